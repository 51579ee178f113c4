"""The shipper: only a proof of exactly that entry counts; batches when receipts queue up."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.receipts.outbox import Outbox
from gateway.receipts.shipper import ProofChecker, ShipError, Shipper
from tests.test_gateway_fakes import FakeLog
from tests.tlogutil import start_tlog, stop
from tlog import checkpoint, merkle, note, proof

SIGNER = note.generate_signer("log.test/x")
ENTRIES = [b"entry-%d" % i for i in range(5)]


def answer(index: int, entry: bytes | None = None, signer: note.Ed25519Signer = SIGNER,
           extra: bytes | None = None) -> bytes:
    leaves = [merkle.leaf_hash(e) for e in ENTRIES]
    if entry is not None:
        leaves[index] = merkle.leaf_hash(entry)
    cp = checkpoint.Checkpoint("log.test/x", len(leaves), merkle.root(leaves), ())
    p = proof.TlogProof(index, tuple(merkle.inclusion_proof(index, len(leaves), leaves)),
                        checkpoint.sign(cp, signer), extra if extra is not None else ENTRIES[index])
    return json.dumps({"index": index, "checkpoint": p.checkpoint.decode(),
                       "proof": p.format().decode()}).encode()


def test_valid_answer() -> None:
    p = ProofChecker(SIGNER.vkey).check(ENTRIES[3], answer(3))
    assert p.index == 3 and p.extra == ENTRIES[3]
    assert ProofChecker(None).check(ENTRIES[3], answer(3)).index == 3


@pytest.mark.parametrize("body", [
    b"not json",
    b"[]",
    b'{"index": "3", "proof": "x"}',
    b'{"index": true, "proof": "x"}',
    b'{"index": 3, "proof": "not a proof"}',
])
def test_malformed_answers(body: bytes) -> None:
    with pytest.raises(ShipError) as e:
        ProofChecker(SIGNER.vkey).check(ENTRIES[3], body)
    assert not e.value.log_down


def test_wrong_entry_index_or_key_is_refused() -> None:
    checker = ProofChecker(SIGNER.vkey)
    with pytest.raises(ShipError, match="does not match"):
        checker.check(b"other entry", answer(3))
    doc = json.loads(answer(3))
    doc["index"] = 2
    with pytest.raises(ShipError, match="does not match"):
        checker.check(ENTRIES[3], json.dumps(doc).encode())
    with pytest.raises(ShipError, match="does not verify"):  # tree holds another entry
        checker.check(b"forged", answer(3, entry=b"other", extra=b"forged"))
    with pytest.raises(ShipError, match="does not verify"):  # signed by someone else
        checker.check(ENTRIES[3], answer(3, signer=note.generate_signer("log.test/x")))


async def _ship_all(data, url: str, token: str, vkey: str, n: int) -> tuple[Any, list]:
    """Queue n receipts, run a shipper until all are logged; (shipper, ledger proofs)."""
    ob = Outbox(data)
    for i in range(n):
        await ob.put(f"{i:032x}", f"{i:064x}", json.dumps({"request_hash": f"{i:064x}"}).encode())
    sh = Shipper(data, url, token, vkey, concurrency=4)
    await sh.start()
    try:
        for _ in range(600):
            if ob.counts()[1] == 0:
                break
            await asyncio.sleep(0.05)
        rows = [ob.get(f"{i:032x}") for i in range(n)]
    finally:
        await sh.close()
        ob.close()
    return sh, rows


def test_queued_receipts_go_in_batches_each_proof_checked(tmp_path: Path) -> None:
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    try:
        token = (data / "append.token").read_text().strip()
        vkey = (data / "log.vkey").read_text().strip()
        sh, rows = asyncio.run(_ship_all(tmp_path / "gw", url, token, vkey, 300))
        size = httpx.get(f"{url}/").json()["size"]
    finally:
        stop(proc)
    assert sh._batching and sh.shipped == 300 and sh.batched > 0  # noqa: SLF001
    assert size == 300  # every receipt once: no duplicates
    verifier = note.verifier_from_vkey(vkey)
    assert sorted(r.log_index for r in rows) == list(range(300))
    for r in rows[::37]:
        p = proof.parse(r.proof.encode())
        assert p.extra == r.entry
        proof.check_inclusion(p, checkpoint.open(p.checkpoint, verifier)[0])


def _ship_to_fake(tmp: Path, n: int, **fake: Any) -> tuple[Any, list, int]:
    """Ship n receipts to a FakeLog; (shipper, rows, entries the fake logged)."""
    async def run() -> tuple[Any, list, int]:
        log = FakeLog(**fake)
        await log.start()
        try:
            sh, rows = await _ship_all(tmp / "gw", log.url, log.token, log.vkey, n)
            return sh, rows, len(log.entries)
        finally:
            await log.stop()

    return asyncio.run(run())


def test_a_log_without_batches_gets_one_entry_per_request(tmp_path: Path) -> None:
    sh, rows, logged = _ship_to_fake(tmp_path, 40)
    assert not sh._batching and sh.shipped == 40 and logged == 40  # noqa: SLF001
    assert sh.batched == 0
    assert all(r.log_index is not None for r in rows)


def test_entries_a_batch_did_not_get_acknowledged_are_shipped_singly(tmp_path: Path) -> None:
    sh, rows, logged = _ship_to_fake(tmp_path, 40, batch_refusals=True)
    assert sh._batching and sh.batched == 0  # noqa: SLF001 - the log has batches, refused these
    assert sh.shipped == 40 and logged == 40
    assert all(r.log_index is not None for r in rows)
