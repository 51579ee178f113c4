"""The gateway's doorbell for its shipper: a ring wakes an idle shipper, a lost or
unheard ring costs nothing but the fallback poll, and nothing but a FIFO is used."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path

import pytest

from gateway.receipts import doorbell, shipper
from gateway.receipts.doorbell import BELL_FILE, Bell, Ringer
from gateway.receipts.outbox import Outbox
from gateway.receipts.shipper import Shipper
from tests.test_gateway_fakes import FakeLog

NEVER = 60.0  # a wait this long would fail the test's own guard: only a ring ends it
GUARD = 10.0


def test_a_ring_wakes_a_waiting_bell_and_one_rung_before_the_wait_is_not_missed(
        tmp_path: Path) -> None:
    async def run() -> None:
        bell = Bell(tmp_path)
        assert bell.open()
        mode = (tmp_path / BELL_FILE).stat().st_mode
        assert stat.S_ISFIFO(mode) and stat.S_IMODE(mode) == 0o600
        ringer = Ringer(tmp_path)
        try:
            asyncio.get_running_loop().call_later(0.05, ringer.ring)
            await asyncio.wait_for(bell.wait(NEVER), GUARD)  # woken while waiting
            ringer.ring()  # between a look and the wait
            await asyncio.wait_for(bell.wait(NEVER), GUARD)
            probe = os.open(tmp_path / BELL_FILE, os.O_RDONLY | os.O_NONBLOCK)
            with pytest.raises(BlockingIOError):  # the wait took every ring with it
                os.read(probe, 1)
            os.close(probe)
        finally:
            ringer.close()
            bell.close()

    asyncio.run(run())


def test_ringing_without_a_shipper_is_harmless_and_reaches_the_next_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doorbell, "REOPEN", 0.0)

    async def run() -> None:
        ringer = Ringer(tmp_path)
        ringer.ring()  # no FIFO at all
        assert not (tmp_path / BELL_FILE).exists()
        os.mkfifo(tmp_path / BELL_FILE, 0o600)
        ringer.ring()  # a FIFO nobody reads (ENXIO)
        first = Bell(tmp_path)
        assert first.open()
        ringer.ring()
        first.close()  # the shipper goes away: the next ring meets EPIPE
        for _ in range(3):
            ringer.ring()
        second = Bell(tmp_path)
        assert second.open()
        try:
            ringer.ring()
            await asyncio.wait_for(second.wait(NEVER), GUARD)
        finally:
            ringer.close()
            second.close()

    asyncio.run(run())


def test_nothing_but_a_fifo_is_used_at_the_bell_path(tmp_path: Path) -> None:
    async def run() -> None:
        plain = tmp_path / "plain"
        plain.mkdir()
        (plain / BELL_FILE).write_bytes(b"not a fifo")
        assert not Bell(plain).open()
        Ringer(plain).ring()
        assert (plain / BELL_FILE).read_bytes() == b"not a fifo"

        linked = tmp_path / "linked"
        linked.mkdir()
        os.mkfifo(tmp_path / "elsewhere", 0o600)
        (linked / BELL_FILE).symlink_to(tmp_path / "elsewhere")
        assert not Bell(linked).open()  # not followed
        reader = os.open(tmp_path / "elsewhere", os.O_RDONLY | os.O_NONBLOCK)
        try:
            Ringer(linked).ring()
            try:
                got = os.read(reader, 1)  # b"": no writer ever opened it
            except BlockingIOError:
                got = b""
            assert got == b""  # nothing was written through the link
        finally:
            os.close(reader)

    asyncio.run(run())


def test_an_idle_shipper_sleeps_until_a_commit_rings(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shipper, "IDLE_POLL", NEVER)
    monkeypatch.setattr(shipper, "IDLE_LOOKS", 1)
    looks = 0
    unlogged_after = Outbox.unlogged_after

    def counted(self: Outbox, *args: object) -> object:
        nonlocal looks
        looks += 1
        return unlogged_after(self, *args)

    monkeypatch.setattr(Outbox, "unlogged_after", counted)

    async def run() -> tuple[int, int]:
        log = FakeLog()
        await log.start()
        ob = Outbox(tmp_path)
        sh = Shipper(tmp_path, log.url, log.token, log.vkey, concurrency=2)
        await sh.start()
        try:
            await asyncio.sleep(0.3)  # idle: 150 looks at one per POLL without the bell
            idle_looks = looks
            await ob.put("0" * 32, "0" * 64, json.dumps({"request_hash": "0" * 64}).encode())
            for _ in range(int(GUARD / 0.01)):  # only the ring can wake it before NEVER
                if ob.counts()[1] == 0:
                    break
                await asyncio.sleep(0.01)
            return idle_looks, ob.counts()[1]
        finally:
            await sh.close()
            ob.close()
            await log.stop()

    idle_looks, unlogged = asyncio.run(run())
    assert idle_looks <= 2
    assert unlogged == 0
