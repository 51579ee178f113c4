"""Read single entries of a C2SP tlog-tiles log, each proven in a verified checkpoint.

`EntryReader(get).entry(index, cp)` fetches the entry bundle that holds `index`
and the hash tiles its inclusion proof needs, at the widths the tree of `cp`
has, and returns the entry only once `merkle.verify_inclusion` proved it
against `cp.root_hash`; `extends(old, cp)` proves, the same way, that an earlier
checkpoint `old` is of a prefix of the tree of `cp` (not of a fork). `cp` must already be verified by the caller (log
signature, witness quorum): the reader trusts nothing the server sends, so a
lying server can only make it fail. Failures are `LogReadError` with a
one-line reason. `getter(base)` reads from an http(s) URL or a directory laid
out as the log serves it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import httpx

from tlog import checkpoint as tcheckpoint
from tlog import merkle, tiles

Getter = Callable[[str], bytes]


class LogReadError(Exception):
    """An entry could not be read or proven; the message is the one-line reason."""


class NotAPrefix(LogReadError):
    """The tiles were read, and the earlier checkpoint is not of a prefix of the tree."""


def getter(base: str, client: httpx.Client | None = None) -> Getter:
    """get(path) -> bytes of a log resource under `base` (URL or directory)."""
    if not base.startswith(("http://", "https://")):
        root = Path(base.removeprefix("file://"))

        def read_file(path: str) -> bytes:
            try:
                with (root / path).open("rb") as f:
                    data = f.read(tiles.WIDTH * (tiles.MAX_ENTRY + 2) + 1)
            except OSError as e:
                raise LogReadError(f"{path}: cannot read ({e.strerror})") from e
            return data
        return read_file
    c = client or httpx.Client(timeout=30)
    url = base.rstrip("/")

    def read_url(path: str) -> bytes:
        try:
            with c.stream("GET", f"{url}/{path}") as r:
                if r.status_code != 200:
                    raise LogReadError(f"{path}: HTTP {r.status_code}")
                data = b""
                for chunk in r.iter_bytes():
                    data += chunk
                    if len(data) > tiles.WIDTH * (tiles.MAX_ENTRY + 2):
                        raise LogReadError(f"{path}: larger than any log resource")
                return data
        except httpx.HTTPError as e:
            raise LogReadError(f"{path}: {type(e).__name__}") from e
    return read_url


class EntryReader:
    """Entries of one log, proven against checkpoints the caller verified."""

    def __init__(self, get: Getter) -> None:
        self.get = get
        self._tiles: dict[tuple[int | None, int, int], bytes] = {}

    def _tile(self, level: int | None, index: int, size: int) -> bytes:
        count = size >> (tiles.HEIGHT * (level or 0))
        width = max(0, min(tiles.WIDTH, count - index * tiles.WIDTH))
        key = (level, index, width)
        if key not in self._tiles:
            self._tiles[key] = self.get(tiles.entries_path(index, width) if level is None
                                        else tiles.path(level, index, width))
        return self._tiles[key]

    def entry(self, index: int, cp: tcheckpoint.Checkpoint) -> bytes:
        """Entry `index` of the tree `cp` describes, proven included in it."""
        if not 0 <= index < cp.size:
            raise LogReadError(f"entry {index} is not in the log's tree of size {cp.size}")
        n, pos = divmod(index, tiles.WIDTH)
        try:
            bundle = tiles.decode_bundle(self._tile(None, n, cp.size))
            entry = bundle[pos]

            def node(level: int, idx: int) -> bytes:
                tl, ti, _, _ = tiles.locate(level, idx)
                return tiles.node_from_tile(self._tile(tl, ti, cp.size), level, idx)

            path = merkle.prove_inclusion(index, cp.size, node)
            merkle.verify_inclusion(merkle.leaf_hash(entry), index, cp.size, path,
                                    cp.root_hash)
        except (tiles.TileError, merkle.ProofError, IndexError) as e:
            raise LogReadError(f"entry {index} is not proven in the checkpoint: {e}") from e
        return entry

    def extends(self, old: tcheckpoint.Checkpoint, cp: tcheckpoint.Checkpoint) -> None:
        """LogReadError unless the tree of `old` is a prefix of the tree of `cp` (a
        consistency proof built from `cp`'s hash tiles, verified against both roots)."""
        if old.size == 0 and old.root_hash == hashlib.sha256(b"").digest():
            return  # the empty tree is a prefix of every tree
        try:
            def node(level: int, idx: int) -> bytes:
                tl, ti, _, _ = tiles.locate(level, idx)
                return tiles.node_from_tile(self._tile(tl, ti, cp.size), level, idx)

            proof = merkle.prove_consistency(old.size, cp.size, node)
            merkle.verify_consistency(old.size, cp.size, proof, old.root_hash, cp.root_hash)
        except (tiles.TileError, merkle.ProofError) as e:
            raise NotAPrefix(f"the checkpoint of size {old.size} is not of this log's "
                             f"tree: {e}") from e
