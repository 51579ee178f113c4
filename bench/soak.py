"""Soak: mixed load against the whole stack while its processes fail; then prove nothing
acknowledged was lost or logged twice.

    .venv/bin/python bench/soak.py crash --seconds 300      # kill -9 at random moments
    .venv/bin/python bench/soak.py outage --seconds 660 --outage 600   # log away 10 min

The stack, on loopback: a witness (`witness serve`), the log (`tlog serve`, the
witness's cosignature required: quorum 1), the gateway (`python -m
tests.test_gateway_fakes`: the real outbox, shipper process and server, with test keys
and leases) and an OpenAI-compatible fake provider in this process. Eight clients send
chat (JSON and streamed) and embeddings calls the whole time; a watcher keeps every
checkpoint the log serves.

- `crash`: every 1-4 s one of gateway, shipper, log, witness gets SIGKILL and is
  restarted after 0-1 s (the gateway restarts its shipper itself, as `gateway serve`
  does; a killed gateway's shipper dies with it: PR_SET_PDEATHSIG).
- `outage`: after 5 s the log is stopped for `--outage` seconds, then started again.

Then every process is left running until the gateway reports no unlogged receipt, the
stack is stopped (SIGTERM), and the log's own database is read:
- every call the clients saw acknowledged (200, a stream with its last chunk) has its
  receipt in the log exactly once, and no receipt is in the log twice;
- every checkpoint the log served carries the log's signature and its root is the root
  of the first `size` entries of the final log (so it is consistent with every later
  one);
- no process exited unless we killed or stopped it (one that did is named, with the end
  of its output, on stderr).
Prints one JSON summary line; exit status 0 only if every check held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_gateway_fakes import API_KEY, FakeProvider, free_port, write_config  # noqa: E402
from tlog import checkpoint, merkle, note  # noqa: E402
from tlog.sqlite_store import SQLiteStore  # noqa: E402

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "chat-model", "messages": [{"role": "user", "content": "soak"}]}
EMBED = {"model": "embed-model", "input": "soak"}


@dataclass
class Service:
    """One process of the stack: how to start it and where it answers when ready."""

    name: str
    cmd: list[str]
    ready: str
    log: Path
    proc: asyncio.subprocess.Process | None = None
    kills: int = 0
    died: list[int] = field(default_factory=list)  # exit statuses of deaths we did not cause

    async def start(self, timeout: float = 90.0) -> None:
        with open(self.log, "ab") as out:  # noqa: ASYNC230 - the child keeps its own copy
            self.proc = await asyncio.create_subprocess_exec(  # a crash prints its stack
                *self.cmd, cwd=ROOT, stdout=out, stderr=out, start_new_session=True,
                env={**os.environ, "PYTHONFAULTHANDLER": "1"})
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as c:
            while True:
                if self.proc.returncode is not None:
                    raise RuntimeError(f"{self.name} exited with {self.proc.returncode}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await c.get(self.ready)).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} not ready in {timeout} s")
                await asyncio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL, and wait for the process to end."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):  # already dead: noted below
            self.proc.kill()
        status = await self.proc.wait()
        if status == -signal.SIGKILL:
            self.kills += 1
        else:
            self.note_death(status)

    def note_death(self, status: int) -> None:
        """The process exited on its own: keep its status, show the end of its output."""
        self.died.append(status)
        tail = self.log.read_bytes()[-3000:].decode(errors="replace")
        print(f"soak: {self.name} exited on its own ({status}); its output ends:\n{tail}",
              file=sys.stderr, flush=True)

    async def stop(self) -> int | None:
        """SIGTERM (then SIGKILL after 15 s); the exit status."""
        if self.proc is None:
            return None
        if self.proc.returncode is not None:
            self.note_death(self.proc.returncode)
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), 15)
        except TimeoutError:
            self.proc.kill()
            return await self.proc.wait()


@dataclass
class Shipper:
    """The gateway's shipper process: found among the gateway's children, restarted by it."""

    gateway: Service
    name: str = "shipper"
    kills: int = 0

    def pid(self) -> int | None:
        """The running shipper's process id, if the gateway has one."""
        if self.gateway.proc is None or self.gateway.proc.returncode is not None:
            return None
        gw = self.gateway.proc.pid
        try:
            children = Path(f"/proc/{gw}/task/{gw}/children").read_text().split()
        except OSError:
            return None
        for child in children:
            with contextlib.suppress(OSError):
                if b"gateway.receipts.shipper" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
        return None

    async def kill(self) -> None:
        pid = self.pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
            self.kills += 1

    async def start(self, timeout: float = 30.0) -> None:
        """Wait until the gateway has a shipper again."""
        deadline = time.monotonic() + timeout
        while self.pid() is None:
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not restart its shipper")
            await asyncio.sleep(0.1)


