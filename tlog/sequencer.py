"""The log: batches appends into checkpoints and answers reads.

Appends queue up while the previous batch is being written; each batch is
one storage transaction and one new signed checkpoint (storage.py's steps).
An append resolves only after its checkpoint committed, and, with a witness
quorum, after that checkpoint holds K valid cosignatures. The served
checkpoint never goes backwards and is always consistent with every earlier
one, because it is only ever a signed head of the same append-only tree.

Appends are idempotent: an entry the log already holds (or that an earlier
append of the same batch carries) is not written again; it is answered with
its existing index and a proof against the served checkpoint. An append that
cannot be acknowledged fails with an AppendError whose `code` says why:

- `storage_unavailable`: a storage step failed (disk full, read-only, the
  database gone); nothing of the batch is acknowledged, some of it may be
  durable. The next batch starts by recovering from storage, so appends
  work again as soon as storage does;
- `quorum_not_reached`: the batch is durable and signed, but fewer than K
  witnesses cosigned within the witness timeout. The served checkpoint stays
  the last one that met the quorum; cosigning is retried in the background
  until every witness has cosigned the newest head, and the same entries
  sent again are answered (at their first index) once a checkpoint covering
  them meets the quorum;
- `not_sequencer` (NotSequencer): this replica does not sequence;
- `shutting_down`: the log is stopping or not started.

A Log is in one of two roles. Over SQLite, or with no lease, it is always
the sequencer. With a PostgreSQL lease (tlog/election.py) it starts as a
replica: it serves reads from storage (`refresh` advances the served
checkpoint, never backwards, never to a same-size checkpoint with another
tree) and refuses appends with NotSequencer; `lead` makes it the sequencer
(recover first, then append), `follow` makes it a replica again and fails
every append in flight with NotSequencer. Partial tiles change with every
append, so only the sequencer's own writes put them in the tile cache, and
each role change empties it; full tiles, complete nodes and full bundles
never change and stay cached.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tlog import merkle, note, proof, tiles
from tlog.storage import (
    FaultHook,
    Fenced,
    Head,
    Storage,
    StorageError,
    lookup_key,
    recover,
    sign_head,
)
from tlog.witnessing import QuorumNotReached, WitnessPool, cosigned_note

if TYPE_CHECKING:
    from tlog.election import PostgresLease

log = logging.getLogger("tlog")

MAX_ENTRY = tiles.MAX_ENTRY
SEQUENCER = "sequencer"
REPLICA = "replica"
RECENT_HEADS = 16
"""How many checkpoints are read at a time when looking for the newest that meets the quorum."""
CATCH_UP_PAUSE = (0.25, 5.0)
"""First and longest pause (seconds) between background cosigning rounds while a witness
has not cosigned the newest head."""

STORAGE_UNAVAILABLE = "storage_unavailable"
QUORUM_NOT_REACHED = "quorum_not_reached"
NOT_SEQUENCER = "not_sequencer"
SHUTTING_DOWN = "shutting_down"


class AppendError(Exception):
    """An append could not be acknowledged now; `code` is one of the stable codes above.

    The entry may still be durable: sending it again is safe (appends are idempotent)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotSequencer(AppendError):
    """This replica does not sequence; `sequencer` is the URL of the one that does, if known."""

    def __init__(self, sequencer: str | None) -> None:
        super().__init__(NOT_SEQUENCER, "this log replica is not the sequencer")
        self.sequencer = sequencer


class Paths:
    """The inclusion paths of one batch's entries under one tree size, all computed on the
    first ask (`merkle.prove_inclusions`, sharing what neighbouring paths share). A
    compact `/add-batch` answer never asks: it proves the batch with one proof."""

    def __init__(self, indices: Iterable[int], size: int, node: merkle.NodeReader) -> None:
        self._indices: Iterable[int] | None = indices
        self._size = size
        self._node: merkle.NodeReader | None = node
        self._paths: dict[int, tuple[bytes, ...]] = {}
        self.b64: dict[bytes, bytes] = {}
        """The base64 of path hashes, shared by the batch's formatted proofs (most of
        neighbouring entries' paths are the same hashes)."""

    def __getitem__(self, index: int) -> tuple[bytes, ...]:
        if self._indices is not None and self._node is not None:
            self._paths = merkle.prove_inclusions(self._indices, self._size, self._node, {})
            self._indices = self._node = None  # the node reader's scratch goes with it
        return self._paths[index]


