"""Gateway-side faults (#17): the outbox stays bounded, refuses cleanly at its bound and on
storage faults, heals by itself, and no acknowledged receipt is lost or logged twice.

"Acknowledged" here means a model call answered 200 (a stream: ended with its last
chunk). docs/reliability.md has the table of these rows and what was observed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import sqlite3
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.receipts import outbox as ob
from gateway.receipts.outbox import Ledger, Outbox
from tests.test_gateway_fakes import API_KEY, FakeLog, FakeProvider, run_gateway, write_config
from tests.test_tlog_faults import fill
from tlog import proof

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hello"}]}


def logged_ids(log: FakeLog) -> Counter[str]:
    """How many times the log holds each receipt id (keyset entries have none)."""
    return Counter(json.loads(e).get("id") for e in log.entries
                   if json.loads(e).get("v", "").startswith("pag-receipt"))


async def all_logged(log: FakeLog, ids: list[str], timeout: float = 30.0) -> Counter[str]:
    """Wait (bounded) until every id is in the log; the log's count per id."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        held = logged_ids(log)
        missing = [i for i in ids if i not in held]
        if not missing:
            return held
        assert loop.time() < deadline, f"{len(missing)} acknowledged receipts never logged"
        await asyncio.sleep(0.05)


async def chat(c: httpx.AsyncClient, url: str, stream: bool = False) -> httpx.Response:
    return await c.post(url + "/v1/chat/completions", json=dict(CHAT, stream=stream),
                        headers=AUTH)


# -- bounded files -------------------------------------------------------------------


def test_files_stay_bounded_and_only_logged_receipts_past_retention_are_pruned(
        tmp_path: Path) -> None:
    """WAL truncated past its limit under a steady load; pruning deletes logged receipts
    past the retention (oldest first, never past an unlogged one, never the newest); the
    ledger follows; receipt numbers are never reused; the files shrink."""
    entry = os.urandom(800).hex().encode()  # ~ a receipt's size
    bound = 16 << 20  # far above what 2,000 receipts use: only the retention prunes
    limit = ob.wal_limit(bound)  # 1 MiB
    wal_seen: list[int] = []

    async def go() -> None:
        box = Outbox(tmp_path, max_bytes=bound, retention=3600)
        ledger = Ledger(tmp_path, max_bytes=bound)
        for n in range(40):
            await asyncio.gather(*(box.put(f"{n:08x}{i:024x}", f"{i:064x}", entry)
                                   for i in range(50)))
            with contextlib.suppress(FileNotFoundError):
                wal_seen.append((tmp_path / f"{ob.OUTBOX_FILE}-wal").stat().st_size)
        rows = box.unlogged_after(0, 5000)
        assert len(rows) == 2000
        skip = rows[1500][0]  # one receipt the log never acknowledged
        for seq, _, e in rows:
            if seq != skip:
                await ledger.record([(seq, proof.TlogProof(seq, (b"h" * 32,), b"cp\n", e))])
        full = sum((tmp_path / f).stat().st_size for f in (ob.OUTBOX_FILE, ob.LEDGER_FILE))
        assert not box.near_bound()
        assert await box.prune() == 0  # all younger than the retention
        now = time.time() + 7200
        while await box.prune(now):
            pass
        assert box.pruned_through() == skip - 1  # stopped at the unlogged receipt
        await ledger.prune(box.pruned_through())
        assert box.counts() == (500, 1)
        assert box.get(rows[1499][1]) is None and box.get(rows[1500][1]) is not None
        await ledger.record([(skip, proof.TlogProof(skip, (b"h" * 32,), b"cp\n", entry))])
        while await box.prune(now):
            pass
        assert box.pruned_through() == rows[-1][0] - 1  # the newest is kept
        await ledger.prune(box.pruned_through())
        assert box.counts() == (1, 0)
        await box.put("f" * 32, "0" * 64, entry)
        assert box.unlogged_after(0)[0][0] == rows[-1][0] + 1  # never a reused number
        await box.probe()  # a commit after the deletions, then the vacuum ran
        small = sum((tmp_path / f).stat().st_size for f in (ob.OUTBOX_FILE, ob.LEDGER_FILE))
        assert small < full / 10, (small, full)
        ledger.close()
        box.close()

    asyncio.run(go())
    assert max(wal_seen) <= limit + (256 << 10), wal_seen  # truncated once past the limit


# -- the bound -----------------------------------------------------------------------


