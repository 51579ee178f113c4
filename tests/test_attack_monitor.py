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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
