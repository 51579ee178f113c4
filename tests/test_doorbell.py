"""The gateway's doorbell for its shipper: a ring wakes an idle shipper, a lost or
unheard ring costs nothing but the fallback poll, and `gateway serve` hands each
shipper process a pipe of its own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from gateway.api import config as gconfig
from gateway.api import server
from gateway.receipts import shipper
from gateway.receipts.doorbell import Bell, Ringer
from gateway.receipts.outbox import Ledger, Outbox
from gateway.receipts.shipper import LogStatus, Shipper
from tests.test_gateway_fakes import FakeLog, LogRef, write_config
from tlog import checkpoint, merkle, note, proof

NEVER = 60.0  # a wait this long would fail the test's own guard: only a ring ends it
GUARD = 10.0


def test_a_ring_wakes_a_waiting_bell_and_one_rung_before_the_wait_is_not_missed() -> None:
    async def run() -> None:
        r, w = os.pipe()
        bell, ringer = Bell(r), Ringer()
        ringer.attach(w)
        try:
            asyncio.get_running_loop().call_later(0.05, ringer.ring)
            await asyncio.wait_for(bell.wait(NEVER), GUARD)  # woken while waiting
            ringer.ring()  # between a look and the wait
            await asyncio.wait_for(bell.wait(NEVER), GUARD)
            with pytest.raises(BlockingIOError):  # the wait took every ring with it
                os.read(r, 1)
            assert bell.listening
        finally:
            ringer.close()
            bell.close()

    asyncio.run(run())


def test_ringing_a_shipper_that_is_gone_is_harmless_and_the_next_one_is_rung() -> None:
    async def run() -> None:
        ringer = Ringer()
        ringer.ring()  # nothing attached yet
        r, w = os.pipe()
        ringer.attach(w)
        os.close(r)  # the shipper exits: the next ring meets EPIPE
        for _ in range(3):
            ringer.ring()
        r2, w2 = os.pipe()
        ringer.attach(w2)  # the restarted shipper's pipe
        bell = Bell(r2)
        try:
            ringer.ring()
            await asyncio.wait_for(bell.wait(NEVER), GUARD)
        finally:
            ringer.close()
            bell.close()

    asyncio.run(run())


@pytest.mark.parametrize("callers", [1, 3])
def test_the_outbox_rings_only_after_the_callers_of_its_commit_went_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, callers: int) -> None:
    """A ring wakes the shipper; the calls whose receipts the commit holds send their answers
    first (here: record that they resumed), so the shipper does not run ahead of them."""
    events: list[str] = []
    monkeypatch.setattr(Ringer, "ring", lambda self: events.append("rang"))

    async def call(ob: Outbox, n: int) -> None:
        await ob.put(f"{n:032x}", f"{n:064x}", b"entry")
        events.append("answered")

    async def run() -> None:
        ob = Outbox(tmp_path)
        try:
            await asyncio.gather(*(call(ob, n) for n in range(callers)))
            await asyncio.sleep(0)  # the loop turn after them
        finally:
            ob.close()

    asyncio.run(run())
    assert events == ["answered"] * callers + ["rang"]


def test_a_bell_whose_gateway_closed_its_end_goes_back_to_polling() -> None:
    async def run() -> bool:
        r, w = os.pipe()
        bell = Bell(r)
        os.close(w)
        await asyncio.wait_for(bell.wait(NEVER), GUARD)  # end of file wakes it
        return bell.listening

    assert asyncio.run(run()) is False


def counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Count the calls of `Outbox.name` from now on (in a one-element list)."""
    calls = [0]
    original = getattr(Outbox, name)

    def counted(self: Outbox, *args: object) -> object:
        calls[0] += 1
        return original(self, *args)

    monkeypatch.setattr(Outbox, name, counted)
    return calls


