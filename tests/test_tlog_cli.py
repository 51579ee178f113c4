"""`python -m tlog serve` as an operator meets it: one writer per data dir, one-line errors."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.tlogutil import free_port, start_tlog, stop
from tlog import note
from tlog.service import LockHeld
from tlog.sqlite_store import SQLiteStore


def serve(data, *extra: str, listen: str | None = None) -> subprocess.CompletedProcess:
    """Run `tlog serve` expecting it to refuse (it must exit by itself)."""
    return subprocess.run(
        [sys.executable, "-m", "tlog", "serve", "--data", str(data),
         "--listen", listen or f"127.0.0.1:{free_port()}", *extra],
        capture_output=True, text=True, timeout=60)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("tlog: ")
    return lines[0]


def test_second_store_on_one_database_is_refused(tmp_path):
    first = SQLiteStore(tmp_path / "log.db")
    with pytest.raises(LockHeld):
        SQLiteStore(tmp_path / "log.db")
    first.close()
    SQLiteStore(tmp_path / "log.db").close()  # the lock went with the first store


def test_second_serve_on_one_data_dir_refuses_and_first_keeps_sequencing(tmp_path):
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    try:
        r = serve(data)
        assert r.returncode == 1
        assert "another tlog serve is using" in one_line(r)
        token = (data / "append.token").read_text().strip()
        added = httpx.post(f"{url}/add", content=b"still mine",
                           headers={"Authorization": f"Bearer {token}"})
        assert added.status_code == 200 and added.json()["index"] == 0
    finally:
        stop(proc)


def test_lock_dies_with_a_killed_writer(tmp_path):
    data = tmp_path / "log"
    proc, _ = start_tlog(data)
    stop(proc, signal.SIGKILL)
    proc, url = start_tlog(data)  # no stale lock to clean up
    stop(proc)


def test_port_in_use(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = serve(tmp_path / "log", listen=f"127.0.0.1:{port}")
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in one_line(r)
    assert not (tmp_path / "log" / "log.db").exists()  # nothing touched before the port


def test_data_dir_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    r = serve(tmp_path / "file")
    assert r.returncode == 2 and "is not a directory" in one_line(r)


def test_data_dir_not_writable():
    r = serve("/sys/kernel")  # refuses file creation even to root
    assert r.returncode == 2 and "is not writable" in one_line(r)


def test_unreachable_database(tmp_path):
    r = serve(tmp_path / "log", "--database", f"postgresql://postgres@127.0.0.1:{free_port()}/x")
    assert r.returncode == 1 and "cannot use the database" in one_line(r)


def test_unsupported_database_url(tmp_path):
    r = serve(tmp_path / "log", "--database", "mysql://u:secret@h/db")
    assert r.returncode == 1 and "unsupported --database" in one_line(r)
    assert "secret" not in r.stderr


@pytest.mark.parametrize("module", ["tlog", "witness"])
def test_version(module):
    r = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "private-ai-gateway" in r.stdout and r.stdout.count("\n") == 1


@pytest.mark.parametrize(("command", "flag"), [
    (["tlog", "serve", "--listen", "127.0.0.1:0"], "--witness-timeout"),
    (["gateway", "demo", "--listen", "127.0.0.1:0"], "--startup-timeout")])
@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_seconds_flags_refuse_what_is_not_a_positive_finite_number(
        tmp_path, command: list[str], flag: str, value: str) -> None:
    """A witness timeout of nan failed each cosignature request, and the log served on:
    now a usage error at start, before anything is made."""
    r = subprocess.run([sys.executable, "-m", *command, "--data", str(tmp_path / "d"),
                        flag, value], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2
    assert f"argument {flag}: not a positive, finite number of seconds: '{value}'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "0", "-1"])
def test_the_monitor_refuses_an_interval_that_is_not_a_positive_finite_number(
        tmp_path, value: str) -> None:
    """asyncio.sleep(nan) returns at once: a monitor at --interval nan or -1 polled the log
    without a pause. Now a set-up error (exit 2), before the first poll."""
    policy = tmp_path / "p.json"
    policy.write_text("{}")
    vkey = note.generate_signer("log.test").vkey
    r = subprocess.run([sys.executable, "-m", "verifier", "monitor", "--log",
                        "http://127.0.0.1:9", "--policy", str(policy), "--vkey", vkey,
                        "--interval", value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"verifier: monitor set-up: --interval {float(value)}: not a positive, finite number "
        "of seconds"]
