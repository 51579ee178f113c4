"""Benchmark: log replicas on PostgreSQL, each figure beside a single SQLite node's (issue 15).

    .venv/bin/python bench/tlog_replicas.py [--quick] [--admin-url URL]

Every figure is measured in this run, on this machine, next to the same
figure for one `tlog serve` on SQLite (the default deployment), so the
ratio is what counts on a shared machine:

1. `POST /add` throughput at 64 clients (wrk, one entry per request, unique
   to the run) sent to the sequencer: SQLite; PostgreSQL with one sequencer
   candidate; PostgreSQL with two candidates, the second a replica. Each
   first alone, then while 16 more clients read (`GET /checkpoint`, hash
   tiles, entry bundles): from the same node on SQLite and with one
   candidate, from the replica with two. Also what a client sees when it
   sends an append to the replica (503 `not_sequencer` naming the sequencer),
   and how long after its acknowledgement an append appears on the replica.
   Without `--quick`, two rounds, the second in the reverse order.
2. Takeover: kill -9 of the active sequencer to the first acknowledged
   append at the other replica (a client retrying every 10 ms), over three
   tries, each with a fresh replica standing by; beside it a SQLite node
   killed and restarted at once by its supervisor (here: this script).
3. `GET /proof/{request_hash}` latency (wrk, one client, random keys) on a
   log of 100,000 receipt-like entries (20,000 with `--quick`) appended in
   256-entry `POST /add-batch` requests: main has no bulk loader, so the
   1M and 10M-entry figures are not measured here. PostgreSQL: served by
   the replica and by the sequencer.

PostgreSQL: a database `pag_bench_<random>` created through `--admin-url`
and dropped at the end, one schema per scenario in it. Asserts nothing;
`run(quick)` returns the rows (the shape of `python -m bench`'s table),
`__main__` prints them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.table import Row, table  # noqa: E402
from bench.wrk import PROOF_LUA, Run  # noqa: E402
from bench.wrk import run as wrk_run  # noqa: E402
from tests.tlogutil import start_tlog, stop  # noqa: E402
from tlog import tiles  # noqa: E402
from tlog.sequencer import SEQUENCER  # noqa: E402

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
APPEND_CLIENTS = 64
READ_CLIENTS = 16
TAKEOVER_TRIES = 3
RETRY_EVERY = 0.01
"""Seconds between a takeover client's append attempts."""

APPEND_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
wrk.headers["Authorization"] = "Bearer {token}"
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(
    '{{"bench": "{run}", "n": %d, "pad": "0123456789abcdef0123456789abcdef"}}', counter))
end
"""
READ_LUA = """
local paths = {"/checkpoint", "/tile/0/000", "/tile/entries/000",
               "/checkpoint", "/tile/0/001", "/tile/entries/001"}
