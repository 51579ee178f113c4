"""The log: batches appends into checkpoints and answers reads.

Appends queue up while the previous batch is being written; each batch is
one storage transaction and one new signed checkpoint (storage.py's steps).
An append resolves only after its checkpoint committed, and, with a witness
quorum, after that checkpoint holds K valid cosignatures. The served
checkpoint never goes backwards and is always consistent with every earlier
one, because it is only ever a signed head of the same append-only tree.

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
import contextlib
import logging
import threading
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
"""How many of the newest checkpoints a replica looks through for one that meets the quorum."""


class AppendError(Exception):
    """An append could not be acknowledged (the entry may still be durable)."""


class NotSequencer(AppendError):
    """This replica does not sequence; `sequencer` is the URL of the one that does, if known."""

    def __init__(self, sequencer: str | None) -> None:
        super().__init__("this log replica is not the sequencer")
        self.sequencer = sequencer


@dataclass(frozen=True)
class Added:
    """What POST /add answers."""

    index: int
    checkpoint: bytes
    proof: bytes


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
        max_batch: int = 4096,
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
        self._cache_lock = threading.Lock()
        self._commit_lock = threading.Lock()
        self._generation = 0
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
        self.served: Head = self._servable([self.head]) or self._verified(self.head)
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[Added]]] | None = None
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
        """merkle.NodeReader over the stored tiles; complete nodes never change."""
        h = self._nodes.get((level, index))
        if h is None:
            tl, ti, _, _ = tiles.locate(level, index)
            h = tiles.node_from_tile(self.read_tile(tl, ti), level, index)
            self._nodes.put((level, index), h)
        return h

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
                cached = tiles.encode_bundle(self.store.read_entries(start, start + width))
                self._bundles.put((0, index), cached)
            return cached
        return tiles.encode_bundle(self.store.read_entries(start, start + width))

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
        hashes = tuple(merkle.prove_inclusion(index, h.size, self.node, memo))
        return proof.TlogProof(index, hashes, h.note, entry).format()

    def proof_for(self, request_hash: str) -> bytes | None:
        """tlog-proof of the newest receipt with that request hash, if served."""
        index = self.store.lookup(request_hash)
        if index is None or index >= self.served.size:
            return None
        return self.prove(index, self.store.read_entries(index, index + 1)[0])

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

    def _quorum(self) -> int:
        return self.witnesses.quorum if self.witnesses is not None else 0

    # -- appends -----------------------------------------------------------

    async def start(self) -> None:
        """Start sequencing (with witnesses, cosign the current head first) or, with a
        lease, start campaigning for it."""
        if self.witnesses is not None:
            await self.witnesses.start()
        if self.lease is not None:
            from tlog.election import campaign

            self._campaign_task = asyncio.create_task(campaign(self, self.lease))
            return
        self._queue = asyncio.Queue()
        if self.witnesses is not None and self.head.size > 0:
            with contextlib.suppress(QuorumNotReached):
                await self._cosign(self.head)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._drain(AppendError("the log is shutting down"))
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
        if self._queue is None:
            if self.lease is not None:
                raise NotSequencer(self.sequencer_url)
            raise AppendError("log not started")
        fut: asyncio.Future[Added] = asyncio.get_running_loop().create_future()
        await self._queue.put((entry, fut))
        return await fut

    def _fault(self, step: str) -> None:
        if self._faults is not None:
            self._faults(step)

    def _commit(self, entries: list[bytes]) -> Head:
        """Steps 1-3 for one batch (runs in a worker thread)."""
        with self._commit_lock:
            generation = self._generation
            start = self.size
            hashes = [merkle.leaf_hash(e) for e in entries]
            changed = tiles.extend(start, hashes, self.read_tile)
            keys = [(k, start + i) for i, e in enumerate(entries)
                    if (k := lookup_key(e)) is not None]
            self._fault("sequence")
            self.store.persist(start, entries, changed, keys)
            with self._cache_lock:
                if generation == self._generation:
                    for key, data in changed.items():
                        self._tiles.put(key, data)
            self.size = start + len(entries)
            self._fault("persist")
            head = sign_head(self.signer, self.size, merkle.tree_root(self.size, self.node))
            self.store.checkpoint(head)
            self.head = head
            self._fault("checkpoint")
            return head

    def _reload(self) -> None:
        """After a failed batch: start again from what storage holds."""
        self._new_generation()
        self._nodes.clear()
        self.head = self._recover()
        self.size = self.head.size

    async def _run(self) -> None:
        queue = self._queue
        assert queue is not None
        batch: list[tuple[bytes, asyncio.Future[Added]]] = []
        try:
            while True:
                batch = [await queue.get()]
                while len(batch) < self.max_batch and not queue.empty():
                    batch.append(queue.get_nowait())
                if not await self._append(batch):
                    return
        except asyncio.CancelledError:
            self._fail(batch, NotSequencer(self.sequencer_url) if self.role == REPLICA
                       else AppendError("the log is shutting down"))
            raise

    async def _append(self, batch: list[tuple[bytes, asyncio.Future[Added]]]) -> bool:
        """One batch through the three steps; False once this log may no longer sequence."""
        entries = [e for e, _ in batch]
        start = self.size
        try:
            head = await asyncio.to_thread(self._commit, entries)
            if self._quorum() > 0:
                await self._cosign(head)
            else:
                self.served = head
                self._schedule_cosign()
        except QuorumNotReached as e:
            self._fail(batch, AppendError(f"witness quorum not reached: {e}"))
            return True
        except Fenced as e:  # another replica took the lease: nothing here is acknowledged
            log.error("append batch fenced: %s", e)
            self._fail(batch, NotSequencer(None))
            self._step_down()
            return False
        except Exception as e:  # storage failed: nothing of this batch is acknowledged
            log.error("append batch failed: %s", e)
            try:
                await asyncio.to_thread(self._reload)
            except Exception as e2:
                log.error("log recovery failed: %s", e2)
            self._fail(batch, AppendError("log storage failed"))
            return True
        served, memo = self.served, {}
        for i, (entry, fut) in enumerate(batch):
            if not fut.done():
                fut.set_result(Added(start + i, served.note,
                                     self.prove(start + i, entry, served, memo)))
        return True

    @staticmethod
    def _fail(batch: list[tuple[bytes, asyncio.Future[Added]]], err: Exception) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    async def _cosign(self, head: Head) -> None:
        """Gather verified cosignatures for `head`, persist them and serve it."""
        assert self.witnesses is not None
        async with self._cosign_lock:
            if head.size < self.served.size:
                return  # a newer checkpoint is served; witnesses would refuse this one
            sigs = await self.witnesses.cosign(head.note, head.size, self._prove_for_witness)
            cosigned = self._verified(head, sigs)
            if cosigned.note != head.note:
                await asyncio.to_thread(self.store.update_note, head.size, cosigned.note)
            if cosigned.size >= self.served.size:
                self.served = cosigned

    def _prove_for_witness(self, old: int, new: int) -> list[bytes]:
        return merkle.prove_consistency(old, new, self.node)

    def _schedule_cosign(self) -> None:
        """Cosign the newest head in the background, one at a time (the served head
        becomes the cosigned one; with a quorum only once it meets it)."""
        if self.witnesses is None or (self._cosign_task and not self._cosign_task.done()):
            return

        async def loop() -> None:
            while True:
                head = self.head
                try:
                    await self._cosign(head)
                except QuorumNotReached:
                    pass
                except StorageError as e:  # fenced, or the database is down: stop here
                    log.warning("storing cosignatures failed: %s", e)
                    return
                if self.head.size == head.size:
                    return

        self._cosign_task = asyncio.create_task(loop())
