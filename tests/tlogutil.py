"""Helpers to run `python -m tlog serve` and friends as real processes in tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Poll `url` until it answers 200, or fail with the process's stderr."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited {proc.returncode}: {_tail(proc)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready")


def _tail(proc: subprocess.Popen) -> str:
    try:
        return (proc.stderr.read() if proc.stderr else b"")[-2000:].decode(errors="replace")
    except (OSError, ValueError):
        return ""


def start(module: str, *args: str, ready: str, stderr_path: Path | None = None) -> subprocess.Popen:
    """Start `python -m module args…` in its own process group and wait for `ready`."""
    err = open(stderr_path, "ab") if stderr_path else subprocess.PIPE  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=subprocess.DEVNULL,
                            stderr=err, start_new_session=True, env={**os.environ})
    try:
        wait_http(ready, proc)
    except BaseException:
        stop(proc)
        raise
    return proc


def stop(proc: subprocess.Popen, sig: int = 15) -> None:
    """Signal a process we started, then make sure it is gone."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def start_tlog(data: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start("tlog", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}", *extra,
                 ready=f"{url}/checkpoint", stderr_path=data.parent / f"{data.name}.stderr")
    return proc, url