@dataclass
class Tally:
    """What the clients and the watcher saw."""

    acked: list[str] = field(default_factory=list)
    failed: Counter[str] = field(default_factory=Counter)
    checkpoints: set[bytes] = field(default_factory=set)
    peak: dict[str, float] = field(default_factory=dict)  # gateway gauges, highest seen


async def client(url: str, tally: Tally, stop: asyncio.Event, rng: random.Random) -> None:
    """Send mixed calls until `stop`; note the receipt id of each acknowledged one."""
    async with httpx.AsyncClient(timeout=15) as c:
        while not stop.is_set():
            kind = rng.choice(("chat", "stream", "embed"))
            try:
                if kind == "embed":
                    r = await c.post(url + "/v1/embeddings", json=EMBED, headers=AUTH)
                    ok = r.status_code == 200
                elif kind == "chat":
                    r = await c.post(url + "/v1/chat/completions", json=CHAT, headers=AUTH)
                    ok = r.status_code == 200
                else:
                    async with c.stream("POST", url + "/v1/chat/completions", headers=AUTH,
                                        json=dict(CHAT, stream=True)) as r:
                        body = b"".join([b async for b in r.aiter_raw()])
                    ok = r.status_code == 200 and body.endswith(b"data: [DONE]\n\n")
            except httpx.HTTPError as e:
                tally.failed[type(e).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            if ok:
                tally.acked.append(r.headers["x-receipt-id"])
            else:
                tally.failed[f"http {r.status_code}"] += 1
                await asyncio.sleep(0.05)


async def watcher(url: str, tally: Tally, stop: asyncio.Event) -> None:
    """Keep every distinct checkpoint the log serves."""
    async with httpx.AsyncClient(timeout=2) as c:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                r = await c.get(url + "/checkpoint")
                if r.status_code == 200:
                    tally.checkpoints.add(r.content)
            await asyncio.sleep(0.05)


async def gauges(url: str, tally: Tally, stop: asyncio.Event) -> None:
    """Keep the highest backlog, outbox size and log_down the gateway reported."""
    names = ("pag_gateway_outbox_unlogged", "pag_gateway_outbox_bytes", "pag_gateway_log_down")
    async with httpx.AsyncClient(timeout=2) as c:
        while not stop.is_set():
            with contextlib.suppress(httpx.HTTPError):
                for line in (await c.get(url + "/metrics")).text.splitlines():
                    name, _, value = line.partition(" ")
                    if name in names:
                        tally.peak[name] = max(tally.peak.get(name, 0.0), float(value))
            await asyncio.sleep(0.25)


async def chaos(services: list[Service | Shipper], stop: asyncio.Event, rng: random.Random) -> None:
    """kill -9 one service at a random moment, restart it after up to 1 s; repeat, in
    shuffled rounds so that every service is hit."""
    order: list[Service | Shipper] = []
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), rng.uniform(1.0, 4.0))
        if stop.is_set():
            return
        if not order:
            order = rng.sample(services, len(services))
        svc = order.pop()
        await svc.kill()
        await asyncio.sleep(rng.uniform(0.0, 1.0))
        await svc.start()


async def outage(log: Service, seconds: float, stop: asyncio.Event) -> None:
    """Stop the log 5 s into the run for `seconds`, then start it again."""
    await asyncio.sleep(5)
    await log.stop()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    await log.start()


async def unlogged(url: str) -> float | None:
    """The gateway's pag_gateway_outbox_unlogged, or None if it does not answer."""
    try:
        async with httpx.AsyncClient(timeout=5) as c:
            text = (await c.get(url + "/metrics")).text
    except httpx.HTTPError:
        return None
    for line in text.splitlines():
        if line.startswith("pag_gateway_outbox_unlogged "):
            return float(line.split()[1])
    return None


def check_log(log_dir: Path, vkey: str, tally: Tally) -> dict[str, object]:
    """The checks of the module docstring, against the log's own database."""
    store = SQLiteStore(log_dir / "log.db")
    try:
        size = store.head().size if store.head() is not None else 0
        entries = store.read_entries(0, size) if size else []
    finally:
        store.close()
    ids = Counter(json.loads(e).get("id") for e in entries
                  if json.loads(e).get("v", "").startswith("pag-receipt"))
    leaves = [merkle.leaf_hash(e) for e in entries]
    verifier = note.verifier_from_vkey(vkey)
    bad_checkpoints = 0
    for text in tally.checkpoints:
        cp, _ = checkpoint.open(text, verifier)
        if cp.size > size or cp.root_hash != merkle.root(leaves[:cp.size]):
            bad_checkpoints += 1
    acked = Counter(tally.acked)
    return {
        "log_entries": size,
        "receipts_in_log": sum(ids.values()),
        "acknowledged": len(tally.acked),
        "acknowledged_missing": sum(1 for i in acked if ids[i] == 0),
        "logged_twice": sum(1 for n in ids.values() if n > 1),
        "ids_acknowledged_twice": sum(1 for n in acked.values() if n > 1),
        "checkpoints_seen": len(tally.checkpoints),
        "checkpoints_inconsistent": bad_checkpoints,
    }


