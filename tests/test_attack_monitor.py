"""Red-team: what a hostile witness status page (or a flaky network) does to the monitor.

The monitor compares the log with every `--witness-url` after each poll. Whatever a
witness answers (not JSON, a list, wrong types, a root that is not hex) or the log does
meanwhile (unreachable), the promise is the one for log entries: at most an alert, the
monitor keeps running and its state advances."""

from __future__ import annotations

import asyncio
import functools
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.attested_log import AttestedLog, attested_log, make_receipt, write_log
from tests.test_attack_verifier_cli import _Endless
from verifier import audit as auditing
from verifier import monitor, receipt


@pytest.fixture(scope="module")
def attested() -> AttestedLog:
    return attested_log("example.com/attack-monitor")


class _Witness(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def witness() -> Iterator[Any]:
    """A witness status page on loopback answering whatever body is set."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Witness))
    httpd.body = b"{}"  # type: ignore[attr-defined]
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def hostile_pages(origin: str, size: int) -> list[Any]:
    return [
        [1, 2, 3],
        {"logs": 5},
        {"logs": [7, None, "x"]},
        {"logs": [{"origin": origin, "root": "zz", "size": size}]},
        {"logs": [{"origin": origin, "root": "00" * 32, "size": "big"}]},
        {"logs": [{"origin": origin, "root": "00" * 32}]},
        {"logs": [{"origin": origin, "root": ["00"], "size": size}]},
        {"logs": [{"origin": origin, "root": "00" * 32, "size": size + 5}]},  # ahead of the log
        b"[" * 100_000,  # deeper than the JSON parser goes
        b"\xff not JSON",
    ]


def test_a_hostile_witness_page_alerts_and_never_stops_the_monitor(
        tmp_path: Path, attested: AttestedLog, witness: Any) -> None:
    a = attested
    write_log(tmp_path / "log", a.signer, a.entries)
    url = f"http://127.0.0.1:{witness.server_address[1]}"
    state = tmp_path / "state.json"
    for page in hostile_pages(a.signer.name, len(a.entries)):
        witness.body = page if isinstance(page, bytes) else json.dumps(page).encode()
        m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                            monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                            witness_urls=[url], state_path=state, webhook=None, quiet=True)
        asyncio.run(m.poll())
        assert m.state is not None and m.state.size == len(a.entries), page
        assert {x["alert"] for x in m.alerts} <= {"witness_unreachable"}, page
        assert len(m.alerts) <= 1, (page, m.alerts)


def test_a_witness_that_cosigned_another_root_is_a_split_view(
        tmp_path: Path, attested: AttestedLog, witness: Any) -> None:
    """Held (the check the hostile pages above must not break)."""
    a = attested
    write_log(tmp_path / "log", a.signer, a.entries)
    witness.body = json.dumps({"logs": [{"origin": a.signer.name, "root": "11" * 32,
                                         "size": len(a.entries)}]}).encode()
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[f"http://127.0.0.1:{witness.server_address[1]}"],
                        state_path=None, webhook=None, quiet=True)
    asyncio.run(m.poll())
    assert [x["alert"] for x in m.alerts] == ["split_view"]


def test_an_alert_per_entry_does_not_grow_the_monitor_without_bound(
        tmp_path: Path, attested: AttestedLog) -> None:
    """A hostile log can append one alerting entry after another; the monitor kept every
    alert in memory, so enough entries would exhaust it. It keeps the first and the
    latest, and counts every one."""
    a = attested
    n = 2 * monitor.ALERTS_KEPT + 500
    entries = [*a.entries, *([b'{"v":"pag-receipt/2"}'] * n)]
    write_log(tmp_path / "log", a.signer, entries)
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[], state_path=None, webhook=None, quiet=True)
    asyncio.run(m.poll())
    assert m.state is not None and m.state.size == len(entries)
    assert m.alert_total == m.counts["bad_receipt"] == n
    assert len(m.alerts) < 2 * monitor.ALERTS_KEPT
    assert m.alerts[0]["index"] == len(a.entries)  # the first alert is kept
    assert m.alerts[-1]["index"] == len(entries) - 1  # and the latest


def test_entries_outside_the_signed_tree_are_not_counted(tmp_path: Path,
                                                         attested: AttestedLog) -> None:
    """A log serving entry bundles and leaf tiles that agree with each other but not with
    its signed root: the audit fails at the end, after the entries were classified. Their
    receipts and keysets counted (and were counted again on every retry); a poll that
    fails leaves the counts and trusted keysets as they were."""
    a = attested
    honest = [*a.entries, receipt.entry(make_receipt(a.receipt_key, a.gateway))]
    forged = [*a.entries, receipt.entry(make_receipt(a.receipt_key, a.gateway,
                                                     route="shadow", request=b"other"))]
    cp = write_log(tmp_path / "log", a.signer, honest)
    write_log(tmp_path / "log", a.signer, forged)  # bundles and tiles of another tree...
    (tmp_path / "log" / "checkpoint").write_bytes(cp)  # ...under the honest signed root
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[], state_path=None, webhook=None, quiet=True)
    for _ in range(2):
        asyncio.run(m.poll())
        assert m.state is None
        assert m.entries["receipt"] == 0 and m.entries["keyset"] == 0
        assert m.receipts["route"] == {} and m.keysets == {}
    write_log(tmp_path / "log", a.signer, honest)
    asyncio.run(m.poll())
    assert m.state is not None and m.state.size == len(honest)
    assert m.entries["receipt"] == 1 and m.receipts["route"] == {"demo": 1}


def test_a_receipt_that_nulls_only_forwarded_hash_is_not_a_refusal(
        tmp_path: Path, attested: AttestedLog) -> None:
    """A refusal breaks no route rule. A receipt that nulls `forwarded_hash` but shows the
    bytes it exchanged with a provider on a forbidden route passed as a refusal."""
    a = attested
    dodge = make_receipt(a.receipt_key, a.gateway, route="shadow", forwarded_hash=None)
    refused = make_receipt(a.receipt_key, a.gateway, forwarded=False, request=b"typo")
    write_log(tmp_path / "log", a.signer, [*a.entries, receipt.entry(dodge),
                                           receipt.entry(refused)])
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True, allowed_routes=["demo"]),
                        witnesses=[], quorum=0, witness_urls=[], state_path=None,
                        webhook=None, quiet=True)
    asyncio.run(m.poll())
    assert [(x["alert"], x["index"]) for x in m.alerts] == [("forbidden_route", 2)]
    assert m.entries["receipt"] == 1 and m.entries["refusal"] == 1


def test_an_endless_log_resource_stops_the_poll_not_the_monitor() -> None:
    """The audit read each tile and bundle whole: a log answering without end exhausted
    the monitor's memory. It stops one byte past the largest bundle a log can have."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Endless.sent = 0
    try:
        f = auditing.Fetcher(f"http://127.0.0.1:{httpd.server_address[1]}")

        async def get() -> bytes:
            try:
                return await f.get("tile/entries/000")
            finally:
                await f.close()

        with pytest.raises(auditing.AuditError, match="larger than an entry bundle can be"):
            asyncio.run(get())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert _Endless.sent < 128 << 20


def test_an_endless_witness_page_is_one_alert(tmp_path: Path, attested: AttestedLog) -> None:
    a = attested
    write_log(tmp_path / "log", a.signer, a.entries)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Endless)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Endless.sent = 0
    try:
        m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                            monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                            witness_urls=[f"http://127.0.0.1:{httpd.server_address[1]}"],
                            state_path=None, webhook=None, quiet=True)
        asyncio.run(m.poll())
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [x["alert"] for x in m.alerts] == ["witness_unreachable"]
    assert m.state is not None and m.state.size == len(a.entries)
    assert _Endless.sent < 128 << 20


