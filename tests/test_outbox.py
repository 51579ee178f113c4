"""The receipt outbox: durable group commits, logged marks, and the receipt signer."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.receipts.outbox import (
    ALARM,
    OUTBOX_FILE,
    USAGE_TTL,
    Ledger,
    Outbox,
    ReceiptSigner,
    _Writer,
    canonical,
)
from tlog import proof
from verifier import receipt

receipt_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(max_codepoint=127), max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(receipt_values)
def test_canonical_equals_rfc8785_for_receipt_values(value: object) -> None:
    assert canonical(value) == rfc8785.dumps(value)


def body() -> dict[str, object]:
    return {"v": receipt.VERSION, "id": "ab" * 16, "time": "2026-01-01T00:00:00.000Z",
            "gateway": {"app_id": "x", "compose_hash": "0" * 64, "keyset_hash": "1" * 64},
            "request_hash": "2" * 64, "forwarded_hash": None, "route": {},
            "upstream": {"verified": False, "evidence": "none"},
            "provider_request_hash": None, "provider_response_hash": None,
            "response_hash": "3" * 64, "e2ee": {"mode": "none"},
            "refusal": {"code": "no_route", "status": 502}, "usage": {"total_tokens": 3},
            "keyset_index": 4}


def test_signer_matches_reference_receipt_module() -> None:
    key = Ed25519PrivateKey.generate()
    signed, entry = ReceiptSigner(key).sign(body())
    pub = key.public_key().public_bytes_raw()
    assert receipt.verify(signed, expected_key=pub) == pub
    assert signed == receipt.sign(body(), key)  # Ed25519 is deterministic
    assert entry == receipt.entry(signed)


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_outbox_ledger_and_reopen(tmp_path: Path, durability: str) -> None:
    data = tmp_path / "o"

    async def go() -> None:
        ob = Outbox(data, durability)
        await asyncio.gather(*(ob.put(f"{i:032x}", f"{i % 3:064x}", b"entry%d" % i)
                               for i in range(50)))
        ledger = Ledger(data)
        p = proof.TlogProof(7, (b"h" * 32,), b"checkpoint note\n", b"entry7")
        seq7 = next(q for q, i, _ in ob.unlogged_after(0) if i == f"{7:032x}")
        await ledger.record([(seq7, p)])
        await ledger.set_state(True, "log unreachable: OSError")
        assert ob.counts() == (50, 49)
        assert ob.logged_among([f"{7:032x}", f"{8:032x}"]) == {f"{7:032x}"}
        assert ob.state() == {"log_down": "1", "last_error": "log unreachable: OSError"}
        row = ob.get(f"{7:032x}")
        assert row is not None and (row.log_index, row.proof) == (7, p.format().decode())
        assert ob.get(f"{8:032x}").proof is None  # type: ignore[union-attr]
        newest = ob.by_request_hash(f"{1:064x}")
        assert newest is not None and newest.id == f"{49:032x}"
        assert ob.get("missing") is None
        ledger.close()
        ob.close()

    asyncio.run(go())
    reader = Outbox(data, writable=False)
    pending = reader.unlogged_after(0)
    assert len(pending) == 49 and pending[0][1:] == (f"{0:032x}", b"entry0")
    assert f"{7:032x}" not in [i for _, i, _ in pending]
    assert [i for _, i, _ in reader.unlogged_after(pending[10][0], 5)] == \
        [i for _, i, _ in pending[11:16]]
    reader.close()


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_outbox_duplicate_id_fails_only_that_put(tmp_path: Path, durability: str) -> None:
    async def go() -> None:
        ob = Outbox(tmp_path, durability)
        await ob.put("a" * 32, "0" * 64, b"one")
        results = await asyncio.gather(
            *(ob.put(f"{i:032x}", "0" * 64, b"x") for i in range(5)),
            ob.put("a" * 32, "0" * 64, b"dup"),
            *(ob.put(f"{i:032x}", "0" * 64, b"x") for i in range(5, 10)),
            return_exceptions=True)
        assert [isinstance(r, Exception) for r in results] == [False] * 5 + [True] + [False] * 5
        assert ob.counts() == (11, 11)
        row = ob.get("a" * 32)
        assert row is not None and row.entry == b"one"
        ob.close()
    asyncio.run(go())


# -- WAL restarts -------------------------------------------------------------------

ENTRY = b"e" * 3000
LIMIT = 1 << 20  # the WAL limit of an outbox bounded at 16 MiB


async def past_the_limit(ob: Outbox, tmp_path: Path) -> None:
    """Commit receipts until the outbox's WAL file is past LIMIT bytes."""
    wal = tmp_path / f"{OUTBOX_FILE}-wal"
    n = 0
    while not wal.exists() or wal.stat().st_size <= LIMIT:
        await ob.put(f"fill{n:028x}", f"{n:064x}", ENTRY)
        n += 1


