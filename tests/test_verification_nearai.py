"""The NEAR AI Cloud adapter against a real recorded report and an adversarial provider.

Part one checks the report-data layout against a real capture of
cloud-api.near.ai (tests/fixtures/providers/nearai/SOURCE.md). Part two runs
a NEAR-shaped HTTPS provider under test control, with simulated quotes whose
report data binds that server's real TLS key, first against the adapter and
then through a real Gateway: honest providers are served over the pinned
TLS channel, adversarial ones are refused with zero prompt bytes delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import ssl
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.verification import nearai, tdx
from gateway.verification.base import MAX_EVIDENCE, Policy, VerificationError
from gateway.verification.lease import LeaseStore
from tests.pccs import Pccs
from tests.test_gateway_fakes import (
    MARKER,
    RecordingProvider,
    post_chat,
    tls_server_context,
    write_config,
)
from tests.test_verification_failclosed import gateway
from verifier.tee import eventlog
from verifier.tee.quote import build_simulated_quote

FIXTURES = Path(__file__).parent / "fixtures" / "providers" / "nearai"
FIXTURE = FIXTURES / "attestation_report_20260424.json"
MODEL_COLLATERAL = FIXTURES / "intel_collateral_fmspc_90c06f000000.json"  # the model's platform
GATEWAY_COLLATERAL = FIXTURES / "intel_collateral_fmspc_b0c06f000000.json"  # the gateway's
RECORDED_NONCE = "7c4b89c7c794886908702155bc671b6214269ed4a4bffaaf751449dba01e27da"
CAPTURED_AT = 1777082774.0  # 2026-04-24T02:06:14Z


def real_report() -> dict[str, Any]:
    return json.loads(FIXTURE.read_bytes())


def _quote_report_data(att: dict[str, Any]) -> bytes:
    return tdx.parse(bytes.fromhex(att["intel_quote"])).report.report_data


def _flip(hex_text: str, i: int = 0) -> str:
    b = bytearray(bytes.fromhex(hex_text.removeprefix("0x")))
    b[i] ^= 1
    return b.hex()


# --- part one: the real capture ------------------------------------------------------------

def test_real_report_parses_into_gateway_and_model():
    gw, models = nearai.parse_report(real_report())
    assert gw.name == "gateway_attestation"
    assert [m.model for m in models] == ["Qwen/Qwen3.5-122B-A10B"]
    assert gw.tls_fingerprint != models[0].tls_fingerprint  # each has its own TLS endpoint


@pytest.mark.parametrize("which", ["gateway", "model"])
def test_real_quotes_carry_our_report_data_layout(which):
    doc = real_report()
    att = doc["gateway_attestation"] if which == "gateway" else doc["model_attestations"][0]
    assert att["request_nonce"] == RECORDED_NONCE
    want = nearai.report_data(att["signing_address"], att["tls_cert_fingerprint"], RECORDED_NONCE)
    assert _quote_report_data(att) == want


def test_real_gateway_fingerprint_is_sha256_of_the_certificate_spki():
    doc = real_report()
    cert = x509.load_pem_x509_certificate(doc["tls_certificate"].encode())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    fp = doc["gateway_attestation"]["tls_cert_fingerprint"]
    assert fp == hashlib.sha256(spki).hexdigest()
    assert fp != hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@pytest.mark.parametrize("field", ["signing_address", "tls_cert_fingerprint", "nonce"])
@pytest.mark.parametrize("pos", [0, 19])
def test_one_changed_byte_of_any_input_breaks_the_binding(field, pos):
    att = real_report()["gateway_attestation"]
    args = {"signing_address": att["signing_address"],
            "tls_cert_fingerprint": att["tls_cert_fingerprint"], "nonce": RECORDED_NONCE}
    args[field] = _flip(args[field], pos)
    got = nearai.report_data(args["signing_address"], args["tls_cert_fingerprint"], args["nonce"])
    assert got != _quote_report_data(att)


def test_report_data_rejects_wrong_lengths():
    att = real_report()["gateway_attestation"]
    with pytest.raises(ValueError):
        nearai.report_data(att["signing_address"], att["tls_cert_fingerprint"][:-2], RECORDED_NONCE)
    with pytest.raises(ValueError):
        nearai.report_data(att["signing_address"], att["tls_cert_fingerprint"], RECORDED_NONCE + "00")
    with pytest.raises(ValueError):
        nearai.report_data("0x", att["tls_cert_fingerprint"], RECORDED_NONCE)


def test_real_event_logs_replay_to_the_quoted_rtmr3():
    doc = real_report()
    for att in [doc["gateway_attestation"], *doc["model_attestations"]]:
        replay = eventlog.replay(att["event_log"])
        assert replay.rtmr3 == tdx.parse(bytes.fromhex(att["intel_quote"])).report.rtmr3
        assert replay.app_id == att["info"]["app_id"]
        assert replay.compose_hash == att["info"]["compose_hash"]


@pytest.mark.parametrize("which", ["gateway", "model"])
def test_real_quote_without_collateral_is_refused(which):
    gw, models = nearai.parse_report(real_report())
    att = gw if which == "gateway" else models[0]
    with pytest.raises(VerificationError) as e:
        asyncio.run(nearai.check_attestation(att, RECORDED_NONCE, Policy(), CAPTURED_AT))
    assert e.value.code == "quote_invalid"
    # allow_simulated does not make a real quote acceptable either
    with pytest.raises(VerificationError) as e:
        asyncio.run(nearai.check_attestation(att, RECORDED_NONCE, Policy(allow_simulated=True),
                                             CAPTURED_AT))
    assert e.value.code == "quote_invalid"


def test_real_model_attestation_verifies_with_recorded_intel_collateral():
    _, models = nearai.parse_report(real_report())
    policy = Policy(collateral_file=str(MODEL_COLLATERAL))
    facts = asyncio.run(nearai.check_attestation(models[0], RECORDED_NONCE, policy, CAPTURED_AT))
    assert facts["tcb_status"] == "UpToDate" and facts["simulated"] is False
    assert facts["app_id"] == "2c0a0c96cb6dbd659bf1446e2f3fce58172ff91b"
    assert facts["mr_td"].startswith("b24d3b24e9e3c160")


def test_real_quote_under_another_nonce_is_refused():
    """A genuine, Intel-verified quote replayed to a verifier that asked with another nonce."""
    _, models = nearai.parse_report(real_report())
    policy = Policy(collateral_file=str(MODEL_COLLATERAL))
    with pytest.raises(VerificationError) as e:
        asyncio.run(nearai.check_attestation(models[0], _flip(RECORDED_NONCE), policy, CAPTURED_AT))
    assert e.value.code == "binding_mismatch"


def test_real_gateway_quote_is_out_of_date_and_needs_policy_consent():
    gw, _ = nearai.parse_report(real_report())
    strict = Policy(collateral_file=str(GATEWAY_COLLATERAL))
    with pytest.raises(VerificationError) as e:
        asyncio.run(nearai.check_attestation(gw, RECORDED_NONCE, strict, CAPTURED_AT))
    assert e.value.code == "quote_invalid" and "OutOfDate" in e.value.reason
    lenient = Policy(collateral_file=str(GATEWAY_COLLATERAL),
                     allowed_tcb_status=("UpToDate", "OutOfDate"))
    facts = asyncio.run(nearai.check_attestation(gw, RECORDED_NONCE, lenient, CAPTURED_AT))
    assert facts["tcb_status"] == "OutOfDate"
    assert facts["tls_spki_sha256"] == "9133446030e5dd73e3f3c151315bf431508991ebc108f37fc01b36836af009fe"


# --- part two: a NEAR-shaped provider under test control ------------------------------------

MR_TD = bytes.fromhex("11" * 48)
APP_ID = "f550fdfb4eb8ad787c1bcd423f091cbb4a4431ae"


def attestation(signing_address: str, fingerprint: str, nonce: str, *,
                bound_fingerprint: str | None = None, mr_td: bytes = MR_TD,
                app_id: str = APP_ID, compose: bytes = b'{"services":{}}') -> dict[str, Any]:
    """One NEAR-shaped attestation with a simulated quote over (address, fingerprint, nonce)."""
    events = [eventlog.runtime_event("app-id", bytes.fromhex(app_id)),
              eventlog.runtime_event("compose-hash", hashlib.sha256(compose).digest())]
    rd = nearai.report_data(signing_address, bound_fingerprint or fingerprint, nonce)
    quote = build_simulated_quote(rd, mr_td=mr_td,
                                  rtmrs=(bytes(48), bytes(48), bytes(48), eventlog.replay_rtmr3(events)))
    return {"signing_address": signing_address, "signing_algo": "ecdsa", "intel_quote": quote.hex(),
            "event_log": eventlog.dumps_event_log(events), "request_nonce": nonce,
            "report_data": rd.hex(), "info": {"app_id": app_id}, "tls_cert_fingerprint": fingerprint}


class NearProvider(RecordingProvider):
    """cloud-api's two endpoints over HTTPS; records every chat body and attestation query."""

    def __init__(self, tmp: Path, mode: str = "honest") -> None:
        super().__init__()
        self.mode = mode
        self.tmp = tmp
        self.queries: list[dict[str, str]] = []
        self.gateway_address = "0x" + secrets.token_hex(20)
        self.model_address = "0x" + secrets.token_hex(20)
        self.model_fp = secrets.token_hex(32)  # the model backend's own TLS key (not ours)
        self.captured_nonce = secrets.token_hex(32)
        self.gpu_payload: Any = None
        self.port = 0

    async def start(self) -> None:
        (self.tmp / "attested").mkdir()
        attested_ctx, self.fingerprint = tls_server_context(self.tmp / "attested")
        ctx: ssl.SSLContext = attested_ctx
        if self.mode == "tls_key_swapped":  # presents another key than the attested one
            (self.tmp / "other").mkdir()
            ctx, _ = tls_server_context(self.tmp / "other")
        app = web.Application()
        app.router.add_get("/v1/attestation/report", self._report)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def report(self, nonce: str) -> dict[str, Any]:
        bound = secrets.token_hex(32) if self.mode == "not_bound" else None
        mr_td = bytes(48) if self.mode == "wrong_measurement" else MR_TD
        model = attestation(self.model_address, self.model_fp,
                            self.captured_nonce if self.mode == "model_replayed" else nonce,
                            mr_td=bytes(48) if self.mode == "model_wrong_measurement" else mr_td)
        model.update(model_name="upstream-model", nvidia_payload=self.gpu_payload)
        gw = attestation(self.gateway_address, self.fingerprint, nonce, bound_fingerprint=bound,
                         mr_td=mr_td)
        if self.mode == "event_log_forged":  # claims another app than the one measured
            events = eventlog.parse_event_log(gw["event_log"])
            events[0] = eventlog.runtime_event("app-id", bytes(20))
            gw["event_log"] = eventlog.dumps_event_log(events)
        return {"gateway_attestation": gw, "model_attestations": [model]}

    async def _report(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        if self.mode == "real":
            return web.Response(body=FIXTURE.read_bytes(), content_type="application/json")
        if self.mode == "not_found":
            return web.Response(status=404)
        if self.mode == "malformed":
            return web.Response(body=b'{"gateway_attestation": ', content_type="application/json")
        nonce = self.captured_nonce if self.mode == "replayed" else request.query["nonce"]
        doc = self.report(nonce)
        if self.mode == "oversized":  # a valid report, padded past the limit
            doc["padding"] = "x" * MAX_EVIDENCE
        return web.json_response(doc)

    def route(self, **kw: Any) -> SimpleNamespace:
        fields = {"id": "near", "provider": "nearai", "evidence": "nearai",
                  "base_url": f"https://127.0.0.1:{self.port}/v1", "attestation_url": "",
                  "upstream_model": "upstream-model"}
        return SimpleNamespace(**{**fields, **kw})


async def _verify(prov: NearProvider, policy: Policy):
    async with httpx.AsyncClient(verify=False) as client:  # noqa: S501 - trust is in the quote
        return await nearai.verify(client, prov.route(), policy, 1000.0)


def run_adapter(tmp: Path, mode: str, policy: Policy, setup: Any = None):
    async def go():
        prov = NearProvider(tmp, mode)
        if setup is not None:
            setup(prov)
        await prov.start()
        try:
            return await _verify(prov, policy), prov
        finally:
            await prov.stop()
    return asyncio.run(go())


SIM = Policy(allow_simulated=True)


def test_honest_provider_yields_a_lease_pinning_its_tls_key(tmp_path):
    lease, prov = run_adapter(tmp_path, "honest", SIM)
    assert lease.binding == f"tls-spki:{prov.fingerprint}"
    assert lease.evidence == "nearai-simulated" and lease.verified
    assert (lease.verified_at, lease.expires_at) == (1000.0, 1000.0 + SIM.max_lease_age)
    f = lease.facts
    assert f["signing_address"] == prov.gateway_address and f["tls_spki_sha256"] == prov.fingerprint
    assert f["mr_td"] == MR_TD.hex() and f["app_id"] == APP_ID and f["simulated"] is True
    assert f["models"][0]["model"] == "upstream-model"
    assert f["gpu"] == ["absent"]
    q = prov.queries[0]  # the real API's parameters, with a fresh 32-byte nonce
    assert q["model"] == "upstream-model" and q["include_tls_fingerprint"] == "true"
    assert q["signing_algo"] == "ecdsa" and len(bytes.fromhex(q["nonce"])) == 32


def test_each_verification_uses_a_fresh_nonce(tmp_path):
    async def go() -> list[str]:
        prov = NearProvider(tmp_path)
        await prov.start()
        try:
            await _verify(prov, SIM)
            await _verify(prov, SIM)
            return [q["nonce"] for q in prov.queries]
        finally:
            await prov.stop()
    a, b = asyncio.run(go())
    assert a != b


ADAPTER_CASES = [
    ("replayed", SIM, "binding_mismatch"),
    ("not_bound", SIM, "binding_mismatch"),
    ("wrong_measurement", Policy(allow_simulated=True, allowed_measurements=({"mr_td": MR_TD.hex()},)),
     "measurement_mismatch"),
    ("model_wrong_measurement",
     Policy(allow_simulated=True, allowed_measurements=({"mr_td": MR_TD.hex()},)),
     "measurement_mismatch"),
    ("model_replayed", SIM, "binding_mismatch"),
    ("event_log_forged", SIM, "quote_invalid"),
    ("honest", Policy(allow_simulated=True, compose_hash="00" * 32), "measurement_mismatch"),
    ("honest", Policy(allow_simulated=True, app_id="00" * 20), "measurement_mismatch"),
    ("honest", Policy(allow_simulated=True, signing_address="0x" + "00" * 20), "binding_mismatch"),
    ("honest", Policy(), "simulated_not_allowed"),
    ("malformed", SIM, "evidence_malformed"),
    ("oversized", SIM, "evidence_malformed"),
    ("not_found", SIM, "evidence_missing"),
]


@pytest.mark.parametrize(("mode", "policy", "code"), ADAPTER_CASES,
                         ids=[f"{m}-{c}-{i}" for i, (m, _, c) in enumerate(ADAPTER_CASES)])
def test_adapter_refusals(tmp_path, mode, policy, code):
    with pytest.raises(VerificationError) as e:
        run_adapter(tmp_path, mode, policy)
    assert e.value.code == code


def test_matching_pins_are_accepted_and_the_signer_pin_selects_the_algo(tmp_path):
    pin = "0x" + "ab" * 20
    policy = Policy(allow_simulated=True, signing_address=pin.upper().replace("0X", "0x"),
                    app_id=APP_ID, compose_hash=hashlib.sha256(b'{"services":{}}').hexdigest())

    def setup(prov: NearProvider) -> None:
        prov.gateway_address = pin
    lease, prov = run_adapter(tmp_path, "honest", policy, setup)
    assert lease.facts["signing_address"] == pin
    assert nearai.signing_algo(Policy(signing_address="ab" * 32)) == "ed25519"


@pytest.mark.parametrize("drop", ["tls_cert_fingerprint", "event_log", "intel_quote"])
def test_attestation_without_a_required_field_is_malformed(drop):
    doc = {"gateway_attestation": attestation("0x" + "aa" * 20, "bb" * 32, "cc" * 32),
           "model_attestations": []}
    del doc["gateway_attestation"][drop]
    with pytest.raises(ValueError):
        nearai.parse_report(doc)


def test_report_without_model_attestation_is_refused(tmp_path):
    def setup(prov: NearProvider) -> None:
        original = prov.report
        prov.report = lambda nonce: dict(original(nonce), model_attestations=[])  # type: ignore[method-assign]
    with pytest.raises(VerificationError) as e:
        run_adapter(tmp_path, "honest", SIM, setup)
    assert e.value.code == "evidence_missing"


def test_plain_http_route_is_refused_before_any_fetch(tmp_path):
    async def go() -> NearProvider:
        prov = NearProvider(tmp_path)
        await prov.start()
        try:
            route = prov.route()
            route.base_url = f"http://127.0.0.1:{prov.port}/v1"
            with pytest.raises(VerificationError) as e:
                async with httpx.AsyncClient(verify=False) as client:  # noqa: S501
                    await nearai.verify(client, route, SIM, 1000.0)
            assert e.value.code == "binding_mismatch"
            return prov
        finally:
            await prov.stop()
    assert asyncio.run(go()).queries == []


def test_recorded_gpu_evidence_replayed_under_our_nonce_is_refused(tmp_path):
    """A genuine NVIDIA payload from the capture, bound to the recorded nonce, not ours."""
    recorded = real_report()["model_attestations"][0]["nvidia_payload"]

    def setup(prov: NearProvider) -> None:
        prov.gpu_payload = recorded
    with pytest.raises(VerificationError) as e:
        run_adapter(tmp_path, "honest",
                    Policy(allow_simulated=True, allow_gpu_unverified_offline=True), setup)
    assert e.value.code == "binding_mismatch"


def test_gpu_required_but_absent_is_refused(tmp_path):
    with pytest.raises(VerificationError) as e:
        run_adapter(tmp_path, "honest", Policy(allow_simulated=True, require_gpu=True))
    assert e.value.code == "evidence_missing"


def run_real(tmp: Path, **policy_kw: Any):
    """The real capture served by a provider under test control, verified at its time."""
    async def go():
        prov = NearProvider(tmp, "real")
        pccs = Pccs([json.loads(f.read_text()) for f in (MODEL_COLLATERAL, GATEWAY_COLLATERAL)])
        await prov.start()
        await pccs.start()
        try:
            policy = Policy(pccs_url=pccs.url, allow_gpu_unverified_offline=True, **policy_kw)
            async with httpx.AsyncClient(verify=False) as client:  # noqa: S501
                return await nearai.verify(client, prov.route(upstream_model="Qwen/Qwen3.5-122B-A10B"),
                                           policy, CAPTURED_AT)
        finally:
            await pccs.stop()
            await prov.stop()
    return asyncio.run(go())


def test_the_real_report_is_accepted_when_it_answers_our_nonce(tmp_path, monkeypatch):
    monkeypatch.setattr(nearai.secrets, "token_hex", lambda n=32: RECORDED_NONCE)
    lease = run_real(tmp_path, allowed_tcb_status=("UpToDate", "OutOfDate"))
    assert lease.binding == "tls-spki:9133446030e5dd73e3f3c151315bf431508991ebc108f37fc01b36836af009fe"
    assert lease.evidence == "nearai" and lease.facts["simulated"] is False
    assert lease.facts["tcb_status"] == "OutOfDate"
    assert [m["tcb_status"] for m in lease.facts["models"]] == ["UpToDate"]
    assert lease.facts["gpu"] == ["unverified-offline"]
    assert lease.facts["models"][0]["gpu"]["gpu_count"] == 8


def test_the_real_report_replayed_to_a_fresh_nonce_is_refused(tmp_path):
    with pytest.raises(VerificationError) as e:
        run_real(tmp_path, allowed_tcb_status=("UpToDate", "OutOfDate"))
    assert e.value.code == "binding_mismatch"


def test_the_real_report_with_an_out_of_date_gateway_is_refused_by_default(tmp_path, monkeypatch):
    monkeypatch.setattr(nearai.secrets, "token_hex", lambda n=32: RECORDED_NONCE)
    with pytest.raises(VerificationError) as e:
        run_real(tmp_path)
    assert e.value.code == "quote_invalid"


# --- through a real Gateway -----------------------------------------------------------------

def _routes(prov: NearProvider, policy: str) -> str:
    return f"""
[[routes]]
id = "near"
model = "chat-model"
provider = "nearai"
base_url = "https://127.0.0.1:{prov.port}/v1"
attestation_url = "https://127.0.0.1:{prov.port}/v1/attestation/report"
upstream_model = "upstream-model"
evidence = "nearai"
[routes.policy]
{policy}
"""


def run_gateway(tmp: Path, mode: str, policy: str) -> tuple[httpx.Response, NearProvider, dict]:
    async def go():
        prov = NearProvider(tmp, mode)
        await prov.start()
        try:
            cfg = write_config(tmp, "unused", routes=_routes(prov, policy))
            async with gateway(cfg, LeaseStore()) as url:
                r = await post_chat(url)
                rec: dict = {}
                if r.status_code == 200:
                    async with httpx.AsyncClient() as c:
                        rec = (await c.get(f"{url}/v1/receipts/{r.headers['x-receipt-id']}")).json()
                return r, prov, rec
        finally:
            await prov.stop()
    return asyncio.run(go())


def test_gateway_serves_an_honest_near_provider_over_the_pinned_tls(tmp_path):
    r, prov, rec = run_gateway(tmp_path, "honest", "allow_simulated = true")
    assert r.status_code == 200, r.text
    assert len(prov.received) == 1 and MARKER.encode() in prov.received[0]
    up = rec["receipt"]["upstream"]
    assert up["verified"] is True and up["evidence"] == "nearai-simulated"
    assert up["binding"] == f"tls-spki:{prov.fingerprint}"


GATEWAY_CASES = [
    ("tls_key_swapped", "allow_simulated = true", "binding_mismatch"),
    ("replayed", "allow_simulated = true", "binding_mismatch"),
    ("not_bound", "allow_simulated = true", "binding_mismatch"),
    ("wrong_measurement", f'allow_simulated = true\nallowed_measurements = [{{mr_td = "{MR_TD.hex()}"}}]',
     "measurement_mismatch"),
    ("malformed", "allow_simulated = true", "evidence_malformed"),
    ("not_found", "allow_simulated = true", "evidence_missing"),
    ("honest", "allow_simulated = false", "simulated_not_allowed"),
]


@pytest.mark.parametrize(("mode", "policy", "code"), GATEWAY_CASES,
                         ids=[f"{m}-{c}" for m, _, c in GATEWAY_CASES])
def test_gateway_refuses_and_no_prompt_byte_moves(tmp_path, mode, policy, code):
    r, prov, _ = run_gateway(tmp_path, mode, policy)
    assert r.status_code in (502, 503), r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert "near" in err["message"]
    assert prov.received == []  # not one byte of the prompt reached the provider
    assert MARKER not in r.text