def test_a_keyset_entry_bound_to_a_forked_checkpoint_is_a_monitor_alert(
        tmp_path: Path, attested: AttestedLog) -> None:
    """The keyset entry's nonce names a checkpoint of size 1 signed by the log, but of
    another tree than the one the monitor audits (entry 0 differs). Only `verifier proof`
    checked this; the monitor trusted the keyset and accepted the receipts after it."""
    a = attested
    rec = make_receipt(a.receipt_key, a.gateway)
    write_log(tmp_path / "log", a.signer, [b"another genesis", a.entries[1],
                                           receipt.entry(rec)])
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[], state_path=None, webhook=None, quiet=True)
    asyncio.run(m.poll())
    assert m.state is not None and m.state.size == 3
    assert [(x["alert"], x["index"]) for x in m.alerts] == [
        ("keyset_checkpoint_fork", 1), ("unattested_receipt", 2)]
    assert "not of this log's tree" in m.alerts[0]["reason"]
    assert m.keysets == {} and m.entries["receipt"] == 0


def test_a_keyset_entry_of_this_tree_is_trusted_across_polls(
        tmp_path: Path, attested: AttestedLog) -> None:
    """Held: the fork check passes for the honest log, also when the keyset entry was
    read in an earlier poll than the receipt (the check runs against each poll's tree)."""
    a = attested
    write_log(tmp_path / "log", a.signer, a.entries)
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[], state_path=tmp_path / "state.json", webhook=None,
                        quiet=True)
    asyncio.run(m.poll())
    write_log(tmp_path / "log", a.signer, [*a.entries, receipt.entry(
        make_receipt(a.receipt_key, a.gateway))])
    asyncio.run(m.poll())
    assert m.alerts == [] and m.entries["keyset"] == 1 and m.entries["receipt"] == 1



