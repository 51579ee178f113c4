"""CPU of one 256-entry `POST /add-batch` answer, default against compact, in process.

The log's side: building the answer's JSON from the sequencer's results (the
default formats a tlog-proof text per entry). The shipper's side: parsing the
answer and verifying it (`ProofChecker.check_batch`, a fresh checker per batch
so the checkpoint's log signature and two witness cosignatures are verified
as for a new batch). The log holds 100,000 entries before the batch, so each
path has 17 hashes. Best of N runs; the two forms are checked to give the same
proofs, byte for byte. Asserts nothing else; returns the figures.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from gateway.receipts.shipper import ProofChecker
from tlog import note
from tlog.sequencer import Added, Log
from tlog.server import TlogApp
from tlog.sqlite_store import SQLiteStore
from tlog.storage import Head
from witness import cosignature

BATCH = 256
BEFORE = 100_000


def best_us_per_entry(f: Callable[[], object], runs: int = 30) -> float:
    """Microseconds per entry of the fastest of `runs` calls of `f`."""
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return min(times) * 1e6 / BATCH


def measure() -> dict[str, float]:
    """{answer bytes, log encode us, shipper check us} per entry, each `_default`/`_compact`."""
    with tempfile.TemporaryDirectory(prefix="pag-batch-answer-") as d:
        store = SQLiteStore(Path(d) / "log.db")
        log = Log(store, note.generate_signer("bench.example/batch"))
        log._commit([b'{"before": %d}' % i for i in range(BEFORE)])  # noqa: SLF001 - no server
        entries = [json.dumps({"request_hash": f"{i:064x}", "pad": "x" * 300}).encode()
                   for i in range(BATCH)]
        head, indices = log._commit(entries)  # noqa: SLF001
        witnesses = [cosignature.generate_signer(f"w.example/{i}") for i in range(2)]
        cosigned = head.note + b"".join(cosignature.cosign(head.note, w).line()
                                        for w in witnesses)
        log.served = Head(head.size, head.root, cosigned)
        added: list[Added] = log._answers(entries, indices)  # noqa: SLF001
        app = TlogApp(log, "unused")

        def default() -> bytes:
            return orjson.dumps({"entries": [
                {"index": a.index, "checkpoint": a.checkpoint.decode(),
                 "proof": a.proof.decode()} for a in added]})

        def compact() -> bytes:
            return app._compact(added)  # noqa: SLF001 - the server's own encoder

        bodies = {"default": default(), "compact": compact()}
        vkeys = [w.vkey for w in witnesses]

        def check(body: bytes) -> list:
            return ProofChecker(log.signer.vkey, vkeys, 2).check_batch(entries, orjson.loads(body))

        if [p.format() for p in check(bodies["default"])] != \
                [p.format() for p in check(bodies["compact"])]:
            raise RuntimeError("the two answers gave different proofs")
        out = {}
        for form, encode in (("default", default), ("compact", compact)):
            out[f"bytes_{form}"] = len(bodies[form]) / BATCH
            out[f"encode_{form}"] = best_us_per_entry(encode)
            out[f"check_{form}"] = best_us_per_entry(lambda b=bodies[form]: check(b))
        store.close()
        return out
