"""Every benchmark of issue #16 in one run, printed as one table.

    .venv/bin/python -m bench [--full] [--only NAME,...] [--rounds N] [--profile SECONDS]

Each row is a figure, the baseline it is compared with (measured in this run,
on this machine, right before or after it), their ratio, and the issue's
target. On a shared machine absolute numbers move with the load; the ratio
against the same run's baseline is the figure that counts. The ratio rows of
`append` and `gateway` run `--rounds` alternating rounds (3 by default: the
baseline, then the figure, each round) and give the medians and the median of
the per-round ratios, with their range: one pair's ratio moved by a quarter
between runs a minute apart on the same code.

Parts (`--only` takes their names):

- `append`: `POST /add` at 64 clients (wrk) against a bare uvicorn POST
  endpoint; `POST /add-batch` (256 entries a request, the gateway shipper's
  path) in entries/s against the same bare endpoint fed the same bodies, with
  the compact answer the shipper asks for (the target's row) and with the
  default one; and in
  process (bench/batch_answer.py) each answer's bytes, the log's CPU to
  encode it and the shipper's to parse and verify it, per entry.
- `gateway`: `python -m gateway demo`; the demo provider directly against
  through the gateway (receipts signed, committed, shipped, logged and
  witnessed): added p50 at one client, throughput at 16, and the added time
  to the first chunk of a streamed answer, and the added p50 at about 10 calls a
  second (a Python client, pausing between calls); beside them LiteLLM's proxy (one
  worker, same provider) when `.bench-venv` has `litellm[proxy]`. Then the
  demo again with `--require-log-inclusion` (each answer waits until its
  receipt is logged and witnessed): its added p50 at one client and throughput
  at 16 (5 s runs, at most 2 rounds), rows marked "log inclusion"
  (informational).
- `proofs`: a log of 1M entries (and 10M with `--full`) built with the bulk
  loader (the storage steps in 8192-entry batches, no HTTP), cached under
  `.bench-data/` so later runs start at once; `GET /proof/{hash}` over HTTP
  (wrk, one client, fresh process: its p99 includes the cold caches) against
  a bare uvicorn GET; the log's RSS after it; `POST /add` at 64 clients and
  `POST /add-batch` (compact answer) on that log (with `--full`: the growth
  rows, 10M against 1M).
- `audit`: `python -m verifier audit` over HTTP and from a directory against
  a plain hashlib loop over the same entries (bench/audit.py's log).
- `replicas` (issue #15, not in the default set): the log on PostgreSQL with
  one and two sequencer candidates against one SQLite node
  (bench/tlog_replicas.py).

`--profile S` samples (py-spy, from `.bench-venv`) the gateway, the shipper
and the tlog under c=16 gateway load and the tlog under `POST /add` load.
Quick settings by default (well under 10 minutes on 2 cores); `--full` runs
longer and adds 10M entries. Asserts nothing; prints figures.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
LITELLM_VENV = ROOT / ".bench-venv"
"""LiteLLM's proxy for the gateway part's peer rows, when installed there (bench/gateway_overhead.py)."""
sys.path.insert(0, str(ROOT))

from bench import audit, batch_answer, gateway_overhead, tlog_append, tlog_replicas  # noqa: E402
from bench.table import Row, table  # noqa: E402
from bench.wrk import PROOF_LUA, Run  # noqa: E402
from bench.wrk import run as wrk  # noqa: E402
from tests.tlogutil import start_tlog, stop, wait_http  # noqa: E402
from tlog.batch import MEDIA_TYPE as COMPACT  # noqa: E402

DATA = ROOT / ".bench-data"
LOG_LAYOUT = "v2"
"""The bulk logs' table layout: v2 has tiles by rowid and inner rows (v1, unnamed, neither)."""
BATCH = 256
ADD_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
{auth}
local tid = 0
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
counter = 0
request = function()
  counter = counter + 1
  return wrk.format(nil, nil, nil, string.format(
    '{{"bench": %d, "thread": %d, "run": "{run}", "pad": "0123456789abcdef"}}', counter, tid))
end
"""
BATCH_LUA = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
{auth}
local tid = 0
setup = function(thread) tid = tid + 1; thread:set("tid", tid) end
counter = 0
request = function()
  local parts = {{}}
  for i = 1, {batch} do
    counter = counter + 1
    local e = string.format('{{"request_hash": "%032x%08x%024x", "run": "{run}"}}',
                            counter, tid, 0)
    parts[#parts + 1] = string.char(math.floor(#e / 256), #e % 256) .. e
  end
  return wrk.format(nil, nil, nil, table.concat(parts))
end
"""








@contextlib.contextmanager
def bare_server(tmp: Path) -> Iterator[str]:
    """bench/tlog_append.py's bare uvicorn app (answers every request 200): the ceiling."""
    (tmp / "bareapp.py").write_text(tlog_append.BARE_APP)
    port = tlog_append.free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bareapp:app", "--port", str(port),
                             "--log-level", "warning", "--no-access-log"], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_http(url + "/", proc)
        yield url
    finally:
        stop(proc)


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process, MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    cur = int(re.search(r"VmRSS:\s+(\d+)", status)[1])
    peak = int(re.search(r"VmHWM:\s+(\d+)", status)[1])
    return cur / 1024, peak / 1024


