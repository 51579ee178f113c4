"""`python -m gateway demo`: ready line, clean stop of every part, restart on the same DIR,
failure reporting; plus helpers the end-to-end tests share."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.demo import stack as demo

ROOT = Path(__file__).resolve().parents[1]
READY_KEYS = {"gateway", "tlog", "witness", "provider", "log_vkey", "witness_vkey", "api_key",
              "gateway_tls", "provider_tls"}
START_TIMEOUT = 120.0


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, state) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[1]), fields[0]


def descendants(pid: int) -> set[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                parents.setdefault(st[0], []).append(int(entry))
    out: set[int] = set()
    pending = [pid]
    while pending:
        for child in parents.get(pending.pop(), []):
            if child not in out:
                out.add(child)
                pending.append(child)
    return out


def alive(pids: set[int]) -> set[int]:
    """The pids that still run (zombies count as gone)."""
    return {p for p in pids if (st := _stat(p)) is not None and st[1] != "Z"}


class Demo:
    """A running `python -m gateway demo` and its ready line."""

    def __init__(self, data: Path, listen: str = "127.0.0.1:0",
                 cmd: list[str] | None = None) -> None:
        self.data = data
        self.stderr_path = data.parent / f"{data.name}-demo.stderr"
        args = cmd or [sys.executable, "-m", "gateway", "demo", "--data", str(data),
                       "--listen", listen]
        with self.stderr_path.open("ab") as err:
            self.proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=err,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        self.children: set[int] = set()
        lines: queue.Queue[bytes] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=lambda: lines.put(self.proc.stdout.readline()),
                         daemon=True).start()
        try:
            line = lines.get(timeout=START_TIMEOUT)
        except queue.Empty:
            line = b""
        if not line:
            self.kill()
            pytest.fail(f"demo printed no ready line; stderr:\n{self.stderr()[-4000:]}")
        self.ready: dict[str, Any] = json.loads(line)
        self.children = descendants(self.proc.pid)

    def stderr(self) -> str:
        """What the demo wrote to stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def terminate(self, timeout: float = 10.0, group: bool = False) -> int:
        """SIGTERM the demo (only the demo process, or its whole group) and wait for it."""
        self.children |= descendants(self.proc.pid)
        if group:
            os.killpg(self.proc.pid, signal.SIGTERM)
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        """Last resort clean-up of everything this demo started."""
        pids = (self.children | descendants(self.proc.pid)) if self.proc.poll() is None \
            else set(self.children)
        for pid in alive(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def auth(ready: dict[str, Any]) -> dict[str, str]:
    """The demo API key as a header."""
    return {"Authorization": f"Bearer {ready['api_key']}"}


def chat(ready: dict[str, Any], text: str) -> httpx.Response:
    """One non-streaming chat call through the gateway."""
    return httpx.post(ready["gateway"] + "/v1/chat/completions", headers=auth(ready),
                      json={"model": "demo-chat",
                            "messages": [{"role": "user", "content": text}]}, timeout=30)


def test_the_stack_runs_the_code_of_the_checkout_it_was_started_from() -> None:
    """Children import `gateway`, `tlog` and `witness` from the directory the demo's own
    `gateway` came from (first on PYTHONPATH, and their working directory), not from
    wherever the venv was installed: a second checkout sharing a venv runs its own code."""
    import gateway
    import tlog
    import witness

    env = demo.child_env()
    first = Path(env["PYTHONPATH"].split(os.pathsep)[0])
    assert first == demo.ROOT
    for pkg in (gateway, tlog, witness):
        assert (first / pkg.__name__ / "__init__.py").resolve() == Path(pkg.__file__).resolve()
    r = subprocess.run([sys.executable, "-c", "import gateway.receipts.shipper as s; print(s.__file__)"],
                       cwd=demo.ROOT, env=env, capture_output=True, text=True, check=True)
    assert Path(r.stdout.strip()).resolve() == first / "gateway" / "receipts" / "shipper.py"


def test_restart_reuses_keys_and_sigterm_stops_every_part(tmp_path: Path) -> None:
    data = tmp_path / "d"
    d = Demo(data)
    try:
        ready = d.ready
        assert set(ready) == READY_KEYS
        assert ready["provider"].endswith("/v1")
        assert httpx.get(ready["provider"] + "/models", timeout=10).status_code == 200
        assert ready["provider_tls"].startswith("https://") and ready["provider_tls"].endswith("/v1")
        assert httpx.get(ready["provider_tls"] + "/models", timeout=10,
                         verify=False).status_code == 200  # noqa: S501 - its self-signed key
        r = chat(ready, "hello")
        assert r.status_code == 200, r.text
        receipt_id = r.headers["x-receipt-id"]
        key1 = httpx.get(ready["gateway"] + "/.well-known/attestation",
                         timeout=30).json()["keyset"]
        children = set(d.children)
        # two simulators, witness, provider, tlog, gateway (+ its shipper)
        assert len(children) >= 6
        assert d.terminate() == 0
        assert alive(children) == set()
        assert (data / "logs" / "gateway.log").exists()
    finally:
        d.kill()

    old_witness = int(ready["witness"].rsplit(":", 1)[1])
    squatter = socket.socket()  # something else took the witness's port meanwhile
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT
    squatter.bind(("127.0.0.1", old_witness))
    squatter.listen()
    try:
        d2 = Demo(data)
    finally:
        squatter.close()
    try:
        again = d2.ready
        for k in ("log_vkey", "witness_vkey", "api_key", "tlog", "provider"):
            assert again[k] == ready[k]  # same keys; the monitor's log URL still works
        assert again["witness"] != ready["witness"]
        assert f"port {old_witness} of the witness is taken" in d2.stderr()
        key2 = httpx.get(again["gateway"] + "/.well-known/attestation",
                         timeout=30).json()["keyset"]
        assert key2["receipt_signing_key"] == key1["receipt_signing_key"]
        old = httpx.get(f"{again['gateway']}/v1/receipts/{receipt_id}", timeout=10,
                        headers=auth(again))
        assert old.status_code == 200
        assert old.json()["receipt"]["id"] == receipt_id
        assert chat(again, "hello again").status_code == 200
        assert d2.terminate() == 0
        assert alive(d2.children) == set()
    finally:
        d2.kill()


def test_a_part_that_fails_is_reported_and_the_rest_stopped(tmp_path: Path) -> None:
    data = tmp_path / "d"
    data.mkdir()
    (data / "gateway").write_text("in the way of the gateway's data directory\n")
    r = subprocess.run([sys.executable, "-m", "gateway", "demo", "--data", str(data),
                        "--listen", "127.0.0.1:0"], cwd=ROOT, capture_output=True,
                       text=True, timeout=180)
    assert r.returncode == 1
    assert r.stdout == ""
    assert "gateway exited with status 1" in r.stderr and "last lines of" in r.stderr
    assert f"data directory {data / 'gateway'} is not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_used_port_fails_before_anything_starts(tmp_path: Path) -> None:
    s = socket.socket()  # hold the port, as a first demo's gateway would
    s.bind(("127.0.0.1", 0))
    s.listen()
    port = s.getsockname()[1]
    try:
        data = tmp_path / "d"
        r = subprocess.run([sys.executable, "-m", "gateway", "demo", "--data", str(data),
                            "--listen", f"127.0.0.1:{port}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    finally:
        s.close()
    assert (r.returncode, r.stdout) == (1, "")  # no ready line, false or otherwise
    assert r.stderr == f"demo: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert sorted(p.name for p in data.iterdir()) == [demo.LOCK_FILE]  # nothing started


def test_a_second_demo_touches_nothing_of_the_first(tmp_path: Path) -> None:
    data = tmp_path / "d"
    first = Demo(data)
    try:
        def state() -> dict[str, tuple[int, int]]:
            return {str(p.relative_to(data)): (p.stat().st_mtime_ns, p.stat().st_size)
                    for p in data.rglob("*") if "logs" not in p.parts and p.is_file()
                    and p.suffix not in (".db", ".sqlite3", ".db-wal", ".sqlite3-wal",
                                         ".db-shm", ".sqlite3-shm")}
        sockets = sorted(data.glob("*.sock"))
        assert len(sockets) == 2
        assert chat(first.ready, "settle").status_code == 200
        for _ in range(200):  # the gateway's shipper comes up after the ready line
            if (data / "gateway" / "shipper.lock").exists():
                break
            time.sleep(0.05)
        before = state()
        again = subprocess.run([sys.executable, "-m", "gateway", "demo", "--data", str(data),
                                "--listen", "127.0.0.1:0"], cwd=ROOT, capture_output=True,
                               text=True, timeout=60)
        assert (again.returncode, again.stdout) == (1, "")
        assert again.stderr == (f"demo: {data} is in use by another demo (pid {first.proc.pid});"
                                " stop it first, or give this one another --data\n")
        port = first.ready["gateway"].rsplit(":", 1)[1]
        other = tmp_path / "other"
        same_port = subprocess.run([sys.executable, "-m", "gateway", "demo", "--data",
                                    str(other), "--listen", f"127.0.0.1:{port}"], cwd=ROOT,
                                   capture_output=True, text=True, timeout=60)
        assert (same_port.returncode, same_port.stdout) == (1, "")
        assert "already in use" in same_port.stderr
        assert state() == before
        assert sorted(data.glob("*.sock")) == sockets
        assert chat(first.ready, "still here").status_code == 200
        assert first.terminate() == 0
    finally:
        first.kill()


def test_stable_ports_are_reused_unless_taken(tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    names = ("a", "b", "c")
    first = demo.stable_ports(tmp_path, names)
    assert sorted(first) == sorted(names) and len(set(first.values())) == 3
    assert json.loads((tmp_path / demo.PORTS_FILE).read_text()) == first
    assert demo.stable_ports(tmp_path, names) == first
    held = socket.socket()
    held.bind(("127.0.0.1", first["b"]))
    held.listen()
    try:
        second = demo.stable_ports(tmp_path, names, reserved=(first["c"],))
    finally:
        held.close()
    assert second["a"] == first["a"]
    assert second["b"] != first["b"] and second["c"] != first["c"]
    assert first["c"] not in second.values() and len(set(second.values())) == 3
    err = capsys.readouterr().err
    assert f"port {first['b']} of the b is taken" in err and f"port {first['c']} of the c" in err
    assert json.loads((tmp_path / demo.PORTS_FILE).read_text()) == second
    for junk in ("{", "[1, 2]", '{"a": "80", "b": true, "c": 70000}'):
        (tmp_path / demo.PORTS_FILE).write_text(junk)
        fresh = demo.stable_ports(tmp_path, names)
        assert len(set(fresh.values())) == 3 and all(0 < p < 65536 for p in fresh.values())


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--data", str(tmp_path), "--listen", "nope"])
    assert exit_.value.code == 2
    assert "expected HOST:PORT" in capsys.readouterr().err


def test_generated_config_is_valid_and_hashes_keys(tmp_path: Path) -> None:
    from gateway.api import config
    from tlog import note
    from witness import cosignature

    w = cosignature.generate_signer("w").vkey
    v = note.generate_signer("v").vkey
    text = demo.gateway_config(
        data=tmp_path, dstack_socket=tmp_path / "s.sock", tlog_url="http://127.0.0.1:1",
        log_vkey=v, witness_vkey=w, api_key="sk-secret",
        admin_key="sk-admin",
        provider_http="http://127.0.0.1:2", provider_base="https://127.0.0.1:3/v1")
    path = tmp_path / "gateway.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert "sk-secret" not in text and "sk-admin" not in text
    assert {r.model: r.kind for r in cfg.routes} == {
        "demo-chat": "chat", "demo-embed": "embeddings", "demo-chat-e2ee": "chat",
        "demo-embed-e2ee": "embeddings"}
    assert [r.base_url for r in cfg.routes if r.e2ee] == ["http://127.0.0.1:2/v1"] * 2
    assert all(r.policy["allow_simulated"] is True and r.evidence == "dstack"
               for r in cfg.routes)
    assert cfg.routes[0].attestation_url == "http://127.0.0.1:2/.well-known/attestation"
    assert all(r.policy["app_id"] == demo.PROVIDER_APP_ID for r in cfg.routes)
    assert all(r.policy["compose_hash"] == demo.PROVIDER_COMPOSE_HASH for r in cfg.routes)
    assert cfg.log.quorum == 1 and cfg.log.witness_vkeys == (w,)
    assert cfg.gateway.require_log_inclusion is False
    strict = tmp_path / "strict.toml"
    strict.write_text(text.replace("require_log_inclusion = false",
                                   "require_log_inclusion = true"))
    assert config.load(strict).gateway.require_log_inclusion is True
    assert demo.gateway_config(
        data=tmp_path, dstack_socket=tmp_path / "s.sock", tlog_url="http://127.0.0.1:1",
        log_vkey=v, witness_vkey=w, api_key="sk-secret",
        admin_key="sk-admin", provider_http="http://127.0.0.1:2",
        provider_base="https://127.0.0.1:3/v1", require_log_inclusion=True) == strict.read_text()


def test_secret_file_is_created_once_private(tmp_path: Path) -> None:
    p = tmp_path / "k"
    first = demo.secret_file(p, lambda: "one")
    assert first == "one"
    assert demo.secret_file(p, lambda: "two") == "one"
    assert p.stat().st_mode & 0o777 == 0o600


def test_free_ports_are_distinct() -> None:
    ports = demo.free_ports(5)
    assert len(set(ports)) == 5 and all(0 < p < 65536 for p in ports)


def test_make_demo_with_overrides(tmp_path: Path) -> None:
    """The README's `make demo DATA=... LISTEN=...`, when the venv is already set up."""
    if shutil.which("make") is None:
        pytest.skip("make not installed")
    if subprocess.run(["make", "-q", ".venv/.installed"], cwd=ROOT).returncode != 0:
        pytest.skip("make demo would run set-up first (.venv/.installed out of date)")
    data = tmp_path / "made"
    d = Demo(data, cmd=["make", "--no-print-directory", "-s", "demo", f"DATA={data}",
                        "LISTEN=127.0.0.1:0"])
    try:
        assert set(d.ready) == READY_KEYS
        assert (data / "gateway.toml").exists()
        assert chat(d.ready, "made").status_code == 200
        children = set(d.children)
        d.terminate(group=True)
        assert alive(children) == set()
    finally:
        d.kill()