def idle_then_ship(tmp_path: Path, looks: list[int], receipts: int,
                   started: Callable[[], None] = lambda: None,
                   batch_interval: float = shipper.BATCH_INTERVAL) -> tuple[int, int]:
    """A shipper with the outbox's doorbell idles 0.3 s, then
    `receipts` are committed: (the outbox looks while idle, receipts still unlogged after
    at most GUARD). `started` runs once the shipper has started."""
    async def run() -> tuple[int, int]:
        log = FakeLog()
        await log.start()
        ob = Outbox(tmp_path)
        r, w = os.pipe()
        ob.ringer.attach(w)
        sh = Shipper(tmp_path, log.url, log.token, log.vkey, concurrency=2, bell_fd=r,
                     batch_interval=batch_interval)
        await sh.start()
        started()
        try:
            await asyncio.sleep(0.3)  # idle: 150 looks at one per POLL without the bell
            idle_looks = looks[0]
            for i in range(receipts):  # each commit rings
                await ob.put(f"{i:032x}", f"{i:064x}",
                             json.dumps({"request_hash": f"{i:064x}"}).encode())
            for _ in range(int(GUARD / 0.01)):  # only rings can wake it before NEVER
                if ob.counts()[1] == 0:
                    break
                await asyncio.sleep(0.01)
            return idle_looks, ob.counts()[1]
        finally:
            await sh.close()
            ob.close()
            await log.stop()

    return asyncio.run(run())


def test_an_idle_shipper_sleeps_until_a_commit_rings(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shipper, "IDLE_POLL", NEVER)
    monkeypatch.setattr(shipper, "IDLE_LOOKS", 1)
    idle_looks, unlogged = idle_then_ship(tmp_path, counting(monkeypatch, "unlogged_after"), 1)
    assert idle_looks <= 2
    assert unlogged == 0


