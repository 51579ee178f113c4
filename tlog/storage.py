"""Log storage as two explicit steps, and the recovery that follows a crash.

An append goes through:
1. sequence: the sequencer gives a batch of entries consecutive indices;
2. persist: entries, their leaf hashes, the hash tiles they change (with the
   inner row of each leaf tile they fill), their lookup keys and the signed
   checkpoint over the grown tree are committed in ONE transaction
   (`Storage.persist`).

Nothing is acknowledged before step 2 has committed, and nothing it wrote is
visible without the rest: a crash before its commit loses only entries nobody
was told about. Storage can still hold entries that no checkpoint covers: a log
written by an earlier version (which committed the checkpoint in a transaction
of its own, after the entries') after a crash between the two, or entries loaded in
bulk. `recover` (run on every open) signs a checkpoint over them
(`Storage.checkpoint`), so recovery is the normal path.

The log holds each entry once. Step 1 looks every entry's leaf hash up in
the leaf index (`Storage.find_leaves`) and among the batch's earlier
entries: an entry already held keeps its index, nothing is written for it,
and its append is answered like the first one (its index and a proof).
Since an entry and its leaf hash commit in the same transaction, after a
crash between any two steps an entry is either held, indexed, or absent:
sending it again after a restart resolves to the one entry. `persist`
refuses an entry whose leaf hash is already held, so a duplicate can never
be written even by mistake. Logs created before the leaf index get it on
open: `recover` indexes the stored entries it lacks, in index order (the
index always covers a prefix of the log; an entry an older log holds twice
keeps its first index).

A full leaf tile's inner row (its 16 level-4 nodes, `tiles.inner_row`) only
makes inclusion proofs cheaper: it commits with the tile, so no crash leaves a
tile without it or it without its tile; the sequencer checks it against the
tree before using one and hashes up the whole tile where a row is absent, so
no proof depends on it. Logs written before inner rows get them on open:
`recover` computes the missing ones from the stored tiles, in index order.

A step that fails (disk full, read-only file system, the database
connection dropped or refused) raises StorageError and acknowledges nothing
of its batch; the next batch starts with `recover` again, so the log
resumes by itself as soon as storage accepts writes, with no restart.

Backends implement `Storage` and raise StorageError for every failure of
the store itself; `faults` lets tests fail or "crash" right after any step
without touching the format code.

One writer at a time: SQLite by an exclusive lock on its file for the
process's lifetime, PostgreSQL by the sequencer lease of tlog/election.py,
whose token every write transaction checks (`fence`; a stale token raises
`Fenced` and commits nothing). Since each new sequencer starts with
`recover` over what storage holds, and nothing is ever deleted, the log
stays append-only across any number of takeovers.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import orjson

from tlog import checkpoint, merkle, note, tiles

STEPS = ("sequence", "persist")

HEX64 = re.compile(r"[0-9a-f]{64}")
"""A request hash: 64 lower-case hex digits."""

FaultHook = Callable[[str], None]
"""Called with a step name right after the step completed; may raise."""


class StorageError(RuntimeError):
    """The stored log is unusable now: corrupt, inconsistent, or the store refused (disk
    full, read-only, database unreachable). The message is one line."""


class Fenced(StorageError):
    """A write refused: this process's sequencer lease token is no longer the current one."""


@dataclass(frozen=True)
class Head:
    """The latest signed checkpoint: size, root and note (with cosignatures)."""

    size: int
    root: bytes
    note: bytes