def test_the_dashboard_serves_only_completed_polls(tmp_path: Path,
                                                   attested: AttestedLog) -> None:
    """`/api/state` serialized the dicts the poll mutates, from the dashboard's thread, at
    any moment: mid-poll it showed entries the audit had not yet proven (and a read racing
    a new dict key could raise). It serves what each poll published when it ended."""
    from verifier.dashboard import serve_dashboard

    a = attested
    rec = receipt.entry(make_receipt(a.receipt_key, a.gateway))
    write_log(tmp_path / "log", a.signer, [*a.entries, rec])
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[], state_path=None, webhook=None, quiet=True)
    httpd = serve_dashboard(m, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    seen_mid_poll: list[dict[str, Any]] = []
    on_entry = m.on_entry

    def reading_on_entry(index: int, entry: bytes) -> None:
        on_entry(index, entry)
        seen_mid_poll.append(httpx.get(f"{url}/api/state").json())

    m.on_entry = reading_on_entry  # type: ignore[method-assign]
    try:
        asyncio.run(m.poll())
        after = httpx.get(f"{url}/api/state").json()
        metrics = httpx.get(f"{url}/metrics").text
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert len(seen_mid_poll) == 3
    assert all(s["size"] == 0 and sum(s["entries"].values()) == 0 for s in seen_mid_poll)
    assert after["size"] == 3 and after["entries"]["receipt"] == 1
    assert 'pag_monitor_entries_total{kind="receipt"} 1' in metrics


def test_concurrent_polls_and_dashboard_reads_never_raise(tmp_path: Path,
                                                          attested: AttestedLog) -> None:
    """Polls growing the per-route dicts while other threads read the dashboard: every
    read is a whole published state, and its counts only ever grow."""
    from verifier.dashboard import serve_dashboard

    a = attested
    write_log(tmp_path / "log", a.signer, a.entries)
    m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                        monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                        witness_urls=[], state_path=None, webhook=None, quiet=True)
    httpd = serve_dashboard(m, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    stop = threading.Event()
    errors: list[BaseException] = []
    reads: list[int] = []

    def read() -> None:
        with httpx.Client() as c:
            last = -1
            while not stop.is_set():
                try:
                    s = c.get(f"{url}/api/state").json()
                    c.get(f"{url}/metrics").raise_for_status()
                    n = sum(s["receipts"]["route"].values())
                    assert n >= last, (n, last)
                    last = n
                    reads.append(n)
                except BaseException as e:  # noqa: BLE001 - collected for the assertion
                    errors.append(e)
                    return

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    entries = list(a.entries)
    try:
        for i in range(20):  # a new route, so a new dict key, in every poll
            entries.append(receipt.entry(make_receipt(a.receipt_key, a.gateway,
                                                      route=f"r{i}", request=b"%d" % i)))
            write_log(tmp_path / "log", a.signer, entries)
            asyncio.run(m.poll())
    finally:
        stop.set()
        for t in readers:
            t.join()
        httpd.shutdown()
        httpd.server_close()
    assert errors == []
    assert reads and m.entries["receipt"] == 20 and m.alerts == []


class _Silent(http.server.BaseHTTPRequestHandler):
    """A webhook that reads each POST and never answers (until the test lets it)."""

    received = 0
    release = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["content-length"]))
        type(self).received += 1
        type(self).release.wait()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_webhook_that_never_answers_does_not_hold_up_the_poll(
        tmp_path: Path, attested: AttestedLog, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each alert was POSTed from the poll, waiting up to 5 s for the webhook: a hostile
    log raising an alert per entry, with a webhook that never answers, stalled polling
    for hours. Alerts now go through a bounded queue posted by another thread: the poll
    finishes while the webhook still holds the first alert, the queue drops the oldest
    when full and counts it."""
    from verifier import webhook

    monkeypatch.setattr(webhook, "CAPACITY", 4)
    monkeypatch.setattr(webhook, "TIMEOUT", 3600.0)
    a = attested
    n = 10
    write_log(tmp_path / "log", a.signer, [*a.entries, *([b'{"v":"pag-receipt/2"}'] * n)])
    _Silent.received, _Silent.release = 0, threading.Event()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        m = monitor.Monitor(str(tmp_path / "log"), a.signer.verifier(),
                            monitor.Policy(allow_simulated=True), witnesses=[], quorum=0,
                            witness_urls=[], state_path=None, quiet=True,
                            webhook=f"http://127.0.0.1:{httpd.server_address[1]}/hook")
        asyncio.run(m.poll())
        assert m.state is not None and m.state.size == len(a.entries) + n
        assert m.counts == {"bad_receipt": n}
        assert _Silent.received <= 1  # the webhook holds at most the first alert
        q = m.webhook
        assert q is not None
        assert q.pending() <= 4 and q.dropped >= n - 4 - 1  # one may be in flight
        assert f"pag_monitor_webhook_dropped_total {q.dropped}" in m.metrics()
    finally:
        _Silent.release.set()
        httpd.shutdown()
        httpd.server_close()


class _Recording(http.server.BaseHTTPRequestHandler):
    """A webhook that answers 204, a little slowly, and keeps what it was sent."""

    bodies: list[Any] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        time.sleep(0.3)  # slower than the run's own end, so an undrained queue shows
        type(self).bodies.append(json.loads(self.rfile.read(
            int(self.headers["content-length"]))))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_a_once_run_posts_every_alert_before_it_exits(tmp_path: Path,
                                                      attested: AttestedLog) -> None:
    """Posting from a background thread must not lose the alerts of `monitor --once`: the
    run drains the queue before returning, in log order."""
    import argparse

    a = attested
    write_log(tmp_path / "log", a.signer, [*a.entries, *([b'{"v":"pag-receipt/2"}'] * 3)])
    (tmp_path / "policy.json").write_text('{"allow_simulated": true}')
    _Recording.bodies = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recording)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    args = argparse.Namespace(
        log=str(tmp_path / "log"), policy=tmp_path / "policy.json", state=None,
        witness_url=[], interval=0.0, once=True, listen=None, vkey=a.signer.vkey,
        witness=[], quorum=None, webhook=f"http://127.0.0.1:{httpd.server_address[1]}/")
    try:
        assert monitor.run(args) == 1
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert [(b["alert"], b["index"]) for b in _Recording.bodies] == [
        ("bad_receipt", 2), ("bad_receipt", 3), ("bad_receipt", 4)]
