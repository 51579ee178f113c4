"""The gateway's CPU per call spent on the shared Redis, without HTTP: `pipeline.model_call`
with a fake provider and a key with a rate limit and a budget, its limits and receipt
index in-process, then in Redis (127.0.0.1:6379, a key prefix of its own, deleted after),
in turns.

    .venv/bin/python bench/gateway_redis_cpu.py [--calls 2000] [--rounds 2]

Prints CPU (`time.process_time`) and wall time per call of each. Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.api import pipeline, shared  # noqa: E402
from gateway.api.ratelimit import RedisLimits  # noqa: E402
from gateway.api.receipt_index import RedisReceiptIndex  # noqa: E402
from tests.test_pipeline_steps import (  # noqa: E402
    ANSWER,
    AUTH,
    CHAT,
    Messages,
    body,
    reply,
    scope,
    services,
)
from tests.test_redis_round_trips import LIMITED, LIVE, MAC_KEY  # noqa: E402


async def per_call(calls: int, redis: bool) -> tuple[float, float]:
    """(CPU ms, wall ms) per call, after 50 warm-up calls."""
    client = shared.connect(LIVE)
    prefix = f"pag:bench:{secrets.token_hex(6)}:"
    svc = services(key=LIMITED)
    if redis:
        svc.limiter = RedisLimits(client, prefix, 900)
        svc.receipt_index = RedisReceiptIndex(client, prefix, MAC_KEY, 60)
    svc.upstream.answers["r1"] = reply(json.dumps(ANSWER).encode())  # type: ignore[union-attr]
    raw = json.dumps(CHAT).encode()

    async def send(m: dict[str, Any]) -> None:
        pass

    async def one() -> None:
        svc.outbox.puts.clear()  # type: ignore[attr-defined]
        await pipeline.model_call(svc, scope((b"authorization", AUTH)), Messages(body(raw)),
                                  send, "chat")
    try:
        for _ in range(50):
            await one()
        c0, w0 = time.process_time(), time.perf_counter()
        for _ in range(calls):
            await one()
        c1, w1 = time.process_time(), time.perf_counter()
    finally:
        stale = [k async for k in client.scan_iter(match=prefix + "*")]
        if stale:
            await client.delete(*stale)
        await client.aclose()
    return (c1 - c0) / calls * 1e3, (w1 - w0) / calls * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    for _ in range(a.rounds):
        for redis in (False, True):
            cpu, wall = asyncio.run(per_call(a.calls, redis))
            print(f"{'redis     ' if redis else 'in-process'}  CPU {cpu:.3f} ms/call  "
                  f"wall {wall:.3f} ms/call")


if __name__ == "__main__":
    main()
