"""Log storage as three explicit steps, and the recovery that follows a crash.

An append goes through:
1. sequence: the sequencer gives a batch of entries consecutive indices;
2. persist: entries, the hash tiles they change and their lookup keys are
   committed in ONE transaction (`Storage.persist`);
3. checkpoint: the new tree head is signed and committed (`Storage.checkpoint`).

Nothing is acknowledged before step 3 has committed. A crash between 2 and 3
leaves entries that no checkpoint covers yet; `recover` (run on every open)
signs a checkpoint over them, so recovery is the normal path. A crash before
2 commits loses only entries nobody was told about.

Backends implement `Storage`; `faults` lets tests fail or "crash" right after
any step without touching the format code.

One writer at a time: SQLite by an exclusive lock on its file for the
process's lifetime, PostgreSQL by the sequencer lease of tlog/election.py,
whose token every write transaction checks (`fence`; a stale token raises
`Fenced` and commits nothing). Since each new sequencer starts with
`recover` over what storage holds, and nothing is ever deleted, the log
stays append-only across any number of takeovers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from tlog import checkpoint, merkle, note, tiles

STEPS = ("sequence", "persist", "checkpoint")

FaultHook = Callable[[str], None]
"""Called with a step name right after the step completed; may raise."""


class StorageError(RuntimeError):
    """The stored log is unusable (corrupt, inconsistent or unreachable)."""


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

    def recent(self, count: int) -> list[Head]:
        """The newest `count` checkpoints, newest first."""

    def fence(self, token: int) -> None:
        """Commit writes from now on only while `token` is the sequencer lease's token
        (a backend with one writer by construction ignores it)."""

    def ping(self) -> None:
        """Raise unless the store can be read now and is the one opened (readiness)."""

    def read_tile(self, level: int, index: int) -> bytes:
        """Current bytes of a hash tile (b"" if absent)."""

    def read_entries(self, start: int, end: int) -> list[bytes]:
        """Entries [start, end)."""

    def persist(self, start: int, entries: Sequence[bytes], tiles: dict[tuple[int, int], bytes],
                keys: Sequence[tuple[str, int]]) -> None:
        """Step 2: entries from index `start`, changed tiles, lookup keys; atomically."""

    def checkpoint(self, head: Head) -> None:
        """Step 3: record a new signed checkpoint."""

    def update_note(self, size: int, note_bytes: bytes) -> None:
        """Replace the stored note of checkpoint `size` (cosignatures added)."""

    def checkpoint_note(self, size: int) -> bytes | None:
        """The stored note of the checkpoint at `size`, if any."""

    def lookup(self, key: str) -> int | None:
        """Newest entry index recorded under a lookup key (a request hash)."""

    def close(self) -> None: ...


def lookup_key(entry: bytes) -> str | None:
    """The request hash of a receipt entry (JSON with a hex `request_hash`), else None."""
    if not entry.startswith(b"{") or b'"request_hash"' not in entry:
        return None
    try:
        value = json.loads(entry).get("request_hash")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
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


def recover(store: Storage, signer: note.Signer) -> Head:
    """Bring a store to a signed head covering every persisted entry.

    A new log gets a signed checkpoint of size 0 (root SHA-256("")). Entries
    persisted after the last checkpoint (a crash between steps 2 and 3) are
    covered by a new checkpoint computed from the stored tiles.
    """
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
