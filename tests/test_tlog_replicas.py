"""Log replicas on one PostgreSQL database: one sequencer at a time, fenced (issue 15).

Against the real server on 127.0.0.1:5432 (database `test`, a fresh schema
per test); skipped when it is not reachable.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import threading
import time
from collections import defaultdict

import httpx
import pytest

from tests.test_tlog_postgres import pg_url  # noqa: F401 - the fresh-schema fixture
from tests.tlogutil import start_tlog, stop
from tlog import checkpoint, keys, merkle, note, tiles
from tlog.election import PostgresLease
from tlog.postgres_store import PostgresStore
from tlog.sequencer import REPLICA, SEQUENCER, Log, NotSequencer
from tlog.storage import Fenced

psycopg = pytest.importorskip("psycopg")


def expire(url: str) -> None:
    """Make the current lease look expired, as if its holder paused for longer than its ttl."""
    with psycopg.connect(url, autocommit=True) as db:
        db.execute("UPDATE tlog_sequencer SET expires = '-infinity'")


def test_stale_token_commits_nothing(pg_url):  # noqa: F811
    a_store, b_store = PostgresStore(pg_url), PostgresStore(pg_url)
    a, b = PostgresLease(pg_url, "http://a", 60), PostgresLease(pg_url, "http://b", 60)
    try:
        ta = a.campaign()
        assert ta.ours and not b.campaign().ours  # a live lease is not taken
        a_store.fence(ta.token)
        a_store.persist(0, [b"by a"], [merkle.leaf_hash(b"by a")], {(0, 0): merkle.leaf_hash(b"by a")}, [])
        expire(pg_url)  # a "pauses" past its ttl
        tb = b.campaign()
        assert tb.ours and tb.token == ta.token + 1 and tb.sequencer == "http://b"
        b_store.fence(tb.token)
        with pytest.raises(Fenced):  # a wakes up and tries to go on
            a_store.persist(1, [b"late a"], [merkle.leaf_hash(b"late a")], {}, [])
        with pytest.raises(Fenced):
            a_store.update_note(0, b"x")
        assert b_store.size() == 1 and b_store.read_entries(0, 2) == [b"by a"]
        assert a.campaign() == type(tb)(tb.token, "http://b", False)  # a sees b holds it
    finally:
        for x in (a, b, a_store, b_store):
            x.close()


def test_dead_holder_is_replaced_before_its_lease_expires(pg_url):  # noqa: F811
    PostgresStore(pg_url).close()  # creates the tables
    a, b = PostgresLease(pg_url, "http://a", 600), PostgresLease(pg_url, "http://b", 600)
    try:
        assert a.campaign().ours and not b.campaign().ours
        a.close()  # its connection goes, as when the process is killed
        deadline = time.monotonic() + 10
        while not b.campaign().ours:
            assert time.monotonic() < deadline, "the dead holder kept the lease"
            time.sleep(0.05)
    finally:
        b.close()


def test_log_steps_down_when_fenced_and_acknowledges_nothing(tmp_path, pg_url):  # noqa: F811
    signer = keys.load_signer(tmp_path)
    a_store, b_store = PostgresStore(pg_url), PostgresStore(pg_url)
    a_lease, b_lease = PostgresLease(pg_url, "http://a", 60), PostgresLease(pg_url, "http://b", 60)

    async def go() -> None:
        a, b = Log(a_store, signer, lease=a_lease), Log(b_store, signer, lease=b_lease)
        assert a.role == b.role == REPLICA
        with pytest.raises(NotSequencer):
            await a.add(b"too early")
        await a.lead(a_lease.campaign().token)
        first = await a.add(b"one")
        expire(pg_url)
        await b.lead(b_lease.campaign().token)
        with pytest.raises(NotSequencer):
            await a.add(b"two")  # fenced: a steps down, the entry is not acknowledged
        assert a.role == REPLICA and b.role == SEQUENCER
        second = await b.add(b"three")
        assert (first.index, second.index) == (0, 1)
        await a.refresh()
        assert a.served.note == b.served.note and a.served.size == 2
        for log in (a, b):
            await log.close()

    try:
        asyncio.run(go())
        assert b_store.read_entries(0, 5) == [b"one", b"three"]
    finally:
        a_store.close()
        b_store.close()


def test_replica_refuses_appends_and_names_the_sequencer(tmp_path, pg_url):  # noqa: F811
    data = tmp_path / "log"
    procs = []
    try:
        for _ in range(2):
            procs.append(start_tlog(data, "--database", pg_url, "--lease-ttl", "2"))
        roles = wait_for_one_sequencer([u for _, u in procs])
        seq = next(u for u, r in roles.items() if r["role"] == SEQUENCER)
        rep = next(u for u, r in roles.items() if r["role"] == REPLICA)
        token = (data / "append.token").read_text().strip()
        r = httpx.post(f"{rep}/add", content=b"x", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["code"] == "not_sequencer" and r.json()["sequencer"] == seq
        batch = httpx.post(f"{rep}/add-batch", content=tiles.encode_bundle([b"y"]),
                           headers={"Authorization": f"Bearer {token}"})
        assert batch.status_code == 503 and batch.json()["code"] == "not_sequencer"
        entry = json.dumps({"request_hash": "ef" * 32}).encode()
        added = httpx.post(f"{seq}/add", content=entry,
                           headers={"Authorization": f"Bearer {token}"})
        assert added.status_code == 200
        deadline = time.monotonic() + 10
        while httpx.get(f"{rep}/proof/{'ef' * 32}").status_code != 200:  # the replica serves it
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert httpx.get(f"{rep}/tile/entries/000.p/1").content == tiles.encode_bundle([entry])
    finally:
        for p, _ in procs:
            stop(p)


def wait_for_one_sequencer(urls: list[str], timeout: float = 15) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while True:
        roles = {}
        for u in urls:
            try:
                roles[u] = httpx.get(f"{u}/", timeout=2).json()
            except httpx.HTTPError:
                continue
        if [r["role"] for r in roles.values()].count(SEQUENCER) == 1:
            return roles
        assert time.monotonic() < deadline, f"no single sequencer: {roles}"
        time.sleep(0.1)


def test_kill_9_sequencer_under_load(tmp_path, pg_url):  # noqa: F811
    """Three replicas, clients appending to any; the sequencer dies by kill -9.

    Another replica takes over, nothing acknowledged is lost, no two
    checkpoints of one size differ, and no replica's checkpoint goes backwards.
    """
    data = tmp_path / "log"
    procs = {}
    for _ in range(3):
        p, u = start_tlog(data, "--database", pg_url, "--lease-ttl", "2")
        procs[u] = p
    urls = list(procs)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    try:
        first = next(u for u, r in wait_for_one_sequencer(urls).items()
                     if r["role"] == SEQUENCER)
        acked: dict[int, bytes] = {}
        polled: dict[str, list[bytes]] = defaultdict(list)  # GET /checkpoint, per replica, in order
        answered: list[bytes] = []  # checkpoints in 200 answers to appends
        state = {"killed_at": None}

        async def load() -> None:
            stop_now = asyncio.Event()
            async with httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_connections=64)) as c:
                async def client(k: int) -> None:
                    i = 0
                    while not stop_now.is_set():
                        entry = b"replica load %d/%d" % (k, i)
                        i += 1
                        for attempt in range(len(urls) * 3):
                            url = urls[(k + attempt) % len(urls)]
                            try:
                                r = await c.post(f"{url}/add", content=entry,
                                                 headers={"Authorization": f"Bearer {token}"})
                            except httpx.HTTPError:
                                continue
                            if r.status_code == 200:
                                acked[r.json()["index"]] = entry
                                answered.append(r.json()["checkpoint"].encode())
                                break
                            await asyncio.sleep(0.05)

                async def poller(url: str) -> None:
                    while not stop_now.is_set():
                        with contextlib.suppress(httpx.HTTPError):
                            polled[url].append((await c.get(f"{url}/checkpoint")).content)
                        await asyncio.sleep(0.02)

                async def killer() -> None:
                    while len(acked) < 300:
                        await asyncio.sleep(0.01)
                    procs[first].send_signal(signal.SIGKILL)
                    state["killed_at"] = len(acked)
                    deadline = time.monotonic() + 30
                    while len(acked) < state["killed_at"] + 300:
                        assert time.monotonic() < deadline, "no replica took over"
                        await asyncio.sleep(0.01)
                    stop_now.set()

                await asyncio.gather(killer(), *[client(k) for k in range(16)],
                                     *[poller(u) for u in urls])

        asyncio.run(load())
        procs[first].wait(10)
        alive = [u for u in urls if u != first]
        roles = wait_for_one_sequencer(alive)
        assert any(r["role"] == SEQUENCER for r in roles.values())

        # no two checkpoints of one size differ; each replica's only grow
        by_size: dict[int, bytes] = {}
        for n in answered + [n for notes in polled.values() for n in notes]:
            cp, opened = checkpoint.open(n, verifier)
            assert by_size.setdefault(cp.size, opened.text) == opened.text
        for url, notes in polled.items():
            sizes = [checkpoint.open(n, verifier)[0].size for n in notes]
            assert sizes == sorted(sizes), f"{url} served a checkpoint older than a previous one"
        assert {u for u, notes in polled.items() if notes} == set(urls)

        # every acknowledged entry is at its index, under the latest checkpoint
        reader = alive[0]
        deadline = time.monotonic() + 10
        while True:
            latest, _ = checkpoint.open(httpx.get(f"{reader}/checkpoint").content, verifier)
            if latest.size > max(acked):
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        stored: list[bytes] = []
        for b in tiles.bundles_for_size(latest.size):
            stored += tiles.decode_bundle(httpx.get(f"{reader}/{b}").content)
        for index, entry in acked.items():
            assert stored[index] == entry
        assert merkle.root([merkle.leaf_hash(e) for e in stored]) == latest.root_hash
        for size in sorted(by_size)[1::25]:  # every served size is a prefix of the latest
            r = httpx.get(f"{reader}/consistency", params={"old": size, "new": latest.size})
            old_root = checkpoint.parse(by_size[size]).root_hash
            merkle.verify_consistency(size, latest.size,
                                      [base64.b64decode(h) for h in r.json()["proof"]],
                                      old_root, latest.root_hash)
    finally:
        for p in procs.values():
            stop(p)


def test_paused_sequencer_wakes_up_fenced(tmp_path, pg_url):  # noqa: F811
    """SIGSTOP the sequencer past its lease: a replica takes over; when the old one resumes,
    the append it was holding is refused and it never writes again."""
    data = tmp_path / "log"
    procs = dict(start_tlog(data, "--database", pg_url, "--lease-ttl", "1") for _ in range(2))
    procs = {u: p for p, u in procs.items()}
    token = (data / "append.token").read_text().strip()
    auth = {"Authorization": f"Bearer {token}"}
    try:
        roles = wait_for_one_sequencer(list(procs))
        old = next(u for u, r in roles.items() if r["role"] == SEQUENCER)
        new = next(u for u in procs if u != old)
        assert httpx.post(f"{old}/add", content=b"before", headers=auth).status_code == 200
        procs[old].send_signal(signal.SIGSTOP)
        answer: list[httpx.Response] = []
        with httpx.Client(timeout=30) as c:
            try:
                deadline = time.monotonic() + 15
                while httpx.get(f"{new}/").json()["role"] != SEQUENCER:
                    assert time.monotonic() < deadline, "no takeover from a paused sequencer"
                    time.sleep(0.1)
                after = httpx.post(f"{new}/add", content=b"after", headers=auth)
                assert after.status_code == 200 and after.json()["index"] == 1
                held = threading.Thread(target=lambda: answer.append(
                    c.post(f"{old}/add", content=b"while paused", headers=auth)))
                held.start()
                time.sleep(0.5)  # the request waits in the paused process's socket
            finally:
                procs[old].send_signal(signal.SIGCONT)
            held.join(30)
        assert answer and answer[0].status_code == 503, answer
        assert answer[0].json()["code"] == "not_sequencer"
        deadline = time.monotonic() + 10
        while httpx.get(f"{old}/").json()["role"] != REPLICA:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        more = httpx.post(f"{new}/add", content=b"later", headers=auth)
        assert more.status_code == 200 and more.json()["index"] == 2
        bundle = httpx.get(f"{new}/tile/entries/000.p/3").content
        assert tiles.decode_bundle(bundle) == [b"before", b"after", b"later"]
    finally:
        for p in procs.values():
            stop(p)
