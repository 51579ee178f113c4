"""Crash safety: a failure after any storage step, and kill -9 under load."""

from __future__ import annotations

import asyncio
import base64
import signal
import threading

import httpx
import pytest

from tests.tlogutil import start_tlog, stop
from tlog import checkpoint, keys, merkle, note, storage, tiles
from tlog.sequencer import AppendError, Log
from tlog.sqlite_store import SQLiteStore


class Crash(Exception):
    """Stands for the process dying right after a step."""


def _run(log: Log, entries: list[bytes]) -> list:
    async def go() -> list:
        await log.start()
        try:
            return await asyncio.gather(*[log.add(e) for e in entries], return_exceptions=True)
        finally:
            await log.close()

    return asyncio.run(go())


@pytest.mark.parametrize("step", storage.STEPS)
def test_failure_after_each_step_recovers(tmp_path, step):
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    ok = _run(Log(store, signer), [b"a%d" % i for i in range(10)])
    assert all(not isinstance(r, Exception) for r in ok)
    before = store.head()
    armed = threading.Event()
    armed.set()

    def fault(name: str) -> None:
        if name == step and armed.is_set():
            armed.clear()
            raise Crash(name)

    results = _run(Log(store, signer, faults=fault), [b"b%d" % i for i in range(5)])
    assert all(isinstance(r, AppendError) for r in results)  # nothing acknowledged
    store.close()

    # reopen, as after a restart: recovery runs on open
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, signer)
    head = log.head
    cp, _ = checkpoint.open(head.note, signer.verifier())
    entries = store.read_entries(0, head.size)
    assert entries[:10] == [b"a%d" % i for i in range(10)]  # every acked entry at its index
    hashes = [merkle.leaf_hash(e) for e in entries]
    assert merkle.root(hashes) == cp.root_hash
    assert head.size == (10 if step == "sequence" else 15)
    merkle.verify_consistency(before.size, head.size,
                              merkle.consistency_proof(before.size, head.size, hashes),
                              before.root, head.root)
    # and the log goes on appending after recovery
    more = _run(log, [b"c"])
    assert more[0].index == head.size
    store.close()


def outrun(store: storage.Storage, entries: list[bytes],
           head: storage.Head | None = None) -> None:
    """Store `entries` after the last one, as persist does, with `head` (None: no checkpoint
    over them, as a log an older version wrote could be left after a crash)."""
    start = store.size()
    hashes = [merkle.leaf_hash(e) for e in entries]
    store.persist(start, entries, hashes, tiles.extend(start, hashes, store.read_tile), [],
                  head)


def test_recover_covers_entries_that_outran_the_checkpoint(tmp_path):
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    _run(Log(store, signer), [b"x%d" % i for i in range(5)])
    before = store.head()
    outrun(store, [b"y%d" % i for i in range(3)])
    assert store.head() == before and store.size() == 8
    head = Log(store, signer).head  # recover, on open
    assert head.size == 8 and store.head() == head
    entries = store.read_entries(0, 8)
    assert entries == [*(b"x%d" % i for i in range(5)), *(b"y%d" % i for i in range(3))]
    hashes = [merkle.leaf_hash(e) for e in entries]
    assert merkle.root(hashes) == head.root
    merkle.verify_consistency(5, 8, merkle.consistency_proof(5, 8, hashes), before.root,
                              head.root)
    store.close()


def test_persist_commits_entries_and_checkpoint_together(tmp_path):
    """A checkpoint that cannot be stored (its size is taken) takes the entries with it."""
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    _run(Log(store, signer), [b"x%d" % i for i in range(5)])
    before = store.head()
    with pytest.raises(storage.StorageError):
        outrun(store, [b"y"], before)
    assert store.size() == 5 and store.head() == before
    assert not store.find_leaves([merkle.leaf_hash(b"y")])
    store.close()


def test_recover_refuses_tampered_tiles(tmp_path):
    signer = keys.load_signer(tmp_path)
    store = SQLiteStore(tmp_path / "log.db")
    _run(Log(store, signer), [b"x%d" % i for i in range(5)])
    # an entry persisted without a checkpoint, over a tile that no longer matches the head
    store.persist(5, [b"y"], [merkle.leaf_hash(b"y")], {(0, 0): b"\x00" * 32 * 6}, [])
    with pytest.raises(storage.StorageError):
        storage.recover(store, signer)
    store.close()


def test_kill_9_under_load(tmp_path):
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    acked: dict[int, bytes] = {}
    served: list[bytes] = []

    async def load() -> None:
        stop_now = asyncio.Event()
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(timeout=2, limits=limits) as c:
            async def client(k: int) -> None:
                i = 0
                while not stop_now.is_set() and i < 200:
                    entry = b"load %d/%d" % (k, i)
                    i += 1
                    try:
                        r = await c.post(f"{url}/add", content=entry,
                                         headers={"Authorization": f"Bearer {token}"})
                    except httpx.HTTPError:
                        return
                    if r.status_code == 200:
                        acked[r.json()["index"]] = entry
                        served.append(r.json()["checkpoint"].encode())

            async def killer() -> None:
                while len(acked) < 500:
                    await asyncio.sleep(0.005)
                proc.send_signal(signal.SIGKILL)
                stop_now.set()

            await asyncio.gather(killer(), *[client(k) for k in range(64)])

    asyncio.run(load())
    proc.wait(10)
    assert len(acked) >= 500

    proc, url = start_tlog(data)
    try:
        cp_note = httpx.get(f"{url}/checkpoint").content
        served.append(cp_note)
        latest, _ = checkpoint.open(cp_note, verifier)
        stored: list[bytes] = []
        for b in tiles.bundles_for_size(latest.size):
            stored += tiles.decode_bundle(httpx.get(f"{url}/{b}").content)
        for index, entry in acked.items():  # every acknowledged entry, at its index
            assert stored[index] == entry
        assert merkle.root([merkle.leaf_hash(e) for e in stored]) == latest.root_hash
        for n in served:  # every checkpoint ever served is consistent with the latest
            cp, _ = checkpoint.open(n, verifier)
            if cp.size == 0:
                continue
            r = httpx.get(f"{url}/consistency", params={"old": cp.size, "new": latest.size})
            merkle.verify_consistency(cp.size, latest.size,
                                      [base64.b64decode(h) for h in r.json()["proof"]],
                                      cp.root_hash, latest.root_hash)
    finally:
        stop(proc)