local i = 0
request = function()
  i = i + 1
  return wrk.format("GET", paths[(i % #paths) + 1])
end
"""






def wrk(url: str, lua: str, seconds: float, conns: int) -> Run:
    """Drive `url` with wrk, one thread (bench/wrk.py)."""
    return wrk_run(url, lua, seconds, conns, threads=1)


# -- the PostgreSQL database of this run ------------------------------------------

@contextlib.contextmanager
def bench_database(admin_url: str) -> Iterator[Callable[[str], str]]:
    """A fresh database for this run, dropped afterwards; yields `schema(name) -> URL`."""
    name = "pag_bench_" + secrets.token_hex(4)
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    base = urllib.parse.urlsplit(admin_url)._replace(path="/" + name, query="")
    db_url = urllib.parse.urlunsplit(base)

    def schema(label: str) -> str:
        with psycopg.connect(db_url, autocommit=True) as db:
            db.execute(f"CREATE SCHEMA {label}")
        opts = urllib.parse.quote(f"-csearch_path={label}")
        return f"{db_url}?options={opts}"

    try:
        yield schema
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# -- nodes ------------------------------------------------------------------------

@dataclass
class Node:
    """One `tlog serve` process we started."""

    proc: subprocess.Popen
    url: str


def start_nodes(data: Path, count: int, database: str | None) -> list[Node]:
    """`count` processes on one data directory (and database: replicas, one of them
    sequencing once `sequencer` has seen the election settle)."""
    extra = ("--database", database) if database else ()
    nodes: list[Node] = []
    try:
        for _ in range(count):
            nodes.append(Node(*start_tlog(data, *extra)))
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def sequencer(nodes: list[Node], timeout: float = 30.0) -> Node:
    """The one node that reports itself the sequencer (waits for the election)."""
    deadline = time.monotonic() + timeout
    while True:
        roles = []
        for n in nodes:
            try:
                roles.append(httpx.get(f"{n.url}/", timeout=2).json()["role"])
            except httpx.HTTPError:
                roles.append(None)
        if roles.count(SEQUENCER) == 1:
            return nodes[roles.index(SEQUENCER)]
        if time.monotonic() > deadline:
            raise RuntimeError(f"no single sequencer among {len(nodes)} replicas: {roles}")
        time.sleep(0.05)


def stop_all(nodes: list[Node]) -> None:
    for n in nodes:
        stop(n.proc)


def token_of(data: Path) -> str:
    return (data / "append.token").read_text().strip()


def receipt_like(i: int) -> bytes:
    """Entry `i`: a JSON object whose `request_hash` is `i` in 64 hex digits (GET /proof key)."""
    return b'{"request_hash": "%064x", "route": "bench"}' % i


def append_batches(url: str, token: str, start: int, count: int, parallel: int = 4) -> None:
    """Append entries start..start+count-1 in 256-entry POST /add-batch requests."""
    async def go() -> None:
        pending = list(range(start, start + count, tiles.WIDTH))
        async with httpx.AsyncClient(timeout=60) as c:
            async def worker() -> None:
                while pending:
                    first = pending.pop(0)
                    batch = [receipt_like(i) for i in
                             range(first, min(first + tiles.WIDTH, start + count))]
                    r = await c.post(f"{url}/add-batch", content=tiles.encode_bundle(batch),
                                     headers={"Authorization": f"Bearer {token}"})
                    r.raise_for_status()
                    failed = [e for e in r.json()["entries"] if "error" in e]
                    if failed:
                        raise RuntimeError(f"batch at {first}: {failed[0]}")
            await asyncio.gather(*(worker() for _ in range(parallel)))

    asyncio.run(go())


def wait_size(url: str, size: int, timeout: float = 30.0) -> None:
    """Wait until `url` serves a checkpoint of at least `size` entries."""
    deadline = time.monotonic() + timeout
    while httpx.get(f"{url}/", timeout=5).json()["size"] < size:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} did not reach size {size}")
        time.sleep(0.05)


# -- 1. append throughput ---------------------------------------------------------

@dataclass
class Appends:
    """Appends alone; appends while readers read; the readers."""

    alone: Run
    loaded: Run
    reads: Run


def append_figures(nodes: list[Node], token: str, seconds: float, run: str) -> Appends:
    """POST /add at the sequencer alone, then with readers on the last node."""
    seq = sequencer(nodes)
    reader = next((n for n in nodes if n is not seq), seq)
    append_batches(seq.url, token, 0, 2 * tiles.WIDTH)  # the tiles READ_LUA asks for
    wait_size(reader.url, 2 * tiles.WIDTH)
    alone = wrk(f"{seq.url}/add", APPEND_LUA.format(token=token, run=run + "a"),
                seconds, APPEND_CLIENTS)
    with ThreadPoolExecutor(2) as pool:
        adds = pool.submit(wrk, f"{seq.url}/add", APPEND_LUA.format(token=token, run=run + "b"),
                           seconds, APPEND_CLIENTS)
        reads = pool.submit(wrk, reader.url, READ_LUA, seconds, READ_CLIENTS)
        return Appends(alone, adds.result(), reads.result())


def refusals(replica: str, sequencer_url: str, token: str, count: int = 100) -> tuple[int, float]:
    """Appends sent to a replica: how many were refused 503 not_sequencer naming the
    sequencer, and the median answer time (ms)."""
    ok, times = 0, []
    with httpx.Client(timeout=10) as c:
        for i in range(count):
            t = time.perf_counter()
            r = c.post(f"{replica}/add", content=receipt_like(10**9 + i),
                       headers={"Authorization": f"Bearer {token}"})
            times.append((time.perf_counter() - t) * 1000)
            if (r.status_code == 503 and r.json().get("code") == "not_sequencer"
                    and r.json().get("sequencer") == sequencer_url):
                ok += 1
    return ok, sorted(times)[len(times) // 2]


def replica_lag(seq: str, replica: str, token: str, samples: int) -> list[float]:
    """Seconds from an append's acknowledgement at `seq` to `replica` serving a checkpoint
    that covers it (the replica refreshes once per campaign round)."""
    out, rng = [], random.Random(3)
    with httpx.Client(timeout=10) as c:
        for i in range(samples):
            time.sleep(rng.uniform(0, 0.5))  # not in step with the replica's rounds
            r = c.post(f"{seq}/add", content=receipt_like(2 * 10**9 + i),
                       headers={"Authorization": f"Bearer {token}"})
            r.raise_for_status()
            acked, index = time.monotonic(), r.json()["index"]
            while c.get(f"{replica}/").json()["size"] <= index:
                time.sleep(0.005)
            out.append(time.monotonic() - acked)
    return out


def combined(loads: list[Run]) -> Run:
    """Rounds of one load as one: total rate, median p50, worst p99, all errors."""
    return Run(sum(x.requests for x in loads), sum(x.seconds for x in loads),
                median([x.p50 for x in loads]), max(x.p99 for x in loads),
                sum(x.errors for x in loads))


def throughput_rows(tmp: Path, schema: Callable[[str], str], seconds: float, run: str,
                    lag_samples: int, rounds: int) -> list[Row]:
    """Each round runs SQLite, PG with 1 candidate and with 2, every other round in the
    reverse order, so a drift in the machine's load favours none of them."""
    measured: dict[str, list[Appends]] = {"sqlite": [], "pg1": [], "pg2": []}
    refused, lag = (0, 0.0), [0.0]
    for r in range(rounds):
        order = [("sqlite", 1), ("pg1", 1), ("pg2", 2)]
        for label, count in order if r % 2 == 0 else order[::-1]:
            name = f"{label}_{r}"
            data = tmp / f"append-{name}"
            nodes = start_nodes(data, count, None if label == "sqlite" else schema(name))
            try:
                measured[label].append(append_figures(nodes, token_of(data), seconds,
                                                      run + name))
                if label == "pg2" and r == 0:
                    seq = sequencer(nodes)
                    rep = next(n for n in nodes if n is not seq)
                    refused = refusals(rep.url, seq.url, token_of(data))
                    lag = replica_lag(seq.url, rep.url, token_of(data), lag_samples)
            finally:
                stop_all(nodes)
    figures = {k: Appends(combined([a.alone for a in v]), combined([a.loaded for a in v]),
                          combined([a.reads for a in v])) for k, v in measured.items()}
    base = figures["sqlite"]
    rows = []
    for label, name in (("pg1", "PG, 1 candidate"), ("pg2", "PG, 2 candidates")):
        f = figures[label]
        rows.append(ratio_row(f"POST /add, {APPEND_CLIENTS} clients, {name} (req/s)",
                              f.alone.rps, base.alone.rps))
        rows.append(Row("  p50 / p99", f"{f.alone.p50:.1f} / {f.alone.p99:.1f} ms",
                        f"{base.alone.p50:.1f} / {base.alone.p99:.1f} ms", "", "", None))
    for label, name, where in (("pg1", "PG, 1 candidate", "same node"),
                               ("pg2", "PG, 2 candidates", "replica")):
        f = figures[label]
        rows.append(ratio_row(f"POST /add + {READ_CLIENTS} readers on the {where}, {name} "
                              "(req/s)", f.loaded.rps, base.loaded.rps))
        rows.append(ratio_row(f"  reads served meanwhile by the {where} (req/s)",
                              f.reads.rps, base.reads.rps))
    errors = {k: (f.alone.errors + f.loaded.errors, f.reads.errors) for k, f in figures.items()}
    rows.append(Row("failed appends/reads: SQLite, PG 1, PG 2",
                    ", ".join(f"{a}/{r}" for a, r in errors.values()), "", "", "0",
                    not any(a or r for a, r in errors.values())))
    ok, ms = refused
    rows.append(Row("POST /add at the replica: 503 not_sequencer naming it",
                    f"{ok}/100, p50 {ms:.1f} ms", "", "", "100/100", ok == 100))
    rows.append(Row(f"replica serves an acked append after (p50 / max of {len(lag)})",
                    f"{1000 * median(lag):.0f} / {1000 * max(lag):.0f} ms",
                    "SQLite: at the ack", "", "", None))
    return rows


# -- 2. takeover ------------------------------------------------------------------

def first_ack(url: str, token: str, entry: bytes, acked: dict[int, bytes],
              timeout: float = 60.0) -> float:
    """Append `entry` at `url`, retrying every RETRY_EVERY s; monotonic time of the 200.

    The acknowledged index and entry go into `acked`."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=5) as c:
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                r = c.post(f"{url}/add", content=entry,
                           headers={"Authorization": f"Bearer {token}"})
                if r.status_code == 200:
                    acked[r.json()["index"]] = entry
                    return time.monotonic()
            time.sleep(RETRY_EVERY)
    raise RuntimeError(f"no append acknowledged at {url} within {timeout:g} s")


def kept(url: str, acked: dict[int, bytes]) -> int:
    """How many acknowledged entries `url` serves at their index."""
    size = httpx.get(f"{url}/").json()["size"]
    stored: list[bytes] = []
    for path in tiles.bundles_for_size(size):
        stored += tiles.decode_bundle(httpx.get(f"{url}/{path}").content)
    return sum(1 for i, e in acked.items() if i < len(stored) and stored[i] == e)


@dataclass
class Takeovers:
    """Seconds from each kill -9 to the next acknowledged append; acknowledged entries,
    and how many of them the surviving node serves at their index afterwards."""

    seconds: list[float]
    acked: int
    kept: int


def takeover_pg(data: Path, database: str) -> Takeovers:
    """kill -9 of the sequencer, first ack at the other replica; a fresh standby each try."""
    nodes = start_nodes(data, 2, database)
    token, out, acked = token_of(data), [], {}
    try:
        for t in range(TAKEOVER_TRIES):
            seq = sequencer(nodes)
            other = next(n for n in nodes if n is not seq)
            first_ack(seq.url, token, receipt_like(2 * t), acked)
            killed = time.monotonic()
            seq.proc.send_signal(signal.SIGKILL)
            out.append(first_ack(other.url, token, receipt_like(2 * t + 1), acked) - killed)
            seq.proc.wait(10)
            nodes = [other, *start_nodes(data, 1, database)]  # the next try's standby
        return Takeovers(out, len(acked), kept(nodes[0].url, acked))
    finally:
        stop_all(nodes)


def restart_sqlite(data: Path) -> Takeovers:
    """kill -9 of a SQLite node, first ack at its process restarted at once."""
    nodes = start_nodes(data, 1, None)
    token, out, acked = token_of(data), [], {}
    try:
        for t in range(TAKEOVER_TRIES):
            first_ack(nodes[0].url, token, receipt_like(2 * t), acked)
            killed = time.monotonic()
            nodes[0].proc.send_signal(signal.SIGKILL)
            nodes[0].proc.wait(10)
            nodes = start_nodes(data, 1, None)
            out.append(first_ack(nodes[0].url, token, receipt_like(2 * t + 1), acked) - killed)
        return Takeovers(out, len(acked), kept(nodes[0].url, acked))
    finally:
        stop_all(nodes)


def takeover_rows(tmp: Path, schema: Callable[[str], str]) -> list[Row]:
    pg = takeover_pg(tmp / "takeover-pg", schema("takeover"))
    lite = restart_sqlite(tmp / "takeover-sqlite")
    med_pg, med_lite = median(pg.seconds), median(lite.seconds)
    return [Row(f"takeover: kill -9 to first ack at the other replica (median of "
                f"{len(pg.seconds)})", f"{med_pg:.2f} s", f"SQLite restarted {med_lite:.2f} s",
                f"{med_pg / med_lite:.2f}x", "within seconds (<= 5 s)", max(pg.seconds) <= 5),
            Row("  every try", ", ".join(f"{s:.2f}" for s in pg.seconds) + " s",
                ", ".join(f"{s:.2f}" for s in lite.seconds) + " s", "", "", None),
            Row("  acknowledged appends served afterwards", f"{pg.kept}/{pg.acked}",
                f"{lite.kept}/{lite.acked}", "", "all", pg.kept == pg.acked)]


# -- 3. proof latency -------------------------------------------------------------

def proof_figures(data: Path, database: str | None, entries: int,
                  seconds: float) -> dict[str, Run]:
    """Build a log of `entries` receipt-like entries, then GET /proof on each node."""
    nodes = start_nodes(data, 2 if database else 1, database)
    try:
        seq = sequencer(nodes)
        append_batches(seq.url, token_of(data), 0, entries)
        out = {}
        for n in sorted(nodes, key=lambda n: n is seq):  # the replica first
            wait_size(n.url, entries)
            out["sequencer" if n is seq else "replica"] = wrk(
                n.url, PROOF_LUA.format(entries=entries), seconds, 1)
        return out
    finally:
        stop_all(nodes)


def proof_rows(tmp: Path, schema: Callable[[str], str], entries: int,
               seconds: float) -> list[Row]:
    lite = proof_figures(tmp / "proofs-sqlite", None, entries, seconds)["sequencer"]
    pg = proof_figures(tmp / "proofs-pg", schema("proofs"), entries, seconds)
    rows = []
    for role in ("replica", "sequencer"):
        f = pg[role]
        rows.append(Row(f"GET /proof, {entries:,} entries, PG {role}: p50 / p99",
                        f"{f.p50:.2f} / {f.p99:.2f} ms", f"{lite.p50:.2f} / {lite.p99:.2f} ms",
                        f"{f.p50 / lite.p50:.2f}x", "", None))
    failed = sum(f.errors for f in pg.values()) + lite.errors
    rows.append(Row("failed proof requests", str(failed), "", "", "0", failed == 0))
    return rows


# -- the whole run ----------------------------------------------------------------

def median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def fmt(v: float) -> str:
    return f"{v:,.0f}" if v >= 100 else f"{v:.3g}"


def ratio_row(figure: str, value: float, base: float) -> Row:
    """A row of a rate beside SQLite's (no target: the figure is the comparison)."""
    return Row(figure, fmt(value), f"SQLite {fmt(base)}",
               f"{value / base:.2f}x" if base else "", "", None)


def run(quick: bool, admin_url: str = ADMIN_URL) -> list[Row]:
    """Every figure of this benchmark; a single explanatory row if PostgreSQL is absent."""
    if shutil.which("wrk") is None:
        return [Row("log replicas on PostgreSQL", "not run", "", "", "wrk (Debian package)",
                    None)]
    try:
        psycopg.connect(admin_url, connect_timeout=3).close()
    except psycopg.OperationalError as e:
        reason = str(e).strip().splitlines()[0]
        return [Row("log replicas on PostgreSQL", "not run", "", "",
                    f"PostgreSQL at {admin_url}: {reason}", None)]
    seconds = 3.0 if quick else 10.0
    entries = 20_000 if quick else 100_000
    lag_samples = 10 if quick else 30
    rounds = 1 if quick else 2
    run_id = secrets.token_hex(4)
    with tempfile.TemporaryDirectory(prefix="pag-replicas-") as d, \
            bench_database(admin_url) as schema:
        tmp = Path(d)
        rows = []
        for part, rows_of in (
                ("appends", lambda: throughput_rows(tmp, schema, seconds, run_id, lag_samples,
                                                    rounds)),
                ("takeover", lambda: takeover_rows(tmp, schema)),
                ("proofs", lambda: proof_rows(tmp, schema, entries, seconds))):
            started = time.monotonic()
            rows += rows_of()
            print(f"tlog replicas: {part} measured in {time.monotonic() - started:.0f} s",
                  file=sys.stderr, flush=True)
        return rows




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="3 s loads and a 20,000-entry log (default: 10 s, 100,000)")
    ap.add_argument("--admin-url", default=ADMIN_URL,
                    help="PostgreSQL URL allowed to CREATE and DROP DATABASE")
    a = ap.parse_args(argv)
    started = time.monotonic()
    rows = run(a.quick, a.admin_url)
    load = os.getloadavg()
    print(f"tlog replicas: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f}, "
          f"{'quick' if a.quick else 'full'} settings, {time.monotonic() - started:.0f} s; "
          "baselines are one SQLite node measured in this run")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
