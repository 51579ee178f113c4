"""`tlog serve` and `witness serve` stop cleanly on SIGTERM: exit 0 after closing their
store (uvicorn re-raises the signal once it stopped serving; the service absorbs it), and
what they acknowledged is there on the next start. The gateway answers the calls still
waiting for the log instead of letting uvicorn cancel them, and the calls its grace
period did not cover get a receipt and a clean end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import app as gateway_app
from gateway.receipts.outbox import Outbox
from tests.test_demo import Demo
from tests.test_gateway_fakes import (
    API_KEY,
    FakeLog,
    FakeProvider,
    gateway_stack,
    post_chat,
    write_config,
)
from tests.test_outbox_durability import wait_ready
from tests.tlogutil import free_port, start, start_tlog
from tlog import checkpoint, note


def test_tlog_serve_exits_0_on_sigterm_with_its_store_closed(tmp_path: Path) -> None:
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    token = (data / "append.token").read_text().strip()
    r = httpx.post(url + "/add", content=b"entry", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    assert not (data / "log.db-wal").exists()  # the store was closed: its WAL folded in
    proc, url = start_tlog(data)  # and it reopens with the entry
    try:
        vkey = (data / "log.vkey").read_text().strip()
        cp, _ = checkpoint.open(httpx.get(url + "/checkpoint").content,
                                note.verifier_from_vkey(vkey))
        assert cp.size == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


def test_witness_serve_exits_0_on_sigterm(tmp_path: Path) -> None:
    data = tmp_path / "w"
    data.mkdir()
    signer = note.generate_signer("example.com/log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start("witness", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                 "--log", f"example.com/log={signer.vkey}", ready=url + "/metrics")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    err = proc.stderr.read().decode() if proc.stderr else ""
    assert "Traceback" not in err
    out = subprocess.run([sys.executable, "-m", "witness", "vkey", "--data", str(data)],
                         capture_output=True, text=True, check=True)
    assert "+" in out.stdout  # its key, readable after the clean stop


ROOT = Path(__file__).resolve().parents[1]
BODY = {"model": "chat-model", "messages": [{"role": "user", "content": "hello"}]}
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class Stopped:
    """What the calls in flight at a gateway's SIGTERM got, and how the gateway ended."""

    statuses: list[int]
    bodies: list[str]
    receipt_ids: list[str]
    exit_code: int | None
    output: str

    def receipts(self, tmp_path: Path) -> list[dict[str, Any]]:
        """The receipt of each answer, from the stopped gateway's outbox."""
        box = Outbox(tmp_path / "data")
        try:
            rows = [box.get(i) for i in self.receipt_ids]
        finally:
            box.close()
        assert all(r is not None for r in rows), self.receipt_ids
        return [json.loads(r.entry) for r in rows if r is not None]


@dataclass
class Raw:
    """An answer read off a raw connection (the fields of httpx's the tests read)."""

    status_code: int
    text: str
    headers: dict[str, str]


async def upload_half(port: int) -> Raw:
    """A chat call whose body stops halfway (the client still uploading), then its answer
    read to the connection's end."""
    body = json.dumps(BODY).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                 b"Authorization: Bearer " + API_KEY.encode() + b"\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
                 + body[:len(body) // 2])
    await writer.drain()
    raw = await reader.read()
    writer.close()
    head, _, text = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:] if ": " in line)
    return Raw(int(lines[0].split()[1]), text.decode(errors="replace"), headers)


def sigterm_with_calls_in_flight(tmp_path: Path, extra_gateway: str, calls: int = 3,
                                 delay: float = 0.0, log_fails: bool = False,
                                 stream_pause: float = 0.0, uploading: bool = False
                                 ) -> Stopped:
    """Serve the gateway (tests.test_gateway_fakes, stopped as `gateway serve` is) with a
    provider answering after `delay` seconds; one call first (logged while the log
    answers), then, with `log_fails`, the log acknowledges nothing; `calls` calls start
    (streams pausing `stream_pause` seconds before their last word, if that is set; with
    `uploading`, calls whose body stops halfway), and SIGTERM comes 0.5 s later."""
    body = {**BODY, "stream": True} if stream_pause else BODY

    async def go() -> Stopped:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = write_config(tmp_path, prov.base_url, log=log, extra_gateway=extra_gateway)
        out = tmp_path / "gateway.out"
        with out.open("wb") as sink:
            gw = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.test_gateway_fakes", str(cfg), str(port),
                env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, stdout=sink, stderr=sink)
            try:
                await wait_ready(url, gw)
                async with httpx.AsyncClient(timeout=60) as c:
                    first = await c.post(url + "/v1/chat/completions", json=BODY, headers=AUTH)
                    assert first.status_code == 200
                    log.fail = log_fails
                    prov.delay, prov.stream_pause = delay, stream_pause
                    flying = [asyncio.create_task(
                        upload_half(port) if uploading else
                        c.post(url + "/v1/chat/completions", json=body, headers=AUTH))
                        for _ in range(calls)]
                    await asyncio.sleep(0.5)  # all of them in the gateway now
                    gw.send_signal(signal.SIGTERM)
                    answers = await asyncio.gather(*flying)
                code = await asyncio.wait_for(gw.wait(), 60)
            finally:
                if gw.returncode is None:
                    gw.kill()
                    await gw.wait()
                await prov.stop()
                await log.stop()
        return Stopped([a.status_code for a in answers], [a.text for a in answers],
                       [a.headers.get("x-receipt-id", "") for a in answers], code,
                       out.read_text(errors="replace"))

    return asyncio.run(go())


