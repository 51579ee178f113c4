"""The log: batches appends into checkpoints and answers reads.

Appends queue up while the previous batch is being written; each batch is
one storage transaction and one new signed checkpoint (storage.py's steps).
An append resolves only after its checkpoint committed, and, with a witness
quorum, after that checkpoint holds K cosignatures. The served checkpoint
never goes backwards and is always consistent with every earlier one,
because it is only ever a signed head of the same append-only tree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from tlog import merkle, note, proof, tiles
from tlog.storage import FaultHook, Head, Storage, lookup_key, recover, sign_head
from tlog.witnessing import QuorumNotReached, WitnessPool, cosigned_note

log = logging.getLogger("tlog")

MAX_ENTRY = tiles.MAX_ENTRY


class AppendError(Exception):
    """An append could not be acknowledged (the entry may still be durable)."""


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
    """One log: a store, a signer, an optional witness pool."""

    def __init__(
        self,
        store: Storage,
        signer: note.Signer,
        *,
        witnesses: WitnessPool | None = None,
        max_batch: int = 4096,
        faults: FaultHook | None = None,
    ) -> None:
        self.store = store
        self.signer = signer
        self.origin = signer.name
        self.witnesses = witnesses
        self.max_batch = max_batch
        self._faults = faults
        self._tiles = _Cache(4096)
        self._nodes = _Cache(1 << 18)
        self._bundles = _Cache(1024)
        self.head: Head = recover(store, signer)
        self.size = self.head.size
        self.served: Head = self._verified(self.head)
        self._queue: asyncio.Queue[tuple[bytes, asyncio.Future[Added]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self._cosign_task: asyncio.Task[None] | None = None

    # -- reads -------------------------------------------------------------

    def read_tile(self, level: int, index: int) -> bytes:
        """Current bytes of a stored tile, cached."""
        cached = self._tiles.get((level, index))
        if cached is None:
            cached = self.store.read_tile(level, index)
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

    # -- appends -----------------------------------------------------------

    async def start(self) -> None:
        """Start the sequencer (and, with witnesses, cosign the current head)."""
        self._queue = asyncio.Queue()
        if self.witnesses is not None:
            await self.witnesses.start()
            if self.head.size > 0:
                with contextlib.suppress(QuorumNotReached):
                    await self._cosign(self.head)
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        for t in (self._task, self._cosign_task):
            if t is not None:
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
        if self.witnesses is not None:
            await self.witnesses.close()

    async def add(self, entry: bytes) -> Added:
        """Append; returns once the entry is durable and under a served checkpoint."""
        if self._queue is None:
            raise AppendError("log not started")
        fut: asyncio.Future[Added] = asyncio.get_running_loop().create_future()
        await self._queue.put((entry, fut))
        return await fut

    def _fault(self, step: str) -> None:
        if self._faults is not None:
            self._faults(step)

    def _commit(self, entries: list[bytes]) -> Head:
        """Steps 1-3 for one batch (runs in a worker thread)."""
        start = self.size
        hashes = [merkle.leaf_hash(e) for e in entries]
        changed = tiles.extend(start, hashes, self.read_tile)
        keys = [(k, start + i) for i, e in enumerate(entries) if (k := lookup_key(e)) is not None]
        self._fault("sequence")
        self.store.persist(start, entries, changed, keys)
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
        self._tiles.clear()
        self._nodes.clear()
        self.head = recover(self.store, self.signer)
        self.size = self.head.size

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            entries = [e for e, _ in batch]
            start = self.size
            try:
                head = await asyncio.to_thread(self._commit, entries)
                if self.witnesses is not None and self.witnesses.quorum > 0:
                    await self._cosign(head)
                else:
                    self.served = head
                    self._schedule_cosign()
            except QuorumNotReached as e:
                self._fail(batch, AppendError(f"witness quorum not reached: {e}"))
                continue
            except Exception as e:  # storage failed: nothing of this batch is acknowledged
                log.error("append batch failed: %s", e)
                try:
                    await asyncio.to_thread(self._reload)
                except Exception as e2:
                    log.error("log recovery failed: %s", e2)
                self._fail(batch, AppendError("log storage failed"))
                continue
            served, memo = self.served, {}
            for i, (entry, fut) in enumerate(batch):
                if not fut.done():
                    fut.set_result(Added(start + i, served.note,
                                         self.prove(start + i, entry, served, memo)))

    @staticmethod
    def _fail(batch: list[tuple[bytes, asyncio.Future[Added]]], err: Exception) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)

    def _verified(self, head: Head, new: list[note.Signature] | None = None) -> Head:
        """`head` carrying only the log's signature and valid witness cosignatures."""
        verifiers = self.witnesses.verifiers if self.witnesses is not None else []
        text, _ = cosigned_note(head.note, (self.signer.name, self.signer.key_id), new or [],
                                verifiers)
        return Head(head.size, head.root, text)

    async def _cosign(self, head: Head) -> None:
        """Gather verified cosignatures for `head`, persist them and serve it."""
        assert self.witnesses is not None
        sigs = await self.witnesses.cosign(head.note, head.size, self._prove_for_witness)
        cosigned = self._verified(head, sigs)
        if cosigned.note != head.note:
            await asyncio.to_thread(self.store.update_note, head.size, cosigned.note)
        if cosigned.size >= self.served.size:
            self.served = cosigned

    def _prove_for_witness(self, old: int, new: int) -> list[bytes]:
        return merkle.prove_consistency(old, new, self.node)

    def _schedule_cosign(self) -> None:
        """Without a quorum, cosign the newest head in the background, one at a time."""
        if self.witnesses is None or (self._cosign_task and not self._cosign_task.done()):
            return

        async def loop() -> None:
            while True:
                head = self.head
                with contextlib.suppress(QuorumNotReached):
                    await self._cosign(head)
                if self.head.size == head.size:
                    return

        self._cosign_task = asyncio.create_task(loop())

