"""One unauthenticated client must not take a service offline.

Every service (log, witness, gateway, demo provider) runs as its own process with
small limits; attackers connect from other loopback addresses (127.0.0.2 and up)
while a normal call from 127.0.0.1, on a fresh connection with a 2 s client
timeout, must still succeed. The attacks: 1,100 idle sockets, slowloris heads,
a 100 MiB header, and hundreds of busy connections from one address. Each
attack also checks what the server did to the attacker (evicted, 408, 431,
refused). The timeouts are hang guards and the client's own 2 s budget; nothing
asserts elapsed time.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from gateway.api import config as gconfig
from gateway.api.apikeys import hash_key
from tests.tlogutil import free_port, start, stop, wait_http
from tlog import checkpoint, merkle, note
from tlog.service import ConnectionBook, ServerLimits
from witness import request as witness_request

GUARD = 20.0  # hang guard only
LIMITS = {"header_timeout": 1, "body_timeout": 30, "keep_alive_timeout": 2,
          "max_connections": 400, "max_connections_per_client": 50}
FLAGS = [x for k, v in LIMITS.items() for x in ("--" + k.replace("_", "-"), str(v))]
API_KEY = "sk-limits-test"
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "hello"}]}
LEAVES = [merkle.leaf_hash(b"l%d" % i) for i in range(200)]


# -- the connection book: which connection makes room --------------------------------


def test_book_evicts_the_oldest_idle_connection_of_the_client_then_overall() -> None:
    book = ConnectionBook(total=4, per_client=2)
    busy: set[str] = set()

    def idle(c: str) -> bool:
        return c not in busy

    assert book.admit("a1", "A", idle) == (True, [])
    assert book.admit("a2", "A", idle) == (True, [])
    assert book.admit("a3", "A", idle) == (True, ["a1"])  # A's oldest idle made room
    busy.update({"a2", "a3"})
    assert book.admit("a4", "A", idle) == (False, [])  # A holds two busy ones: no more
    assert book.admit("b1", "B", idle) == (True, [])
    assert book.admit("c1", "C", idle) == (True, [])
    assert len(book) == 4
    assert book.admit("d1", "D", idle) == (True, ["b1"])  # the oldest idle overall
    busy.update({"c1", "d1"})
    assert book.admit("e1", "E", idle) == (False, [])  # everything busy: refused
    book.forget("a2")
    book.forget("a2")  # forgetting twice is harmless
    assert book.admit("e1", "E", idle) == (True, [])


def test_book_without_a_per_client_cap() -> None:
    book = ConnectionBook(total=2, per_client=0)
    assert [book.admit(c, "same", lambda c: True)[0] for c in "xyz"] == [True, True, True]
    assert len(book) == 2


@pytest.mark.parametrize(("field", "value"), [
    ("header_timeout", 0), ("body_timeout", -1), ("keep_alive_timeout", 0),
    ("max_connections", 0), ("max_header_bytes", 0), ("max_connections_per_client", -1)])
def test_unusable_limits_are_refused_naming_the_setting(field: str, value: float,
                                                         tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=field):
        ServerLimits(**{field: value})
    cfg = tmp_path / "g.toml"
    cfg.write_text(f"[server]\n{field} = {value}\n")
    with pytest.raises(gconfig.ConfigError, match=rf"\[server\]\.{field}"):
        gconfig.load(cfg)
    flag = "--" + field.replace("_", "-")
    run = subprocess.run([sys.executable, "-m", "tlog", "serve", "--data", str(tmp_path / "d"),
                          "--listen", "127.0.0.1:0", flag, str(value)],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        f"tlog: {flag} must {'not be negative' if value < 0 and 'client' in field else 'be positive'}"]



@pytest.mark.parametrize("value", ["nan", "inf"])
def test_limits_that_are_not_finite_are_refused(value: str, tmp_path: Path) -> None:
    """nan passed `<= 0` and inf meant no timeout at all: both are refused, from a flag
    and from the gateway's TOML (which has nan and inf literals)."""
    with pytest.raises(ValueError, match="header_timeout must be a finite number"):
        ServerLimits(header_timeout=float(value))
    cfg = tmp_path / "g.toml"
    cfg.write_text(f"[server]\nheader_timeout = {value}\n")
    with pytest.raises(gconfig.ConfigError, match=r"\[server\]\.header_timeout"):
        gconfig.load(cfg)
    run = subprocess.run([sys.executable, "-m", "tlog", "serve", "--data", str(tmp_path / "d"),
                          "--listen", "127.0.0.1:0", "--header-timeout", value],
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == ["tlog: --header-timeout must be a finite number"]

def test_gateway_config_server_table() -> None:
    cfg = gconfig.parse({"server": {"header_timeout": 2.5, "max_connections": 10}}, Path("x"))
    assert cfg.server == ServerLimits(header_timeout=2.5, max_connections=10)
    assert gconfig.parse({}, Path("x")).server == ServerLimits()
    with pytest.raises(gconfig.ConfigError, match="unknown key"):
        gconfig.parse({"server": {"max_conns": 1}}, Path("x"))


# -- the services under attack -------------------------------------------------------


@dataclass
class Service:
    """One running service: its port, a normal call, and a request that keeps a
    connection busy (a head announcing a body that never fully comes)."""

    name: str
    port: int
    normal: Callable[[httpx.AsyncClient, str], Awaitable[httpx.Response]]
    busy_request: bytes

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def busy_head(path: str, extra: str = "") -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 4000\r\n{extra}\r\n"
            "0123456789").encode()


