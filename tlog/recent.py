"""The index rows of a log's newest entries, kept in memory until written to storage.

A random-key B-tree index dirties about one page per inserted row once it has more
pages than a batch has rows: on a log of 1M entries each appended entry cost ~7 KB of
WAL for its two index rows, more at 10M. So the SQLite store (tlog/sqlite_store.py)
keeps the rows of its newest entries here and writes them into the stored indexes in
key order, once FOLD_AT entries' rows are held: each stored page is then written about
once per fold, not once per entry. A fold is written in PIECES consecutive prefix
ranges, one per append transaction, so no append waits for a whole fold.

Nothing here is the only copy: every row derives from a stored entry (its leaf hash,
its lookup key), so after a crash the store rebuilds `Memory` from the entries the
stored index does not cover yet (from `Memory.below`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

FOLD_AT = 65536
"""Entries whose rows are held before a fold starts (~13 MB of rows for both indexes)."""

PIECES = 16
"""Append transactions a fold is spread over."""

CATCH_UP_FOLDS = 4
"""On open, rows of more than this many folds are written at once (`Memory.behind`)."""

Rows = list[tuple[int, int]]
"""(prefix, entry index) rows of an index."""


class Recent:
    """A multimap of 64-bit key prefixes to entry indices (most prefixes have one index),
    its prefixes also listed in PIECES runs by key range (`run`).

    Written by one thread; a reader on another thread sees each `add` whole or not at
    all (single dict and list operations, atomic in CPython)."""

    def __init__(self) -> None:
        self._one: dict[int, int] = {}
        self._more: dict[int, list[int]] = {}  # a prefix's indices after the first
        self._runs: list[list[int]] = [[] for _ in range(PIECES)]  # the prefixes, by range

    def add(self, rows: Iterable[tuple[int, int]]) -> None:
        """Record (prefix, index) rows; a row already held is kept once."""
        one, more, runs, count = self._one, self._more, self._runs, len(self._runs)
        for p, ix in rows:
            first = one.get(p)
            if first is None:
                one[p] = ix
                runs[((p + (1 << 63)) * count) >> 64].append(p)
            elif first != ix and ix not in more.get(p, ()):
                more.setdefault(p, []).append(ix)

    def indices(self, prefixes: Iterable[int]) -> set[int]:
        """The indices under any of these prefixes."""
        one, more = self._one, self._more
        found = set()
        for p in prefixes:
            first = one.get(p)
            if first is not None:
                found.add(first)
                if p in more:
                    found.update(more[p])
        return found

    def run(self, k: int) -> Iterator[tuple[int, int]]:
        """The rows whose prefix is in the k-th of PIECES equal ranges of the signed 64-bit
        integers, sorted: the order that writes each B-tree page once. A generator, so
        that SQLite's `executemany` interleaves it with its writes (it lets other threads
        run between rows instead of waiting for the whole list)."""
        one, more = self._one, self._more
        for p in sorted(self._runs[k]):
            if p in more:
                for ix in sorted([one[p], *more[p]]):
                    yield p, ix
            else:
                yield p, one[p]


class Memory:
    """The rows of entries [below, end): those `filling`, and those of a fold in progress
    (`draining`: the rows of [below, drain_end), of whose PIECES runs `piece` are written
    so far). Rows stay readable here until the last piece commits."""

    def __init__(self, below: int) -> None:
        self.below = self.end = self.drain_end = below
        self.leaves, self.keys = Recent(), Recent()
        self.draining: tuple[Recent, Recent] | None = None
        self.piece = 0

    def add(self, end: int, leaves: Rows, keys: Rows) -> None:
        """The rows of entries [self.end, end), committed."""
        self.leaves.add(leaves)
        self.keys.add(keys)
        self.end = end

    def due(self) -> bool:
        """A fold should start: enough rows are filling and none is in progress."""
        return self.draining is None and self.end - self.below >= FOLD_AT

    def behind(self) -> bool:
        """More rows are held than appends fill between folds (CATCH_UP_FOLDS * FOLD_AT):
        only a log whose stored index lacks many entries (written by an older version) is."""
        return self.end - self.below >= CATCH_UP_FOLDS * FOLD_AT

    def pieces_due(self) -> range:
        """The pieces of the fold in progress the next transaction writes: the next one;
        all the rest if another FOLD_AT entries' rows filled meanwhile or memory is
        `behind`; none with no fold in progress."""
        if self.draining is None:
            return range(0)
        if self.end - self.drain_end >= FOLD_AT or self.behind():
            return range(self.piece, PIECES)
        return range(self.piece, self.piece + 1)

    def start_fold(self) -> None:
        """What is filling becomes the fold in progress; new rows fill anew."""
        self.draining = (self.leaves, self.keys)
        self.piece = 0
        self.drain_end = self.end
        self.leaves, self.keys = Recent(), Recent()

    def piece_rows(self, k: int) -> tuple[Iterator[tuple[int, int]], Iterator[tuple[int, int]]]:
        """The leaf and lookup rows piece `k` of the fold in progress writes, sorted."""
        assert self.draining is not None  # noqa: S101 - only while a fold is in progress
        return self.draining[0].run(k), self.draining[1].run(k)

    def piece_written(self) -> None:
        """The next piece committed; after the last, the fold's rows leave memory."""
        self.piece += 1
        if self.piece == PIECES:
            self.draining = None
            self.below = self.drain_end

    def leaf_indices(self, prefixes: Iterable[int]) -> set[int]:
        """Entry indices whose leaf hash may have one of these prefixes."""
        return self._indices(0, tuple(prefixes))

    def key_indices(self, p: int) -> set[int]:
        """Entry indices whose lookup key may have prefix `p`."""
        return self._indices(1, (p,))

    def _indices(self, which: int, prefixes: tuple[int, ...]) -> set[int]:
        """The indices under `prefixes` in the filling and draining multimaps of index
        `which` (0 leaves, 1 lookup keys). Reads the filling ones before `draining`, the
        reverse of the order `start_fold` sets them in, so a reader on another thread never
        misses the rows a fold is taking over."""
        found = (self.leaves, self.keys)[which].indices(prefixes)
        draining = self.draining
        return found if draining is None else found | draining[which].indices(prefixes)