def fmt(v: float, unit: str = "") -> str:
    if v >= 100:
        return f"{v:,.0f}{unit}"
    return f"{v:.3g}{unit}" if v < 10 else f"{v:.1f}{unit}"


def median_ratio(values: list[float], bases: list[float]) -> tuple[float, str]:
    """The median of the per-round ratios value/base, and its text: "0.28x", and with more
    than one round the range, "0.28x (0.25-0.31)". Each round's pair ran back to back, so
    a ratio never spans the machine's drift between rounds."""
    ratios = sorted(v / b if b else 0.0 for v, b in zip(values, bases, strict=True))
    r = statistics.median(ratios)
    return r, f"{r:.2f}x" + (f" ({ratios[0]:.2f}-{ratios[-1]:.2f})" if len(ratios) > 1 else "")


def rounds_row(figure: str, values: list[float], bases: list[float], unit: str, want: float,
               target: str, extra: bool = True) -> Row:
    """A ratio row over alternating rounds: medians of the values and of the baselines, and
    the verdict (median per-round ratio >= want, unless not `extra`)."""
    r, text = median_ratio(values, bases)
    return Row(figure, fmt(statistics.median(values), unit), fmt(statistics.median(bases), unit),
               text, target, r >= want if extra else None)


# -- append -------------------------------------------------------------------

def append_auth(data: Path) -> str:
    """The wrk script line that sends the log's append token (in `data`)."""
    return ('wrk.headers["Authorization"] = "Bearer '
            + (data / "append.token").read_text().strip() + '"')


def add_batch(url: str, auth: str, run: str, seconds: float, compact: bool = True) -> Run:
    """POST /add-batch of BATCH entries unique to `run`, 16 clients, for `seconds`; asking
    for the compact answer (the shipper's ask) unless `compact` is False."""
    if compact:
        auth += f'\nwrk.headers["Accept"] = "{COMPACT}"'
    return wrk(url + "/add-batch", BATCH_LUA.format(auth=auth, run=run, batch=BATCH),
               seconds, 16)


def append_rows(tmp: Path, seconds: float, run: str, rounds: int) -> list[Row]:
    """POST /add at 64 clients against the bare endpoint in `rounds` alternating rounds (the
    bare endpoint, then the log, each round), then POST /add-batch, each against it."""
    rows = []
    data = tmp / "append-log"
    adds: list[Run] = []
    bares: list[Run] = []
    add_cpu = 0.0
    with bare_server(tmp) as bare:
        proc, url = start_tlog(data)
        try:
            auth = append_auth(data)
            for i in range(rounds):  # entries unique to each round: appends never deduplicate
                bares.append(wrk(bare + "/add", ADD_LUA.format(auth="", run=f"{run}-{i}"),
                                 seconds, 64))
                cpu0 = gateway_overhead.cpu_seconds([proc.pid])
                adds.append(wrk(url + "/add", ADD_LUA.format(auth=auth, run=f"{run}-{i}"),
                                seconds, 64))
                add_cpu += gateway_overhead.cpu_seconds([proc.pid]) - cpu0
            b_batch = wrk(bare + "/add", BATCH_LUA.format(auth="", run=run, batch=BATCH),
                          seconds, 16)
            cpu1 = gateway_overhead.cpu_seconds([proc.pid])
            batch = add_batch(url, auth, run, seconds, compact=False)
            cpu2 = gateway_overhead.cpu_seconds([proc.pid])
            compact = add_batch(url, auth, run + "-compact", seconds)
            cpu3 = gateway_overhead.cpu_seconds([proc.pid])
        finally:
            stop(proc)
    errors = sum(a.errors for a in adds)
    n = f", median of {rounds} rounds" if rounds > 1 else ""
    rows.append(rounds_row(f"POST /add, 64 clients (req/s){n}",
                           [a.rps for a in adds], [b.rps for b in bares], "", 0.6,
                           ">= 0.6x bare uvicorn"))
    worst, worst_bare = max(a.p99 for a in adds), max(b.p99 for b in bares)
    rows.append(Row("POST /add, 64 clients: p99 (the worst round)", fmt(worst, " ms"),
                    fmt(worst_bare, " ms"), "", "<= 100 ms", worst <= 100 and errors == 0))
    if errors:
        rows.append(Row("POST /add failures", str(errors), "", "", "0", False))
    e_s, b_s, c_s = batch.rps * BATCH, b_batch.rps * BATCH, compact.rps * BATCH
    rows.append(Row(f"POST /add-batch ({BATCH}/req, 16 clients), compact answer (the "
                    "shipper's): entries/s", fmt(c_s), fmt(b_s),
                    f"{c_s / b_s:.2f}x" if b_s else "", ">= 50,000/s",
                    c_s >= 50_000 and compact.errors == 0))
    rows.append(Row(f"POST /add-batch ({BATCH}/req, 16 clients), default answer: entries/s",
                    fmt(e_s), fmt(b_s), f"{e_s / b_s:.2f}x" if b_s else "",
                    "(a full POST /add answer per entry)", None if batch.errors == 0 else False))
    m = batch_answer.measure()
    rows.append(Row("/add-batch answer bytes per entry: compact (default)",
                    fmt(m["bytes_compact"]), fmt(m["bytes_default"]),
                    f"{m['bytes_compact'] / m['bytes_default']:.2f}x", "(in process)", None))
    rows.append(Row("/add-batch answer CPU per entry, log encode: compact (default)",
                    fmt(m["encode_compact"], " us"), fmt(m["encode_default"], " us"),
                    f"{m['encode_compact'] / m['encode_default']:.2f}x", "(in process)", None))
    rows.append(Row("/add-batch answer CPU per entry, shipper check: compact (default)",
                    fmt(m["check_compact"], " us"), fmt(m["check_default"], " us"),
                    f"{m['check_compact'] / m['check_default']:.2f}x", "(in process)", None))
    add_us = 1e6 * add_cpu / max(sum(a.requests for a in adds), 1)
    # the log is one interpreter: its Python work, on any thread, runs one piece at a time
    rows.append(Row("tlog CPU per POST /add (one interpreter)", f"{add_us:.0f} us",
                    f"0.6x bare allows {1e6 / (0.6 * statistics.median(b.rps for b in bares)):.0f} us",
                    "", "(the ceiling)", None))
    rows.append(Row("tlog CPU per entry: /add, /add-batch default, /add-batch compact",
                    f"{add_us:.0f} us, "
                    f"{1e6 * (cpu2 - cpu1) / max(batch.requests * BATCH, 1):.0f} us, "
                    f"{1e6 * (cpu3 - cpu2) / max(compact.requests * BATCH, 1):.0f} us",
                    "", "", "(load-independent)", None))
    return rows