def test_a_shipper_without_batch_interval_waits_on_the_bell_after_one_empty_look(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Batch interval 0 (answers wait for the log): no run of 50 empty looks first, and a
    ring starts the next look at once, not POLL after the last one."""
    monkeypatch.setattr(shipper, "IDLE_POLL", NEVER)
    looks = counting(monkeypatch, "unlogged_after")
    idle_looks, unlogged = idle_then_ship(  # from the start on, only a ring starts a look
        tmp_path, looks, 3, lambda: monkeypatch.setattr(shipper, "POLL", NEVER),
        batch_interval=0)
    assert idle_looks == 1
    assert unlogged == 0


def test_gateway_serve_hands_each_shipper_pipes_of_its_own(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[tuple[list[str], tuple[int, ...]]] = []

    class Started:
        def __init__(self, cmd: list[str], pass_fds: tuple[int, ...] = ()) -> None:
            started.append((cmd, pass_fds))
            # what the child inherits
            self.bell = os.dup(int(cmd[cmd.index("--bell-fd") + 1]))
            self.ack = os.dup(int(cmd[cmd.index("--ack-fd") + 1]))

    monkeypatch.setattr(subprocess, "Popen", Started)
    monkeypatch.setattr(shipper, "ACK_POLL", NEVER)
    ref = LogRef(url="http://127.0.0.1:9", vkey=note.generate_signer("log.test").vkey,
                 token="append-token")  # noqa: S106 - a test token
    cfg = gconfig.load(write_config(tmp_path, "http://127.0.0.1:9/v1", log=ref))
    ob = Outbox(tmp_path / "outbox")

    async def run() -> None:
        status = LogStatus(ob, True)
        await status.start()
        try:
            first = server.start_shipper(cfg, ob, status)
            waiting = asyncio.create_task(status.wait_logged("0" * 32, GUARD))
            await asyncio.sleep(0.05)  # the status now waits on the first shipper's pipe
            second = server.start_shipper(cfg, ob, status)  # the watchdog's restart
            (cmd1, fds1), (cmd2, fds2) = started
            for cmd, fds in ((cmd1, fds1), (cmd2, fds2)):
                assert fds == (int(cmd[cmd.index("--bell-fd") + 1]),
                               int(cmd[cmd.index("--ack-fd") + 1]))
            ob.ringer.ring()
            os.set_blocking(first.bell, False)
            assert os.read(first.bell, 1) == b""  # the old shipper's pipe: closed, unrung
            assert os.read(second.bell, 1) == b"\0"
            with pytest.raises(BrokenPipeError):  # the gateway stopped listening to it
                os.write(first.ack, b"\0")
            await ob.put("0" * 32, "0" * 64, b"{}")
            ledger = Ledger(tmp_path / "outbox")
            try:
                await ledger.record([(1, tlog_proof())])
            finally:
                ledger.close()
            os.write(second.ack, b"\0")  # the new shipper's ring: only it ends the wait
            assert await waiting
            for fd in (first.bell, second.bell, first.ack, second.ack):
                os.close(fd)
        finally:
            await status.close()

    try:
        asyncio.run(run())
    finally:
        ob.close()


@contextlib.asynccontextmanager
async def following(tmp_path: Path, bell: bool = True
                    ) -> AsyncIterator[tuple[Outbox, Ledger, LogStatus]]:
    """An outbox, its ledger and a started `LogStatus` hearing the ledger's doorbell (or,
    with `bell` false, polling), closed afterwards."""
    ob, ledger = Outbox(tmp_path), Ledger(tmp_path)
    status = LogStatus(ob, True)
    if bell:
        r, w = os.pipe()
        ledger.ringer.attach(w)
        status.listen(r)
    await status.start()
    try:
        yield ob, ledger, status
    finally:
        await status.close()
        ledger.close()
        ob.close()


async def eventually(holds: Callable[[], bool]) -> bool:
    """Whether `holds()` comes true within GUARD seconds (looked at every 10 ms)."""
    for _ in range(int(GUARD / 0.01)):
        if holds():
            return True
        await asyncio.sleep(0.01)
    return False


def test_a_call_waiting_for_the_log_hears_the_ledger_ring_not_a_poll(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the ledger doorbell the gateway reads the ledger when rung (not every POLL),
    and a waiting call resolves as soon as its acknowledgement is committed."""
    monkeypatch.setattr(shipper, "ACK_POLL", NEVER)
    reads = counting(monkeypatch, "logged_among")

    async def run() -> tuple[int, bool]:
        async with following(tmp_path) as (ob, ledger, status):
            await ob.put("0" * 32, "0" * 64, b"{}")
            waiting = asyncio.create_task(status.wait_logged("0" * 32, GUARD))
            await asyncio.sleep(0.3)  # unlogged: 150 reads at one per POLL without the bell
            idle_reads = reads[0]
            for _ in range(3):  # a ring is a hint: without the ledger's ack nothing resolves
                ledger.ringer.ring()
                await asyncio.sleep(0.02)
            assert not waiting.done()
            await ledger.record([(1, tlog_proof())])  # the commit rings
            return idle_reads, await waiting

    idle_reads, logged = asyncio.run(run())
    assert idle_reads <= 2
    assert logged


