"""Gateway throughput: two replicas sharing Redis (`[shared]`) against one node with its state
in-process and SQLite only, in the same run.

    .venv/bin/python bench/gateway_replicas.py [--duration 5] [--rounds 2] [--concurrency 32]

Starts, on this machine: the dstack simulator, `tlog serve`, the demo provider, one
`gateway serve` without `[shared]` (the single node) and two with `[shared] redis_url` on
the Redis at 127.0.0.1:6379 (a key prefix of their own, deleted at the end). The API key
has a rate limit and a token budget (both far from reached), so every call runs the admit,
reserve and settle steps and records its receipt in the shared index. `wrk` (one thread,
keep-alive, closed loop) drives the single node at `--concurrency` connections, then both
replicas at once with half as many each (the client alternates by splitting), taking turns
per round; and, to tell the cost of the shared state from that of two processes on the same
cores, one of the two replicas alone. Prints req/s, p50/p99 and errors of each, and the
ratio. Asserts nothing.

All the parts share this machine's cores, so the figure measures what sharing state costs,
not what a second machine would add.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_overhead import Result, Target, wrk  # noqa: E402

from tests import replica_stack as rs  # noqa: E402

REDIS = "redis://127.0.0.1:6379/0"


def warm(url: str, key: str) -> None:
    """One call, so the route's lease is verified before the clock runs."""
    r = httpx.post(url + "/v1/chat/completions", timeout=60,
                   headers={"Authorization": f"Bearer {key}"},
                   json={"model": rs.MODEL, "messages": [{"role": "user", "content": "hi"}]})
    r.raise_for_status()


def together(targets: list[Target], concurrency: int, duration: int, work: Path
             ) -> list[Result]:
    """wrk on every target at once; their results in order."""
    out: list[Result | None] = [None] * len(targets)

    def run(i: int) -> None:
        out[i] = wrk(targets[i], concurrency, duration, work)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(targets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in out), "a wrk run failed"
    return [r for r in out if r is not None]


def line(name: str, rps: float, p50: float, p99: float, errors: int, cpu: float) -> str:
    return f"  {name:<26} {rps:7.1f} req/s  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  " \
           f"errors {errors}  gateway CPU {cpu:.2f} ms/req"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=32)
    a = ap.parse_args()
    if shutil.which("wrk") is None:
        print("bench: wrk is not installed (Debian package wrk)", file=sys.stderr)
        return 1
    import redis

    client = redis.Redis.from_url(REDIS, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        print("bench: no Redis at 127.0.0.1:6379", file=sys.stderr)
        return 1
    prefix = f"pag:bench:{secrets.token_hex(6)}:"
    key = rs.Key("bench", "sk-bench-" + secrets.token_hex(12), 10**12, 10**15)
    base = Path(tempfile.mkdtemp(prefix="pagbench-", dir="/tmp"))
    single_runs: list[Result] = []
    pair_runs: list[list[Result]] = []
    alone_runs: list[Result] = []
    try:
        with rs.stack(base) as s:
            single = s.add_replica("single", [key])
            shared = f'[shared]\nredis_url = "{REDIS}"\nprefix = "{prefix}"\n'
            pair = [s.add_replica(n, [key], shared) for n in ("a", "b")]
            for r in (single, *pair):
                warm(r.url, key.key)

            def target(r: rs.Replica, name: str) -> Target:
                return Target(name, r.url + "/v1", rs.MODEL, key.key,
                              [r.proc.pid])
            for n in range(a.rounds):
                print(f"round {n + 1}/{a.rounds}", file=sys.stderr, flush=True)
                single_runs.append(wrk(target(single, "single"), a.concurrency, a.duration,
                                       base))
                alone_runs.append(wrk(target(pair[0], "alone"), a.concurrency, a.duration,
                                      base))
                pair_runs.append(together([target(r, f"replica-{i}")
                                           for i, r in enumerate(pair)],
                                          max(1, a.concurrency // 2), a.duration, base))
    finally:
        stale = list(client.scan_iter(match=prefix + "*"))
        if stale:
            client.delete(*stale)
        client.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(base)

    print(f"gateway throughput, {a.concurrency} connections, {a.duration} s x {a.rounds} "
          "rounds (a key with a rate limit and a budget)")
    for i, (one, alone, two) in enumerate(zip(single_runs, alone_runs, pair_runs,
                                              strict=True)):
        rps2 = sum(r.rps for r in two)
        print(f"round {i + 1}")
        print(line("single node, in-process", one.rps, one.p50_ms, one.p99_ms, one.errors,
                   one.cpu_ms))
        print(line("1 replica, shared Redis", alone.rps, alone.p50_ms, alone.p99_ms,
                   alone.errors, alone.cpu_ms))
        print(line("2 replicas, shared Redis", rps2, max(r.p50_ms for r in two),
                   max(r.p99_ms for r in two), sum(r.errors for r in two),
                   sum(r.cpu_ms * r.requests for r in two) / max(1, sum(r.requests
                                                                     for r in two))))
    base_rps = max(r.rps for r in single_runs)
    pair_rps = max(sum(r.rps for r in two) for two in pair_runs)
    print(f"figure: 2 replicas sharing Redis {pair_rps:.1f} req/s (best round)")
    print(f"baseline: single node, SQLite only {base_rps:.1f} req/s (best round)")
    print(f"ratio: {pair_rps / base_rps:.2f}" if base_rps else "ratio: n/a")
    alone_rps = max(r.rps for r in alone_runs)
    print(f"(one replica with shared Redis alone: {alone_rps:.1f} req/s, "
          f"{alone_rps / base_rps:.2f} of the baseline)" if base_rps else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