def test_gateway_sigterm_answers_calls_waiting_for_the_log_503_not_500(tmp_path: Path) -> None:
    """With `require_log_inclusion` and a log that stopped acknowledging, calls waiting
    for it when SIGTERM comes are answered 503 log_unavailable LOG_WAIT_MARGIN before the
    graceful period ends (their receipts stay queued); that period used to run out first
    and uvicorn cancelled them: a 500 and "Exception in ASGI application" for each."""
    r = sigterm_with_calls_in_flight(tmp_path, "require_log_inclusion = true\n",
                                     log_fails=True)
    assert r.statuses == [503, 503, 503], r.bodies
    assert all(json.loads(b)["error"]["code"] == "log_unavailable" for b in r.bodies)
    assert r.exit_code == 0
    assert "Exception in ASGI application" not in r.output
    assert "CancelledError" not in r.output


def test_gateway_sigterm_lets_calls_finish_within_shutdown_grace(tmp_path: Path) -> None:
    """Model calls take long. Calls in flight at SIGTERM whose provider answers after 6 s
    complete with `shutdown_grace = 10`; the fixed 5 s before cut them (500)."""
    r = sigterm_with_calls_in_flight(tmp_path, "shutdown_grace = 10\n", calls=2, delay=6.0)
    assert r.statuses == [200, 200], r.bodies
    assert r.exit_code == 0
    assert "Exception in ASGI application" not in r.output


def test_gateway_sigterm_cut_calls_get_a_receipt_and_503(tmp_path: Path) -> None:
    """Calls still waiting for their provider when `shutdown_grace` runs out were forwarded:
    each gets 503 gateway_stopping and a receipt recording that (before: uvicorn cancelled
    them, a 500, "Exception in ASGI application", and no receipt for a prompt that went
    upstream)."""
    r = sigterm_with_calls_in_flight(tmp_path, "shutdown_grace = 1\n", calls=2, delay=5.0)
    assert r.statuses == [503, 503], r.bodies
    assert all(json.loads(b)["error"]["code"] == "gateway_stopping" for b in r.bodies)
    assert r.exit_code == 0
    assert "Exception in ASGI application" not in r.output
    for rc in r.receipts(tmp_path):
        assert rc["refusal"] == {"code": "gateway_stopping", "status": 503}
        assert rc["forwarded_hash"] is not None  # it had gone upstream
        assert rc["route"]["route_id"] == "r1"


def test_gateway_sigterm_cut_stream_ends_with_an_error_event_and_a_receipt(
        tmp_path: Path) -> None:
    """A stream still running when `shutdown_grace` runs out ends with an error event and
    its last chunk (no `[DONE]`), and its receipt records `gateway_stopping`."""
    r = sigterm_with_calls_in_flight(tmp_path, "shutdown_grace = 1\n", calls=2,
                                     stream_pause=5.0)
    assert r.statuses == [200, 200], r.bodies
    for b in r.bodies:
        assert "[DONE]" not in b
        last = json.loads(b.strip().split("\n\n")[-1].removeprefix("data: "))
        assert last["error"]["code"] == "gateway_stopping"
    assert r.exit_code == 0
    assert "Exception in ASGI application" not in r.output
    for rc in r.receipts(tmp_path):
        assert rc["refusal"] == {"code": "gateway_stopping", "status": 200}