@pytest.fixture(scope="module")
def services() -> Iterator[dict[str, Service]]:
    """The log, a witness, the demo provider (with its dstack simulator) and a gateway in
    front of that provider, each its own process with the small LIMITS."""
    d = Path(tempfile.mkdtemp(prefix="paglim-", dir="/tmp"))  # short: a unix socket lives here
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield start_services(d, procs)
    finally:
        for p in reversed(procs):
            stop(p)
        shutil.rmtree(d, ignore_errors=True)


def start_services(d: Path, procs: list[subprocess.Popen[bytes]]) -> dict[str, Service]:
    out: dict[str, Service] = {}
    port = free_port()
    procs.append(start("tlog", "serve", "--data", str(d / "log"), "--listen",
                       f"127.0.0.1:{port}", *FLAGS, ready=f"http://127.0.0.1:{port}/checkpoint",
                       stderr_path=d / "log.stderr"))
    token = (d / "log" / "append.token").read_text().strip()
    out["tlog"] = Service("tlog", port, lambda c, u: c.get(u + "/checkpoint"),
                          busy_head("/add", f"Authorization: Bearer {token}\r\n"))

    signer = note.generate_signer("limits.test/log")
    port = free_port()
    procs.append(start("witness", "serve", "--data", str(d / "wit"), "--listen",
                       f"127.0.0.1:{port}", "--log", f"{signer.name}={signer.vkey}", *FLAGS,
                       ready=f"http://127.0.0.1:{port}/", stderr_path=d / "witness.stderr"))
    sizes = [0]

    async def cosign(c: httpx.AsyncClient, url: str) -> httpx.Response:
        old, new = sizes[0], sizes[0] + 1
        cp = checkpoint.sign(checkpoint.Checkpoint(signer.name, new, merkle.root(LEAVES[:new])),
                             signer)
        proof = merkle.consistency_proof(old, new, LEAVES) if old else []
        r = await c.post(url + "/add-checkpoint", content=witness_request.format(old, proof, cp))
        if r.status_code == 200:
            sizes[0] = new
        return r
    out["witness"] = Service("witness", port, cosign, busy_head("/add-checkpoint"))

    sock = d / "sim.sock"
    sim = subprocess.Popen([sys.executable, "-m", "gateway.identity.dstack_sim", "--socket",
                            str(sock), "--data", str(d / "sim")], stdout=subprocess.PIPE)
    procs.append(sim)
    assert sim.stdout is not None
    json.loads(sim.stdout.readline())  # ready
    port = free_port()
    procs.append(start("gateway.demo.provider", "--listen", f"127.0.0.1:{port}", "--dstack",
                       str(sock), *FLAGS, ready=f"http://127.0.0.1:{port}/v1/models",
                       stderr_path=d / "provider.stderr"))
    provider_url = f"http://127.0.0.1:{port}/v1"
    out["provider"] = Service(
        "provider", port, lambda c, u: c.post(u + "/v1/chat/completions",
                                             json={**CHAT, "model": "demo-chat-1"}),
        busy_head("/v1/chat/completions"))

    port = free_port()
    (d / "gw").mkdir()
    cfg = d / "gw" / "gateway.toml"
    cfg.write_text("\n".join([
        '[gateway]\nname = "limits"\ndata_dir = "data"', "[server]",
        *(f"{k} = {v}" for k, v in LIMITS.items()),
        f'[[api_keys]]\nname = "t"\nsha256 = "{hash_key(API_KEY)}"',
        f'[[routes]]\nid = "demo"\nmodel = "chat-model"\nprovider = "demo"\n'
        f'base_url = "{provider_url}"\nupstream_model = "demo-chat-1"']) + "\n")
    gw = subprocess.Popen([sys.executable, "-m", "tests.test_gateway_fakes", str(cfg), str(port)],
                          stdout=subprocess.DEVNULL, stderr=(d / "gateway.stderr").open("wb"),
                          start_new_session=True)
    procs.append(gw)
    wait_http(f"http://127.0.0.1:{port}/v1/models", gw)
    auth = {"Authorization": f"Bearer {API_KEY}"}
    out["gateway"] = Service(
        "gateway", port, lambda c, u: c.post(u + "/v1/chat/completions", json=CHAT,
                                             headers=auth),
        busy_head("/v1/chat/completions", f"Authorization: Bearer {API_KEY}\r\n"))
    return out


