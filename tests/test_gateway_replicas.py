"""Two real `gateway serve` replicas sharing one Redis (`[shared]`), one client alternating
between them: budgets, rate limits, E2EE nonces and receipt lookups hold across replicas;
a third replica whose Redis is unreachable refuses what it cannot check (503).

Every test uses the keys of its own API key (one key per promise), all under one prefix
unique to this run, deleted at the end.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api.apikeys import hash_key
from tests import replica_stack as rs
from tlog import proof
from verifier import aci, receipt

REDIS = "redis://127.0.0.1:6379/0"
BUDGET = 1000
RPM = 6
KEYS = {name: rs.Key(name, f"sk-{name}-{secrets.token_hex(8)}", rpm, budget)
        for name, rpm, budget in (("budget", 0, BUDGET), ("rate", RPM, 0), ("owner", 0, 0),
                                  ("other", 0, 0), ("sealed", 0, 0),
                                  ("revoked", 0, 0))}
PROMPT = " ".join(["word"] * 40)


def redis_client() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("Redis is not running at 127.0.0.1:6379 (the replica tests need a real one)")
    return client


class Replicas:
    """Replicas a and b on the live Redis, `down` on a port where nothing listens."""

    def __init__(self, s: rs.Stack, prefix: str) -> None:
        shared = f'[shared]\nredis_url = "{REDIS}"\nprefix = "{prefix}"\n'
        self.prefix = prefix
        self.a = s.add_replica("a", KEYS.values(), shared)
        self.b = s.add_replica("b", KEYS.values(), shared)
        self.down = s.add_replica("down", KEYS.values(),
                                  '[shared]\nredis_url = "redis://127.0.0.1:1/0"\n')


@pytest.fixture(scope="module")
def replicas() -> Iterator[Replicas]:
    import shutil
    import tempfile

    client = redis_client()
    prefix = f"pag:test:{secrets.token_hex(6)}:"
    base = Path(tempfile.mkdtemp(prefix="pagrep-", dir="/tmp"))
    try:
        with rs.stack(base) as s:
            yield Replicas(s, prefix)
    finally:
        stale = list(client.scan_iter(match=prefix + "*"))
        if stale:
            client.delete(*stale)
        client.close()
        shutil.rmtree(base, ignore_errors=True)


def auth(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name].key}"}


def chat(max_tokens: int = 10) -> dict[str, Any]:
    return {"model": rs.MODEL, "messages": [{"role": "user", "content": PROMPT}],
            "max_tokens": max_tokens}


async def post(c: httpx.AsyncClient, url: str, key: str, body: dict[str, Any]
               ) -> httpx.Response:
    return await c.post(url + "/v1/chat/completions", headers=auth(key), json=body)


def code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_a_shared_budget_is_not_overspent_by_parallel_calls_across_both_replicas(
        replicas: Replicas) -> None:
    urls = [replicas.a.url, replicas.b.url]

    async def go() -> tuple[int, dict[str, int]]:
        spent, refused = 0, {u: 0 for u in urls}
        async with httpx.AsyncClient(timeout=30) as c:
            for _ in range(40):
                targets = [urls[i % 2] for i in range(8)]  # the client alternates
                got = await asyncio.gather(*(post(c, u, "budget", chat()) for u in targets))
                for u, r in zip(targets, got, strict=True):
                    if r.status_code == 200:
                        spent += r.json()["usage"]["total_tokens"]
                    else:
                        assert (r.status_code, code(r)) == (429, "budget_exceeded"), r.text
                        refused[u] += 1
                if all(r.status_code == 429 for r in got):
                    return spent, refused
        raise AssertionError("the budget never ran out")

    spent, refused = asyncio.run(go())
    assert spent <= BUDGET  # apart, each replica would have let about 2x through
    assert spent > BUDGET // 2
    assert all(refused.values()), refused  # both replicas refused from the one budget
    client = redis_client()
    stored = client.hgetall(f"{replicas.prefix}budget:{hash_key(KEYS['budget'].key)}")
    assert stored == {b"used": str(spent).encode()}  # every reservation settled, exactly
    client.close()


def test_a_rate_limit_is_shared_by_both_replicas(replicas: Replicas) -> None:
    async def go() -> list[tuple[str, int]]:
        async with httpx.AsyncClient(timeout=30) as c:
            out = []
            for i in range(2 * RPM):
                url = (replicas.a.url, replicas.b.url)[i % 2]
                r = await post(c, url, "rate", chat(2))
                if r.status_code != 200:
                    assert code(r) == "rate_limit_exceeded", r.text
                out.append((url, r.status_code))
            return out

    got = asyncio.run(go())
    served = [s for _, s in got].count(200)
    assert RPM <= served <= RPM + 1  # one bucket of RPM (plus what refilled meanwhile)
    assert {u for u, s in got if s == 429} == {replicas.a.url, replicas.b.url}


def attested_e2ee_key(url: str) -> bytes:
    doc = httpx.get(url + "/.well-known/attestation", timeout=30).json()
    return base64.b64decode(doc["keyset"]["e2ee_public_key"])


def sealed(pub: bytes) -> tuple[bytes, dict[str, str]]:
    body, headers, _ = aci.seal_request(chat(2), "chat", pub, now=time.time())
    return json.dumps(body).encode(), {**auth("sealed"), **headers,
                                       "Content-Type": "application/json"}


def test_a_sealed_request_replayed_on_the_other_replica_is_refused(replicas: Replicas) -> None:
    pub = attested_e2ee_key(replicas.a.url)
    assert attested_e2ee_key(replicas.b.url) == pub  # one app, one KMS: one E2EE key
    body, headers = sealed(pub)
    first = httpx.post(replicas.a.url + "/v1/chat/completions", content=body, headers=headers,
                       timeout=30)
    assert first.status_code == 200, first.text
    again = httpx.post(replicas.b.url + "/v1/chat/completions", content=body, headers=headers,
                       timeout=30)
    assert (again.status_code, code(again)) == (400, "e2ee_replay_detected")
    rc = owned_receipt(replicas.b.url, again.headers["x-receipt-id"], "sealed")
    assert rc["provider_request_hash"] is None  # nothing went upstream


def owned_receipt(url: str, receipt_id: str, key: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/receipts/{receipt_id}", headers=auth(key), timeout=10)
    assert r.status_code == 200, r.text
    return r.json()["receipt"]


def test_a_receipt_made_on_one_replica_is_served_by_the_other_to_its_owner_only(
        replicas: Replicas) -> None:
    a, b = replicas.a.url, replicas.b.url
    made = httpx.post(a + "/v1/chat/completions", headers=auth("owner"), json=chat(2),
                      timeout=30)
    assert made.status_code == 200, made.text
    rid, salt = made.headers["x-receipt-id"], bytes.fromhex(made.headers["x-receipt-salt"])
    rc = owned_receipt(b, rid, "owner")
    receipt.verify(rc)
    receipt.check_digest(rc, "request_hash", salt, made.request.content)
    assert rc["id"] == rid
    other = httpx.get(f"{b}/v1/receipts/{rid}", headers=auth("other"), timeout=10)
    assert (other.status_code, code(other)) == (404, "receipt_not_found")
    assert "request_hash" not in other.text
    assert httpx.get(f"{b}/v1/receipts/{rid}", timeout=10).status_code == 401
    by_hash = httpx.get(f"{b}/v1/receipts/by-request-hash/{rc['request_hash']}", timeout=10)
    assert by_hash.status_code == 200 and by_hash.json()["receipt"]["id"] == rid

    deadline = time.monotonic() + 30  # once A's shipper logged it, B serves the proof too
    while True:
        doc = httpx.get(f"{b}/v1/receipts/{rid}", headers=auth("owner"), timeout=10).json()
        if doc["proof"] is not None:
            break
        assert time.monotonic() < deadline, "B never found the log's proof"
        time.sleep(0.2)
    p = proof.parse(doc["proof"].encode())
    assert p.extra == receipt.entry(rc) and p.index == doc["index"]

    # Whoever can write to Redis cannot hand the receipt to another key: the record is MACed.
    client = redis_client()
    name = f"{replicas.prefix}receipt:{rid}"
    value = client.get(name)
    forged = value.replace(hash_key(KEYS["owner"].key).encode(),
                           hash_key(KEYS["other"].key).encode(), 1)
    assert forged != value
    client.set(name, forged)
    other = httpx.get(f"{b}/v1/receipts/{rid}", headers=auth("other"), timeout=10)
    assert (other.status_code, code(other)) == (404, "receipt_not_found")
    client.set(name, value)
    client.close()


def test_the_replicas_share_one_verified_lease(replicas: Replicas) -> None:
    for url in (replicas.a.url, replicas.b.url):
        r = httpx.post(url + "/v1/chat/completions", headers=auth("owner"), json=chat(2),
                       timeout=30)
        assert r.status_code == 200
    client = redis_client()
    leases = list(client.scan_iter(match=f"{replicas.prefix}lease:replica-route:*"))
    client.close()
    assert len(leases) == 1  # under [shared] prefix + "lease:", one for the route
    on_b = owned_receipt(replicas.b.url, r.headers["x-receipt-id"], "owner")  # the last: B
    made = httpx.post(replicas.a.url + "/v1/chat/completions", headers=auth("owner"),
                      json=chat(2), timeout=30)
    on_a = owned_receipt(replicas.a.url, made.headers["x-receipt-id"], "owner")
    assert on_a["upstream"]["verified"] is True
    assert on_a["upstream"]["lease_id"] == on_b["upstream"]["lease_id"]  # one lease, both


def test_a_replica_that_cannot_reach_redis_refuses_what_it_cannot_check(
        replicas: Replicas) -> None:
    down = replicas.down.url
    for key, body in (("budget", chat()), ("rate", chat(2))):
        r = httpx.post(down + "/v1/chat/completions", headers=auth(key), json=body, timeout=30)
        assert (r.status_code, code(r)) == (503, "shared_state_unavailable"), r.text
        rc = owned_receipt(down, r.headers["x-receipt-id"], key)
        assert rc["refusal"]["code"] == "shared_state_unavailable"
        assert rc["provider_request_hash"] is None  # nothing went upstream
    body, headers = sealed(attested_e2ee_key(down))
    r = httpx.post(down + "/v1/chat/completions", content=body, headers=headers, timeout=30)
    assert (r.status_code, code(r)) == (503, "shared_state_unavailable")
    # A key without limits too: whether it was revoked cannot be checked.
    r = httpx.post(down + "/v1/chat/completions", headers=auth("owner"), json=chat(2),
                   timeout=30)
    assert (r.status_code, code(r)) == (503, "shared_state_unavailable")
    ready = httpx.get(down + "/readyz", timeout=10)
    assert ready.status_code == 503
    assert ready.json()["checks"]["shared_redis"]["ok"] is False
    assert httpx.get(replicas.a.url + "/readyz", timeout=10).json()["checks"][
        "shared_redis"]["ok"] is True


def revoke_key(replicas: Replicas, name: str, *flags: str) -> str:
    import subprocess
    import sys

    cfg = replicas.a.data.parent / "a.toml"
    r = subprocess.run([sys.executable, "-m", "gateway", "revoke-key", "--config", str(cfg),
                        "--sha256", hash_key(KEYS[name].key), *flags], cwd=rs.ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_a_key_revoked_once_is_refused_by_every_replica(replicas: Replicas) -> None:
    urls = (replicas.a.url, replicas.b.url)

    def statuses() -> list[int]:
        return [httpx.post(u + "/v1/chat/completions", headers=auth("revoked"), json=chat(2),
                           timeout=30).status_code for u in urls]
    assert statuses() == [200, 200]
    assert "revoked" in revoke_key(replicas, "revoked")
    until(lambda: statuses() == [401, 401], "both replicas to refuse the revoked key")
    assert "no longer revoked" in revoke_key(replicas, "revoked", "--undo")
    until(lambda: statuses() == [200, 200], "both replicas to accept the key again")


def test_with_one_replica_killed_the_other_serves_and_answers_for_its_receipts(
        replicas: Replicas) -> None:
    made = httpx.post(replicas.a.url + "/v1/chat/completions", headers=auth("owner"),
                      json=chat(2), timeout=30)
    assert made.status_code == 200
    replicas.a.proc.kill()  # kill -9: last test of the module, the fixture's A is gone
    replicas.a.proc.wait()
    rc = owned_receipt(replicas.b.url, made.headers["x-receipt-id"], "owner")
    assert rc["id"] == made.headers["x-receipt-id"]
    r = httpx.post(replicas.b.url + "/v1/chat/completions", headers=auth("owner"),
                   json=chat(2), timeout=30)
    assert r.status_code == 200
    replicas.b.proc.terminate()  # and B stops cleanly, closing its Redis connections
    assert replicas.b.proc.wait(15) == 0