def test_an_idle_gateway_reads_the_shippers_state_when_rung_not_every_50_ms(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing waiting, the gateway reads the shipper's state when the ledger rings
    (the state's own commit rings too), not every STATE_POLL; a call that starts waiting
    wakes it at once, so an acknowledgement stored before that wait is not missed."""
    monkeypatch.setattr(shipper, "IDLE_POLL", NEVER)
    monkeypatch.setattr(shipper, "ACK_POLL", NEVER)
    reads = counting(monkeypatch, "state")

    async def run() -> tuple[int, bool, bool]:
        async with following(tmp_path) as (ob, ledger, status):
            await asyncio.sleep(0.3)  # idle: 6 reads at one per STATE_POLL without the bell
            idle_reads = reads[0]
            await ledger.set_state(True, "log unreachable")  # the commit rings
            seen = await eventually(lambda: status.last_error == "log unreachable")
            await ob.put("0" * 32, "0" * 64, b"{}")
            await ledger.record([(1, tlog_proof())])
            await asyncio.sleep(0.05)  # that ring came and went: no call waited then
            logged = await asyncio.wait_for(status.wait_logged("0" * 32, NEVER), GUARD)
            return idle_reads, seen and status.log_down, logged

    idle_reads, seen, logged = asyncio.run(run())
    assert idle_reads <= 2
    assert seen
    assert logged


def test_rings_faster_than_state_poll_read_the_state_at_most_that_often_and_miss_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under load the ledger rings far more often than STATE_POLL: the state is read at
    most once per STATE_POLL, and a change rung just after a read is read when due (not
    at the next ring, nor IDLE_POLL later)."""
    monkeypatch.setattr(shipper, "IDLE_POLL", NEVER)
    monkeypatch.setattr(shipper, "ACK_POLL", NEVER)
    reads = counting(monkeypatch, "state")

    async def run() -> tuple[int, bool]:
        async with following(tmp_path) as (_, ledger, status):
            await asyncio.sleep(0.05)
            before = reads[0]
            for _ in range(60):  # 0.3 s of rings every 5 ms: 60 reads if each rang one
                ledger.ringer.ring()
                await asyncio.sleep(0.005)
            flood_reads = reads[0] - before
            await ledger.set_state(True, None)  # rung once, right after the flood's reads
            return flood_reads, await eventually(lambda: status.log_down)

    flood_reads, seen = asyncio.run(run())
    assert flood_reads <= 0.3 / shipper.STATE_POLL + 2
    assert seen


def test_without_a_bell_the_gateway_polls_the_shippers_state(tmp_path: Path) -> None:
    """No ledger doorbell (a gateway started without one): the state is still followed."""
    async def run() -> bool:
        async with following(tmp_path, bell=False) as (_, ledger, status):
            await asyncio.sleep(0.05)
            await ledger.set_state(True, None)
            return await eventually(lambda: status.log_down)

    assert asyncio.run(run())


def test_a_draining_gateway_answers_waiting_calls_after_the_grace_not_at_the_cancel(
        tmp_path: Path) -> None:
    """`drain` (the server is stopping): a call acknowledged within the grace is still
    logged; one that is not returns False once the grace is over, as does a call that
    starts waiting afterwards, whatever its own timeout."""
    async def run() -> tuple[bool, bool, bool]:
        async with following(tmp_path, bell=False) as (ob, ledger, status):
            for rid in ("1" * 32, "2" * 32):
                await ob.put(rid, rid * 2, b"{}")
            logged = asyncio.create_task(status.wait_logged("1" * 32, NEVER))
            unlogged = asyncio.create_task(status.wait_logged("2" * 32, NEVER))
            await asyncio.sleep(0.05)
            status.drain(0.3)
            status.drain(NEVER)  # a later, longer drain does not extend the first (GUARD)
            await ledger.record([(1, tlog_proof())])
            late = await asyncio.wait_for(status.wait_logged("3" * 32, NEVER), GUARD)
            return (await asyncio.wait_for(logged, GUARD),
                    await asyncio.wait_for(unlogged, GUARD), late)

    logged, unlogged, late = asyncio.run(run())
    assert logged
    assert not unlogged
    assert not late


def tlog_proof() -> proof.TlogProof:
    """A well-formed proof (the ledger stores it; nothing here verifies it)."""
    signer = note.generate_signer("log.test")
    cp = checkpoint.Checkpoint("log.test", 1, merkle.leaf_hash(b"{}"))
    return proof.TlogProof(0, (), checkpoint.sign(cp, signer))


@pytest.mark.parametrize("flag", ["--bell-fd", "--ack-fd"])
def test_the_shipper_refuses_a_doorbell_fd_that_is_not_a_pipe(tmp_path: Path, flag: str) -> None:
    r = subprocess.run([sys.executable, "-m", "gateway.receipts.shipper", "--data", str(tmp_path),
                        "--log", "http://127.0.0.1:9", flag, "0"],
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 2
    assert f"{flag}: not an open pipe" in r.stderr