# -- gateway ------------------------------------------------------------------

def first_chunk_ms(client: httpx.Client, url: str, body: dict, headers: dict[str, str]) -> float:
    """Milliseconds from sending a streamed request to its first body bytes."""
    t = time.perf_counter()
    with client.stream("POST", url, json=body, headers=headers) as r:
        chunks = r.iter_raw()
        next(chunks)
        dt = time.perf_counter() - t
        for _ in chunks:
            pass
    if r.status_code != 200:
        raise RuntimeError(f"streamed call answered {r.status_code}")
    return dt * 1000


PACED_RATE = 10  # calls a second to each of direct and gateway in the paced row


def paced_ms(client: httpx.Client, direct: gateway_overhead.Target,
             gw: gateway_overhead.Target, samples: int) -> dict[str, list[float]]:
    """Milliseconds of each of `samples` calls (after 10 unmeasured) to direct and to the
    gateway, one after the other, about PACED_RATE a second to each: the processes sleep between
    calls, as at a quiet deployment, which the wrk rows never let them."""
    out: dict[str, list[float]] = {direct.name: [], gw.name: []}
    msg = [{"role": "user", "content": gateway_overhead.PROMPT}]
    for i in range(samples + 10):
        for t in (direct, gw):
            time.sleep(0.5 / PACED_RATE)
            t0 = time.perf_counter()
            r = client.post(t.url + "/chat/completions", json={"model": t.model, "messages": msg},
                            headers={"Authorization": f"Bearer {t.key}"})
            ms = 1000 * (time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"paced call to {t.name} answered {r.status_code}")
            if i >= 10:
                out[t.name].append(ms)
    return out


def demo_targets(demo: gateway_overhead.Demo
                 ) -> tuple[gateway_overhead.Target, gateway_overhead.Target]:
    """The demo's provider called directly (plain HTTP) and through its gateway."""
    ready = demo.ready
    return (gateway_overhead.Target("direct", ready["provider"], "demo-chat-1", "unused",
                                    [demo.pids["provider"]]),
            gateway_overhead.Target("gateway", ready["gateway"] + "/v1", "demo-chat",
                                    ready["api_key"], [demo.pids["gateway"]]))