class Attacker:
    """Raw connections to one port from loopback addresses other than 127.0.0.1; a watcher
    per connection records the first bytes the server sent it and when it was closed."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.writers: list[asyncio.StreamWriter] = []
        self.answers: list[bytes] = []  # first bytes of each connection the server ended
        self._watchers: list[asyncio.Task[None]] = []

    async def open(self, n: int, per_address: int, send: bytes = b"") -> None:
        for i in range(n):
            r, w = await asyncio.open_connection("127.0.0.1", self.port,
                                                 local_addr=(f"127.0.0.{2 + i // per_address}", 0))
            if send:
                w.write(send)
            self.writers.append(w)
            self._watchers.append(asyncio.create_task(self._watch(r)))

    async def _watch(self, r: asyncio.StreamReader) -> None:
        first = b""
        try:
            while chunk := await r.read(1 << 16):
                first = first or chunk
        except ConnectionError:
            pass
        self.answers.append(first)

    async def ended_at_least(self, n: int) -> None:
        async with asyncio.timeout(GUARD):
            while len(self.answers) < n:
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        for w in self.writers:
            w.close()
        for t in self._watchers:
            t.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)


async def normal_calls(svc: Service, n: int = 3, pause: float = 0.2) -> list[int]:
    """`n` normal calls, each on a fresh connection from 127.0.0.1 with a 2 s budget."""
    out = []
    for _ in range(n):
        async with httpx.AsyncClient(timeout=2.0) as c:
            out.append((await svc.normal(c, svc.url)).status_code)
        await asyncio.sleep(pause)
    return out


@asynccontextmanager
async def attacker(port: int) -> AsyncIterator[Attacker]:
    a = Attacker(port)
    try:
        yield a
    finally:
        await a.close()
        await asyncio.sleep(0.2)  # let the server see the closes before the next attack


async def idle_sockets(svc: Service) -> None:
    """1,100 idle sockets (22 addresses): the oldest idle ones are closed for newcomers."""
    async with attacker(svc.port) as a:
        await a.open(1100, per_address=50)
        assert await normal_calls(svc) == [200, 200, 200]
        await a.ended_at_least(1100 - LIMITS["max_connections"])


async def slowloris(svc: Service) -> None:
    """200 connections sending a header line every 0.25 s: each gets its head deadline."""
    async with attacker(svc.port) as a:
        await a.open(200, per_address=50, send=b"GET / HTTP/1.1\r\nHost: x\r\n")

        async def drip() -> None:
            while True:
                await asyncio.sleep(0.25)
                for w in a.writers:
                    if not w.is_closing():
                        w.write(b"X-Slow: 1\r\n")

        dripping = asyncio.create_task(drip())
        try:
            assert await normal_calls(svc, n=4, pause=0.4) == [200] * 4
            await a.ended_at_least(200)
        finally:
            dripping.cancel()
        if svc.name != "provider":  # aiohttp closes without an answer
            assert all(x.startswith(b"HTTP/1.1 408 ") for x in a.answers)


async def huge_header(svc: Service) -> None:
    """One connection streams a 100 MiB header: refused at the header cap, nobody waits."""
    r, w = await asyncio.open_connection("127.0.0.1", svc.port, local_addr=("127.0.0.2", 0))
    sent = 0

    async def send() -> None:
        nonlocal sent
        w.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: ")
        piece = b"a" * (1 << 16)
        with pytest.raises(ConnectionError):
            while sent < 100 << 20:
                w.write(piece)
                sent += len(piece)
                await w.drain()

    sending = asyncio.create_task(send())
    try:
        assert await normal_calls(svc) == [200, 200, 200]
        async with asyncio.timeout(GUARD):
            await sending
        assert sent < 16 << 20  # the server stopped reading long before 100 MiB
    finally:
        sending.cancel()
        w.close()
    try:  # a 431 (400 from aiohttp) may be lost to the reset of the unread bytes
        answer = await r.read(100)
    except ConnectionError:
        answer = b""
    assert answer == b"" or answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 "))


async def one_client_many_connections(svc: Service) -> None:
    """300 connections from one address, each busy with a body that never completes: the
    address keeps at most its per-client share; the rest are refused (503) or closed."""
    async with attacker(svc.port) as a:
        await a.open(300, per_address=300, send=svc.busy_request)
        assert await normal_calls(svc) == [200, 200, 200]
        await a.ended_at_least(300 - LIMITS["max_connections_per_client"])
        assert all(x == b"" or x.startswith(b"HTTP/1.1 503 ") for x in a.answers)


ATTACKS = {"idle sockets": idle_sockets, "slowloris": slowloris, "100 MiB header": huge_header,
           "one client, many connections": one_client_many_connections}


@pytest.mark.parametrize("attack", ATTACKS.values(), ids=ATTACKS.keys())
@pytest.mark.parametrize("name", ["tlog", "witness", "gateway", "provider"])
def test_normal_calls_succeed_during_the_attack(services: dict[str, Service], name: str,
                                                attack: Callable[[Service], Awaitable[None]]
                                                ) -> None:
    asyncio.run(attack(services[name]))


def test_a_silent_connection_gets_408_at_the_head_deadline(services: dict[str, Service]
                                                           ) -> None:
    async def go() -> None:
        for name in ("tlog", "witness", "gateway"):
            r, w = await asyncio.open_connection("127.0.0.1", services[name].port)
            async with asyncio.timeout(GUARD):
                assert (await r.read()).startswith(b"HTTP/1.1 408 ")
            w.close()
    asyncio.run(go())


def test_a_request_the_parser_rejects_gets_a_json_400_with_a_code(
        services: dict[str, Service]) -> None:
    """What httptools cannot parse (here a Transfer-Encoding no server knows; the schema
    fuzzer found it) is refused in the service's own JSON shape, not uvicorn's plain text."""
    async def go() -> None:
        for name in ("tlog", "witness", "gateway"):
            r, w = await asyncio.open_connection("127.0.0.1", services[name].port)
            w.write(b"POST /add-batch HTTP/1.1\r\nHost: x\r\ntransfer-encoding: ?kHS{j\r\n"
                    b"\r\n\xff")
            async with asyncio.timeout(GUARD):
                answer = await r.read()  # the answer, then the close
            w.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 400 "), (name, head)
            assert b"content-type: application/json" in head.lower(), (name, head)
            doc = json.loads(body)
            code = doc["error"]["code"] if name == "gateway" else doc["code"]
            assert code == "malformed_http", (name, doc)
    asyncio.run(go())


def test_a_keep_alive_connection_is_closed_once_idle(services: dict[str, Service]) -> None:
    async def go() -> None:
        for svc in services.values():
            r, w = await asyncio.open_connection("127.0.0.1", svc.port)
            w.write(b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n")
            async with asyncio.timeout(GUARD):
                answer = await r.read()  # the answer, then the end at the keep-alive limit
            assert answer.startswith(b"HTTP/1.1 404 "), svc.name
            w.close()
    asyncio.run(go())


def test_body_that_never_completes_is_cut_at_the_body_deadline(tmp_path: Path) -> None:
    port = free_port()
    proc = start("tlog", "serve", "--data", str(tmp_path / "log"), "--listen",
                 f"127.0.0.1:{port}", "--body-timeout", "0.5",
                 ready=f"http://127.0.0.1:{port}/checkpoint")
    token = (tmp_path / "log" / "append.token").read_text().strip()

    async def go() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(busy_head("/add", f"Authorization: Bearer {token}\r\n"))
        async with asyncio.timeout(GUARD):
            await r.read()  # the server ends the connection
        w.close()
        async with httpx.AsyncClient(timeout=2.0) as c:
            assert (await c.get(f"http://127.0.0.1:{port}/checkpoint")).status_code == 200
    try:
        asyncio.run(go())
    finally:
        stop(proc)


def test_start_lowers_the_connection_cap_to_what_the_file_limit_allows(tmp_path: Path) -> None:
    """Under `ulimit -n 512` the log caps itself at (512 - 256) / 2 connections and says so;
    1,100 idle sockets then still cannot lock a caller out (they would exhaust the files
    a process may open if the cap were not lowered)."""
    port = free_port()
    err = tmp_path / "stderr"
    proc = subprocess.Popen(
        ["/bin/sh", "-c", f"ulimit -n 512 && exec {sys.executable} -m tlog serve --data "
         f"{tmp_path / 'log'} --listen 127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=err.open("wb"), start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{port}/checkpoint", proc)
        svc = Service("tlog", port, lambda c, u: c.get(u + "/checkpoint"), b"")

        async def go() -> None:
            async with attacker(port) as a:
                await a.open(1100, per_address=50)
                assert await normal_calls(svc) == [200, 200, 200]
                await a.ended_at_least(1100 - 128)
        asyncio.run(go())
        assert "max_connections lowered to 128" in err.read_text()
    finally:
        stop(proc)