async def run(tmp: Path, mode: str, seconds: float, outage_s: float, seed: int) -> dict:
    rng = random.Random(seed)
    py = sys.executable
    log_dir, w_dir = tmp / "tlog", tmp / "witness"
    keys = {}
    for name, d in (("tlog", log_dir), ("witness", w_dir)):
        out = await asyncio.create_subprocess_exec(py, "-m", name, "vkey", "--data", str(d),
                                                   cwd=ROOT, stdout=asyncio.subprocess.PIPE)
        keys[name] = (await out.communicate())[0].decode().strip()
    origin = keys["tlog"].split("+", 1)[0]
    lp, wp, gp = free_port(), free_port(), free_port()
    witness = Service("witness", [py, "-m", "witness", "serve", "--data", str(w_dir), "--listen",
                                  f"127.0.0.1:{wp}", "--log", f"{origin}={keys['tlog']}"],
                      f"http://127.0.0.1:{wp}/metrics", tmp / "witness.out")
    log = Service("log", [py, "-m", "tlog", "serve", "--data", str(log_dir), "--listen",
                          f"127.0.0.1:{lp}", "--witness", f"http://127.0.0.1:{wp}",
                          "--witness-vkey", keys["witness"], "--quorum", "1"],
                  f"http://127.0.0.1:{lp}/checkpoint", tmp / "tlog.out")
    prov = FakeProvider()
    await prov.start()
    gw_dir = tmp / "gw"
    gw_dir.mkdir()
    await witness.start()
    await log.start()
    ref = SimpleNamespace(url=f"http://127.0.0.1:{lp}", vkey=keys["tlog"],
                          token=(log_dir / "append.token").read_text().strip(),
                          witness=SimpleNamespace(vkey=keys["witness"]))
    cfg = write_config(gw_dir, prov.base_url, log=ref)  # type: ignore[arg-type]
    gw_url = f"http://127.0.0.1:{gp}"
    gateway = Service("gateway", [py, "-m", "tests.test_gateway_fakes", str(cfg), str(gp)],
                      gw_url + "/healthz", tmp / "gateway.out")
    services = [gateway, log, witness]
    shipper = Shipper(gateway)
    tally = Tally()
    stop = asyncio.Event()
    started = time.monotonic()
    try:
        await gateway.start()
        tasks = [asyncio.create_task(client(gw_url, tally, stop, random.Random(seed + i)))
                 for i in range(8)]
        tasks.append(asyncio.create_task(watcher(ref.url, tally, stop)))
        tasks.append(asyncio.create_task(gauges(gw_url, tally, stop)))
        if mode == "crash":
            targets = [*services, shipper]
            tasks.append(asyncio.create_task(chaos(targets, stop, rng)))
        else:
            tasks.append(asyncio.create_task(outage(log, outage_s, stop)))
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        for svc in services:  # whatever died on its own comes back (chaos restarts its kills)
            if svc.proc is not None and svc.proc.returncode is not None:
                svc.note_death(svc.proc.returncode)
                await svc.start()
        deadline = time.monotonic() + 120
        while (await unlogged(gw_url)) != 0:
            if time.monotonic() > deadline:
                raise RuntimeError("receipts still unlogged 120 s after the load ended")
            await asyncio.sleep(0.2)
    finally:
        exits = {s.name: await s.stop() for s in services}
        await prov.stop()
    summary = {"mode": mode, "seconds": round(time.monotonic() - started, 1),
               "kills": {s.name: s.kills for s in [*services, shipper]},
               "died_on_their_own": {s.name: s.died for s in services if s.died},
               "failed_calls": dict(tally.failed),
               "gateway_peaks": tally.peak,
               "sigterm_exit": exits, **check_log(log_dir, keys["tlog"], tally)}
    summary["ok"] = (summary["acknowledged_missing"] == 0 and summary["logged_twice"] == 0
                     and summary["checkpoints_inconsistent"] == 0
                     and not summary["died_on_their_own"]
                     and summary["acknowledged"] > 0)
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(prog="bench/soak.py")
    ap.add_argument("mode", choices=("crash", "outage"))
    ap.add_argument("--seconds", type=float, default=300.0, help="how long the load runs")
    ap.add_argument("--outage", type=float, default=600.0,
                    help="outage mode: seconds the log is away")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--keep", type=Path, help="run in this directory and keep it")
    a = ap.parse_args()
    if a.keep is not None:
        a.keep.mkdir(parents=True, exist_ok=True)
        summary = asyncio.run(run(a.keep, a.mode, a.seconds, a.outage, a.seed))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            summary = asyncio.run(run(Path(tmp), a.mode, a.seconds, a.outage, a.seed))
    print(json.dumps(summary), flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