def restarts(monkeypatch: pytest.MonkeyPatch, gate: threading.Event | None = None
             ) -> list[tuple[str, bool]]:
    """Record each WAL restart (the thread it ran on, whether it finished); with `gate`,
    each waits for it to be set first."""
    done: list[tuple[str, bool]] = []
    real = _Writer._restart

    def recorded(self: _Writer, conn: sqlite3.Connection) -> bool:
        if gate is not None:
            gate.wait(10)
        finished = real(self, conn)
        done.append((threading.current_thread().name, finished))
        return finished

    monkeypatch.setattr(_Writer, "_restart", recorded)
    return done


def test_the_loop_runs_on_while_the_checkpoint_thread_restarts_the_wal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process mode a restart runs on the checkpoint thread: commits queued meanwhile
    wait for it and are then committed; the event loop is not blocked by it."""
    gate = threading.Event()
    done = restarts(monkeypatch, gate)

    async def go() -> None:
        ob = Outbox(tmp_path, max_bytes=16 << 20)
        await past_the_limit(ob, tmp_path)  # the last commit asked for a restart
        held = asyncio.ensure_future(ob.put("held" + "0" * 28, "1" * 64, b"x"))
        for _ in range(20):  # the loop keeps running while the restart is under way
            await asyncio.sleep(0.001)
        assert not held.done() and ob.get("held" + "0" * 28) is None  # it waits
        gate.set()
        await asyncio.wait_for(held, 10)
        assert ob.get("held" + "0" * 28) is not None
        assert done == [("outbox-checkpoint", True)]
        assert (tmp_path / f"{OUTBOX_FILE}-wal").stat().st_size <= LIMIT  # cut back
        ob.close()

    asyncio.run(go())


def test_a_restart_with_no_commit_waiting_still_cuts_the_file_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An outbox refusing calls at its bound commits nothing more: the restart itself must
    leave the WAL file at most at its limit, or the bytes in use would never fall."""
    done = restarts(monkeypatch)

    async def go() -> None:
        ob = Outbox(tmp_path, max_bytes=16 << 20)
        await past_the_limit(ob, tmp_path)
        wal = tmp_path / f"{OUTBOX_FILE}-wal"
        for _ in range(1000):
            if wal.stat().st_size <= LIMIT:
                break
            await asyncio.sleep(0.01)
        assert done == [("outbox-checkpoint", True)]
        assert wal.stat().st_size <= LIMIT
        ob.close()

    asyncio.run(go())


