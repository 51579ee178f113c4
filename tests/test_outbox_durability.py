"""No receipt is lost: kill -9 of the gateway under load, and the log killed under load."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.receipts import shipper
from tests.test_gateway_fakes import (
    API_KEY,
    COMPLETION,
    MARKER,
    FakeLog,
    FakeProvider,
    LogRef,
    free_port,
    run_gateway,
    write_config,
)
from tlog import checkpoint, note, proof
from verifier import receipt

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BODY = {"model": "chat-model", "messages": [{"role": "user", "content": MARKER}]}


async def load(url: str, acked: list[str], stop: asyncio.Event, workers: int = 8) -> int:
    """POST until `stop`; collect receipt ids of 200 answers; count failures."""
    failures = 0

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal failures
        while not stop.is_set():
            try:
                r = await c.post(url + "/v1/chat/completions", json=BODY, headers=AUTH)
            except httpx.HTTPError:
                failures += 1
                await asyncio.sleep(0.01)
                continue
            if r.status_code == 200:
                acked.append(r.headers["x-receipt-id"])
            else:
                failures += 1

    async with httpx.AsyncClient(timeout=10) as c:
        await asyncio.gather(*(worker(c) for _ in range(workers)))
    return failures


async def wait_logged(c: httpx.AsyncClient, url: str, ids: list[str], vkey: str | None,
                      timeout: float = 60) -> None:
    """Every id has its receipt, its proof, and (with vkey) the proof verifies."""
    verifier = note.verifier_from_vkey(vkey) if vkey else None
    pending = list(ids)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while pending:
        assert loop.time() < deadline, f"{len(pending)} receipts never logged"
        rid = pending[-1]
        r = await c.get(f"{url}/v1/receipts/{rid}")
        assert r.status_code == 200, f"receipt {rid} lost"
        doc = r.json()
        if doc["proof"] is None:
            await asyncio.sleep(0.05)
            continue
        receipt.verify(doc["receipt"])
        if verifier is not None:
            p = proof.parse(doc["proof"].encode())
            cp, _ = checkpoint.open(p.checkpoint, verifier)
            proof.check_inclusion(p, cp, receipt.entry(doc["receipt"]))
        pending.pop()


async def wait_ready(url: str, proc: Any, path: str = "/healthz", timeout: float = 30) -> None:
    """Wait (bounded) until the server process `proc` answers `GET url+path` with 200."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with httpx.AsyncClient() as c:
        while True:
            assert proc.returncode is None, f"the server for {url} exited"
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url + path)).status_code == 200:
                    return
            assert loop.time() < deadline, f"{url}{path} did not answer in time"
            await asyncio.sleep(0.05)


async def shippers_gone(data: Path, timeout: float = 15.0) -> None:
    """Wait until no shipper holds the data directory's lock (all have closed their files)."""
    fd = os.open(data / shipper.LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for _ in range(int(timeout / 0.05)):
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("a shipper still holds the data directory")
    finally:
        os.close(fd)


def test_gateway_kill9_under_load_loses_no_receipt(tmp_path: Path) -> None:
    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = write_config(tmp_path, prov.base_url, log=log)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "tests.test_gateway_fakes", str(cfg), str(port)]
        procs = []
        out = open(tmp_path / "gateway.out", "wb")  # noqa: SIM115 - closed below
        try:
            gw = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT, stdout=out,
                                                      stderr=out)
            procs.append(gw)
            await wait_ready(url, gw)
            acked: list[str] = []
            stop = asyncio.Event()
            loader = asyncio.create_task(load(url, acked, stop))
            while len(acked) < 150:
                await asyncio.sleep(0.01)
            gw.kill()  # SIGKILL, mid-load
            await gw.wait()
            stop.set()
            await loader
            assert len(acked) >= 150
            gw = await asyncio.create_subprocess_exec(*cmd, env=env, cwd=ROOT, stdout=out,
                                                      stderr=out)
            procs.append(gw)
            await wait_ready(url, gw)
            async with httpx.AsyncClient(timeout=10) as c:
                await wait_logged(c, url, acked, log.vkey)
            logged = {json.loads(e)["id"] for e in log.entries}
            assert set(acked) <= logged
            gw.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(gw.wait(), 15) is not None
        finally:
            for p in procs:
                if p.returncode is None:
                    p.kill()
                    await p.wait()
            await prov.stop()
            await log.stop()
            out.close()
        await shippers_gone(tmp_path / "data")  # the killed gateway's shipper exits late
        data = (tmp_path / "data").iterdir()
        for blob in [(tmp_path / "gateway.out").read_bytes(), *log.entries,
                     *(p.read_bytes() for p in data)]:
            assert MARKER.encode() not in blob and COMPLETION.encode() not in blob
    asyncio.run(go())


async def log_killed_under_load(tmp_path: Path, ref: LogRef, kill: Any, restart: Any) -> None:
    """Load through an in-process gateway; kill the log, bring it back; all gets logged."""
    prov = FakeProvider()
    await prov.start()
    try:
        (tmp_path / "gw").mkdir()
        cfg = write_config(tmp_path / "gw", prov.base_url, log=ref)
        async with run_gateway(cfg) as gw:
            acked: list[str] = []
            stop = asyncio.Event()
            loader = asyncio.create_task(load(gw.url, acked, stop))
            while len(acked) < 50:
                await asyncio.sleep(0.01)
            await kill()  # the log dies mid-load: the gateway serves and queues
            mark = len(acked)
            while len(acked) < mark + 100:
                await asyncio.sleep(0.01)
            await restart()
            while len(acked) < mark + 150:
                await asyncio.sleep(0.01)
            stop.set()
            assert await loader == 0  # serve-and-queue: no call failed
            async with httpx.AsyncClient(timeout=10) as c:
                await wait_logged(c, gw.url, acked, ref.vkey)
    finally:
        await prov.stop()


def test_fake_log_killed_under_load_loses_no_receipt(tmp_path: Path) -> None:
    async def go() -> None:
        log = FakeLog()
        await log.start()
        try:
            await log_killed_under_load(tmp_path, LogRef(log.url, log.token, log.vkey),
                                        log.stop, log.start)
        finally:
            await log.stop()
    asyncio.run(go())


def test_tlog_killed_under_load_loses_no_receipt(tmp_path: Path) -> None:
    if not (ROOT / "tlog" / "__main__.py").exists():
        pytest.skip("tlog serve is not available yet (tlog/__main__.py missing)")
    log_dir = tmp_path / "tlog"
    log_port = free_port()
    log_url = f"http://127.0.0.1:{log_port}"
    cmd = [sys.executable, "-m", "tlog", "serve", "--data", str(log_dir),
           "--listen", f"127.0.0.1:{log_port}"]
    procs: list[asyncio.subprocess.Process] = []

    async def start_log() -> None:
        p = await asyncio.create_subprocess_exec(*cmd, cwd=ROOT, stdout=subprocess.DEVNULL)
        procs.append(p)
        await wait_ready(log_url, p, "/checkpoint")

    async def kill_log() -> None:
        procs[-1].kill()
        await procs[-1].wait()

    async def go() -> None:
        await start_log()
        try:
            ref = LogRef(log_url, (log_dir / "append.token").read_text().strip(),
                         (log_dir / "log.vkey").read_text().strip())
            await log_killed_under_load(tmp_path, ref, kill_log, start_log)
        finally:
            for p in procs:
                if p.returncode is None:
                    p.terminate()
                    await p.wait()
    asyncio.run(go())