def gateway_rows(tmp: Path, seconds: float, samples: int, profile: float, rounds: int
                 ) -> list[Row]:
    """The demo provider directly against through the gateway: c=1 and c=16 in `rounds`
    alternating rounds (direct, gateway, direct HTTPS), streaming."""
    demo = gateway_overhead.Demo(tmp / "demo")
    litellm: gateway_overhead.LiteLLM | None = None
    try:
        ready = demo.ready
        direct, gw = demo_targets(demo)
        tls = gateway_overhead.Target("direct-tls", ready["provider_tls"], "demo-chat-1",
                                      "unused", [demo.pids["provider"]])  # as the route does
        streamed = [direct, gw, tls]
        targets = list(streamed)
        for t in targets:  # warm up connections, leases and caches
            gateway_overhead.wrk(t, 4, 1, tmp)
        chain = ("provider", "shipper", "tlog", "witness")  # the gateway's own CPU: from wrk
        if (LITELLM_VENV / "bin" / "litellm").exists():
            try:
                litellm = gateway_overhead.LiteLLM(LITELLM_VENV, ready["provider"],
                                                   gateway_overhead.free_port(), tmp)
            except RuntimeError as e:
                print(f"bench: LiteLLM unavailable ({e}); no LiteLLM rows")
            else:
                targets.append(gateway_overhead.Target("litellm", litellm.url + "/v1",
                                                       "demo-chat", litellm.key, litellm.pids()))
                gateway_overhead.wrk(targets[-1], 4, 1, tmp)
        res: dict[tuple[str, int], list[gateway_overhead.Result]] = {}
        cpu = dict.fromkeys(chain, 0.0)  # seconds of each, during the gateway's c=16 runs
        for c in (1, 16):
            for i in range(rounds):  # each round: direct, gateway, direct HTTPS back to back
                for t in targets if i == 0 else streamed:  # the peer once
                    before = {n: gateway_overhead.cpu_seconds([demo.pids[n]]) for n in chain}
                    res.setdefault((t.name, c), []).append(
                        gateway_overhead.wrk(t, c, int(seconds), tmp))
                    if t is gw and c == 16:
                        for n in chain:
                            cpu[n] += gateway_overhead.cpu_seconds([demo.pids[n]]) - before[n]
        ttfc: dict[str, list[float]] = {t.name: [] for t in streamed}
        msg = [{"role": "user", "content": gateway_overhead.PROMPT}]
        with httpx.Client(timeout=30) as client, \
                httpx.Client(timeout=30, verify=False) as unpinned:  # noqa: S501 - the demo provider's self-signed key, on loopback
            for i in range(samples + 20):
                for t in streamed:
                    ms = first_chunk_ms(unpinned if t is tls else client,
                                        t.url + "/chat/completions",
                                        {"model": t.model, "messages": msg, "stream": True},
                                        {"Authorization": f"Bearer {t.key}"})
                    if i >= 20:
                        ttfc[t.name].append(ms)
            paced = paced_ms(client, direct, gw, samples // 2)
        if profile:
            run_profiles(demo, gw, tmp, profile)
    finally:
        if litellm is not None:
            litellm.stop()
        demo.stop()
    def p50s(name: str) -> list[float]:
        return [r.p50_ms for r in res[(name, 1)]]

    def rps16(name: str) -> list[float]:
        return [r.rps for r in res[(name, 16)]]

    def added(name: str) -> float:  # the median over rounds of each round's added p50
        return statistics.median(g - d for g, d in zip(p50s("gateway"), p50s(name),
                                                       strict=True))

    g16 = res[("gateway", 16)]
    g16_calls = sum(r.requests for r in g16)
    t_d, t_g = statistics.median(ttfc["direct"]), statistics.median(ttfc["gateway"])
    errors = sum(r.errors for runs in res.values() for r in runs)
    n = f", median of {rounds} rounds" if rounds > 1 else ""
    rows = [
        Row(f"gateway c=1: added p50{n}", fmt(added("direct"), " ms"),
            f"direct p50 {fmt(statistics.median(p50s('direct')), ' ms')}",
            median_ratio(p50s("gateway"), p50s("direct"))[1], "<= 0.5 ms",
            added("direct") <= 0.5),
        rounds_row(f"gateway c=16 (req/s){n}", rps16("gateway"), rps16("direct"), "", 0.3,
                   ">= 0.3x direct"),
        Row("streaming: added time to first chunk (p50)", fmt(t_g - t_d, " ms"),
            f"direct {fmt(t_d, ' ms')}", f"{t_g / t_d:.2f}x", "<= 1 ms", t_g - t_d <= 1.0),
        Row("gateway c=16: p99 latency (the worst round)", fmt(max(r.p99_ms for r in g16), " ms"),
            f"direct p99 {fmt(max(r.p99_ms for r in res[('direct', 16)]), ' ms')}", "",
            "(informational)", None),
    ]
    t_s = statistics.median(ttfc["direct-tls"])
    rows += [
        Row("gateway c=1: added p50 over direct HTTPS", fmt(added("direct-tls"), " ms"),
            f"direct HTTPS p50 {fmt(statistics.median(p50s('direct-tls')), ' ms')}",
            median_ratio(p50s("gateway"), p50s("direct-tls"))[1], "(the route's transport)",
            None),
        rounds_row("gateway c=16 (req/s) vs direct HTTPS", rps16("gateway"), rps16("direct-tls"),
                   "", 0.3, "(the route's transport)", extra=False),
        Row("streaming: added time to first chunk over direct HTTPS", fmt(t_g - t_s, " ms"),
            f"direct HTTPS {fmt(t_s, ' ms')}", f"{t_g / t_s:.2f}x", "(the route's transport)",
            None),
    ]
    def cpu_ms(runs: list[gateway_overhead.Result]) -> float:  # per call over all rounds
        return sum(r.cpu_ms * r.requests for r in runs) / max(sum(r.requests for r in runs), 1)

    per_call = {"gateway": cpu_ms(g16), **{n: 1000 * cpu[n] / max(g16_calls, 1) for n in chain}}
    direct_ms = cpu_ms(res[("direct", 16)])
    # at one client each call runs alone: the gateway's CPU per call is time added to it
    rows.append(Row("gateway CPU per call at c=1 (serial with the call)",
                    f"{cpu_ms(res[('gateway', 1)]):.3f} ms",
                    f"added p50 {fmt(added('direct'), ' ms')}", "", "(load-independent)", None))
    rows.append(Row("CPU per call at c=16: gateway; shipper+tlog+witness",
                    f"{per_call['gateway']:.3f} ms; "
                    f"{sum(per_call[n] for n in ('shipper', 'tlog', 'witness')):.3f} ms",
                    f"direct {direct_ms:.3f} ms", "", "(load-independent)", None))
    # what the c=16 target leaves the gateway (its Python work runs one piece at a time)
    # and the whole chain (all CPUs counted, wrk's own not charged)
    one = 1000 / (0.3 * statistics.median(rps16("direct")))
    rows.append(Row("gateway CPU per call at c=16 (one interpreter)",
                    f"{per_call['gateway']:.3f} ms", f"0.3x direct allows {one:.3f} ms", "",
                    "(the ceiling)", None))
    budget = (os.cpu_count() or 1) * one
    rows.append(Row("CPU per call at c=16, the whole chain: "
                    + ", ".join(f"{n} {v:.3f}" for n, v in per_call.items()),
                    f"{sum(per_call.values()):.3f} ms",
                    f"0.3x direct allows {budget:.3f} ms ({os.cpu_count()} CPUs)", "",
                    "(the ceiling)", None))
    p_d, p_g = statistics.median(paced["direct"]), statistics.median(paced["gateway"])
    rows.append(Row(f"gateway at {PACED_RATE} calls a second: added p50", fmt(p_g - p_d, " ms"),
                    f"direct p50 {fmt(p_d, ' ms')}", f"{p_g / p_d:.2f}x", "(informational)",
                    None))
    if ("litellm", 1) in res:  # against the first round, which ran next to it
        (l1,), (l16,) = res[("litellm", 1)], res[("litellm", 16)]
        d1, g1, g16_first = res[("direct", 1)][0], res[("gateway", 1)][0], g16[0]
        rows += [
            Row("LiteLLM proxy c=1: added p50", fmt(l1.p50_ms - d1.p50_ms, " ms"),
                f"gateway {fmt(g1.p50_ms - d1.p50_ms, ' ms')}",
                f"{(g1.p50_ms - d1.p50_ms) / max(l1.p50_ms - d1.p50_ms, 1e-9):.2f}x", "(peer)",
                None),
            Row("gateway c=16 (req/s) vs the LiteLLM proxy", f"{g16_first.rps:,.0f}",
                f"LiteLLM {l16.rps:,.0f}", f"{g16_first.rps / max(l16.rps, 1e-9):.1f}x",
                "(peer)", None),
            Row("CPU per call at c=16: LiteLLM proxy", f"{l16.cpu_ms:.3f} ms", "", "",
                "(load-independent)", None),
        ]
    if errors:
        rows.append(Row("gateway failures", str(errors), "", "", "0", False))
    return rows


def inclusion_rows(tmp: Path, seconds: float, rounds: int) -> list[Row]:
    """The demo with `--require-log-inclusion` (each answer waits until its receipt is in
    the log, witnessed): added p50 at one client and throughput at 16 against the
    provider called directly, in alternating rounds. Informational: the issue's targets
    are for the default mode."""
    demo = gateway_overhead.Demo(tmp / "demo-inclusion", "--require-log-inclusion")
    try:
        direct, gw = demo_targets(demo)
        for t in (direct, gw):
            gateway_overhead.wrk(t, 4, 1, tmp)
        res: dict[tuple[str, int], list[gateway_overhead.Result]] = {}
        for c in (1, 16):
            for _ in range(rounds):
                for t in (direct, gw):
                    res.setdefault((t.name, c), []).append(
                        gateway_overhead.wrk(t, c, int(seconds), tmp))
    finally:
        demo.stop()
    p50 = {n: [r.p50_ms for r in res[(n, 1)]] for n in ("direct", "gateway")}
    added = statistics.median(g - d for g, d in zip(p50["gateway"], p50["direct"], strict=True))
    g16 = res[("gateway", 16)]
    n = f", median of {rounds} rounds" if rounds > 1 else ""
    rows = [
        Row(f"log inclusion: gateway c=1: added p50{n}", fmt(added, " ms"),
            f"direct p50 {fmt(statistics.median(p50['direct']), ' ms')}",
            median_ratio(p50["gateway"], p50["direct"])[1], "(informational)", None),
        rounds_row(f"log inclusion: gateway c=16 (req/s){n}", [r.rps for r in g16],
                   [r.rps for r in res[("direct", 16)]], "", 0.0, "(informational)",
                   extra=False),
        Row("log inclusion: gateway CPU per call at c=1; at c=16",
            f"{statistics.median(r.cpu_ms for r in res[('gateway', 1)]):.3f} ms; "
            f"{statistics.median(r.cpu_ms for r in g16):.3f} ms", "", "",
            "(load-independent)", None),
    ]
    errors = sum(r.errors for runs in res.values() for r in runs)
    if errors:
        rows.append(Row("log inclusion: gateway failures", str(errors), "", "", "0", False))
    return rows


def run_profiles(demo: gateway_overhead.Demo, gw: gateway_overhead.Target, tmp: Path,
                 seconds: float) -> None:
    """py-spy tops of the gateway, shipper and tlog under c=16 gateway load."""
    spy = ROOT / ".bench-venv" / "bin" / "py-spy"
    if not spy.exists():
        print("profile: no py-spy in .bench-venv (python3 -m venv .bench-venv && "
              ".bench-venv/bin/pip install py-spy)")
        return
    for name in ("gateway", "shipper", "tlog"):
        load = threading.Thread(target=gateway_overhead.wrk, args=(gw, 16, int(seconds) + 2, tmp))
        load.start()
        time.sleep(1)
        print_profile(str(spy), demo.pids[name], seconds, tmp / f"{name}.prof",
                      f"{name} under gateway load at c=16")
        load.join()


def print_profile(spy: str, pid: int, seconds: float, out: Path, label: str) -> None:
    try:
        top = gateway_overhead.profile(spy, pid, seconds, out)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        print(f"profile: py-spy failed on {label}: {e}")
        return
    print(f"\n{label} (py-spy {seconds:g} s; self % / inclusive %):")
    for s_pct, i_pct, fn in top[:15]:
        print(f"  {s_pct:5.1f} {i_pct:5.1f}  {fn}")


# -- proofs -------------------------------------------------------------------

def bulk_log(entries: int) -> Path:
    """A log of `entries` receipt-like entries, kept under .bench-data/ for later runs.

    The bulk loader writes what the storage steps would, in big sequential
    transactions: entries and hash tiles (`tiles.extend`, 65,536 leaves at a
    time), then the leaf index and lookup keys sorted by key, so the random-key
    indexes are built in one pass instead of page by page. The signed
    checkpoint is the one `recover` signs when the log is first opened (over
    entries no checkpoint covers yet). The tables are
    tlog/sqlite_store.py's: tiles by `tile_id` with each full leaf tile's
    inner row, the prefix index tables. The cache directory names the
    layout (`LOG_LAYOUT`), so a log cached by an older loader is rebuilt,
    not migrated again in every run's copy.
    """
    from tlog import keys, merkle, tiles
    from tlog.sequencer import Log
    from tlog.sqlite_store import SQLiteStore, key_prefix, prefix, tile_id
    from tlog.storage import inner_rows, lookup_key

    data = DATA / f"log-{entries}-{LOG_LAYOUT}"
    if (data / "complete").exists():
        return data
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    t = time.perf_counter()
    store = SQLiteStore(data / "log.db")
    db = store._db  # noqa: SLF001 - the loader writes the tables the steps would
    db.execute("CREATE TEMP TABLE new_leaves (prefix INTEGER, idx INTEGER)")
    db.execute("CREATE TEMP TABLE new_keys (prefix INTEGER, idx INTEGER)")
    edge: dict[tuple[int, int], bytes] = {}
    step = 1 << 16
    for start in range(0, entries, step):
        chunk = [b'{"request_hash": "%064x"}' % i for i in range(start, min(entries, start + step))]
        hashes = [merkle.leaf_hash(e) for e in chunk]
        edge = tiles.extend(start, hashes, lambda lv, ix, e=edge: e.get((lv, ix), b""))
        db.execute("BEGIN")
        db.executemany("INSERT INTO entries (idx, data) VALUES (?, ?)",
                       ((start + i, e) for i, e in enumerate(chunk)))
        db.executemany("INSERT OR REPLACE INTO tiles (id, data) VALUES (?, ?)",
                       ((tile_id(lv, ix), d) for (lv, ix), d in edge.items()))
        db.executemany("INSERT INTO tile_inner (idx, data) VALUES (?, ?)", inner_rows(edge))
        db.executemany("INSERT INTO new_leaves VALUES (?, ?)",
                       ((prefix(h), start + i) for i, h in enumerate(hashes)))
        db.executemany("INSERT INTO new_keys VALUES (?, ?)",
                       ((key_prefix(lookup_key(e)), start + i) for i, e in enumerate(chunk)))
        db.execute("COMMIT")
    db.execute("BEGIN")
    db.execute("INSERT INTO leaf_prefixes (prefix, idx) "
               "SELECT prefix, idx FROM new_leaves ORDER BY prefix, idx")
    db.execute("INSERT INTO lookup_prefixes (prefix, idx) "
               "SELECT prefix, idx FROM new_keys ORDER BY prefix, idx")
    db.execute("DROP TABLE new_leaves")
    db.execute("DROP TABLE new_keys")
    db.execute("COMMIT")
    log = Log(store, keys.load_signer(data))  # recover: signs the checkpoint over it all
    size = log.head.size
    store.close()
    if size != entries:
        raise RuntimeError(f"bulk log has {size} entries, not {entries}")
    (data / "complete").write_text(f"{entries} entries built in {time.perf_counter() - t:.0f} s\n")
    print(f"bench: built {data} ({(data / 'complete').read_text().strip()})", flush=True)
    return data


def proof_figures(entries: int, tmp: Path, seconds: float, run: str, bare: str
                  ) -> dict[str, float]:
    """Fresh `tlog serve` on the bulk log: GET /proof (wrk, one client) right after the same
    load on the `bare` server, RSS, POST /add, POST /add-batch."""
    data = tmp / f"log-{entries}"  # a copy: the appends below leave the cached log as built
    shutil.copytree(bulk_log(entries), data)
    os.sync()  # the copy's write-back (1.6 GB at 10M) must not run under the measurements
    proc, url = start_tlog(data)
    try:
        base = wrk(bare, PROOF_LUA.format(entries=1), seconds, 1)
        proof = wrk(url, PROOF_LUA.format(entries=entries), seconds, 1)
        rss, _ = rss_mib(proc.pid)
        auth = append_auth(data)
        add = wrk(url + "/add", ADD_LUA.format(auth=auth, run=run), seconds, 64)
        batch = add_batch(url, auth, run + "-batch", seconds)
        _, peak = rss_mib(proc.pid)
    finally:
        stop(proc)
        shutil.rmtree(data, ignore_errors=True)
    return {"p50": proof.p50, "p99": proof.p99, "errors": proof.errors, "rss": rss,
            "peak": peak, "add": add.rps, "add_p99": add.p99, "batch": batch.rps * BATCH,
            "bare_p50": base.p50, "bare_p99": base.p99}


def proof_rows(tmp: Path, seconds: float, sizes: list[int], run: str) -> list[Row]:
    with bare_server(tmp) as bare:
        figs = {n: proof_figures(n, tmp, seconds, run, bare) for n in sizes}
    rows = []
    for n, f in figs.items():
        big = n >= 10_000_000
        label = f"{round(n / 1e6)}M"
        rows.append(Row(f"GET /proof at {label} entries, HTTP p50", fmt(f["p50"], " ms"),
                        f"bare GET {fmt(f['bare_p50'], ' ms')}",
                        f"{f['p50'] / f['bare_p50']:.2f}x",
                        "<= 0.5 ms (at 10M)", f["p50"] <= 0.5 and f["errors"] == 0))
        rows.append(Row(f"GET /proof at {label}, p99 from a cold start", fmt(f["p99"], " ms"),
                        f"bare GET {fmt(f['bare_p99'], ' ms')}", "", "<= 5 ms", f["p99"] <= 5))
        rows.append(Row(f"tlog RSS at {label} (after proofs; peak after appends)",
                        f"{f['rss']:.0f} MiB", f"peak {f['peak']:.0f} MiB", "",
                        "<= 200 MiB (at 10M)", f["peak"] <= 200 if big else None))
        rows.append(Row(f"POST /add at {label}, 64 clients (req/s)", fmt(f["add"]), "", "",
                        "", None))
        rows.append(Row(f"POST /add-batch at {label} ({BATCH}/req, 16 clients, compact): "
                        "entries/s",
                        fmt(f["batch"]), "", "", ">= 50,000/s", f["batch"] >= 50_000))
    if len(figs) > 1:
        small, large = figs[min(figs)], figs[max(figs)]
        for key, name, unit in (("add", "POST /add", " req/s"),
                                ("batch", "POST /add-batch", " entries/s")):
            r = large[key] / small[key]
            rows.append(Row(f"growth: {name}, 10M vs 1M", fmt(large[key], unit),
                            fmt(small[key], unit), f"{r:.2f}x", "within 20 %", r >= 0.8))
        # each p50 over the bare GET measured right before it: the machine's drift between
        # the two logs' turns (minutes apart) moved the raw ratio by more than 20 %
        small_over, large_over = (f["p50"] / f["bare_p50"] for f in (small, large))
        r = large_over / small_over
        rows.append(Row("growth: GET /proof p50 (over a bare GET just before), 10M vs 1M",
                        f"{fmt(large['p50'], ' ms')} ({large_over:.2f}x)",
                        f"{fmt(small['p50'], ' ms')} ({small_over:.2f}x)",
                        f"{r:.2f}x", "within 20 %", r <= 1.2))
    return rows


# -- audit --------------------------------------------------------------------

def audit_rows(tmp: Path, entries: int) -> list[Row]:
    """bench/audit.py: its generated log, its static server, its hashlib baseline.

    The auditor runs as users run it: on two CPUs it checks half the leaf tiles in a
    second process, so its entries/s are wall time on up to two cores against the
    one-core hashlib loop; the CPU row sums both processes (without the server)."""
    data = audit.entries(entries)
    d = tmp / "audit-log"
    d.mkdir()
    signer = audit.generate(d, data)
    base = max(audit.baseline(data) for _ in range(2))
    del data
    (d / "static_app.py").write_text(audit.STATIC_APP)
    port = tlog_append.free_port()
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "static_app:app", "--port",
                               str(port), "--log-level", "warning", "--no-access-log"],
                              cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = {}
    try:
        wait_http(f"http://127.0.0.1:{port}/checkpoint", server)
        for label, src in (("HTTP", f"http://127.0.0.1:{port}"), ("directory", str(d))):
            t = time.perf_counter()
            # user + system CPU of the auditor and its second process (which it reaps)
            r = subprocess.run(["/usr/bin/time", "-f", "%M %U %S", sys.executable, "-m",
                                "verifier", "audit", "--log", src, "--vkey", signer.vkey],
                               capture_output=True, text=True)
            dt = time.perf_counter() - t
            if r.returncode != 0:
                raise RuntimeError(f"audit failed: {r.stderr.strip()[-300:]}")
            rss, user, system = r.stderr.strip().splitlines()[-1].split()
            out[label] = (entries / dt, int(rss) / 1024,
                          (float(user) + float(system)) / entries * 1e6)
    finally:
        stop(server)
    (h, h_rss, h_cpu), (dr, d_rss, d_cpu) = out["HTTP"], out["directory"]
    return [
        Row(f"audit over HTTP ({entries:,} entries): entries/s", fmt(h), f"hashlib {fmt(base)}",
            f"{h / base:.2f}x", ">= 300,000/s, memory bounded", h >= 300_000),
        Row("audit from a directory: entries/s", fmt(dr), f"hashlib {fmt(base)}",
            f"{dr / base:.2f}x", ">= 0.6x hashlib", dr / base >= 0.6),
        Row("audit peak RSS (HTTP / directory)", f"{h_rss:.0f} / {d_rss:.0f} MiB", "", "",
            "bounded", None),
        Row("audit CPU per entry, both processes (HTTP client / directory)",
            f"{h_cpu:.2f} / {d_cpu:.2f} us", f"hashlib {1e6 / base:.2f} us", "",
            "(load-independent)", None),
    ]


