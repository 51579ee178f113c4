"""Benchmark: disk used by the gateway's outbox and ledger per receipt, under load.

    .venv/bin/python bench/outbox_growth.py [--calls 5000] [--concurrency 16]

Runs, on this machine and in this run: `python -m tlog serve` (SQLite), a fake
OpenAI provider and the gateway in this process with its receipt shipper; sends
`--calls` chat calls, waits until the shipper recorded every receipt's proof,
then prints the size of each file in the gateway's data directory and the bytes
per receipt. With `--retention S` the gateway prunes shipped receipts older than
S seconds (the bench waits for one pruning round before measuring). Prints
figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_gateway_fakes import (  # noqa: E402
    API_KEY,
    FakeProvider,
    LogRef,
    run_gateway,
    write_config,
)
from tests.tlogutil import start_tlog, stop  # noqa: E402

BODY = {"model": "chat-model", "messages": [{"role": "user", "content": "hello"}]}


def sizes(data: Path) -> dict[str, int]:
    """Bytes of every file in the data directory."""
    return {p.name: p.stat().st_size for p in sorted(data.iterdir()) if p.is_file()}


async def load(url: str, calls: int, concurrency: int) -> int:
    """Send `calls` chat calls with `concurrency` workers; the number answered 200."""
    ok = 0
    pending = iter(range(calls))

    async def worker(c: httpx.AsyncClient) -> None:
        nonlocal ok
        for _ in pending:
            r = await c.post(url + "/v1/chat/completions", json=BODY,
                             headers={"Authorization": f"Bearer {API_KEY}"})
            ok += r.status_code == 200

    async with httpx.AsyncClient(timeout=30) as c:
        await asyncio.gather(*(worker(c) for _ in range(concurrency)))
    return ok


async def run(tmp: Path, calls: int, concurrency: int, retention: int | None) -> None:
    log_dir = tmp / "tlog"
    proc, log_url = start_tlog(log_dir)
    prov = FakeProvider()
    await prov.start()
    try:
        ref = LogRef(log_url, (log_dir / "append.token").read_text().strip(),
                     (log_dir / "log.vkey").read_text().strip())
        extra = f"receipt_retention_seconds = {retention}\n" if retention is not None else ""
        cfg = write_config(tmp, prov.base_url, log=ref, extra_gateway=extra)
        async with run_gateway(cfg) as gw:
            start = time.perf_counter()
            ok = await load(gw.url, calls, concurrency)
            took = time.perf_counter() - start
            outbox = gw.app.svc.outbox
            while outbox.counts()[1]:
                await asyncio.sleep(0.2)
            shipped = time.perf_counter() - start
            if retention is not None:
                await asyncio.sleep(retention + 12)  # one pruning round past the retention
            data = tmp / "data"
            during = sizes(data)
        after = sizes(data)  # closed: the write-ahead logs are folded in
    finally:
        await prov.stop()
        stop(proc)
    total = sum(during.values())
    print(json.dumps({"calls": calls, "answered_200": ok, "load_seconds": round(took, 1),
                      "all_shipped_seconds": round(shipped, 1), "files_running": during,
                      "files_after_close": after, "bytes_running": total,
                      "bytes_per_receipt_running": round(total / max(ok, 1))}, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--retention", type=int, default=None,
                    help="[gateway] receipt_retention_seconds for this run")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp), a.calls, a.concurrency, a.retention))


if __name__ == "__main__":
    main()
