"""`tlog serve` and `witness serve` stop cleanly on SIGTERM: exit 0 after closing their
store (uvicorn re-raises the signal once it stopped serving; the service absorbs it), and
what they acknowledged is there on the next start."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import httpx

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