class Storage(Protocol):
    """What a backend stores. All writes are durable when they return."""

    def size(self) -> int:
        """Number of persisted entries (may exceed the head's size after a crash)."""

    def head(self) -> Head | None:
        """The latest checkpoint, or None for a new log."""

    def recent(self, count: int, below: int | None = None) -> list[Head]:
        """The newest `count` checkpoints (of size below `below`, if given), newest first."""

    def fence(self, token: int) -> None:
        """Commit writes from now on only while `token` is the sequencer lease's token
        (a backend with one writer by construction ignores it)."""

    def ping(self) -> None:
        """Raise unless the store can be read now and is the one opened (readiness)."""

    def read_tile(self, level: int, index: int) -> bytes:
        """Current bytes of a hash tile (b"" if absent)."""

    def read_inner(self, index: int) -> bytes:
        """The inner row (tiles.inner_row) of full leaf tile `index` (b"" if absent)."""

    def read_entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end)."""

    def persist(self, start: int, entries: Sequence[bytes], hashes: Sequence[bytes],
                tiles: dict[tuple[int, int], bytes], keys: Sequence[tuple[str, int]],
                head: Head | None = None) -> None:
        """Step 2: entries from index `start` with their leaf hashes (`hashes[i]` is
        merkle.leaf_hash(entries[i]): the caller has them from sequencing), changed tiles
        (with the inner row of each full leaf tile among them, `inner_rows`), lookup keys
        and `head`, the signed checkpoint of size start + len(entries); atomically.
        Without `head` the entries are left for `recover` to cover, as an older log's
        could be. Raises StorageError (writing nothing) if the log already holds one of
        the entries."""

    def find_leaves(self, hashes: Sequence[bytes]) -> dict[bytes, int]:
        """The index of each of these leaf hashes that the leaf index holds."""

    def leaves_indexed(self) -> int:
        """One past the highest entry index in the leaf index (0 if empty)."""

    def index_leaves(self, start: int, hashes: Sequence[bytes]) -> None:
        """Record the leaf hashes of stored entries from `start`, keeping any already held."""

    def inner_held(self) -> int:
        """One past the highest leaf tile index with a stored inner row (0 if none)."""

    def store_inner(self, start: int, rows: Sequence[bytes]) -> None:
        """Record the inner rows of full leaf tiles from `start`, keeping any already held."""

    def checkpoint(self, head: Head) -> None:
        """Record a signed checkpoint over entries already stored (`recover`)."""

    def update_note(self, size: int, note_bytes: bytes) -> None:
        """Replace the stored note of checkpoint `size` (cosignatures added)."""

    def checkpoint_note(self, size: int) -> bytes | None:
        """The stored note of the checkpoint at `size`, if any."""

    def lookup(self, key: str) -> int | None:
        """Newest entry index recorded under a lookup key (a request hash)."""

    def close(self) -> None: ...


def lookup_key(entry: bytes) -> str | None:
    """The request hash of a receipt entry (JSON with a hex `request_hash`), else None.

    Parsed by orjson; what orjson refuses (NaN, lone surrogates, UTF-16...) is parsed
    by `json` as before, so the answer is always the one `json.loads` gives; nesting
    too deep for either is not a receipt (None), never an error of the append.
    """
    if not entry.startswith(b"{") or b'"request_hash"' not in entry:
        return None
    try:
        try:
            doc = orjson.loads(entry)
        except orjson.JSONDecodeError:
            doc = json.loads(entry)
        value = doc.get("request_hash")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return None
    if isinstance(value, str) and HEX64.fullmatch(value):
        return value
    return None


def node_reader(read_tile: Callable[[int, int], bytes]) -> merkle.NodeReader:
    """A merkle.NodeReader over stored tiles."""

    def node(level: int, index: int) -> bytes:
        tl, ti, _, _ = tiles.locate(level, index)
        return tiles.node_from_tile(read_tile(tl, ti), level, index)

    return node


def sign_head(signer: note.Signer, size: int, root: bytes) -> Head:
    """A signed checkpoint for the tree (size, root)."""
    return Head(size, root, checkpoint.sign(checkpoint.Checkpoint(signer.name, size, root), signer))


INDEX_CHUNK = 4096
"""Entries read and indexed per transaction when an older log gets its leaf index."""


def index_leaves(store: Storage) -> int:
    """Put every stored entry's leaf hash in the leaf index; how many entries were read.

    Cheap when the index is complete (one lookup of the last entry). Otherwise
    indexes from one past the highest indexed entry, in index order.
    """
    size = store.size()
    if size == 0:
        return 0
    last = merkle.leaf_hash(store.read_entries(size - 1, size)[0])
    if store.find_leaves([last]).get(last) == size - 1:
        return 0
    start = done = store.leaves_indexed()
    while start < size:
        entries = store.read_entries(start, min(size, start + INDEX_CHUNK))
        if not entries:
            raise StorageError(f"entries from {start} are missing below size {size}")
        store.index_leaves(start, [merkle.leaf_hash(e) for e in entries])
        start += len(entries)
    return start - done


def inner_rows(changed: dict[tuple[int, int], bytes]) -> list[tuple[int, bytes]]:
    """(index, inner row) of every full leaf tile among `changed` tiles: what `persist`
    stores beside them, in the same transaction."""
    return [(ix, tiles.inner_row(data)) for (level, ix), data in changed.items()
            if level == 0 and len(data) == tiles.TILE_BYTES]


INNER_CHUNK = 1024
"""Leaf tiles read (8 MiB) and inner rows written per transaction when an older log gets them."""


def store_inner_rows(store: Storage) -> int:
    """Give every full leaf tile its inner row; how many rows were computed.

    `persist` writes a tile's row with the tile, so rows always cover the full leaf
    tiles from 0 up to some index, and a log written before them (or by an older
    sequencer) lacks only rows above it. Cheap when complete (one query); otherwise
    computed from the stored tiles in index order, INNER_CHUNK per transaction, so a
    crash part way leaves a shorter prefix that the next open extends.
    """
    full = store.size() >> tiles.HEIGHT
    start = done = store.inner_held()
    while start < full:
        end = min(full, start + INNER_CHUNK)
        rows = []
        for n in range(start, end):
            tile = store.read_tile(0, n)
            if len(tile) != tiles.TILE_BYTES:
                raise StorageError(f"leaf tile {n} is not full below size {full << tiles.HEIGHT}")
            rows.append(tiles.inner_row(tile))
        store.store_inner(start, rows)
        start = end
    return start - done


def recover(store: Storage, signer: note.Signer) -> Head:
    """Bring a store to a signed head covering every persisted entry, every entry in the
    leaf index, every full leaf tile its inner row.

    A new log gets a signed checkpoint of size 0 (root SHA-256("")). Entries
    stored beyond the last checkpoint (an older version's crash, a bulk load) are
    covered by a new checkpoint computed from the stored tiles.
    """
    index_leaves(store)
    store_inner_rows(store)
    size = store.size()
    head = store.head()
    if head is not None and head.size > size:
        raise StorageError(f"checkpoint size {head.size} exceeds the {size} stored entries")
    if head is not None and head.size == size:
        return head
    root = merkle.tree_root(size, node_reader(store.read_tile))
    if head is not None and head.size > 0:
        old = merkle.tree_root(head.size, node_reader(store.read_tile))
        if old != head.root:
            raise StorageError("stored tiles do not match the last checkpoint")
    new = sign_head(signer, size, root)
    store.checkpoint(new)
    return new
