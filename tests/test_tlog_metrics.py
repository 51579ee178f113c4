"""Operations: /metrics, /healthz and /readyz on the log and the witness (issue 15).

/readyz must tell the truth: each test breaks the dependency it checks and
sees 503, while /healthz (the process answers) stays 200.
"""

from __future__ import annotations

import httpx
import psycopg
import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_tlog_postgres import pg_url  # noqa: F401 - the fresh-schema fixture
from tests.test_tlog_witnessing import junk, serve_fake
from tests.tlogutil import free_port, start, start_tlog, stop
from tlog import checkpoint, merkle, note
from tlog.metrics import route
from tlog.service import RequestCounter
from witness import cosignature, request


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a /metrics page, by (name, sorted labels)."""
    r = httpx.get(f"{url}/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_log_metrics_count_what_happened(tmp_path):
    fake_url, fake = serve_fake(junk)  # a witness that never gives a valid cosignature
    w = cosignature.generate_signer("w.example")
    data = tmp_path / "log"
    proc, url = start_tlog(data, "--witness", fake_url, "--witness-vkey", w.vkey,
                           "--witness-timeout", "2")
    try:
        token = (data / "append.token").read_text().strip()
        for i in range(5):
            r = httpx.post(f"{url}/add", content=b"m%d" % i,
                           headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
        assert httpx.post(f"{url}/add", content=b"x").status_code == 401
        assert httpx.get(f"{url}/tile/0/x000/000").status_code == 400
        assert httpx.get(url + '/%22%7D%0Aevil%7Bx=%22').status_code == 404
        size = checkpoint.parse(note.split(httpx.get(f"{url}/checkpoint").content)[0]).size
        m = samples(url)
        assert m[("tlog_size", ())] == size == 5
        assert m[("tlog_sequencer", ())] == 1
        assert m[("tlog_served_cosignatures", ())] == 0
        assert m[("tlog_http_requests_total", (("route", "add"), ("status", "200")))] == 5
        assert m[("tlog_http_requests_total", (("route", "add"), ("status", "401")))] == 1
        assert m[("tlog_http_requests_total", (("route", "tile"), ("status", "400")))] == 1
        assert m[("tlog_http_requests_total", (("route", "other"), ("status", "404")))] == 1
        assert not any("evil" in str(k) for k in m)  # paths never become labels
        assert m[("tlog_append_seconds_count", ())] == 5
        assert m[("tlog_witness_lag", (("witness", fake_url),))] == 5
        assert m[("tlog_witness_cosigned_size", (("witness", fake_url),))] == 0
        assert m[("tlog_witness_failures_total",
                  (("reason", "bad_answer"), ("witness", fake_url)))] >= 1
    finally:
        stop(proc)
        fake.shutdown()
        fake.server_close()


def test_the_request_counter_counts_each_route_and_status_and_keeps_few_children() -> None:
    registry = CollectorRegistry()
    count = RequestCounter(Counter("r", "requests", ["route", "status"], registry=registry),
                           route)
    for i in range(300):  # distinct paths of a few routes
        count(f"/tile/0/{i:03d}", 200, 0.001)
        count(f"/proof/{i:064x}", 404 if i % 3 else 200, 0.001)
    count("/add", 200, 0.01)
    count("/add", 503, 0.01)
    count('/%22%7D%0Aevil', 404, 0.0)
    got = {(s.labels["route"], s.labels["status"]): s.value
           for fam in text_string_to_metric_families(generate_latest(registry).decode())
           for s in fam.samples if s.name == "r_total"}
    assert got == {("tile", "200"): 300, ("proof", "404"): 200, ("proof", "200"): 100,
                   ("add", "200"): 1, ("add", "503"): 1, ("other", "404"): 1}
    assert len(count._children) == len(got)  # noqa: SLF001 - one child per label pair


def test_log_readyz_tells_the_truth_on_sqlite(tmp_path):
    data = tmp_path / "log"
    proc, url = start_tlog(data)
    try:
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 200 and r.json()["ready"] is True
        (data / "log.db").rename(data / "moved.db")  # the database the log writes is gone
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and r.json()["checks"]["storage"] != "ok"
        assert "replaced or deleted" in r.json()["checks"]["storage"]
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        stop(proc)


def test_log_readyz_tells_the_truth_on_postgres(tmp_path, pg_url):  # noqa: F811
    proc, url = start_tlog(tmp_path / "log", "--database", pg_url)
    try:
        assert httpx.get(f"{url}/readyz").status_code == 200
        schema = pg_url.rsplit("search_path%3D", 1)[1]
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as db:
            db.execute(f"DROP SCHEMA {schema} CASCADE")
        r = httpx.get(f"{url}/readyz")
        assert r.status_code == 503 and "UndefinedTable" in r.json()["checks"]["storage"]
        assert httpx.get(f"{url}/healthz").status_code == 200
        with psycopg.connect(pg_url.split("?")[0], autocommit=True) as db:
            db.execute(f"CREATE SCHEMA {schema}")  # for the fixture's clean-up
    finally:
        stop(proc)


@pytest.fixture
def witness_proc(tmp_path):
    log = note.generate_signer("example.com/log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "w"
    proc = start("witness", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                 "--log", log.vkey, ready=url + "/")
    yield url, log, data
    stop(proc)


def test_witness_metrics_and_readyz(witness_proc):
    url, log, data = witness_proc
    leaves = [merkle.leaf_hash(b"%d" % i) for i in range(8)]
    cp = checkpoint.sign(checkpoint.Checkpoint(log.name, 8, merkle.root(leaves)), log)
    assert httpx.post(f"{url}/add-checkpoint", content=request.format(0, [], cp)).status_code == 200
    assert httpx.post(f"{url}/add-checkpoint", content=request.format(3, [], cp)).status_code == 409
    stranger = note.generate_signer("stranger.example/log")
    other = checkpoint.sign(checkpoint.Checkpoint(stranger.name, 1, leaves[0]), stranger)
    assert httpx.post(f"{url}/add-checkpoint",
                      content=request.format(0, [], other)).status_code == 404
    m = samples(url)
    assert m[("witness_cosignatures_total", (("origin", log.name),))] == 1
    assert m[("witness_refusals_total", (("status", "409"),))] == 1
    assert m[("witness_refusals_total", (("status", "404"),))] == 1
    assert m[("witness_log_size", (("origin", log.name),))] == 8
    assert m[("witness_forks", ())] == 0
    assert not any("stranger" in str(k) for k in m)  # unknown origins are no label
    assert httpx.get(f"{url}/readyz").status_code == 200
    (data / "witness.db").rename(data / "moved.db")
    r = httpx.get(f"{url}/readyz")
    assert r.status_code == 503 and "replaced or deleted" in r.json()["checks"]["state"]
    assert httpx.get(f"{url}/healthz").status_code == 200
