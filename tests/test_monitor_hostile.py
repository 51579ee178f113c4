"""The monitor against a hostile log: no entry stops it, its state advances, unattested
receipts and keysets outside policy alert, refusals break no route rule, /metrics escapes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.attested_log import AttestedLog, attested_log, make_receipt, write_log
from verifier import monitor, receipt

ROUTE_POLICY = {"allowed_routes": ["demo"], "allowed_providers": ["demo"],
                "require_verified": True}


@pytest.fixture(scope="module")
def attested() -> AttestedLog:
    return attested_log("example.com/hostile")


def run_monitor(tmp: Path, a: AttestedLog, entries: list[bytes], policy: dict[str, Any],
                state: Path | None = None) -> monitor.Monitor:
    write_log(tmp / "log", a.signer, entries)
    m = monitor.Monitor(str(tmp / "log"), a.signer.verifier(), monitor.Policy(**policy),
                        witnesses=[], quorum=0, witness_urls=[], state_path=state,
                        webhook=None)
    asyncio.run(m.poll())
    return m


def alerts(m: monitor.Monitor) -> list[tuple[str, int | None]]:
    return sorted((a["alert"], a.get("index")) for a in m.alerts)


def signed(a: AttestedLog, **kw: Any) -> bytes:
    return receipt.entry(make_receipt(a.receipt_key, a.gateway, **kw))


HOSTILE = [
    b'{"v":"pag-receipt/1","route":"x"}',                       # the crasher
    b'{"v":"pag-receipt/2","route":"x"}',
    b'{"v":"pag-receipt/2","keyset_index":' + b"9" * 5000 + b"}",  # beyond int parsing
    b'{"v":"pag-receipt/2","keyset_index":1e999,"x":NaN}',
    b'{"v":"pag-receipt/2","keyset_index":NaN}',
    b'{"v":"pag-keyset/1","keyset":5,"checkpoint":[],"attestation":"x"}',
    b'{"v":"pag-keyset/1"}',
    b'{"v":["pag-receipt/2"]}',
    b"[1, 2, 3]", b'"pag-receipt/2"', b"null", b"\xff\xfe not utf-8", b"",
    b"[" * 30000 + b"]" * 30000,                                # nesting beyond the parser
]


def test_hostile_entries_alert_at_most_and_the_state_advances(tmp_path: Path,
                                                              attested: AttestedLog) -> None:
    a = attested
    bad = make_receipt(a.receipt_key, a.gateway, request=b"big")
    bad["usage"] = {"total_tokens": 10**30}  # added after signing: a value JCS cannot hold
    entries = [*a.entries, *HOSTILE, json.dumps(bad).encode(), signed(a, request=b"fine")]
    m = run_monitor(tmp_path, a, entries, {"allow_simulated": True, **ROUTE_POLICY},
                    tmp_path / "state.json")
    assert m.state is not None and m.state.size == len(entries)
    # entries 2..15 are HOSTILE, 16 the receipt with a huge number, 17 a good receipt;
    # 4 (a number Python will not parse) and 9.. (not receipt objects) are just "other"
    bad_receipts = [2, 3, 5, 6, 16]
    assert alerts(m) == sorted([("bad_receipt", i) for i in bad_receipts]
                               + [("keyset_out_of_policy", 7), ("keyset_out_of_policy", 8)])
    assert m.entries["receipt"] == 1 and m.entries["keyset"] == 1
    assert m.entries["receipt_invalid"] == len(bad_receipts)
    assert m.entries["keyset_out_of_policy"] == 2
    assert m.entries["other"] == 9  # genesis, 4 and 9..15
    assert sum(m.entries.values()) == len(entries)
    # a restart resumes after the hostile entries: nothing to do, nothing raised
    r = subprocess.run([sys.executable, "-m", "verifier", "monitor", "--once", "--log",
                        str(tmp_path / "log"), "--vkey", a.signer.vkey, "--policy",
                        str(write_policy(tmp_path, {"allow_simulated": True, **ROUTE_POLICY})),
                        "--state", str(tmp_path / "state.json")],
                       capture_output=True, timeout=120)
    assert r.returncode == 0 and r.stdout == b"", r.stderr


def write_policy(tmp: Path, policy: dict[str, Any]) -> Path:
    p = tmp / "policy.json"
    p.write_text(json.dumps(policy))
    return p


def test_receipts_without_an_in_policy_keyset_before_them_are_unattested(
        tmp_path: Path, attested: AttestedLog) -> None:
    a = attested
    rogue = Ed25519PrivateKey.generate()
    entries = [*a.entries,
               signed(a, request=b"ok"),                                    # 2 accepted
               receipt.entry(make_receipt(rogue, a.gateway, request=b"r")),  # 3 other key
               signed(a, request=b"g", keyset_index=0),                     # 4 not a keyset
               signed(a, request=b"s", keyset_index=5),                     # 5 itself
               signed(a, request=b"l", keyset_index=9),                     # 6 after it
               receipt.entry(make_receipt(a.receipt_key, {**a.gateway, "app_id": "00"},
                                          request=b"i"))]                   # 7 other identity
    m = run_monitor(tmp_path, a, entries, {"allow_simulated": True, **ROUTE_POLICY})
    assert alerts(m) == [("unattested_receipt", i) for i in range(3, 8)]
    assert m.entries["receipt"] == 1 and m.entries["receipt_unattested"] == 5
    assert m.receipts["route"] == {"demo": 1}  # unattested receipts are counted apart
    # the same log under a policy that refuses simulated quotes: the keyset is outside it
    m = run_monitor(tmp_path / "strict", a, entries[:3], ROUTE_POLICY)
    assert alerts(m) == [("keyset_out_of_policy", 1), ("unattested_receipt", 2)]
    assert "simulated_not_allowed" in m.alerts[0]["reason"]
    # and under a compose-hash pin it does not meet
    m = run_monitor(tmp_path / "pinned", a, entries[:3],
                    {"allow_simulated": True, "compose_hash": "ab" * 32})
    assert alerts(m) == [("keyset_out_of_policy", 1), ("unattested_receipt", 2)]


def test_refusals_are_not_forbidden_routes(tmp_path: Path, attested: AttestedLog) -> None:
    a = attested
    refused = receipt.entry(make_receipt(
        a.receipt_key, a.gateway, forwarded=False, verified=False, request=b"typo",
        refusal={"code": "model_not_found", "status": 404}))
    m = run_monitor(tmp_path, a, [*a.entries, refused, signed(a, request=b"ok")],
                    {"allow_simulated": True, "require_e2ee": None, **ROUTE_POLICY})
    assert m.alerts == []
    assert m.entries["refusal"] == 1 and m.entries["receipt"] == 1
    # a call that was forwarded on a route outside policy still alerts
    m = run_monitor(tmp_path / "b", a, [*a.entries, signed(a, route="shadow", request=b"x")],
                    {"allow_simulated": True, **ROUTE_POLICY})
    assert alerts(m) == [("forbidden_route", 2)]


def test_metrics_labels_from_the_log_are_escaped(tmp_path: Path,
                                                 attested: AttestedLog) -> None:
    a = attested
    route = 'a"b\nc\\d} 1\nfake_metric{x="'
    m = run_monitor(tmp_path, a, [*a.entries, signed(a, route=route, request=b"q")],
                    {"allow_simulated": True})
    text = m.metrics()
    assert 'pag_monitor_receipts_total{route="a\\"b\\nc\\\\d} 1\\nfake_metric{x=\\""} 1' \
        in text
    assert not any(line.startswith("fake_metric") for line in text.splitlines())
    assert 'pag_monitor_entries_total{kind="receipt"} 1' in text
    assert 'pag_monitor_entries_total{kind="keyset"} 1' in text


def test_a_malformed_policy_file_is_a_one_line_setup_error(tmp_path: Path,
                                                           attested: AttestedLog) -> None:
    write_log(tmp_path / "log", attested.signer, attested.entries)
    for bad in ('["not an object"]', '{"allowed_routes": "demo"}',
                '{"measurements": [{}]}', '{"allow_simulated": "yes"}', "{"):
        (tmp_path / "p.json").write_text(bad)
        r = subprocess.run([sys.executable, "-m", "verifier", "monitor", "--once", "--log",
                            str(tmp_path / "log"), "--vkey", attested.signer.vkey,
                            "--policy", str(tmp_path / "p.json")],
                           capture_output=True, timeout=120)
        assert r.returncode == 2, bad
        assert len(r.stderr.decode().strip().splitlines()) == 1, r.stderr


def test_a_receipt_spelled_two_ways_is_refused(tmp_path: Path, attested: AttestedLog) -> None:
    """A duplicate member another parser would read first: the signature still verifies
    over what Python reads, but the entry is not the receipt's RFC 8785 bytes."""
    a = attested
    canonical = signed(a, route="demo", request=b"dup")
    twofaced = b'{"route":{"route_id":"shadow"},' + canonical[1:]
    m = run_monitor(tmp_path, a, [*a.entries, canonical, twofaced], {"allow_simulated": True})
    assert alerts(m) == [("bad_receipt", 3)]
    assert "RFC 8785" in m.alerts[0]["reason"]


def test_a_restarted_monitor_remembers_the_keysets_it_verified(tmp_path: Path,
                                                              attested: AttestedLog) -> None:
    a = attested
    policy = {"allow_simulated": True, **ROUTE_POLICY}
    state = tmp_path / "state.json"
    first = [*a.entries, signed(a, request=b"1")]
    assert run_monitor(tmp_path, a, first, policy, state).alerts == []
    # a new process, a grown log: the receipt after the restart still has its keyset
    m = run_monitor(tmp_path, a, [*first, signed(a, request=b"2")], policy, state)
    assert m.alerts == [] and m.entries["receipt"] == 1 and m.state.size == 4
    assert (tmp_path / "state.json.keysets.json").exists()
