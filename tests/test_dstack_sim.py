"""The dstack guest-agent simulator, driven by the real dstack_sdk client."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.identity.dstack_sim import SimulatorServer
from verifier.tee import eventlog, quote

dstack_sdk = pytest.importorskip("dstack_sdk")

APP_ID = "aa" * 20
COMPOSE = "bb" * 32


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A short directory (unix socket paths are limited to ~107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="pagsim-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_get_key_is_deterministic_across_restarts(short_dir: Path) -> None:
    sock, data = short_dir / "a.sock", short_dir / "data"

    async def keys() -> tuple[str, str, str, str, list[str]]:
        async with SimulatorServer(sock, data, app_id=APP_ID):
            c = dstack_sdk.AsyncDstackClient(str(sock))
            k1 = await c.get_key("gw/receipt", "signing")
            k2 = await c.get_key("gw/other", "signing")
            k3 = await c.get_key("gw/receipt", "another-purpose")
            k4 = await c.get_key("gw/receipt", "signing", algorithm="ed25519")
            return k1.key, k2.key, k3.key, k4.key, k1.signature_chain

    a = asyncio.run(keys())
    assert not sock.exists()  # stop removes the socket
    b = asyncio.run(keys())
    assert a == b  # same data dir and app id after a restart: same keys and chain
    assert len(bytes.fromhex(a[0])) == 32 and len(a[4]) == 2
    assert a[0] != a[1]  # path separates keys
    assert a[0] == a[2] == a[3]  # as in dstack: purpose/algorithm do not change the key

    async def other_app() -> str:
        async with SimulatorServer(sock, data, app_id="cc" * 20):
            return (await dstack_sdk.AsyncDstackClient(str(sock)).get_key("gw/receipt")).key

    assert asyncio.run(other_app()) != a[0]
    assert oct((data / "sim-seed").stat().st_mode & 0o777) == "0o600"


def test_get_quote_round_trips_report_data(short_dir: Path) -> None:
    sock = short_dir / "q.sock"

    async def run() -> None:
        async with SimulatorServer(sock, short_dir / "data", app_id=APP_ID,
                                   compose_hash=COMPOSE):
            c = dstack_sdk.AsyncDstackClient(str(sock))
            rd = bytes(range(64))
            resp = await c.get_quote(rd)
            raw = resp.decode_quote()
            assert quote.is_simulated(raw)
            q = quote.parse_quote(raw)
            assert q.report.report_data == rd
            assert resp.report_data == rd.hex()
            rep = eventlog.replay(resp.event_log)
            assert rep.rtmr3 == q.report.rtmr3
            assert resp.replay_rtmrs()[3] == q.report.rtmr3.hex()  # SDK's own replay agrees
            assert rep.app_id == APP_ID and rep.compose_hash == COMPOSE
            short = await c.get_quote(b"abc")
            assert quote.parse_quote(short.decode_quote()).report.report_data == (
                b"abc" + bytes(61))
            # The SDK refuses > 64 bytes itself; the agent refuses it too.
            async with httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=str(sock)),
                                         base_url="http://localhost") as h:
                r = await h.post("/GetQuote", json={"report_data": "00" * 65})
                assert r.status_code == 400 and "too long" in r.json()["error"]
                r = await h.post("/NoSuchMethod", json={})
                assert r.status_code == 404

    asyncio.run(run())


def test_info_and_emit_event(short_dir: Path) -> None:
    sock = short_dir / "i.sock"

    async def run() -> None:
        async with SimulatorServer(sock, short_dir / "data", app_id=APP_ID,
                                   compose_hash=COMPOSE) as srv:
            c = dstack_sdk.AsyncDstackClient(str(sock))
            info = await c.info()
            assert info.app_id == APP_ID and info.compose_hash == COMPOSE
            assert info.instance_id == srv.agent.instance_id.hex()
            assert json.loads(info.key_provider_info)["name"] == "kms"
            before = info.tcb_info.rtmr3
            assert eventlog.replay([e.model_dump() for e in info.tcb_info.event_log]
                                   ).rtmr3.hex() == before
            await c.emit_event("app-event", b"payload")
            after = (await c.info()).tcb_info.rtmr3
            assert after != before
            q = await c.get_quote(b"x")
            assert quote.parse_quote(q.decode_quote()).report.rtmr3.hex() == after
            assert eventlog.replay(q.event_log).runtime_events[-1] == "app-event"
            assert (await c.version()).version

    asyncio.run(run())


def test_thread_mode_with_sync_client(short_dir: Path) -> None:
    sock = short_dir / "t.sock"
    srv = SimulatorServer(sock, short_dir / "data")
    srv.start_in_thread()
    try:
        c = dstack_sdk.DstackClient(str(sock))
        info = c.info()
        # Default identity: compose hash of the simulated app-compose; app id its prefix.
        assert info.compose_hash.startswith(info.app_id)
        assert c.get_key("p").key == c.get_key("p").key
    finally:
        srv.stop_in_thread()
    assert not sock.exists()


def test_cli_serves_and_stops_on_sigterm(short_dir: Path) -> None:
    sock = short_dir / "c.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.identity.dstack_sim", "--socket", str(sock), "--data",
         str(short_dir / "data"), "--app-id", APP_ID, "--compose-hash", COMPOSE],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        assert proc.stdout is not None
        line = json.loads(proc.stdout.readline())
        assert line["simulated"] is True and line["app_id"] == APP_ID
        c = dstack_sdk.DstackClient(str(sock))
        assert c.info().compose_hash == COMPOSE
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert not sock.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_rejects_bad_app_id(short_dir: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "gateway.identity.dstack_sim", "--socket",
                        str(short_dir / "x.sock"), "--data", str(short_dir / "d"),
                        "--app-id", "abcd"], capture_output=True, text=True, timeout=60,
                       cwd=Path(__file__).resolve().parents[1], env=dict(os.environ))
    assert r.returncode == 2 and "app id" in r.stderr