def test_a_restart_readers_keep_from_finishing_is_not_retried_at_every_commit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = restarts(monkeypatch)

    async def go() -> None:
        ob = Outbox(tmp_path, max_bytes=16 << 20)
        reader = sqlite3.connect(tmp_path / OUTBOX_FILE, isolation_level=None)
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM receipts").fetchone()  # holds its snapshot
        await past_the_limit(ob, tmp_path)
        await ob.put("next" + "0" * 28, "2" * 64, ENTRY)  # committed after the attempt
        assert done == [("outbox-checkpoint", False)]
        for n in range(20):  # still past the limit: every commit goes through at once
            await ob.put(f"more{n:028x}", f"{n:064x}", ENTRY)
        assert len(done) == 1
        reader.execute("COMMIT")
        reader.close()
        ob._writer._trim_after = 0.0  # noqa: SLF001 - the retry time has come
        await ob.put("last" + "0" * 28, "3" * 64, ENTRY)
        await ob.put("cut" + "0" * 29, "4" * 64, ENTRY)
        assert done[1:] == [("outbox-checkpoint", True)]
        assert (tmp_path / f"{OUTBOX_FILE}-wal").stat().st_size <= LIMIT
        ob.close()

    asyncio.run(go())


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_closing_during_a_restart_commits_what_waited(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, durability: str) -> None:
    gate = threading.Event()
    done = restarts(monkeypatch, gate)

    async def go() -> None:
        ob = Outbox(tmp_path, durability, max_bytes=16 << 20)
        if durability == "fsync":  # the writer thread restarts the WAL: nothing waits
            gate.set()
        await past_the_limit(ob, tmp_path)
        waiting = asyncio.ensure_future(ob.put("wait" + "0" * 28, "5" * 64, b"x"))
        await asyncio.sleep(0.01)
        threading.Timer(0.2, gate.set).start()
        ob.close()  # returns after the restart, with the waiting receipt committed
        await asyncio.wait_for(waiting, 10)
        want = "outbox-writer" if durability == "fsync" else "outbox-checkpoint"
        assert done and done[0] == (want, True)

    asyncio.run(go())
    reopened = Outbox(tmp_path)
    assert reopened.get("wait" + "0" * 28) is not None
    reopened.close()


def test_without_its_checkpoint_thread_the_writer_restarts_the_wal_itself(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    done = restarts(monkeypatch)

    async def go() -> None:
        ob = Outbox(tmp_path, max_bytes=16 << 20)
        writer = ob._writer  # noqa: SLF001
        writer._closing.set()  # noqa: SLF001 - stops the checkpoint thread
        writer._trim_asked.set()  # noqa: SLF001
        writer._checkpointer.join()  # noqa: SLF001
        writer._closing.clear()  # noqa: SLF001
        wal = tmp_path / f"{OUTBOX_FILE}-wal"
        sizes = []
        for n in range(1000):  # each put returns: none waits for a thread that is gone
            await asyncio.wait_for(ob.put(f"fill{n:028x}", f"{n:064x}", ENTRY), 10)
            sizes.append(wal.stat().st_size)
        assert done and all(d == ("MainThread", True) for d in done)
        assert max(sizes) <= LIMIT + len(ENTRY) + (64 << 10)  # one commit past, then cut
        ob.close()

    asyncio.run(go())


# -- the bound ---------------------------------------------------------------------------


def test_past_the_alarm_level_the_bytes_in_use_are_measured_at_each_call(
        tmp_path: Path) -> None:
    """Below the alarm level a measurement is reused for USAGE_TTL; past it every `admit`
    sees what was just committed (a fast gateway committed 26 % past its bound within one
    USAGE_TTL)."""
    async def go() -> None:
        ob = Outbox(tmp_path, max_bytes=1 << 30)
        first = ob.bytes_used()
        await ob.put("a" * 32, "0" * 64, b"x" * 200_000)
        assert ob.bytes_used() == first  # far below the alarm level: the cached figure
        await asyncio.sleep(USAGE_TTL)
        before = ob.bytes_used()  # measured again: its time is up
        assert before >= first + 200_000
        ob.max_bytes = int(before / ALARM)  # now just at the alarm level
        await ob.put("b" * 32, "1" * 64, b"y" * 600_000)  # more than the WAL holds now
        assert ob.bytes_used() >= before + 300_000  # measured again at once
        ob.close()

    asyncio.run(go())
