"""`tlog serve` and `witness serve` stop cleanly on SIGTERM: exit 0 after closing their
store (uvicorn re-raises the signal once it stopped serving; the service absorbs it), and
what they acknowledged is there on the next start. The gateway answers the calls still
waiting for the log instead of letting uvicorn cancel them."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from tests.test_gateway_fakes import API_KEY, FakeLog, FakeProvider, write_config
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


def test_gateway_sigterm_answers_calls_waiting_for_the_log_503_not_500(tmp_path: Path) -> None:
    """With `require_log_inclusion` and a log that stopped acknowledging, calls waiting
    for it when SIGTERM comes are answered 503 log_unavailable once LOG_WAIT_ON_SHUTDOWN is
    over (their receipts stay queued); uvicorn's graceful period used to run out first and
    cancel them: a 500 and "Exception in ASGI application" for each."""
    root = Path(__file__).resolve().parents[1]
    body = {"model": "chat-model", "messages": [{"role": "user", "content": "hello"}]}
    auth = {"Authorization": f"Bearer {API_KEY}"}

    async def go() -> tuple[list[int], list[str], int | None, str]:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cfg = write_config(tmp_path, prov.base_url, log=log,
                           extra_gateway="require_log_inclusion = true\n")
        out = tmp_path / "gateway.out"
        with out.open("wb") as sink:
            gw = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.test_gateway_fakes", str(cfg), str(port),
                env={**os.environ, "PYTHONPATH": str(root)}, cwd=root, stdout=sink, stderr=sink)
            try:
                await wait_ready(url, gw)
                async with httpx.AsyncClient(timeout=30) as c:
                    first = await c.post(url + "/v1/chat/completions", json=body, headers=auth)
                    assert first.status_code == 200  # logged while the log answers
                    log.fail = True  # from now on nothing is acknowledged
                    calls = [asyncio.create_task(c.post(url + "/v1/chat/completions",
                                                        json=body, headers=auth))
                             for _ in range(3)]
                    await asyncio.sleep(0.5)  # all three wait for the log
                    gw.send_signal(signal.SIGTERM)
                    answers = await asyncio.gather(*calls)
                code = await asyncio.wait_for(gw.wait(), 15)
            finally:
                if gw.returncode is None:
                    gw.kill()
                    await gw.wait()
                await prov.stop()
                await log.stop()
        return ([a.status_code for a in answers], [a.text for a in answers], code,
                out.read_text(errors="replace"))

    statuses, bodies, code, output = asyncio.run(go())
    assert statuses == [503, 503, 503], bodies
    assert all(json.loads(b)["error"]["code"] == "log_unavailable" for b in bodies)
    assert code == 0
    assert "Exception in ASGI application" not in output
    assert "CancelledError" not in output
