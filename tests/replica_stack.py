"""Real processes for the multi-replica tests and bench: a dstack simulator, a log, the demo
provider, and any number of `python -m gateway serve` replicas, each with its own data
directory, all with one config apart from `data_dir` (and, when given, `[shared]`).

This module holds no tests; tests/test_gateway_replicas.py and bench/gateway_replicas.py
use it. Every process is started here and stopped by its own PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
MODEL = "replica-chat"


@dataclass(frozen=True)
class Key:
    """One `[[api_keys]]` entry the replicas share (the key itself, not its hash)."""

    name: str
    key: str
    requests_per_minute: int = 0
    token_budget: int = 0


@dataclass
class Replica:
    """One running `gateway serve`."""

    url: str
    data: Path
    proc: subprocess.Popen[bytes]
    err: Path


@dataclass
class Stack:
    """The shared parts (simulator, log, provider) and the replicas started on them."""

    dir: Path
    sock: Path
    log_url: str
    log_vkey: str
    token_file: Path
    provider_http: str
    provider_tls: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)

    def config(self, data: Path, keys: Sequence[Key], shared: str = "") -> str:
        """A gateway config over this stack's log and provider (`shared`: extra TOML)."""
        keys_toml = "".join(
            f'[[api_keys]]\nname = "{k.name}"\n'
            f'sha256 = "{hashlib.sha256(k.key.encode()).hexdigest()}"\n'
            f"requests_per_minute = {k.requests_per_minute}\ntoken_budget = {k.token_budget}\n"
            for k in keys)
        return f"""[gateway]
name = "replicas"
data_dir = "{data}"

[tls]
enabled = false

[dstack]
endpoint = "{self.sock}"

[log]
url = "{self.log_url}"
token_file = "{self.token_file}"
vkey = "{self.log_vkey}"

{shared}

{keys_toml}
[[routes]]
id = "replica-route"
model = "{MODEL}"
provider = "demo"
base_url = "{self.provider_tls}"
attestation_url = "{self.provider_http}/.well-known/attestation"
upstream_model = "demo-chat-1"
evidence = "dstack"
policy = {{ allow_simulated = true, allow_any_workload = true }}
"""

    def add_replica(self, name: str, keys: Sequence[Key], shared: str = "") -> Replica:
        """Start one more `gateway serve` (its own data dir) and wait for its ready line."""
        data = self.dir / name
        data.mkdir()
        cfg = self.dir / f"{name}.toml"
        cfg.write_text(self.config(data, keys, shared))
        err = self.dir / f"{name}.err"
        proc = start(["-m", "gateway", "serve", "--config", str(cfg), "--listen",
                      "127.0.0.1:0"], err)
        self.procs.append(proc)
        replica = Replica(ready_line(proc, err)["gateway"], data, proc, err)
        self.replicas.append(replica)
        return replica


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], err: Path) -> subprocess.Popen[bytes]:
    """A child `python ARGS`, stdout piped (ready lines), stderr to `err`."""
    with err.open("wb") as f:
        return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=f, stdin=subprocess.DEVNULL)


def ready_line(proc: subprocess.Popen[bytes], err: Path) -> dict[str, Any]:
    """The JSON line a child prints once it is ready (AssertionError with its stderr if it
    exits first)."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, f"no ready line; stderr:\n{err.read_text()[-3000:]}"
    return json.loads(line)


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM this child, SIGKILL it after 10 s."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until `url` answers 200."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        assert time.monotonic() < deadline, f"{url} did not answer in {timeout:g} s"
        time.sleep(0.1)


@contextlib.contextmanager
def stack(base: Path) -> Iterator[Stack]:
    """The simulator, the log and the provider, running; every child stopped on exit."""
    sock = base / "agent.sock"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim = start(["-m", "gateway.identity.dstack_sim", "--socket", str(sock), "--data",
                     str(base / "sim")], base / "sim.err")
        procs.append(sim)
        ready_line(sim, base / "sim.err")
        tlog_dir = base / "tlog"
        vkey = subprocess.run([sys.executable, "-m", "tlog", "vkey", "--data", str(tlog_dir)],
                              cwd=ROOT, capture_output=True, text=True, check=True
                              ).stdout.strip()
        log_port = free_port()
        procs.append(start(["-m", "tlog", "serve", "--data", str(tlog_dir), "--listen",
                            f"127.0.0.1:{log_port}"], base / "tlog.err"))
        http_port, tls_port = free_port(), free_port()
        prov = start(["-m", "gateway.demo.provider", "--listen", f"127.0.0.1:{http_port}",
                      "--tls-listen", f"127.0.0.1:{tls_port}", "--dstack", str(sock)],
                     base / "provider.err")
        procs.append(prov)
        urls = ready_line(prov, base / "provider.err")
        log_url = f"http://127.0.0.1:{log_port}"
        wait_http(log_url + "/checkpoint")
        s = Stack(base, sock, log_url, vkey, tlog_dir / "append.token",
                  f"http://127.0.0.1:{http_port}", urls["tls"], procs)
        yield s
    finally:
        for p in reversed(procs):
            stop(p)