@dataclass(frozen=True)
class Added:
    """An acknowledged entry: its index and inclusion path under `head`, a served
    checkpoint covering it. The path and the tlog-proof text are computed only when
    asked for (a compact `/add-batch` answer asks for neither)."""

    index: int
    head: Head
    paths: Paths
    entry: bytes

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """The inclusion path under `head`, leaf side first."""
        return self.paths[self.index]

    @property
    def checkpoint(self) -> bytes:
        """The signed (and cosigned) checkpoint note."""
        return self.head.note

    @property
    def proof(self) -> bytes:
        """What POST /add answers as `proof`: c2sp.org/tlog-proof@v1 text, `extra` the entry
        (formatted with the base64 memo the batch's answers share, `Paths.b64`)."""
        return proof.TlogProof(self.index, self.hashes, self.head.note,
                               self.entry).format(self.paths.b64)


Pending = tuple[list[bytes], "asyncio.Future[list[Added]]"]
"""Entries queued together by one `add` or `add_many`, and the future of their answers."""


class _Cache(dict[tuple[int, int], bytes]):
    """A bounded map: emptied when full. Single dict operations are atomic
    under the GIL, so the writer thread and readers may share it."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self._limit = limit

    def put(self, key: tuple[int, int], value: bytes) -> None:
        if len(self) >= self._limit:
            self.clear()
        self[key] = value


class Log:
    """One log: a store, a signer, an optional witness pool, an optional sequencer lease."""

    def __init__(
        self,
        store: Storage,
        signer: note.Signer,
        *,
        witnesses: WitnessPool | None = None,
        lease: PostgresLease | None = None,
        max_batch: int = 4096,  # entries a batch takes, in whole groups (one may exceed it)
        faults: FaultHook | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.origin = signer.name
        self.witnesses = witnesses
        self.lease = lease
        self.max_batch = max_batch
        self._faults = faults
        self._tiles = _Cache(4096)
        self._nodes = _Cache(1 << 18)
        self._bundles = _Cache(1024)
        self._edge: tuple[tuple[int, bytes], dict[tuple[int, int], bytes]] = ((0, b""), {})
        """(size, root) of the last head single proofs were served against, and its
        right-edge memo (`_edge_memo`)."""
        self._cache_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._generation = 0
        self._stale = False
        """A batch failed: the next one first reloads what storage holds."""
        self.duplicates = 0
        """Appends answered with the index of an entry the log already held."""
        self.refusals: collections.Counter[str] = collections.Counter()
        """Appends not acknowledged, by AppendError code."""
        self.sequencer_url: str | None = None
        self.term: int | None = None
        """The lease token this log sequences under (None: no lease, or a replica)."""
        if lease is None:
            self.role = SEQUENCER
            self.head: Head = recover(store, signer)
        else:  # a replica until elected: read only, nothing written before the lease
            self.role = REPLICA
            self.head = store.head() or sign_head(signer, 0, merkle.EMPTY_ROOT)
        self.size = self.head.size
        self.served: Head = self._last_witnessed()
        self._queue: asyncio.Queue[Pending] | None = None
        self._task: asyncio.Task[None] | None = None
        self._cosign_task: asyncio.Task[None] | None = None
        self._campaign_task: asyncio.Task[None] | None = None
        self._cosign_lock = asyncio.Lock()

    # -- reads -------------------------------------------------------------

    def read_tile(self, level: int, index: int) -> bytes:
        """Current bytes of a stored tile; full tiles are cached (they never change)."""
        cached = self._tiles.get((level, index))
        if cached is None:
            cached = self.store.read_tile(level, index)
            if len(cached) == tiles.TILE_BYTES:
                self._tiles.put((level, index), cached)
        return cached

    def node(self, level: int, index: int) -> bytes:
        """merkle.NodeReader over the stored tiles; complete nodes never change.

        A node inside an upper tile (level 8 and above) is hashed up with every node
        on the way cached: there are 256 times fewer of those than of level-0 nodes,
        and every proof crosses them.
        """
        h = self._nodes.get((level, index))
        if h is None:
            if level >= tiles.HEIGHT and level % tiles.HEIGHT:
                return self._hash_up(level, index, self._nodes.put)
            tl, ti, _, _ = tiles.locate(level, index)
            h = tiles.node_from_tile(self.read_tile(tl, ti), level, index)
            self._nodes.put((level, index), h)
        return h

    def _batch_node(self, scratch: dict[tuple[int, int], bytes]) -> merkle.NodeReader:
        """`node` for many proofs of neighbouring leaves: a node inside a tile is hashed up
        once, every node on the way kept in `scratch` (thrown away with the batch, so
        random single proofs never fill the shared cache with them)."""

        def node(level: int, index: int) -> bytes:
            h = scratch.get((level, index))
            if h is not None:
                return h
            if level % tiles.HEIGHT == 0 or (level, index) in self._nodes:
                return self.node(level, index)
            h = self._hash_up(level, index, scratch.__setitem__)
            self._nodes.put((level, index), h)
            return h

        return node

    def _hash_up(self, level: int, index: int,
                 keep: Callable[[tuple[int, int], bytes], None]) -> bytes:
        """Node (level, index), not at a tile's base level, hashed up from its tile;
        `keep` gets every node computed on the way, the asked one last."""
        tl, ti, first, count = tiles.locate(level, index)
        tile = self.read_tile(tl, ti)
        if len(tile) < (first + count) * merkle.HASH_SIZE:
            raise tiles.TileError("tile too short for the requested node")
        layers = tiles.run_layers(tile[first * merkle.HASH_SIZE:
                                       (first + count) * merkle.HASH_SIZE])
        base, start = tl * tiles.HEIGHT, index << (level - tl * tiles.HEIGHT)
        for up, layer in enumerate(layers, 1):
            for j in range(0, len(layer), merkle.HASH_SIZE):
                keep((base + up, (start >> up) + j // merkle.HASH_SIZE),
                     layer[j:j + merkle.HASH_SIZE])
        return layers[-1]

    def tile(self, level: int, index: int, width: int) -> bytes | None:
        """Hash tile (level, index) at `width`, or None beyond the served tree."""
        count = self.served.size >> (tiles.HEIGHT * level)
        if index * tiles.WIDTH + width > count:
            return None
        data = self.read_tile(level, index)
        return data[: width * merkle.HASH_SIZE]

    def bundle(self, index: int, width: int) -> bytes | None:
        """Entry bundle `index` at `width`, or None beyond the served tree."""
        start = index * tiles.WIDTH
        if start + width > self.served.size:
            return None
        if width == tiles.WIDTH:
            cached = self._bundles.get((0, index))
            if cached is None:
                cached = tiles.encode_bundle(self._entries(start, start + width))
                self._bundles.put((0, index), cached)
            return cached
        return tiles.encode_bundle(self._entries(start, start + width))

    def _entries(self, start: int, end: int) -> list[bytes]:
        """Stored entries [start, end), all of them (StorageError rather than a short read)."""
        entries = self.store.read_entries(start, end)
        if len(entries) != end - start:
            raise StorageError(f"storage returned {len(entries)} of entries {start}..{end - 1}")
        return entries

    def consistency(self, old: int, new: int) -> list[bytes]:
        """Consistency proof between two sizes of the served tree."""
        if not 0 < old <= new <= self.served.size:
            raise merkle.ProofError(f"no consistency proof from {old} to {new}")
        return merkle.prove_consistency(old, new, self.node)

    def prove(self, index: int, entry: bytes, head: Head | None = None,
              memo: dict[tuple[int, int], bytes] | None = None) -> bytes:
        """tlog-proof text for entry `index` against `head` (default: served).

        Proofs against one head may share a `memo` of its right-edge hashes.
        """
        h = head or self.served
        return proof.TlogProof(index, self.inclusion(index, h, memo), h.note, entry).format()

    def inclusion(self, index: int, head: Head,
                  memo: dict[tuple[int, int], bytes] | None = None) -> tuple[bytes, ...]:
        """The inclusion path of entry `index` under `head`, leaf side first."""
        node = self.node
        if index | (tiles.WIDTH - 1) < head.size:  # its leaf tile is full under `head`
            low = self._tile_path(index)

            def node(level: int, i: int) -> bytes:
                h = low.get((level, i))
                return self.node(level, i) if h is None else h

        return tuple(merkle.prove_inclusion(index, head.size, node, memo))

    def batch_inclusion(self, indices: Iterable[int], head: Head) -> list[bytes]:
        """One proof of the inclusion of every entry in `indices` under `head`
        (`merkle.prove_batch`)."""
        return merkle.prove_batch(indices, head.size, self._batch_node({}), {})

    def _tile_path(self, index: int) -> dict[tuple[int, int], bytes]:
        """The 8 nodes of the inclusion path of leaf `index` inside its full leaf tile:
        (level, (index >> level) ^ 1) for levels 0..7, each from the node cache or else
        from `_tile_runs` (computed once) and cached, as `node` would give it."""
        out: dict[tuple[int, int], bytes] = {}
        runs: list[tuple[bytes, int]] = []
        for level in range(tiles.HEIGHT):
            key = (level, (index >> level) ^ 1)
            h = self._nodes.get(key)
            if h is None:
                if not runs:
                    runs = self._tile_runs(index)
                run, first = runs[level]
                j = (key[1] - first) * merkle.HASH_SIZE
                h = run[j:j + merkle.HASH_SIZE]
                self._nodes.put(key, h)
            out[key] = h
        return out

    def _tile_runs(self, index: int) -> list[tuple[bytes, int]]:
        """For each level 0..7, a run of nodes inside leaf `index`'s full leaf tile holding
        its path node at that level: (the nodes concatenated, the index of the first).

        With the tile's inner row (tiles.inner_row): levels 0..3 from the leaf's 16-leaf
        group hashed up, 4..7 from the row hashed up (30 SHA-256); the group must hash to
        its node in the row and the row to the tile's node in the level-1 tile, else
        StorageError: a wrong row is refused, never served. Without one (a log not yet
        given them, a backend without them): the whole tile hashed up (255 SHA-256),
        checked against the same level-1 node.
        """
        n, low = index >> tiles.HEIGHT, tiles.INNER_LEVEL
        tile = self.read_tile(0, n)
        if len(tile) != tiles.TILE_BYTES:
            raise tiles.TileError("leaf tile too short for a full tile's path")
        top = self.node(tiles.HEIGHT, n)
        inner = self.store.read_inner(n)
        if not inner:
            layers = [tile, *tiles.run_layers(tile)]
            if layers[-1] != top:
                raise StorageError(f"leaf tile {n} does not hash to its node in the level-1 tile")
            return [(layers[lv], n << (tiles.HEIGHT - lv)) for lv in range(tiles.HEIGHT)]
        if len(inner) != tiles.INNER_BYTES:
            raise StorageError(f"the inner row of leaf tile {n} is {len(inner)} bytes, "
                               f"not {tiles.INNER_BYTES}")
        upper = [inner, *tiles.run_layers(inner)]
        if upper[-1] != top:
            raise StorageError(f"the inner row of leaf tile {n} does not hash to its node "
                               "in the level-1 tile")
        g = index >> low  # the leaf's level-4 node, the root of its group
        k = g & ((1 << (tiles.HEIGHT - low)) - 1)  # its position in the tile and the row
        span = merkle.HASH_SIZE << low
        group = tile[k * span:(k + 1) * span]
        lower = [group, *tiles.run_layers(group)]
        if lower[-1] != inner[k * merkle.HASH_SIZE:(k + 1) * merkle.HASH_SIZE]:
            raise StorageError(f"leaf tile {n} does not hash to its inner row")
        return ([(lower[lv], g << (low - lv)) for lv in range(low)]
                + [(upper[lv - low], n << (tiles.HEIGHT - lv))
                   for lv in range(low, tiles.HEIGHT)])

    def proof_for(self, request_hash: str) -> bytes | None:
        """tlog-proof of the newest receipt with that request hash, if served."""
        index = self.store.lookup(request_hash)
        head = self.served
        if index is None or index >= head.size:
            return None
        return self.prove(index, self._entries(index, index + 1)[0], head, self._edge_memo(head))

    def _edge_memo(self, head: Head) -> dict[tuple[int, int], bytes]:
        """The memo of `head`'s right edge, shared by every proof against it: merkle.range_hash
        keeps only incomplete ranges in it, all ending at `head.size` (O(log size) hashes).
        A fresh one for another head, so it holds one head's edge only."""
        tree, memo = self._edge
        if tree != (head.size, head.root):
            memo = {}
            self._edge = ((head.size, head.root), memo)
        return memo

    # -- what is served ----------------------------------------------------

    def _verified(self, head: Head, new: list[note.Signature] | None = None) -> Head:
        """`head` carrying only the log's signature and valid witness cosignatures."""
        verifiers = self.witnesses.verifiers if self.witnesses is not None else []
        text, _ = cosigned_note(head.note, (self.signer.name, self.signer.key_id), new or [],
                                verifiers)
        return Head(head.size, head.root, text)

    def cosigners(self, head: Head) -> int:
        """Distinct witness keys with a valid cosignature on `head`."""
        return self.witnesses.count(head.note) if self.witnesses is not None else 0

    def _servable(self, heads: list[Head]) -> Head | None:
        """The newest of `heads` (newest first) that meets the quorum, verified."""
        quorum = self.witnesses.quorum if self.witnesses is not None else 0
        for h in heads:
            v = self._verified(h)
            if v.size == 0 or self.cosigners(v) >= quorum:
                return v
        return None

    def _last_witnessed(self) -> Head:
        """The newest stored checkpoint that meets the quorum, verified; the signed empty
        tree if none does. Never a checkpoint below the quorum."""
        below = None
        while True:
            heads = self.store.recent(RECENT_HEADS, below)
            best = self._servable(heads)
            if best is not None:
                return best
            if len(heads) < RECENT_HEADS:
                return self._verified(sign_head(self.signer, 0, merkle.EMPTY_ROOT))
            below = heads[-1].size

    def _advance_served(self, head: Head) -> None:
        """Serve `head` if it is newer, or the same tree with more cosignatures; never back."""
        s = self.served
        if head.size < s.size or head.note == s.note:
            return
        if head.size == s.size:
            if note.split(head.note)[0] != note.split(s.note)[0]:
                log.error("storage holds two different checkpoints of size %d; "
                          "serving the first", head.size)
                return
            if self.cosigners(head) <= self.cosigners(s):
                return
        self.served = head

    async def refresh(self) -> None:
        """Replica: serve the newest checkpoint storage holds that meets the quorum."""
        heads = await asyncio.to_thread(self.store.recent, RECENT_HEADS if self._quorum() else 1)
        best = self._servable(heads)
        if best is not None and self.role == REPLICA:
            self._advance_served(best)
            self.head, self.size = self.served, self.served.size

    # -- roles -------------------------------------------------------------

    async def lead(self, token: int) -> None:
        """Become the sequencer under lease `token`: recover from storage, then append.

        Raises (and stays a replica) if storage refuses, e.g. the token is already stale.
        """
        self.store.fence(token)
        self._new_generation()
        head = await asyncio.to_thread(self._recover)
        self.head, self.size = head, head.size
        if self._quorum() == 0:
            self._advance_served(self._verified(head))
        self.role, self.term = SEQUENCER, token
        self.sequencer_url = self.lease.advertise if self.lease is not None else None
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())
        self._schedule_cosign()
        log.info("sequencing from size %d (lease token %d)", head.size, token)

    async def follow(self, sequencer: str | None) -> None:
        """Be a replica of the sequencer at `sequencer` (None: unknown); appends in flight
        fail with NotSequencer."""
        self.sequencer_url = sequencer
        if self.role != SEQUENCER:
            return
        self._step_down()
        for t in (self._task, self._cosign_task):
            if t is not None and t is not asyncio.current_task():
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        log.warning("no longer the sequencer (now: %s)", sequencer or "unknown")

    def _step_down(self) -> None:
        self.role, self.term = REPLICA, None
        self._new_generation()
        self._drain(NotSequencer(self.sequencer_url))
        if self._cosign_task is not None and self._cosign_task is not asyncio.current_task():
            self._cosign_task.cancel()

    def _drain(self, err: Exception) -> None:
        """Stop taking appends; every queued one fails with `err`."""
        queue, self._queue = self._queue, None
        while queue is not None and not queue.empty():
            _, fut = queue.get_nowait()
            if not fut.done():
                fut.set_exception(err)

    def _new_generation(self) -> None:
        """Partial tiles cached so far may be stale from now on: drop them."""
        with self._cache_lock:
            self._generation += 1
            self._tiles.clear()

    def _recover(self) -> Head:
        with self._commit_lock:  # a commit of an earlier term finishes first
            return recover(self.store, self.signer)

    def _reload(self) -> None:
        """Start again from what storage holds (caller holds the commit lock)."""
        self._new_generation()
        self._nodes.clear()
        self.head = recover(self.store, self.signer)
        self.size = self.head.size

    def _quorum(self) -> int:
        return self.witnesses.quorum if self.witnesses is not None else 0

    # -- appends -----------------------------------------------------------

    async def start(self) -> None:
        """Start sequencing (cosigning the current head in the background) or, with a
        lease, start campaigning for it (waiting up to a lease ttl for the first round,
        so a lone replica is already the sequencer when it starts serving)."""
        if self.witnesses is not None:
            await self.witnesses.start()
        if self.lease is not None:
            from tlog.election import campaign

            first = asyncio.Event()
            self._campaign_task = asyncio.create_task(campaign(self, self.lease, first))
            with contextlib.suppress(TimeoutError):  # the role settles before serving
                await asyncio.wait_for(first.wait(), self.lease.ttl)
            return
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())
        self._schedule_cosign()

    async def close(self) -> None:
        self._drain(AppendError(SHUTTING_DOWN, "the log is shutting down"))
        for t in (self._campaign_task, self._task, self._cosign_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if self.lease is not None:
            if self.role == SEQUENCER:
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.lease.resign)
            await asyncio.to_thread(self.lease.close)
        if self.witnesses is not None:
            await self.witnesses.close()

    async def add(self, entry: bytes) -> Added:
        """Append; returns once the entry is durable and under a served checkpoint."""
        return (await self._submit([entry]))[0]

    async def add_many(self, entries: list[bytes]) -> list[Added | AppendError]:
        """Append several entries (queued together, so one batch); each result is what
        `add` returns or raises for that entry, in order."""
        if not entries:
            return []
        try:
            return await self._submit(entries)  # type: ignore[return-value]
        except AppendError as e:
            return [e] * len(entries)

    async def _submit(self, entries: list[bytes]) -> list[Added]:
        """Queue `entries` as one group (never split across batches); their answers, in
        order, or the AppendError that refused the whole batch."""
        if self._queue is None:
            if self.lease is not None:
                raise NotSequencer(self.sequencer_url)
            raise AppendError(SHUTTING_DOWN, "the log is not started")
        fut: asyncio.Future[list[Added]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((entries, fut))  # unbounded: never waits
        return await fut

    def _fault(self, step: str) -> None:
        if self._faults is not None:
            self._faults(step)

    def _commit(self, entries: list[bytes]) -> tuple[Head, list[int]]:
        """Both steps for one batch (runs in a worker thread): the head covering the batch
        and each entry's index. An entry the log holds, or that an earlier entry of the
        batch carries, keeps that index and is not written again; a batch of such entries
        writes nothing."""
        with self._commit_lock:
            if self._stale:
                self._reload()
                self._stale = False
            generation = self._generation
            start = self.size
            hashes = [merkle.leaf_hash(e) for e in entries]
            held = self.store.find_leaves(hashes)
            indices: list[int] = []
            fresh: list[int] = []  # positions in `entries` of those new to the log
            for i, h in enumerate(hashes):
                if h not in held:
                    held[h] = start + len(fresh)
                    fresh.append(i)
                indices.append(held[h])
            self.duplicates += len(entries) - len(fresh)
            new = [entries[i] for i in fresh]
            self._fault("sequence")
            if new:
                new_hashes = [hashes[i] for i in fresh]
                changed = tiles.extend(start, new_hashes, self.read_tile)
                keys = [(k, start + j) for j, e in enumerate(new)
                        if (k := lookup_key(e)) is not None]
                size = start + len(new)
                head = sign_head(self.signer, size,
                                 merkle.tree_root(size, self._changed_node(changed)))
                self.store.persist(start, new, new_hashes, changed, keys, head)
                with self._cache_lock:
                    if generation == self._generation:
                        for key, data in changed.items():
                            self._tiles.put(key, data)
                self.size, self.head = size, head
            self._fault("persist")
            return self.head, indices

    def _changed_node(self, changed: dict[tuple[int, int], bytes]) -> merkle.NodeReader:
        """`node` over the stored tiles with `changed` ones in their place: the tree a batch
        makes, read before it is stored (nothing read from `changed` is cached)."""

        def node(level: int, index: int) -> bytes:
            tl, ti, _, _ = tiles.locate(level, index)
            data = changed.get((tl, ti))
            if data is None:
                return self.node(level, index)
            return tiles.node_from_tile(data, level, index)

        return node

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None  # noqa: S101 - type narrowing: created by start()
        batch: list[Pending] = []
        try:
            while True:
                batch = [await queue.get()]
                count = len(batch[0][0])
                while count < self.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                    count += len(batch[-1][0])
                if not await self._append(batch):
                    return
        except asyncio.CancelledError:
            self._fail(batch, NotSequencer(self.sequencer_url) if self.role == REPLICA
                       else AppendError(SHUTTING_DOWN, "the log is shutting down"))
            raise

    async def _append(self, batch: list[Pending]) -> bool:
        """One batch through both steps, answered; False once this log may no longer
        sequence."""
        entries = [e for group, _ in batch for e in group]
        try:
            head, indices = await asyncio.to_thread(self._commit, entries)
            if self._quorum() > 0:
                if max(indices) >= self.served.size:
                    await self._cosign(head)
            elif head.size > self.served.size:
                self.served = head
            self._schedule_cosign()
            answers = self._answers(entries, indices)
        except QuorumNotReached as e:
            self._fail(batch, AppendError(QUORUM_NOT_REACHED, f"witness quorum not reached "
                                          f"({e}); the entry is durable: send it again later"))
            self._schedule_cosign()
            return True
        except Fenced as e:  # another replica took the lease: nothing here is acknowledged
            log.error("append batch fenced: %s", e)
            self._fail(batch, NotSequencer(None))
            self._step_down()
            return False
        except Exception as e:  # storage failed: nothing of this batch is acknowledged
            log.error("append batch failed: %s", (str(e).splitlines() or [type(e).__name__])[0])
            self._stale = True
            self._fail(batch, AppendError(STORAGE_UNAVAILABLE, "log storage failed; nothing "
                                          "was acknowledged: send the entry again"))
            return True
        at = 0
        for group, fut in batch:
            if not fut.done():
                fut.set_result(answers[at:at + len(group)])
            at += len(group)
        return True

    def _answers(self, entries: list[bytes], indices: list[int]) -> list[Added]:
        """Each entry's index and proof against the served checkpoint, which covers them."""
        served = self.served
        if max(indices) >= served.size:
            raise QuorumNotReached(f"the served checkpoint (size {served.size}) does not "
                                   "cover the batch")
        paths = Paths(indices, served.size, self._batch_node({}))
        return [Added(i, served, paths, entry)
                for entry, i in zip(entries, indices, strict=True)]

    def _fail(self, batch: list[Pending], err: AppendError) -> None:
        for group, fut in batch:
            if not fut.done():
                fut.set_exception(err)
                self.refusals[err.code] += len(group)

    async def _cosign(self, head: Head) -> None:
        """Gather verified cosignatures for `head`, persist them and serve it (with a quorum,
        only if it meets it: QuorumNotReached otherwise)."""
        assert self.witnesses is not None  # noqa: S101 - type narrowing: only called with witnesses configured
        async with self._cosign_lock:
            if head.size < self.served.size:
                return  # a newer checkpoint is served; witnesses would refuse this one
            late = functools.partial(self._add_late, head.size)
            sigs = await self.witnesses.cosign(head.note, head.size, self._prove_for_witness,
                                               late)
            base = self.served if self.served.size == head.size else head
            await self._keep(self._verified(base, sigs), base)

    async def _add_late(self, size: int, sigs: list[note.Signature]) -> None:
        """Cosignatures that arrived after the quorum was met: added to the served
        checkpoint if it is still the one of `size`."""
        try:
            async with self._cosign_lock:
                if self.served.size == size:
                    await self._keep(self._verified(self.served, sigs), self.served)
        except Exception as e:  # noqa: BLE001 - storing extra cosignatures is best effort
            log.warning("storing late cosignatures failed: %s", e)

    async def _keep(self, cosigned: Head, base: Head) -> None:
        """Store `cosigned` (base's checkpoint with more cosignatures) and serve it."""
        if cosigned.note != base.note:
            await asyncio.to_thread(self.store.update_note, cosigned.size, cosigned.note)
        self._advance_served(cosigned)

    def _prove_for_witness(self, old: int, new: int) -> list[bytes]:
        return merkle.prove_consistency(old, new, self.node)

    def _witnessed_by_all(self, head: Head) -> bool:
        """`head` is served and every witness URL has cosigned its size."""
        assert self.witnesses is not None  # noqa: S101 - type narrowing: only called with witnesses configured
        return self.served.size >= head.size and all(
            st.size >= head.size for st in self.witnesses.status.values())

    def _schedule_cosign(self) -> None:
        """Cosign the newest head in the background (one task at a time) until every
        witness has cosigned it, pausing between rounds while one does not answer."""
        if self.witnesses is None or self.role != SEQUENCER or (
                self._cosign_task is not None and not self._cosign_task.done()):
            return
        self._cosign_task = asyncio.create_task(self._catch_up())

    async def _catch_up(self) -> None:
        first, longest = CATCH_UP_PAUSE
        pause = first
        while True:
            head = self.head
            if self._witnessed_by_all(head):
                return
            try:
                await self._cosign(head)
            except QuorumNotReached:
                pass
            except Fenced:
                return
            except Exception as e:  # noqa: BLE001 - storage refused the cosignatures: retry
                log.warning("storing cosignatures failed: %s", e)
            if self.head.size != head.size:
                pause = first
                continue
            if self._witnessed_by_all(head):
                return
            await asyncio.sleep(pause)
            pause = min(2 * pause, longest)