def test_at_the_bound_calls_are_refused_then_served_once_the_log_catches_up(
        tmp_path: Path) -> None:
    """The log down, receipts pile up: past 80% the alarm metric is 1, at the bound every
    call is refused 503 outbox_full with nothing forwarded; log back: all ship once,
    pruning makes room, calls are served again with no restart."""
    bound = 1 << 20

    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, log=log,
                               extra_gateway=f"outbox_max_bytes = {bound}\n")
            async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=20) as c:
                log.fail = True
                acked: list[str] = []
                refused: list[httpx.Response] = []
                alarm = 0.0
                while len(refused) < 5:
                    rs = await asyncio.gather(*(chat(c, gw.url) for _ in range(8)))
                    for r in rs:
                        if r.status_code == 200:
                            acked.append(r.headers["x-receipt-id"])
                        else:
                            refused.append(r)
                    if not alarm:
                        alarm = metric(await c.get(gw.url + "/metrics"),
                                       "pag_gateway_outbox_near_bound")
                    assert len(acked) < 5000, "the bound never refused a call"
                assert alarm == 1.0  # raised before the first refusal
                for r in refused:
                    assert r.status_code == 503
                    assert r.json()["error"]["code"] == "outbox_full"
                    assert "x-receipt-id" not in r.headers  # no receipt: none could be kept
                forwarded = len(prov.received)
                assert (await chat(c, gw.url)).status_code == 503
                assert len(prov.received) == forwarded  # nothing went upstream
                used = metric(await c.get(gw.url + "/metrics"), "pag_gateway_outbox_bytes")
                assert bound <= used < bound * 1.25
                log.fail = False  # the log is back: ship, prune, serve
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 40
                while (r := await chat(c, gw.url)).status_code != 200:
                    assert loop.time() < deadline, "never served again"
                    await asyncio.sleep(0.2)
                acked.append(r.headers["x-receipt-id"])
                held = await all_logged(log, acked)
                assert all(held[i] == 1 for i in acked)
                assert all(n == 1 for n in held.values())  # nothing logged twice
        finally:
            await prov.stop()
            await log.stop()

    asyncio.run(go())


def metric(r: httpx.Response, name: str) -> float:
    line = next(x for x in r.text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


# -- storage faults ------------------------------------------------------------------

ERRORS = {
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "EROFS": OSError(errno.EROFS, "Read-only file system"),
    "SQLITE_FULL": sqlite3.OperationalError("database or disk is full"),
}


@pytest.mark.parametrize("error", sorted(ERRORS))
@pytest.mark.parametrize("step", ["begin", "write", "commit", "committed"])
def test_outbox_storage_fault_at_each_step_is_503_and_heals(tmp_path: Path, step: str,
                                                            error: str) -> None:
    """A write refused at each step of the outbox transaction: the call is 503
    outbox_unavailable (a stream is cut off without its last chunk), later calls are
    refused before anything is forwarded, metrics say so; the fault cleared, the next
    call is served, no restart; every acknowledged receipt is logged exactly once."""
    armed = False

    def fault(where: str) -> None:
        if armed and where == step:
            raise ERRORS[error]

    async def go() -> None:
        nonlocal armed
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, log=log)
            async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=20) as c:
                gw.app.svc.outbox.faults = fault
                acked = [(await chat(c, gw.url)).headers["x-receipt-id"] for _ in range(3)]
                armed = True
                async with c.stream("POST", gw.url + "/v1/chat/completions", headers=AUTH,
                                    json=dict(CHAT, stream=True)) as s:
                    assert s.status_code == 200  # the head went out before the commit
                    got = b""
                    with pytest.raises(httpx.HTTPError):  # no last chunk: not acknowledged
                        async for chunk in s.aiter_raw():
                            got += chunk
                    assert b'"code":"outbox_unavailable"' in got
                forwarded = len(prov.received)
                for stream in (False, True):
                    r = await chat(c, gw.url, stream)
                    assert r.status_code == 503
                    assert r.json()["error"]["code"] == "outbox_unavailable"
                assert len(prov.received) == forwarded  # refused before forwarding
                m = await c.get(gw.url + "/metrics")
                assert metric(m, "pag_gateway_outbox_failing") == 1
                assert 'code="outbox_unavailable"' in m.text
                armed = False  # the disk recovers: served again at once
                r = await chat(c, gw.url)
                assert r.status_code == 200
                acked.append(r.headers["x-receipt-id"])
                r = await chat(c, gw.url, True)
                assert r.status_code == 200 and r.text.endswith("[DONE]\n\n")
                acked.append(r.headers["x-receipt-id"])
                assert metric(await c.get(gw.url + "/metrics"),
                              "pag_gateway_outbox_failing") == 0
                held = await all_logged(log, acked)
                assert all(n == 1 for n in held.values())
        finally:
            await prov.stop()
            await log.stop()

    asyncio.run(go())


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 3 MiB tmpfs; skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); the injected "
                    "storage-fault test covers the same refusals")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_disk_full_under_the_outbox_is_503_and_heals(tmp_path: Path,
                                                         tmpfs: Path) -> None:
    """The data directory on a tmpfs filled up: calls 503 outbox_unavailable (never a 500,
    never an answer without its receipt); space freed: served again with no restart;
    every acknowledged receipt logged exactly once."""

    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, log=log)
            cfg.write_text(cfg.read_text().replace('data_dir = "data"', f'data_dir = "{tmpfs}"'))
            async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=20) as c:
                acked = [(await chat(c, gw.url)).headers["x-receipt-id"] for _ in range(3)]
                filler = fill(tmpfs)
                statuses: Counter[int] = Counter()
                codes: Counter[str] = Counter()
                for _ in range(400):
                    r = await chat(c, gw.url)
                    statuses[r.status_code] += 1
                    if r.status_code == 200:
                        acked.append(r.headers["x-receipt-id"])
                    else:
                        codes[r.json()["error"]["code"]] += 1
                    if codes["outbox_unavailable"] >= 3:
                        break
                assert codes["outbox_unavailable"] >= 3, (statuses, codes)
                assert set(statuses) <= {200, 503}
                filler.unlink()
                r = await chat(c, gw.url)
                assert r.status_code == 200
                acked.append(r.headers["x-receipt-id"])
                held = await all_logged(log, acked)
                assert all(n == 1 for n in held.values())
        finally:
            await prov.stop()
            await log.stop()

    asyncio.run(go())
