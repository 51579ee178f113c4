"""The shipper: only a proof of exactly that entry counts; batches when receipts queue up."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.receipts import outbox as ob
from gateway.receipts.outbox import Outbox
from gateway.receipts.shipper import BATCHES_IN_FLIGHT, ProofChecker, ShipError, Shipper
from tests.test_doorbell import counting
from tests.test_gateway_fakes import FakeLog
from tests.tlogutil import start_tlog, stop
from tlog import batch, checkpoint, merkle, note, proof
from witness import cosignature

SIGNER = note.generate_signer("log.test/x")
ENTRIES = [b"entry-%d" % i for i in range(5)]
WITNESS = cosignature.generate_signer("witness.test/w")


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


async def put_receipt(box: Outbox, i: int) -> None:
    """Commit receipt number `i` (its id and request hash are `i` in hex)."""
    await box.put(f"{i:032x}", f"{i:064x}", json.dumps({"request_hash": f"{i:064x}"}).encode())


async def steady(box: Outbox, numbers: range, every: float = 0.01) -> None:
    """Commit receipt `i` for each i of `numbers`, `every` seconds apart."""
    for i in numbers:
        await put_receipt(box, i)
        await asyncio.sleep(every)


async def drained(box: Outbox, looks: int, every: float = 0.02) -> None:
    """Wait until nothing in the outbox is unlogged, looking at most `looks` times, `every`
    seconds apart."""
    for _ in range(looks):
        if box.counts()[1] == 0:
            return
        await asyncio.sleep(every)


async def _ship_all(data, url: str, token: str, vkey: str, n: int) -> tuple[Any, list]:
    """Queue n receipts, run a shipper until all are logged; (shipper, ledger proofs)."""
    ob = Outbox(data)
    for i in range(n):
        await put_receipt(ob, i)
    sh = Shipper(data, url, token, vkey, concurrency=4)
    await sh.start()
    try:
        await drained(ob, 600, 0.05)
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


def compact(signer: note.Ed25519Signer = SIGNER,
            cosigners: tuple[cosignature.CosignatureSigner, ...] = (),
            of: Sequence[int] = range(len(ENTRIES))) -> dict[str, Any]:
    """The compact `/add-batch` answer (tlog/batch.py) for the ENTRIES at `of`, under a
    checkpoint of all ENTRIES cosigned as given."""
    leaves = [merkle.leaf_hash(e) for e in ENTRIES]
    signed = checkpoint.sign(
        checkpoint.Checkpoint("log.test/x", len(leaves), merkle.root(leaves), ()), signer)
    for w in cosigners:
        signed += cosignature.cosign(signed, w).line()
    hashes = merkle.prove_batch(of, len(leaves), merkle._list_reader(leaves))  # noqa: SLF001
    return json.loads(batch.encode(signed, list(of), hashes))


def test_a_compact_answer_gives_each_entry_the_proof_add_would_answer() -> None:
    got = ProofChecker(SIGNER.vkey).check_batch(ENTRIES, compact())
    for i, p in enumerate(got):
        assert isinstance(p, proof.TlogProof)
        assert p.format().decode() == json.loads(answer(i))["proof"]  # byte for byte
    assert ProofChecker(None).check_batch(ENTRIES, compact())[3].index == 3  # type: ignore[union-attr]


def test_a_compact_answer_has_its_checkpoint_verified_once(monkeypatch) -> None:
    calls = []
    real = cosignature.verify_witnessed

    def counted(*args: Any) -> Any:
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr("gateway.receipts.shipper.cosignature.verify_witnessed", counted)
    checker = ProofChecker(SIGNER.vkey, [WITNESS.vkey], quorum=1)
    assert all(isinstance(p, proof.TlogProof)
               for p in checker.check_batch(ENTRIES, compact(cosigners=(WITNESS,))))
    assert len(calls) == 1
    calls.clear()
    unwitnessed = ProofChecker(SIGNER.vkey, [WITNESS.vkey], quorum=1).check_batch(
        ENTRIES, compact())  # in the log, not yet witnessed: asked again, never re-appended
    assert len(calls) == 1
    assert all(isinstance(e, ShipError) and e.appended and e.log_down for e in unwitnessed)


def test_a_refused_compact_item_is_refused_alone() -> None:
    leaves = [merkle.leaf_hash(e) for e in ENTRIES]
    doc = compact()
    doc["entries"][1] = {"error": "log storage failed", "code": "storage_unavailable"}
    doc["proof"] = [base64.b64encode(h).decode() for h in merkle.prove_batch(
        [0, 2, 3, 4], len(leaves), merkle._list_reader(leaves))]  # noqa: SLF001
    ok, refused, *rest = ProofChecker(SIGNER.vkey).check_batch(ENTRIES, doc)
    assert isinstance(ok, proof.TlogProof) and ok.index == 0
    assert isinstance(refused, ShipError) and not refused.appended
    assert "storage_unavailable" in str(refused)
    assert [p.index for p in rest] == [2, 3, 4]  # type: ignore[union-attr]


def _moved(doc: dict[str, Any]) -> dict[str, Any]:
    doc["entries"][2]["index"] = doc["entries"][1]["index"]  # two entries on one index
    return doc


def _swapped(doc: dict[str, Any]) -> dict[str, Any]:
    doc["entries"][1]["index"], doc["entries"][2]["index"] = 2, 1
    return doc


MIDDLE = (1, 2, 3)  # a batch whose proof is not empty: leaves 0 and 4 are beside it
SENT = [ENTRIES[i] for i in MIDDLE]


@pytest.mark.parametrize(("sent", "doc"), [
    ([SENT[0], b"not the logged entry", SENT[2]], compact(of=MIDDLE)),  # a forged entry
    (SENT, _moved(compact(of=MIDDLE))),
    (SENT, _swapped(compact(of=MIDDLE))),  # each index real, but not that entry's
    (SENT, {**compact(of=MIDDLE), "proof": compact(of=MIDDLE)["proof"][:-1]}),  # a hash short
    (SENT, {**compact(of=MIDDLE), "proof": [*compact(of=MIDDLE)["proof"]] * 2}),  # too many
    (SENT, {**compact(of=MIDDLE), "proof": compact(of=MIDDLE)["proof"][::-1]}),  # reordered
    (SENT, {**compact(of=MIDDLE), "entries": [{"index": i} for i in (1, 2, 5)]}),  # past size
    (ENTRIES, {**compact(), "proof": compact(of=MIDDLE)["proof"]}),  # hashes where none are due
])
def test_a_compact_proof_that_does_not_verify_refuses_the_whole_batch(sent: list[bytes],
                                                                       doc: object) -> None:
    with pytest.raises(ShipError) as e:
        ProofChecker(SIGNER.vkey).check_batch(sent, doc)
    assert not e.value.appended and not e.value.log_down
    with pytest.raises(ShipError):  # without the log's key the proof is still recomputed
        ProofChecker(None).check_batch(sent, doc)


@pytest.mark.parametrize("doc", [
    compact(signer=note.generate_signer("log.test/x")),  # not the log's key
    {**compact(), "entries": compact()["entries"][:4]},  # an answer short
    {**compact(), "proof": ["AAAA"]},
    {"checkpoint": None, "entries": []},
    {"entries": [{}] * 4},  # old form, an answer short
    [],
])
def test_a_batch_answer_wrong_as_a_whole_refuses_every_entry(doc: object) -> None:
    with pytest.raises(ShipError) as e:
        ProofChecker(SIGNER.vkey).check_batch(ENTRIES, doc)
    assert not e.value.appended and not e.value.log_down


def test_an_old_form_batch_answer_is_still_read() -> None:
    doc = {"entries": [json.loads(answer(i)) for i in range(5)]}
    doc["entries"][4] = {"error": "not now"}
    *good, refused = ProofChecker(SIGNER.vkey).check_batch(ENTRIES, doc)
    assert [p.index for p in good] == [0, 1, 2, 3]  # type: ignore[union-attr]
    assert isinstance(refused, ShipError)


def test_a_log_ignoring_the_compact_ask_gets_its_old_answers_read(tmp_path: Path) -> None:
    async def run() -> tuple[Any, list, FakeLog]:
        log = FakeLog(old_batches=True)
        await log.start()
        try:
            sh, rows = await _ship_all(tmp_path / "gw", log.url, log.token, log.vkey, 40)
            return sh, rows, log
        finally:
            await log.stop()

    sh, rows, log = asyncio.run(run())
    assert log.batch_accepts and set(log.batch_accepts) == {batch.MEDIA_TYPE}
    assert sh._batching and sh.batched > 0 and sh.shipped == 40  # noqa: SLF001
    assert len(log.entries) == 40  # nothing appended twice
    verifier = note.verifier_from_vkey(log.vkey)
    for r in rows:
        p = proof.parse(r.proof.encode())
        assert p.extra == r.entry and p.index == r.log_index
        proof.check_inclusion(p, checkpoint.open(p.checkpoint, verifier)[0])


def test_a_batch_is_acknowledged_in_one_ledger_transaction(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    """The acknowledgements of one /add-batch answer are committed together, not one
    transaction each (a batch of 256 cost 256 commits: 31 us of the shipper's CPU a receipt)."""
    logged_rows: list[int] = []  # acknowledgement rows written by each ledger transaction
    real = ob._Writer._run  # noqa: SLF001

    def counted(self: Any, ops: list) -> Any:
        rows = [len(op.args) if op.many else 1 for op in ops
                if op.sql.startswith("INSERT OR REPLACE INTO logged")]
        if rows:
            logged_rows.append(sum(rows))
        return real(self, ops)

    monkeypatch.setattr(ob._Writer, "_run", counted)  # noqa: SLF001

    async def run() -> tuple[Any, FakeLog]:
        log = FakeLog(old_batches=True)
        await log.start()
        try:
            sh, _ = await _ship_all(tmp_path / "gw", log.url, log.token, log.vkey, 200)
            return sh, log
        finally:
            await log.stop()

    sh, log = asyncio.run(run())
    assert sh.batched == sh.shipped == sum(logged_rows) == 200
    assert len(logged_rows) == len(log.batch_accepts)  # one transaction per batch answer
    assert max(logged_rows) > 1


def test_batches_in_flight_are_bounded_so_receipts_arriving_meanwhile_share_one(
        tmp_path: Path) -> None:
    async def run() -> tuple[Shipper, FakeLog, list]:
        log = FakeLog(old_batches=True)
        log.batch_delay = 0.05
        await log.start()
        ob = Outbox(tmp_path / "gw")
        sh = Shipper(tmp_path / "gw", log.url, log.token, log.vkey, concurrency=16)
        await sh.start()
        try:
            for i in range(200):  # receipts keep arriving while batches are slow
                await put_receipt(ob, i)
                if i % 10 == 9:
                    await asyncio.sleep(0.005)
            await drained(ob, 600)
            return sh, log, [ob.get(f"{i:032x}") for i in range(200)]
        finally:
            await sh.close()
            ob.close()
            await log.stop()

    sh, log, rows = asyncio.run(run())
    assert 1 <= log.most_batches_in_flight <= BATCHES_IN_FLIGHT
    assert sh.shipped == 200 and len(log.entries) == 200  # all logged, none twice
    assert all(r is not None and r.log_index is not None for r in rows)
    assert len(log.batch_accepts) <= 40  # 200 receipts in few batches, not one per poll


@contextlib.asynccontextmanager
async def interval_shipper(data: Path, interval: float
                           ) -> AsyncIterator[tuple[FakeLog, Outbox]]:
    """A fake log, an outbox in `data` and its shipper posting batches `interval` apart."""
    log = FakeLog(old_batches=True)
    await log.start()
    box = Outbox(data)
    sh = Shipper(data, log.url, log.token, log.vkey, concurrency=8, batch_interval=interval)
    await sh.start()
    try:
        yield log, box
    finally:
        await sh.close()
        box.close()
        await log.stop()


def test_while_a_batch_waits_out_the_interval_the_outbox_is_looked_at_once_before_it_leaves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A receipt every 10 ms for 1.2 s, batches 0.3 s apart: every receipt is logged, and
    the outbox is read a few times a batch, not every POLL (2 ms)."""
    interval = 0.3
    looks = counting(monkeypatch, "unlogged_after")

    async def run() -> tuple[int, int, list[float]]:
        async with interval_shipper(tmp_path / "gw", interval) as (log, box):
            await steady(box, range(120))
            await drained(box, 200)
            return looks[0], len(log.entries), log.batch_starts

    n, logged, starts = asyncio.run(run())
    assert logged == 120
    assert len(starts) >= 3
    assert n <= 15 * len(starts), (n, len(starts))  # before: 784 looks, 5 batches


def test_batch_posts_start_at_least_the_interval_apart_and_a_lone_receipt_goes_at_once(
        tmp_path: Path) -> None:
    interval = 0.25

    async def run() -> tuple[list[float], float | None, bool, int]:
        loop = asyncio.get_running_loop()
        async with interval_shipper(tmp_path / "gw", interval) as (log, ob):
            t0 = loop.time()
            first = None
            await put_receipt(ob, 0)
            for _ in range(200):  # the first receipt after a pause: posted without waiting
                if ob.counts()[1] == 0:
                    first = loop.time() - t0
                    break
                await asyncio.sleep(0.005)
            # a second one right after must wait out the interval: not logged at once
            await ob.put(f"{1:032x}", f"{1:064x}", json.dumps({"request_hash": "1" * 64}).encode())
            await asyncio.sleep(0.02)
            waited = ob.counts()[1] == 1
            await steady(ob, range(2, 120))
            await drained(ob, 400)
            return log.batch_starts, first, waited, len(log.entries)

    starts, first, waited, logged = asyncio.run(run())
    assert logged == 120  # every receipt logged once
    assert first is not None and first < interval  # not held back after a pause
    assert waited
    assert len(starts) >= 3
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= interval * 0.95, gaps  # the loop's clock; sleep never ends early


def test_a_batch_interval_outside_0_to_10_s_is_refused(tmp_path: Path) -> None:
    for bad in (-0.1, 10.5):
        with pytest.raises(ValueError, match="batch interval"):
            Shipper(tmp_path, "http://127.0.0.1:1", None, batch_interval=bad)
