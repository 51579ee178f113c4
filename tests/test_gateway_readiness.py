"""/healthz and /readyz tell the truth: each dependency is broken and /readyz says so."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import health
from gateway.api.health import Check, Readiness
from tests.test_gateway_fakes import (
    API_KEY,
    COMPLETION,
    FakeLog,
    FakeProvider,
    free_port,
    run_gateway,
    write_config,
)
from tlog import note

ROOT = Path(__file__).resolve().parents[1]


def test_verdict_is_cached_shared_and_bounded() -> None:
    runs: list[str] = []

    async def ok() -> None:
        runs.append("ok")
        await asyncio.sleep(0.01)

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def down() -> None:
        raise ConnectionRefusedError("connect to 127.0.0.1:1 refused")

    async def go() -> None:
        r = Readiness([Check("a", ok), Check("cache", down, required=False)], ttl=60)
        verdicts = await asyncio.gather(*(r.verdict() for _ in range(10)))
        assert runs == ["ok"]  # ten callers, one run
        ready, checks = verdicts[0]
        assert ready is True  # an optional check never gates readiness
        assert checks["cache"] == {"ok": False, "required": False,
                                   "error": "ConnectionRefusedError: connect to 127.0.0.1:1 "
                                            "refused"}
        assert await r.verdict() == verdicts[0] and runs == ["ok"]  # cached
        slow = Readiness([Check("a", ok), Check("b", hangs)], timeout=0.05, ttl=0)
        ready, checks = await slow.verdict()
        assert ready is False and checks["a"]["ok"] is True
        assert checks["b"] == {"ok": False, "required": True, "error": "no answer within 0.05 s"}
    asyncio.run(go())


async def readyz(c: httpx.AsyncClient, url: str) -> tuple[int, dict[str, Any]]:
    r = await c.get(url + "/readyz")
    assert r.headers["cache-control"] == "no-store"
    return r.status_code, r.json()


def test_readyz_follows_the_outbox_and_the_log(tmp_path: Path) -> None:
    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, log=log)

            def checks(outbox: Any) -> Readiness:
                return Readiness([Check("outbox", outbox.probe),
                                  Check("log", health.log_probe(log.url, log.vkey))], ttl=0)

            async with run_gateway(cfg, readiness=checks) as gw, httpx.AsyncClient() as c:
                status, doc = await readyz(c, gw.url)
                assert (status, doc["ready"]) == (200, True), doc
                assert set(doc["checks"]) == {"outbox", "log"}

                log.fail = True  # the log answers 503
                status, doc = await readyz(c, gw.url)
                assert (status, doc["ready"]) == (503, False)
                assert doc["checks"]["log"]["ok"] is False
                assert "503" in doc["checks"]["log"]["error"]
                assert doc["checks"]["outbox"]["ok"] is True
                assert (await c.get(gw.url + "/healthz")).status_code == 200  # still alive
                log.fail = False
                assert (await readyz(c, gw.url))[0] == 200

                writer = gw.app.svc.outbox._writer._wconn  # the outbox stops taking writes
                writer.execute("PRAGMA query_only=1")
                status, doc = await readyz(c, gw.url)
                assert status == 503 and doc["checks"]["outbox"]["ok"] is False
                assert "readonly" in doc["checks"]["outbox"]["error"]
                assert doc["checks"]["log"]["ok"] is True
                chat = await c.post(gw.url + "/v1/chat/completions", headers={
                    "Authorization": f"Bearer {API_KEY}"}, json={
                    "model": "chat-model", "messages": [{"role": "user", "content": "hi"}]})
                assert chat.status_code == 503  # no receipt, so the call is refused
                assert chat.json()["error"]["code"] == "outbox_unavailable"
                assert COMPLETION not in chat.text
                writer.execute("PRAGMA query_only=0")
                assert (await readyz(c, gw.url))[0] == 200

                await log.stop()  # nothing listens any more
                status, doc = await readyz(c, gw.url)
                assert status == 503 and doc["checks"]["log"]["ok"] is False
        finally:
            await prov.stop()
            await log.stop()
    asyncio.run(go())


def test_log_probe_refuses_a_checkpoint_signed_by_another_key() -> None:
    async def go() -> None:
        log = FakeLog()
        await log.start()
        try:
            await health.log_probe(log.url, log.vkey)()
            other = note.generate_signer("fake.log/test").vkey
            with pytest.raises(ValueError):
                await health.log_probe(log.url, other)()
        finally:
            await log.stop()
    asyncio.run(go())


def test_agent_probe_follows_the_guest_agent(short_dir: Path) -> None:
    from dstack_sdk import AsyncDstackClient

    from gateway.identity.dstack_sim import SimulatorServer

    async def go() -> None:
        sock = short_dir / "a.sock"
        async with SimulatorServer(sock, short_dir / "sim"):
            probe = health.agent_probe(AsyncDstackClient(str(sock)))
            await probe()
        with pytest.raises(Exception):  # noqa: B017 - whatever the SDK raises: not ready
            await probe()
        ready, checks = await Readiness([Check("key_agent", probe)], timeout=2).verdict()
        assert ready is False and checks["key_agent"]["ok"] is False
    asyncio.run(go())


# -- the real `gateway serve`, its simulator and its log as processes ------------------


@contextlib.contextmanager
def process(args: list[str], out: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A child `python ARGS` (its output in `out`), killed on exit."""
    with out.open("wb") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=f, stdin=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def first_line(proc: subprocess.Popen[bytes], log: Path) -> dict[str, Any]:
    """The JSON line a child prints once it is ready."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"no ready line; stderr:\n{log.read_text()[-3000:]}"
    return json.loads(line)


def wait_for(check: Any, what: str, timeout: float = 20.0) -> Any:
    """Poll `check()` until it returns something truthy."""
    async def go() -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                got = await check()
                if got:
                    return got
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.1)
    return asyncio.run(go())


def test_serve_readyz_checks_the_real_agent_log_outbox_and_shipper(short_dir: Path) -> None:
    sock = short_dir / "agent.sock"
    tlog_dir = short_dir / "tlog"
    vkey = subprocess.run([sys.executable, "-m", "tlog", "vkey", "--data", str(tlog_dir)],
                          cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    log_url = f"http://127.0.0.1:{free_port()}"
    with process(["-m", "gateway.identity.dstack_sim", "--socket", str(sock), "--data",
                  str(short_dir / "sim")], short_dir / "sim.err") as sim, \
            process(["-m", "tlog", "serve", "--data", str(tlog_dir), "--listen",
                     log_url.removeprefix("http://")], short_dir / "tlog.err") as tlog:
        first_line(sim, short_dir / "sim.err")
        cfg = short_dir / "gateway.toml"
        cfg.write_text(f'[gateway]\ndata_dir = "gw"\n[dstack]\nendpoint = "{sock}"\n'
                       f'[log]\nurl = "{log_url}"\ntoken_file = "{tlog_dir}/append.token"\n'
                       f'vkey = "{vkey}"\n')
        with process(["-m", "gateway", "serve", "--config", str(cfg), "--no-tls", "--listen",
                      "127.0.0.1:0"], short_dir / "gw.err") as gw:
            url = first_line(gw, short_dir / "gw.err")["gateway"]
            assert not url.endswith(":0")

            async def ready() -> dict[str, Any] | None:
                async with httpx.AsyncClient() as c:
                    r = await c.get(url + "/readyz")
                return r.json() if r.status_code == 200 else None
            doc = wait_for(ready, "readiness")
            assert set(doc["checks"]) == {"outbox", "log", "shipper", "key_agent"}

            def not_ready(name: str) -> Any:
                async def check() -> dict[str, Any] | None:
                    async with httpx.AsyncClient() as c:
                        r = await c.get(url + "/readyz")
                    doc = r.json()
                    return doc if r.status_code == 503 and not doc["checks"][name]["ok"] \
                        else None
                return check

            sim.send_signal(signal.SIGTERM)  # the guest agent goes away
            sim.wait(10)
            doc = wait_for(not_ready("key_agent"), "key_agent not ready")
            assert doc["checks"]["log"]["ok"] and doc["checks"]["outbox"]["ok"]
            tlog.kill()
            tlog.wait()
            wait_for(not_ready("log"), "log not ready")
            assert httpx.get(url + "/healthz").status_code == 200
            assert httpx.post(url + "/v1/chat/completions", json={}).status_code == 401
            gw.send_signal(signal.SIGTERM)
            assert gw.wait(15) == 0
        lines = [json.loads(ln) for ln in (short_dir / "gw.err").read_text().splitlines()
                 if ln.strip()]
        assert all({"time", "level", "logger", "msg"} <= set(d) for d in lines)
        assert [(d["kind"], d["status"]) for d in lines if d["logger"] == "gateway.calls"] == [
            ("chat", 401)]
