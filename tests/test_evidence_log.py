"""Evidence entries (`pag-evidence/1`): the format, its offline re-check, the gateway logging
each lease's evidence before the lease serves, and `python -m gateway verify-evidence`
re-verifying it from a real log."""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from dstack_sdk import AsyncDstackClient

from gateway.api import server, verify_evidence
from gateway.api.routes import now_rfc3339
from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from gateway.identity.dstack_sim import SimulatorServer
from gateway.receipts.evidence import EvidenceLog
from gateway.receipts.logclient import LogClient
from gateway.verification.base import Lease, VerificationError
from gateway.verification.lease import LeaseStore
from tests.test_gateway_fakes import API_KEY, MARKER, FakeLog, run_gateway, write_config
from tests.test_verification_failclosed import Adversary, _routes
from tests.tlogutil import start_tlog, stop
from verifier import evidence_entry

ROUTE = {"route_id": "r1", "model": "m", "provider": "p", "upstream_model": "u"}


def _build(document: bytes, **kw: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    args = dict(route=ROUTE, kind="dstack", evidence="dstack-simulated", binding="tls-spki:00",
                lease_id="lease-1", verified_at="2026-12-04T00:00:00Z",
                expires_at="2026-12-04T00:05:00Z", nonce="ab" * 32, document=document,
                collateral=None, facts={"app_id": "aa"}, time="2026-12-04T00:00:01Z")
    args.update(kw)
    return evidence_entry.build(**args)


# -- the format ------------------------------------------------------------------------

def test_small_document_is_inline_and_round_trips() -> None:
    obj, parts = _build(b'{"quote": "00"}')
    assert parts == [] and obj["document_parts"] == [] and obj["route_id"] == "r1"
    ev = evidence_entry.parse(json.loads(evidence_entry.entry(obj)))
    assert ev.document() == b'{"quote": "00"}'
    assert obj["document_sha256"] == hashlib.sha256(b'{"quote": "00"}').hexdigest()


def test_binary_document_is_base64_and_large_one_is_split() -> None:
    obj, _ = _build(b"\xff\xfe raw")
    assert obj["document_encoding"] == "base64"
    assert evidence_entry.parse(obj).document() == b"\xff\xfe raw"
    big = json.dumps({"pad": "x" * 150_000}).encode()
    obj, parts = _build(big)
    assert obj["document"] is None and len(parts) == 4
    assert all(len(evidence_entry.entry(p)) <= evidence_entry.MAX_ENTRY for p in parts)
    obj["document_parts"] = [10, 11, 12, 13]
    ev = evidence_entry.parse(obj)
    assert len(evidence_entry.entry(obj)) <= evidence_entry.MAX_ENTRY
    assert ev.document(parts) == big
    with pytest.raises(evidence_entry.EvidenceEntryError) as e:
        ev.document(list(reversed(parts)))
    assert e.value.code == "document_mismatch"
    swapped = copy.deepcopy(parts)
    swapped[1]["data"] = base64.b64encode(b"y" * 40_000).decode()
    with pytest.raises(evidence_entry.EvidenceEntryError):
        ev.document(swapped)


@pytest.mark.parametrize("mutate", [
    lambda o: o.pop("nonce"),
    lambda o: o.__setitem__("route_id", 7),
    lambda o: o.__setitem__("document_sha256", "AB" * 32),
    lambda o: o.__setitem__("document_parts", [True]),
    lambda o: o.__setitem__("document_parts", [1]),  # both inline and in parts
    lambda o: o.__setitem__("facts", []),
    lambda o: o.__setitem__("v", "pag-evidence/0"),
])
def test_malformed_entries_are_refused(mutate: Any) -> None:
    obj, _ = _build(b"{}")
    mutate(obj)
    with pytest.raises(evidence_entry.EvidenceEntryError) as e:
        evidence_entry.parse(obj)
    assert e.value.code == "malformed"


def test_tampered_inline_document_is_refused() -> None:
    obj, _ = _build(b'{"quote": "00"}')
    obj["document"] = '{"quote": "01"}'
    with pytest.raises(evidence_entry.EvidenceEntryError) as e:
        evidence_entry.parse(obj).document()
    assert e.value.code == "document_mismatch"


# -- the offline re-check --------------------------------------------------------------

def _provider_doc(short_dir: Path, nonce: str) -> tuple[bytes, str]:
    """A real simulated dstack provider attestation for `nonce`; (bytes, its TLS binding)."""
    async def run() -> tuple[bytes, str]:
        async with SimulatorServer(short_dir / "p.sock", short_dir / "psim"):
            client = AsyncDstackClient(str(short_dir / "p.sock"))
            ks = await keys.load(client, log_vkey="")
            doc = await identity_attestation.build(client, ks, nonce)
            return json.dumps(doc).encode(), "tls-spki:" + ks.keyset.tls_spki_sha256
    return asyncio.run(run())


def test_recheck_of_a_dstack_document(short_dir: Path) -> None:
    nonce = "cd" * 32
    doc, binding = _provider_doc(short_dir, nonce)
    obj, _ = _build(doc, nonce=nonce, binding=binding, facts={})
    ev = evidence_entry.parse(obj)
    facts = evidence_entry.recheck(ev, ev.document(), allow_simulated=True)
    assert facts.simulated and facts.nonce == nonce
    cases = {
        "simulated_not_allowed": (dict(), {"allow_simulated": False}, "attestation_invalid"),
        "another nonce": (dict(nonce="ef" * 32), {}, "attestation_invalid"),
        "another binding": (dict(binding="tls-spki:" + "00" * 32), {}, "binding_mismatch"),
        "another kind": (dict(kind="nearai"), {}, "unsupported_kind"),
        "claimed app id": (dict(facts={"app_id": "ff" * 20}), {}, "attestation_invalid"),
    }
    for name, (change, kw, code) in cases.items():
        bad, _ = _build(doc, **{"nonce": nonce, "binding": binding, "facts": {}, **change})
        bev = evidence_entry.parse(bad)
        with pytest.raises(evidence_entry.EvidenceEntryError) as e:
            evidence_entry.recheck(bev, bev.document(), **{"allow_simulated": True, **kw})
        assert e.value.code == code, name


# -- the gateway logs each lease's evidence first ---------------------------------------

def _serve(tmp_path: Path, fail_log: bool = False, calls: int = 2) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        sim = SimulatorServer(str(tmp_path / "dstack.sock"), tmp_path / "sim")
        await sim.start()
        adv, log = Adversary("honest"), FakeLog()
        await log.start()
        try:
            await adv.start(str(tmp_path / "dstack.sock"), tmp_path)
            cfg = write_config(tmp_path, "unused", log=log, routes=_routes(
                adv, policy="allow_simulated = true\nallow_any_workload = true"))
            evidence = LogClient(log.url, log.token, log.vkey)
            store = LeaseStore(publish=server.evidence_hook(EvidenceLog(evidence, now_rfc3339)))
            async with run_gateway(cfg, store, VerificationError) as gw, \
                    httpx.AsyncClient(timeout=30) as c:
                log.fail = fail_log
                out: dict[str, Any] = {"responses": [], "receipts": []}
                for _ in range(calls):
                    r = await c.post(f"{gw.url}/v1/chat/completions",
                                     headers={"Authorization": f"Bearer {API_KEY}"},
                                     json={"model": "chat-model",
                                           "messages": [{"role": "user", "content": MARKER}]})
                    out["responses"].append(r)
                    log.fail = False
                    for _ in range(300):
                        doc = (await c.get(f"{gw.url}/v1/receipts/{r.headers['x-receipt-id']}",
                                           headers={"Authorization": f"Bearer {API_KEY}"})).json()
                        if doc["index"] is not None:
                            break
                        await asyncio.sleep(0.01)
                    out["receipts"].append(doc)
                await evidence.close()
            out["entries"] = list(log.entries)
            out["received"] = list(adv.received)
            return out
        finally:
            await adv.stop()
            await sim.stop()
            await log.stop()
    return asyncio.run(run())


def test_lease_evidence_is_logged_once_before_the_receipts_that_name_it(tmp_path: Path) -> None:
    out = _serve(tmp_path)
    assert [r.status_code for r in out["responses"]] == [200, 200]
    entries = [json.loads(e) for e in out["entries"]]
    evidence = [i for i, e in enumerate(entries) if e["v"] == evidence_entry.VERSION]
    assert len(evidence) == 1  # one lease, logged once, reused by both calls
    ei = evidence[0]
    for doc in out["receipts"]:
        rc = doc["receipt"]
        assert rc["upstream"]["evidence_index"] == ei < doc["index"]
    ev = evidence_entry.parse(entries[ei])
    assert (ev.route_id, ev.kind, ev.binding) == (
        "adv", "dstack", out["receipts"][0]["receipt"]["upstream"]["binding"])
    assert entries[ei]["lease_id"] == out["receipts"][0]["receipt"]["upstream"]["lease_id"]
    facts = evidence_entry.recheck(ev, ev.document(), allow_simulated=True)
    assert facts.app_id == entries[ei]["facts"]["app_id"]
    assert MARKER not in json.dumps(entries[ei])


def test_no_lease_serves_while_its_evidence_cannot_be_logged(tmp_path: Path) -> None:
    out = _serve(tmp_path, fail_log=True, calls=1)
    r = out["responses"][0]
    assert r.status_code == 503 and r.json()["error"]["code"] == "log_unavailable"
    assert out["received"] == []  # not one prompt byte went upstream
    assert not any(json.loads(e)["v"] == evidence_entry.VERSION for e in out["entries"])


# -- verify-evidence against a real log --------------------------------------------------

def test_verify_evidence_command_rechecks_from_the_log(short_dir: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    nonce = "ab" * 32
    doc, binding = _provider_doc(short_dir, nonce)
    padded = json.dumps(dict(json.loads(doc), padding="p" * 100_000)).encode()  # in parts
    proc, url = start_tlog(short_dir / "tlog")
    try:
        token = (short_dir / "tlog" / "append.token").read_text().strip()
        vkey = (short_dir / "tlog" / "log.vkey").read_text().strip()

        async def publish() -> list[int]:
            client = LogClient(url, token, vkey)
            log = EvidenceLog(client, now_rfc3339)
            route = type("R", (), {"id": "r1", "model": "m", "provider": "p",
                                   "upstream_model": "u", "evidence": "dstack",
                                   "policy": {}})()
            out = []
            try:
                for document, b in ((doc, binding), (padded, binding),
                                    (doc, "tls-spki:" + "00" * 32)):
                    lease = Lease("r1", "p", "dstack-simulated", "", b, 1.0e9, 1.0e9 + 300,
                                  facts={"simulated": True}, nonce=nonce,
                                  document_b64=base64.b64encode(document).decode())
                    published = await log.publish(route, lease)
                    assert published.document_b64 == "" and published.evidence_index is not None
                    out.append(published.evidence_index)
            finally:
                await client.close()
            return out

        good, split, forged = asyncio.run(publish())
        base = ["--log", url, "--vkey", vkey]
        assert verify_evidence.main([*base, "--index", str(good), "--allow-simulated"]) == 0
        assert "SIMULATED" in capsys.readouterr().out
        assert verify_evidence.main([*base, "--index", str(split), "--allow-simulated",
                                     "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["route_id"] == "r1"
        for argv, reason in (([*base, "--index", str(good)], "simulated"),
                             ([*base, "--index", str(forged), "--allow-simulated"],
                              "binding_mismatch"),
                             ([*base, "--index", str(split - 1), "--allow-simulated"], "malformed"),
                             (["--log", url, "--vkey", vkey.replace(vkey.split("+")[0], "x"),
                               "--index", str(good)], "checkpoint")):
            assert verify_evidence.main(argv) == 1
            assert reason in capsys.readouterr().err
    finally:
        stop(proc)
