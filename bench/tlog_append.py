"""Benchmark: sustained POST /add throughput and latency vs a bare uvicorn endpoint.

    .venv/bin/python bench/tlog_append.py [--seconds 10] [--connections 64]

Runs, on this machine and in this run: (1) a bare uvicorn ASGI app that
answers every POST with 200 (the Python HTTP ceiling), (2) `python -m tlog
serve` with SQLite, both loaded by `wrk` (Debian package) with the same
concurrency; then (3) inclusion-proof latency on a log of 1M+ entries built
directly through the storage steps. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tlogutil import free_port, start_tlog, stop  # noqa: E402

BARE_APP = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": b'{"index": 0}'})
"""


def wrk(url: str, seconds: int, conns: int, token: str | None) -> dict[str, float]:
    lua = textwrap.dedent(f"""
        wrk.method = "POST"
        wrk.headers["Content-Type"] = "application/octet-stream"
        {'wrk.headers["Authorization"] = "Bearer ' + token + '"' if token else ''}
        counter = 0
        request = function()
          counter = counter + 1
          return wrk.format(nil, nil, nil, '{{"bench": ' .. counter .. ', "pad": "0123456789abcdef0123456789abcdef"}}')
        end
    """)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua)
    out = subprocess.run(["wrk", "-t2", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", f.name,
                          url], capture_output=True, text=True, check=True).stdout
    os.unlink(f.name)

    def ms(label: str) -> float:
        m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", out)
        if not m:
            return float("nan")
        v, unit = float(m[1]), m[2]
        return v / 1000 if unit == "us" else v * 1000 if unit == "s" else v

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: .*", out)
    return {"rps": rps, "p50": ms("50%"), "p99": ms("99%"),
            "non2xx": float(non2xx[1]) if non2xx else 0.0, "socket_errors": errors[0] if errors else ""}


def bare(seconds: int, conns: int, tmp: Path) -> dict[str, float]:
    (tmp / "bareapp.py").write_text(BARE_APP)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "bareapp:app", "--port", str(port),
                             "--log-level", "warning", "--no-access-log"], cwd=tmp,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.post(f"http://127.0.0.1:{port}/", content=b"x")
                break
            except httpx.HTTPError:
                time.sleep(0.05)
        return wrk(f"http://127.0.0.1:{port}/add", seconds, conns, None)
    finally:
        stop(proc)


def tlog_add(seconds: int, conns: int, tmp: Path) -> dict[str, float]:
    data = tmp / "log"
    proc, url = start_tlog(data)
    try:
        token = (data / "append.token").read_text().strip()
        res = wrk(f"{url}/add", seconds, conns, token)
        res["log_size"] = float(httpx.get(f"{url}/").json()["size"])
        return res
    finally:
        stop(proc)


def proofs(entries: int, tmp: Path, samples: int = 2000) -> dict[str, float]:
    """Build a log of `entries` through the storage steps, then time proofs."""
    from tlog import keys
    from tlog.sequencer import Log
    from tlog.sqlite_store import SQLiteStore

    data = tmp / "big"
    signer = keys.load_signer(data)
    store = SQLiteStore(data / "log.db")
    log = Log(store, signer)
    t0 = time.perf_counter()
    batch = 8192
    for start_i in range(0, entries, batch):
        n = min(batch, entries - start_i)
        chunk = [b'{"request_hash": "%064x"}' % (start_i + i) for i in range(n)]
        log._commit(chunk)  # the same two steps an append batch takes
    build = time.perf_counter() - t0
    log.served = log.head
    store.close()

    # HTTP: GET /proof/{request_hash} on the served log, sequential requests
    proc, url = start_tlog(data)
    try:
        rng = random.Random(1)
        lat = []
        with httpx.Client() as c:
            for _ in range(samples):
                i = rng.randrange(entries)
                t = time.perf_counter()
                r = c.get(f"{url}/proof/{i:064x}")
                lat.append((time.perf_counter() - t) * 1000)
                assert r.status_code == 200
        http_p50 = statistics.median(lat)
    finally:
        stop(proc)
    # in-process: proof generation alone, cold node cache per sample set
    store = SQLiteStore(data / "log.db")
    log = Log(store, signer)
    rng = random.Random(2)
    lat = []
    for _ in range(samples):
        i = rng.randrange(entries)
        t = time.perf_counter()
        log.proof_for(f"{i:064x}")
        lat.append((time.perf_counter() - t) * 1000)
    store.close()
    return {"entries": entries, "build_s": build, "http_p50_ms": http_p50,
            "inproc_p50_ms": statistics.median(lat), "inproc_p99_ms": sorted(lat)[int(0.99 * len(lat))]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--proof-entries", type=int, default=1_048_576)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("bench needs wrk: apt-get install -y wrk")
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        b = bare(args.seconds, args.connections, tmp)
        t = tlog_add(args.seconds, args.connections, tmp)
        print(f"bare uvicorn POST : {b['rps']:9.0f} req/s  p50 {b['p50']:.2f} ms  p99 {b['p99']:.2f} ms")
        print(f"tlog POST /add    : {t['rps']:9.0f} req/s  p50 {t['p50']:.2f} ms  p99 {t['p99']:.2f} ms"
              f"  (non-2xx {t['non2xx']:.0f}, log size after {t['log_size']:.0f}) {t['socket_errors']}")
        print(f"ratio tlog/bare   : {t['rps'] / b['rps']:.2f}x   (target >= 0.5x, >= 10,000/s, p99 <= 250 ms)")
        p = proofs(args.proof_entries, tmp)
        print(f"proofs @ {p['entries']} entries (built in {p['build_s']:.1f} s): "
              f"HTTP GET /proof p50 {p['http_p50_ms']:.3f} ms; "
              f"generation in-process p50 {p['inproc_p50_ms']:.3f} ms p99 {p['inproc_p99_ms']:.3f} ms"
              f"   (target p50 <= 0.5 ms)")


if __name__ == "__main__":
    main()