def profile_add_load(tmp: Path, seconds: float, run: str) -> None:
    """py-spy top of the tlog under POST /add load at 64 clients."""
    spy = ROOT / ".bench-venv" / "bin" / "py-spy"
    if not spy.exists():
        return
    data = tmp / "profile-log"
    proc, url = start_tlog(data)
    try:
        auth = append_auth(data)
        load = threading.Thread(target=wrk, args=(url + "/add", ADD_LUA.format(
            auth=auth, run=run), seconds + 2, 64))
        load.start()
        time.sleep(1)
        print_profile(str(spy), proc.pid, seconds, tmp / "add.prof",
                      "tlog under POST /add at 64 clients")
        load.join()
    finally:
        stop(proc)




def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="longer runs, and logs of 10M entries")
    ap.add_argument("--only", default="append,gateway,proofs,audit")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of each ratio row's pair (the median counts)")
    ap.add_argument("--profile", type=float, default=0.0,
                    help="seconds of py-spy sampling per process (0: none)")
    a = ap.parse_args(argv)
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if shutil.which("wrk") is None:
        print("bench: wrk not found (Debian package wrk)", file=sys.stderr)
        return 2
    parts = a.only.split(",")
    seconds = 10.0 if a.full else 5.0
    run = os.urandom(4).hex()  # entries unique to this run: appends never deduplicate
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pag-bench-") as d:
        tmp = Path(d)
        if "append" in parts:
            rows += append_rows(tmp, seconds, run, a.rounds)
            if a.profile:
                profile_add_load(tmp, a.profile, run)
        if "gateway" in parts:
            rows += gateway_rows(tmp, seconds, 500 if a.full else 200, a.profile, a.rounds)
            rows += inclusion_rows(tmp, 5.0, min(a.rounds, 2))  # informational: kept short
        if "proofs" in parts:
            sizes = [1 << 20, 10_000_000] if a.full else [1 << 20]
            rows += proof_rows(tmp, seconds, sizes, run)
        if "audit" in parts:
            rows += audit_rows(tmp, 1 << 20)
        if "replicas" in parts:
            rows += tlog_replicas.run(quick=not a.full)
    load = os.getloadavg()
    print(f"\nbench: {os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f}, "
          f"{'full' if a.full else 'quick'} settings, {time.monotonic() - started:.0f} s; "
          f"ratios are against baselines measured in this run")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