def test_demo_gateway_sigterm_cuts_calls_on_both_listeners_with_receipts(
        tmp_path: Path) -> None:
    """The real `gateway serve` of the demo (a plain and a TLS listener, 5 s grace), its
    provider frozen: calls on either listener, streamed or not, are answered 503
    gateway_stopping with a receipt once SIGTERM's grace runs out, and the gateway exits
    0 with no "Exception in ASGI application". (Before, each got a 500 and no receipt; and the signal reached one
    listener's server, so the other only began its own grace once the first had stopped.)"""
    d = Demo(tmp_path / "demo")
    try:
        pids = {p: Path(f"/proc/{p}/cmdline").read_bytes() for p in d.children}
        gw = next(p for p, c in pids.items() if b"gateway\0serve" in c)
        prov = next(p for p, c in pids.items() if b"gateway.demo.provider" in c)
        os.kill(prov, signal.SIGSTOP)
        try:
            hdrs = {"Authorization": f"Bearer {d.ready['api_key']}"}
            body = {"model": "demo-chat", "messages": [{"role": "user", "content": "hi"}]}

            async def calls() -> list[httpx.Response]:
                async with httpx.AsyncClient(timeout=60, verify=False) as c:  # noqa: S501 - the attested TLS key, on loopback
                    flying = [asyncio.create_task(c.post(
                        f"{base}/v1/chat/completions", json={**body, "stream": s},
                        headers=hdrs)) for base in (d.ready["gateway"], d.ready["gateway_tls"])
                        for s in (False, True)]
                    await asyncio.sleep(1.0)
                    os.kill(gw, signal.SIGTERM)
                    return await asyncio.gather(*flying)

            answers = asyncio.run(calls())
        finally:
            os.kill(prov, signal.SIGCONT)
        assert [a.status_code for a in answers] == [503] * 4, [a.text for a in answers]
        assert all(a.json()["error"]["code"] == "gateway_stopping" for a in answers)
        for _ in range(300):  # the demo reports the gateway's exit once it has noticed it
            if "gateway exited" in d.stderr():
                break
            time.sleep(0.1)
        assert "gateway exited with status 0" in d.stderr()
        d.terminate()
        box = Outbox(tmp_path / "demo" / "gateway")
        try:
            rows = [box.get(a.headers["x-receipt-id"]) for a in answers]
        finally:
            box.close()
        assert all(r is not None and json.loads(r.entry)["refusal"]["code"] ==
                   "gateway_stopping" for r in rows)
        assert "Exception in ASGI application" not in d.stderr()
    finally:
        d.kill()


def test_app_shutdown_waits_for_calls_another_listener_still_serves(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gateway serve` has two listeners and the app's lifespan runs with one of them. When
    that one had nothing in flight, the app's shutdown starts while the other's calls are
    still within their grace: it waits for them (here a call the provider answers after
    0.6 s) before closing what they use. It waited CUT_WAIT only, and a call of the other
    listener outlived the app's pool, Redis clients and ledger follower."""
    monkeypatch.setattr(gateway_app, "CUT_WAIT", 0.1)

    async def go() -> tuple[int, list[int]]:
        async with gateway_stack(tmp_path, extra_gateway="shutdown_grace = 5\n") as s:
            s.prov.delay = 0.6
            call = asyncio.create_task(post_chat(s.url))
            while not s.prov.received:  # the call is with the provider now
                await asyncio.sleep(0.01)
            app = s.gw.app
            in_flight_at_close: list[int] = []
            close = app.svc.status.close

            async def recorded() -> None:
                in_flight_at_close.append(app.metrics.inflight)
                await close()

            app.svc.status.close = recorded  # type: ignore[method-assign]
            await app.shutdown()  # as the lifespan's server, idle, does
            r = await call
            return r.status_code, in_flight_at_close

    status, in_flight_at_close = asyncio.run(go())
    assert status == 200
    assert in_flight_at_close[0] == 0


def test_gateway_sigterm_answers_a_request_still_uploading_503(tmp_path: Path) -> None:
    """A request whose body is still coming when `shutdown_grace` runs out has no receipt
    to write (not yet parsed): it is answered 503 gateway_stopping, the gateway exits 0
    (before: uvicorn's cancel made it a 500 and "Exception in ASGI application")."""
    r = sigterm_with_calls_in_flight(tmp_path, "shutdown_grace = 1\n", calls=2,
                                     uploading=True)
    assert r.statuses == [503, 503], r.bodies
    assert all(json.loads(b)["error"]["code"] == "gateway_stopping" for b in r.bodies)
    assert r.exit_code == 0
    assert "Exception in ASGI application" not in r.output
