"""`python -m gateway demo --data DIR --listen HOST:PORT`: the whole stack on one machine.

Starts, as child processes on 127.0.0.1 (free ports chosen at start, the
gateway on PORT): two dstack simulators (the gateway's and the provider's),
the demo model provider, one witness, the tlog (witnessed, quorum 1) and the
gateway with a generated config. Once every part answers it prints one JSON
line to stdout (`gateway`, `tlog`, `witness`, `provider`, `log_vkey`,
`witness_vkey`, `api_key`, `gateway_tls`: the same gateway over HTTPS with
its attested TLS key, on a second port, and `provider_tls`: the provider's
HTTPS base URL, the one the gateway's route uses) and serves until
SIGTERM/SIGINT. With `--require-log-inclusion` the gateway answers a call only
once its receipt is in the log and witnessed (`[gateway] require_log_inclusion`).

Invariants:
- One demo per DIR: the demo holds an exclusive lock on DIR/demo.lock for its
  lifetime (released by the kernel if it dies). A second demo on the same DIR
  exits 1 with the holder's pid before touching anything in DIR.
- The gateway's HOST:PORT is checked before anything starts: if it is taken the
  demo exits 1 with one line and starts nothing. The gateway counts as ready
  only once it printed its own ready line (a server already on the port can
  never pass for it), and the log only once its checkpoint verifies under the
  log's key.
- The log, witness and provider ports are kept in DIR/ports.json and reused on
  the next start of the same DIR (a monitor pointed at the log keeps working);
  a port something else took meanwhile is replaced by a free one, with a warning.
- Every child runs in its own process group with its output in DIR/logs/NAME.log;
  stopping kills those groups (SIGTERM, SIGKILL after a grace period), all
  within 10 s, and nothing else.
- DIR keeps every key (simulator KMS roots, log, witness, API and admin keys)
  and every log, so a restart on the same DIR continues the same stack.
- If a part fails to start or dies, its log tail goes to stderr, the rest is
  stopped and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from gateway.identity.dstack_sim import default_app_compose
from tlog.service import LockHeld, bind, listen_address, lock_exclusive, seconds

ROOT = Path(__file__).resolve().parents[2]
"""The directory this `gateway` package is imported from: every child runs there with it
first on PYTHONPATH, so the stack runs the same code as the demo process (a second
checkout sharing one venv runs its own code, not the one the venv was installed from)."""
GATEWAY_APP_ID = hashlib.sha256(b"pag-demo/gateway").hexdigest()[:40]
PROVIDER_APP_ID = hashlib.sha256(b"pag-demo/provider").hexdigest()[:40]
PROVIDER_APP_NAME = "pag-demo-provider"
# what the provider's simulator attests as its compose hash (its app-compose for that name)
PROVIDER_COMPOSE_HASH = hashlib.sha256(default_app_compose(PROVIDER_APP_NAME).encode()).hexdigest()
STOP_GRACE = 7.0
SOCKET_MAX = 100
LOG_TAIL = 30
TAIL_BYTES = 1 << 16
LOCK_FILE = "demo.lock"
PORTS_FILE = "ports.json"
PART_PORTS = ("provider", "provider_tls", "witness", "tlog", "gateway_tls")


class DemoError(Exception):
    """A part of the stack failed to start; the message says which and why."""


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (held together while chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def lock_data_dir(data: Path) -> int:
    """Hold DIR/demo.lock exclusively (the returned fd keeps it; the kernel drops it when
    this process ends); DemoError naming the holder if another demo has it."""
    data.mkdir(parents=True, exist_ok=True)
    path = data / LOCK_FILE
    try:
        fd = lock_exclusive(path)
    except LockHeld:
        holder = path.read_text(errors="replace").strip() or "unknown"
        raise DemoError(f"{data} is in use by another demo (pid {holder}); stop it first, "
                        "or give this one another --data") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def stable_ports(data: Path, names: Sequence[str], reserved: Sequence[int] = ()
                 ) -> dict[str, int]:
    """A port for each part: the one DIR/ports.json gave it last time if it is still free,
    else a new free one (with a warning on stderr); saved back to DIR/ports.json.
    Ports in `reserved` (the gateway's) are never handed out."""
    try:
        saved = json.loads((data / PORTS_FILE).read_text())
    except (OSError, ValueError):
        saved = {}
    if not isinstance(saved, dict):
        saved = {}
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for name in names:
            port = saved.get(name)
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                continue
            if port in reserved or port in ports.values():
                taken = True
            else:
                try:
                    held.append(bind("127.0.0.1", port))
                    taken = False
                except OSError:
                    taken = True
            if taken:
                print(f"demo: port {port} of the {name} is taken; using a new one",
                      file=sys.stderr, flush=True)
            else:
                ports[name] = port
        missing = [n for n in names if n not in ports]
        while missing:  # held ports cannot come back from free_ports; reserved ones might
            for name, port in zip(missing, free_ports(len(missing)), strict=True):
                if port not in reserved:
                    ports[name] = port
                    held.append(bind("127.0.0.1", port))
            missing = [n for n in names if n not in ports]
    finally:
        for s in held:
            s.close()
    tmp = data / (PORTS_FILE + ".tmp")
    tmp.write_text(json.dumps({n: ports[n] for n in names}, indent=1) + "\n")
    os.replace(tmp, data / PORTS_FILE)
    return ports


def secret_file(path: Path, make: Callable[[], str]) -> str:
    """The secret kept in `path`, created (mode 0600) on first use."""
    if path.exists():
        return path.read_text().strip()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, (make() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path.read_text().strip()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the demo process dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def child_env() -> dict[str, str]:
    """The environment of every child: this checkout importable, output unbuffered."""
    env = dict(os.environ)
    env.pop("DSTACK_SIMULATOR_ENDPOINT", None)
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Child:
    """One started part of the stack."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    log_start: int = 0  # where this run's output begins in the (appended) log

    def output(self) -> bytes:
        """What this run of the child wrote so far."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self.log_start)
                return f.read()
        except OSError:
            return b""

    def tail(self, lines: int = LOG_TAIL) -> str:
        """The last lines of the child's log."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(max(0, f.seek(0, os.SEEK_END) - TAIL_BYTES))
                text = f.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class Stack:
    """The children started so far, and how to stop them."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.children: list[Child] = []
        self.stopping = False  # set from a signal handler: a plain flag, never a lock
        self._env = child_env()

    def start(self, name: str, args: list[str]) -> Child:
        """Start `python ARGS` in its own process group, output to logs/NAME.log."""
        path = self.logs / f"{name}.log"
        with path.open("ab") as out:
            out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                      f"demo starts {name}\n".encode())
            out.flush()
            start = out.tell()
            proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.DEVNULL,  # noqa: S603 - our own interpreter and modules, no shell
                                    stdout=out, stderr=out, cwd=str(ROOT), env=self._env,
                                    start_new_session=True, preexec_fn=_die_with_parent)
        child = Child(name, proc, path, start)
        self.children.append(child)
        return child

    def run(self, name: str, args: list[str], timeout: float = 60.0) -> str:
        """Run a short `python ARGS` to completion; its stdout (DemoError on failure)."""
        try:
            r = subprocess.run([sys.executable, *args], capture_output=True, cwd=str(ROOT),  # noqa: S603 - our own interpreter and modules, no shell
                               env=self._env, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            raise DemoError(f"{name}: did not finish in {timeout:.0f} s") from e
        if r.returncode != 0:
            raise DemoError(f"{name}: exit status {r.returncode}\n"
                            + r.stderr.decode(errors="replace")[-4000:])
        return r.stdout.decode().strip()

    def dead(self) -> Child | None:
        """A child that has exited, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self, grace: float = STOP_GRACE) -> None:
        """SIGTERM every child's process group, SIGKILL what is left after `grace`."""
        groups = [c.proc.pid for c in self.children]
        for pgid in reversed(groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive(groups):
            time.sleep(0.05)
        for pgid in self._alive(groups):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and self._alive(groups):
            time.sleep(0.02)

    def _alive(self, groups: list[int]) -> list[int]:
        """The groups with a live member. Zombies do not count: an orphaned child that
        exited stays a zombie until init reaps it, yet it runs nothing."""
        for c in self.children:
            c.proc.poll()
        running = live_groups()
        if running is not None:
            return [g for g in groups if g in running]
        alive = []
        for pgid in groups:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                continue
            except PermissionError:
                pass
            alive.append(pgid)
        return alive


def live_groups() -> set[int] | None:
    """Process groups with a member that is not a zombie (from /proc; None without it)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return None
    out: set[int] = set()
    for e in entries:
        if not e.isdigit():
            continue
        try:
            with open(f"/proc/{e}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()  # after "pid (comm) "
        if len(fields) > 2 and fields[0] != b"Z":
            out.add(int(fields[2]))
    return out


def wait_ready(stack: Stack, child: Child, probe: Callable[[], bool], what: str,
               deadline: float) -> None:
    """Poll `probe` until it holds; DemoError if the child dies or time runs out."""
    while True:
        if stack.stopping:
            raise DemoError("interrupted while starting")
        if child.proc.poll() is not None:
            raise DemoError(f"{child.name} exited with status {child.proc.returncode} "
                            f"before {what}")
        with contextlib.suppress(httpx.HTTPError, OSError):
            if probe():
                return
        if time.monotonic() > deadline:
            raise DemoError(f"{child.name} did not become ready ({what}) in time")
        time.sleep(0.05)


def http_ok(url: str, status: tuple[int, ...] = (200,), headers: dict[str, str] | None = None
            ) -> Callable[[], bool]:
    """A probe: GET `url` answers with one of `status`."""
    def probe() -> bool:
        return httpx.get(url, timeout=2.0, headers=headers).status_code in status
    return probe


def https_answers(url: str) -> Callable[[], bool]:
    """A probe: GET `url` over TLS answers 200 (readiness only: the certificate is
    self-signed, and clients pin its key from the attestation instead)."""
    def probe() -> bool:
        return httpx.get(url, timeout=2.0, verify=False).status_code == 200  # noqa: S501 - a readiness probe of our own child; no data is trusted from it
    return probe


def printed_ready(child: Child, url: str) -> Callable[[], bool]:
    """A probe: the child printed its own JSON ready line for the port of `url` (so a
    server that already held the port cannot pass for it), and `url`/healthz answers 200."""
    port = urlsplit(url).port

    def probe() -> bool:
        for line in child.output().splitlines():
            if line.startswith(b'{"gateway"'):
                try:
                    said = urlsplit(json.loads(line)["gateway"]).port
                except (ValueError, KeyError, TypeError):
                    continue
                if said == port:
                    return httpx.get(url + "/healthz", timeout=2.0).status_code == 200
        return False
    return probe


def signed_checkpoint(url: str, vkey: str) -> Callable[[], bool]:
    """A probe: `url`/checkpoint is a checkpoint signed by the key `vkey` (our log)."""
    from tlog import checkpoint, note

    verifier = note.verifier_from_vkey(vkey)

    def probe() -> bool:
        r = httpx.get(url + "/checkpoint", timeout=2.0)
        if r.status_code != 200:
            return False
        try:
            checkpoint.open(r.content, verifier)
        except ValueError:
            return False
        return True
    return probe


def http_answers(url: str) -> Callable[[], bool]:
    """A probe: anything answers HTTP at `url`."""
    def probe() -> bool:
        httpx.get(url, timeout=2.0)
        return True
    return probe


def unix_answers(path: Path) -> Callable[[], bool]:
    """A probe: the guest-agent socket answers HTTP."""
    def probe() -> bool:
        if not path.exists():
            return False
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path)), timeout=2.0) as c:
            c.get("http://dstack/")
        return True
    return probe


def toml_str(value: str) -> str:
    """A TOML basic string (JSON string escapes are valid TOML)."""
    return json.dumps(value)


def gateway_config(*, data: Path, dstack_socket: Path, tlog_url: str, log_vkey: str,
                   witness_vkey: str, api_key: str, admin_key: str, provider_http: str,
                   provider_base: str, require_log_inclusion: bool = False) -> str:
    """The demo gateway's TOML config (docs/config.md); `require_log_inclusion`: answers
    wait until their receipt is in the log, witnessed."""
    def sha(s: str) -> str:
        return hashlib.sha256(s.encode()).hexdigest()

    attestation_url = provider_http + "/.well-known/attestation"
    policy = ("[routes.policy]\nallow_simulated = true\nallow_unverified = false\n"
              f"max_lease_age = 300\napp_id = {toml_str(PROVIDER_APP_ID)}\n"
              f"compose_hash = {toml_str(PROVIDER_COMPOSE_HASH)}\n")

    def route(rid: str, model: str, aliases: list[str], upstream: str, kind: str,
              e2ee: bool = False) -> str:
        base = provider_http + "/v1" if e2ee else provider_base
        return (f"[[routes]]\nid = {toml_str(rid)}\nmodel = {toml_str(model)}\n"
                f"aliases = [{', '.join(toml_str(a) for a in aliases)}]\n"
                f"provider = \"demo\"\nbase_url = {toml_str(base)}\n"
                f"attestation_url = {toml_str(attestation_url)}\n"
                f"upstream_model = {toml_str(upstream)}\nkind = {toml_str(kind)}\n"
                f"priority = 0\ntimeout = 30\nevidence = \"dstack\"\nrequired = true\n"
                f"e2ee = {'true' if e2ee else 'false'}\n" + policy)

    return "\n".join([
        "# Generated by `python -m gateway demo` at every start; edits are overwritten.",
        "[gateway]",
        'name = "pag-demo"',
        "max_body_bytes = 1048576",
        f"require_log_inclusion = {'true' if require_log_inclusion else 'false'}",
        'log_unavailable = "serve-and-queue"',
        f"data_dir = {toml_str(str(data / 'gateway'))}",
        f"admin_key_sha256 = {toml_str(sha(admin_key))}",
        "",
        "[dstack]",
        f"endpoint = {toml_str(str(dstack_socket))}",
        "",
        "[log]",
        f"url = {toml_str(tlog_url)}",
        f"token_file = {toml_str(str(data / 'tlog' / 'append.token'))}",
        f"vkey = {toml_str(log_vkey)}",
        f"witness_vkeys = [{toml_str(witness_vkey)}]",
        "quorum = 1",
        "",
        "[[api_keys]]",
        'name = "demo"',
        f"sha256 = {toml_str(sha(api_key))}",
        "requests_per_minute = 6000000",
        "token_budget = 0",
        "",
        route("demo-dstack", "demo-chat", ["gpt-4o-mini"], "demo-chat-1", "chat"),
        route("demo-dstack-embed", "demo-embed", ["text-embedding-3-small"], "demo-embed-1",
              "embeddings"),
        # The same provider over plain HTTP, every call sealed to its attested E2EE key.
        route("demo-dstack-e2ee", "demo-chat-e2ee", [], "demo-chat-1", "chat", e2ee=True),
        route("demo-dstack-embed-e2ee", "demo-embed-e2ee", [], "demo-embed-1", "embeddings",
              e2ee=True),
    ])


def socket_dir(data: Path) -> tuple[Path, bool]:
    """(directory for the simulators' sockets, whether it is a temporary one).

    DIR itself unless its path is too long for a unix socket name.
    """
    if len(str(data / "dstack-provider.sock")) <= SOCKET_MAX:
        return data, False
    return Path(tempfile.mkdtemp(prefix="pag-demo-")), True


def start_stack(stack: Stack, data: Path, host: str, port: int, timeout: float,
                sockets: Path, require_log_inclusion: bool = False) -> dict[str, Any]:
    """Start every part and wait for it; the ready line's members."""
    deadline = time.monotonic() + timeout
    ports = stable_ports(data, PART_PORTS, reserved=(port,))
    provider_port, provider_tls_port, witness_port, tlog_port, tls_port = (
        ports[n] for n in PART_PORTS)
    api_key = secret_file(data / "api_key", lambda: "sk-pag-demo-" + secrets.token_urlsafe(24))
    admin_key = secret_file(data / "admin_key",
                            lambda: "sk-pag-admin-" + secrets.token_urlsafe(24))

    sims = {}
    for who, app_id in (("gateway", GATEWAY_APP_ID), ("provider", PROVIDER_APP_ID)):
        sock = sockets / f"dstack-{who}.sock"
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
        sims[who] = (sock, stack.start(f"dstack-{who}", [
            "-m", "gateway.identity.dstack_sim", "--socket", str(sock),
            "--data", str(data / f"dstack-{who}"), "--app-id", app_id,
            "--app-name", PROVIDER_APP_NAME if who == "provider" else f"pag-demo-{who}"]))
    for sock, child in sims.values():
        wait_ready(stack, child, unix_answers(sock), "its socket answered", deadline)

    log_vkey = stack.run("tlog vkey", ["-m", "tlog", "vkey", "--data", str(data / "tlog")])
    witness_vkey = stack.run("witness vkey",
                             ["-m", "witness", "vkey", "--data", str(data / "witness")])
    origin = log_vkey.split("+", 1)[0]

    witness_url = f"http://127.0.0.1:{witness_port}"
    witness = stack.start("witness", [
        "-m", "witness", "serve", "--data", str(data / "witness"),
        "--listen", f"127.0.0.1:{witness_port}", "--log", f"{origin}={log_vkey}"])
    provider_url = f"http://127.0.0.1:{provider_port}"
    provider = stack.start("provider", [
        "-m", "gateway.demo.provider", "--listen", f"127.0.0.1:{provider_port}",
        "--tls-listen", f"127.0.0.1:{provider_tls_port}",
        "--dstack", str(sims["provider"][0])])
    wait_ready(stack, witness, http_answers(witness_url), "it answered HTTP", deadline)

    tlog_url = f"http://127.0.0.1:{tlog_port}"
    tlog = stack.start("tlog", [
        "-m", "tlog", "serve", "--data", str(data / "tlog"),
        "--listen", f"127.0.0.1:{tlog_port}", "--witness", witness_url,
        "--witness-vkey", witness_vkey, "--quorum", "1"])
    wait_ready(stack, provider, http_ok(provider_url + "/v1/models"), "/v1/models answered",
               deadline)
    wait_ready(stack, tlog, signed_checkpoint(tlog_url, log_vkey),
               "/checkpoint answered, signed by its key", deadline)

    provider_base = f"https://127.0.0.1:{provider_tls_port}/v1"
    cfg = data / "gateway.toml"
    cfg.write_text(gateway_config(
        data=data, dstack_socket=sims["gateway"][0], tlog_url=tlog_url, log_vkey=log_vkey,
        witness_vkey=witness_vkey, api_key=api_key, admin_key=admin_key,
        provider_http=provider_url, provider_base=provider_base,
        require_log_inclusion=require_log_inclusion))
    gateway_url = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
    tls_url = gateway_url.replace("http://", "https://").rsplit(":", 1)[0] + f":{tls_port}"
    gateway = stack.start("gateway", ["-m", "gateway", "serve", "--config", str(cfg),
                                      "--listen", f"{host}:{port}", "--no-tls",
                                      "--tls-listen", f"{host}:{tls_port}"])
    wait_ready(stack, gateway, printed_ready(gateway, gateway_url),
               "it printed its ready line and /healthz answered", deadline)
    wait_ready(stack, gateway, https_answers(tls_url + "/healthz"),
               "/healthz answered over TLS", deadline)
    check_routes(gateway_url, admin_key)
    return {"gateway": gateway_url, "tlog": tlog_url, "witness": witness_url,
            "provider": provider_url + "/v1", "log_vkey": log_vkey,
            "witness_vkey": witness_vkey, "api_key": api_key, "gateway_tls": tls_url,
            "provider_tls": provider_base}


def check_routes(gateway_url: str, admin_key: str) -> None:
    """Verify every route now (GET /v1/routes); warn on stderr about any refused one."""
    try:
        r = httpx.get(gateway_url + "/v1/routes", timeout=30.0,
                      headers={"Authorization": f"Bearer {admin_key}"})
        routes = r.json().get("routes", []) if r.status_code == 200 else []
    except (httpx.HTTPError, ValueError):
        routes = []
    for route in routes:
        if route.get("state") != "verified":
            print(f"demo: warning: route {route.get('id')} is {route.get('state')}: "
                  f"{route.get('last_error')}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    """Entry point of `python -m gateway demo`."""
    ap = argparse.ArgumentParser(prog="python -m gateway demo",
                                 description="run the whole local demo stack")
    ap.add_argument("--data", required=True, type=Path, help="state directory (kept)")
    ap.add_argument("--listen", required=True, type=listen_address, metavar="HOST:PORT",
                    help="HOST:PORT of the gateway (port 0: any)")
    ap.add_argument("--startup-timeout", type=seconds, default=90.0, help="seconds")
    ap.add_argument("--require-log-inclusion", action="store_true",
                    help="answer a call only once its receipt is in the log, witnessed")
    a = ap.parse_args(argv)
    host, port = a.listen
    data = a.data.resolve()
    try:
        lock = lock_data_dir(data)  # first: a second demo on DIR must touch nothing
        with bind(host, port) as held:  # before anything starts
            port = held.getsockname()[1]
    except (DemoError, OSError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 1
    try:
        return run(data, host, port, a.startup_timeout, a.require_log_inclusion)
    finally:
        os.close(lock)


def run(data: Path, host: str, port: int, startup_timeout: float,
        require_log_inclusion: bool = False) -> int:
    """Start the stack in the locked DIR, print the ready line, serve until a signal."""
    (data / "logs").mkdir(parents=True, exist_ok=True)
    stack = Stack(data / "logs")

    def on_signal(signum: int, frame: Any) -> None:
        stack.stopping = True  # an Event.set() here could deadlock on the Event's own lock

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    sockets, temporary = socket_dir(data)
    status = 0
    try:
        try:
            ready = start_stack(stack, data, host, port, startup_timeout, sockets,
                                require_log_inclusion)
        except DemoError as e:
            if stack.stopping:
                return 0
            print(f"demo: {e}", file=sys.stderr)
            failed = stack.dead() or (stack.children[-1] if stack.children else None)
            if failed is not None:
                print(f"demo: last lines of {failed.log_path}:\n{failed.tail()}",
                      file=sys.stderr)
            return 1
        print(json.dumps(ready), flush=True)
        print(f"demo: ready; logs in {data / 'logs'}; SIGTERM or Ctrl-C stops it",
              file=sys.stderr, flush=True)
        while not stack.stopping:
            time.sleep(0.25)
            dead = stack.dead()
            if dead is not None:
                print(f"demo: {dead.name} exited with status {dead.proc.returncode}; "
                      f"stopping\ndemo: last lines of {dead.log_path}:\n{dead.tail()}",
                      file=sys.stderr, flush=True)
                status = 1
                break
    finally:
        stack.stop()
        if temporary:
            shutil.rmtree(sockets, ignore_errors=True)
    return status
