"""The PostgreSQL backend, against the real server on 127.0.0.1:5432 (database `test`)."""

from __future__ import annotations

import secrets
import urllib.parse

import httpx
import pytest

from tests.test_tlog_crash import _run, outrun
from tests.tlogutil import start_tlog, stop
from tlog import checkpoint, keys, merkle, note, storage, tiles
from tlog.sequencer import AppendError, Log

psycopg = pytest.importorskip("psycopg")
BASE = "postgresql://postgres@127.0.0.1:5432/test"


@pytest.fixture
def pg_url():
    try:
        admin = psycopg.connect(BASE, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        pytest.skip(f"PostgreSQL not reachable at 127.0.0.1:5432 ({e}); backend not tested")
    schema = "tlog_test_" + secrets.token_hex(4)
    admin.execute(f"CREATE SCHEMA {schema}")
    opts = urllib.parse.quote(f"-csearch_path={schema}")
    yield f"{BASE}?options={opts}"
    admin.execute(f"DROP SCHEMA {schema} CASCADE")
    admin.close()


@pytest.mark.parametrize("step", storage.STEPS)
def test_postgres_failure_after_each_step_recovers(tmp_path, pg_url, step):
    from tlog.postgres_store import PostgresStore

    signer = keys.load_signer(tmp_path)
    store = PostgresStore(pg_url)
    assert all(not isinstance(r, Exception) for r in _run(Log(store, signer), [b"a", b"b", b"c"]))

    def fault(name: str) -> None:
        if name == step:
            raise RuntimeError("crash")

    assert all(isinstance(r, AppendError)
               for r in _run(Log(store, signer, faults=fault), [b"d", b"e"]))
    store.close()
    store = PostgresStore(pg_url)
    head = Log(store, signer).head
    entries = store.read_entries(0, head.size)
    assert entries[:3] == [b"a", b"b", b"c"]
    assert merkle.root([merkle.leaf_hash(e) for e in entries]) == head.root
    store.close()


def test_postgres_entries_that_outran_the_checkpoint_are_covered(tmp_path, pg_url):
    from tlog.postgres_store import PostgresStore

    signer = keys.load_signer(tmp_path)
    store = PostgresStore(pg_url)
    _run(Log(store, signer), [b"a", b"b", b"c"])
    before = store.head()
    with pytest.raises(storage.StorageError):  # its checkpoint's size is taken: nothing stored
        outrun(store, [b"d"], before)
    assert store.size() == 3 and store.head() == before
    outrun(store, [b"d", b"e"])  # no checkpoint over them, as an older version could leave
    assert store.head() == before
    head = Log(store, signer).head  # recover
    hashes = [merkle.leaf_hash(e) for e in store.read_entries(0, 5)]
    assert head.size == 5 and merkle.root(hashes) == head.root
    merkle.verify_consistency(3, 5, merkle.consistency_proof(3, 5, hashes), before.root,
                              head.root)
    store.close()


def test_postgres_server_via_cli(tmp_path, pg_url):
    data = tmp_path / "log"
    proc, url = start_tlog(data, "--database", pg_url)
    try:
        token = (data / "append.token").read_text().strip()
        verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
        entry = b'{"request_hash": "' + b"cd" * 32 + b'"}'
        for e in [b"one", entry, b"three"]:
            r = httpx.post(f"{url}/add", content=e, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        cp, _ = checkpoint.open(httpx.get(f"{url}/checkpoint").content, verifier)
        bundle = tiles.decode_bundle(httpx.get(f"{url}/tile/entries/000.p/3").content)
        assert bundle == [b"one", entry, b"three"]
        assert merkle.root([merkle.leaf_hash(e) for e in bundle]) == cp.root_hash
        assert httpx.get(f"{url}/proof/{'cd' * 32}").status_code == 200
        assert not (data / "log.db").exists()  # nothing went to SQLite
    finally:
        stop(proc)
