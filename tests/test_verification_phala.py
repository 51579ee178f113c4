"""The Phala (vllm-proxy) adapter: a real recorded report, then a provider under test control.

(a) The real report (tests/fixtures/providers/phala/SOURCE.md) proves the
report-data layout, the event-log replay and the GPU binding match what the
real proxy produces; its real quote, lacking Intel collateral here, is refused.
(b) A local aiohttp provider serves Phala-shaped reports with simulated quotes;
each way of lying is refused with its stable code, and through a real Gateway
the provider receives zero prompt bytes when refused.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from eth_keys import keys as eth_keys

from gateway.api.config import RouteSpec
from gateway.verification import nvidia, phala, tdx
from gateway.verification.base import MAX_EVIDENCE, Policy, VerificationError
from gateway.verification.lease import LeaseStore
from tests.test_gateway_fakes import (
    MARKER,
    OK_COMPLETION,
    post_chat,
    tls_server_context,
    write_config,
)
from tests.test_verification_failclosed import gateway
from tests.test_verification_nvidia import GpuTestCa
from verifier import receipt as receipts
from verifier.tee import eventlog
from verifier.tee.quote import build_simulated_quote

FIXTURES = Path(__file__).parent / "fixtures" / "providers" / "phala"
REPORT = json.loads((FIXTURES / "attestation_report.json").read_text())
SIGNATURES = json.loads((FIXTURES / "signatures.json").read_text())
REAL_NONCE = bytes.fromhex(REPORT["request_nonce"])

SIGNER = eth_keys.PrivateKey(hashlib.sha256(b"pag test vllm-proxy signer").digest())
ADDRESS = SIGNER.public_key.to_checksum_address()  # the attested response-signing key
MR_TD = bytes.fromhex("a1" * 48)
APP_ID, COMPOSE_HASH = "2c" * 20, "24" * 32
OK_POLICY = {"allow_simulated": True, "allow_gpu_unverified_offline": True,
             "allow_signature_binding": True}


# --- (a) the real report -------------------------------------------------------------------

def test_real_report_data_is_signing_address_then_recorded_nonce():
    rd = tdx.parse(bytes.fromhex(REPORT["intel_quote"])).report.report_data
    assert tdx.same(rd, phala.expected_report_data(REPORT["signing_address"], REAL_NONCE))
    assert not tdx.same(rd, phala.expected_report_data(REPORT["signing_address"], bytes(32)))
    assert not tdx.same(rd, phala.expected_report_data("0x" + "00" * 20, REAL_NONCE))
    assert not tdx.same(rd, phala.expected_report_data(REPORT["signing_address"], REAL_NONCE,
                                                       "00" * 32))


def test_real_quote_parses_and_its_event_log_replays_to_rtmr3():
    q = tdx.parse(bytes.fromhex(REPORT["intel_quote"]))
    tcb = REPORT["info"]["tcb_info"]
    assert q.version == 4 and q.report.mr_td.hex() == tcb["mrtd"]
    replay = eventlog.replay(REPORT["event_log"])
    assert replay.rtmr3 == q.report.rtmr3
    assert (replay.app_id, replay.compose_hash) == (REPORT["info"]["app_id"],
                                                    REPORT["info"]["compose_hash"])


def test_real_gpu_evidence_is_bound_to_the_recorded_nonce():
    allow = Policy(allow_gpu_unverified_offline=True)
    facts = nvidia.check_gpu(REPORT["nvidia_payload"], REAL_NONCE.hex(), allow)
    assert facts["gpu"] == "unverified-offline" and facts["gpu_count"] == 8
    with pytest.raises(VerificationError) as e:
        nvidia.check_gpu(REPORT["nvidia_payload"], REAL_NONCE.hex(), Policy())
    assert e.value.code == "gpu_unverified"


@pytest.mark.parametrize("sig", SIGNATURES, ids=lambda s: s["signing_address"][:10])
def test_real_response_signatures_recover_to_their_signing_address(sig):
    text, signature, address = sig["text"], sig["signature"], sig["signing_address"]
    assert phala.verify_response_signature(text, signature, address)
    assert phala.verify_response_signature(text, signature, address.lower())
    flipped_text = text[:-1] + format(int(text[-1], 16) ^ 1, "x")
    assert not phala.verify_response_signature(flipped_text, signature, address)
    raw = bytearray(bytes.fromhex(signature[2:]))
    raw[10] ^= 1
    assert not phala.verify_response_signature(text, "0x" + raw.hex(), address)
    assert not phala.verify_response_signature(text, signature, "0x" + "11" * 20)


def test_real_report_passes_every_other_check_once_its_quote_is_vouched_for(tmp_path,
                                                                          monkeypatch):
    """With the quote check stubbed (no Intel collateral here) and the recorded nonce
    replayed as ours, the whole real report goes through the adapter."""
    async def vouched(raw: bytes, policy: Policy, now: float) -> tdx.VerifiedQuote:
        return tdx.VerifiedQuote(tdx.parse(raw), False, "UpToDate")

    monkeypatch.setattr(tdx, "verify_quote", vouched)
    monkeypatch.setattr(phala.secrets, "token_bytes", lambda n: REAL_NONCE)
    tcb = REPORT["info"]["tcb_info"]
    policy = {"allow_gpu_unverified_offline": True, "allow_signature_binding": True,
              "signing_address": REPORT["signing_address"],
              "app_id": REPORT["info"]["app_id"], "compose_hash": REPORT["info"]["compose_hash"],
              "allowed_measurements": [{"mr_td": tcb["mrtd"], "rtmr3": tcb["rtmr3"]}]}
    lease = asyncio.run(_verify_against(Provider("real"), policy, tmp_path))
    assert lease.evidence == "phala"
    assert lease.binding == "signing-address:0x56d070df1c6be444b007839ef9cf67cec7c12b8b"
    assert lease.facts == {"signing_address": REPORT["signing_address"], "mr_td": tcb["mrtd"],
                           "tcb_status": "UpToDate", "simulated": False,
                           "app_id": REPORT["info"]["app_id"],
                           "compose_hash": REPORT["info"]["compose_hash"],
                           "gpu": "unverified-offline", "gpu_count": 8, "gpu_arch": "HOPPER",
                           "gpu_root_spki_sha256": nvidia.NVIDIA_DEVICE_ROOT_SPKI_SHA256}


def test_real_quote_without_collateral_is_refused_fail_closed(tmp_path):
    err = asyncio.run(_verify_against(Provider("real"), dict(OK_POLICY), tmp_path))
    assert isinstance(err, VerificationError) and err.code == "quote_invalid", err
    assert "collateral" in err.reason


# --- (b) a provider under test control -----------------------------------------------------

class Provider:
    """Serves vllm-proxy shaped reports (simulated quotes) and chat; records every body."""

    def __init__(self, mode: str = "honest", tls: bool = False) -> None:
        self.mode, self.tls = mode, tls
        self.ca = GpuTestCa()
        self.queries: list[dict[str, str]] = []
        self.bodies: list[bytes] = []
        self.received: list[bytes] = []
        self.spki: str | None = None
        self.runner: web.AppRunner | None = None
        self.http_port = self.tls_port = 0

    async def start(self, tmp: Path) -> None:
        app = web.Application()
        app.router.add_get("/v1/attestation/report", self._attest)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_get("/v1/signature/{chat_id}", self._signature)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.http_port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        if self.tls:
            ctx, self.spki = tls_server_context(tmp)
            tls = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
            await tls.start()
            self.tls_port = tls._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    def route(self, policy: dict[str, Any], https: bool = False) -> RouteSpec:
        base = (f"https://127.0.0.1:{self.tls_port}/v1" if https
                else f"http://127.0.0.1:{self.http_port}/v1")
        return RouteSpec(id="ph", model="chat-model", provider="phala", base_url=base,
                         upstream_model="phala/test-model", evidence="phala", policy=policy,
                         attestation_url=f"http://127.0.0.1:{self.http_port}/v1/attestation/report")

    def report(self, nonce: str) -> dict[str, Any]:
        events = [eventlog.runtime_event("app-id", bytes.fromhex(APP_ID)),
                  eventlog.runtime_event("compose-hash", bytes.fromhex(COMPOSE_HASH))]
        rtmr3 = eventlog.replay_rtmr3(events)
        if self.mode == "event_log_forged":  # the log claims another compose hash
            events[1] = eventlog.runtime_event("compose-hash", bytes(32))
        quote_nonce = "ee" * 32 if self.mode == "replayed" else nonce
        bound = "0x" + "00" * 20 if self.mode == "unbound" else ADDRESS
        rd = phala.expected_report_data(bound, bytes.fromhex(quote_nonce), self.spki)
        quote = build_simulated_quote(rd, mr_td=MR_TD, rtmrs=(bytes(48),) * 3 + (rtmr3,))
        gpu_nonce = "dd" * 32 if self.mode == "gpu_nonce" else nonce
        doc = {"signing_address": ADDRESS, "signing_algo": "ecdsa", "request_nonce": nonce,
               "intel_quote": quote.hex(), "nvidia_payload": self.ca.payload(gpu_nonce),
               "event_log": json.loads(eventlog.dumps_event_log(events)),
               "info": {"app_id": APP_ID, "compose_hash": COMPOSE_HASH}}
        if self.spki:
            doc["tls_cert_fingerprint"] = self.spki
        return doc

    async def _attest(self, request: web.Request) -> web.Response:
        self.queries.append(dict(request.query))
        nonce = request.query.get("nonce", "")
        if self.mode == "missing":
            return web.Response(status=404)
        if self.mode == "malformed":
            body = b"{not json"
        elif self.mode == "oversized":
            body = b" " * (MAX_EVIDENCE + 1) + b"{}"
        elif self.mode == "real":
            body = json.dumps(REPORT).encode()
        else:
            body = json.dumps(self.report(nonce)).encode()
        self.bodies.append(body)
        return web.Response(body=body, content_type="application/json")

    async def _chat(self, request: web.Request) -> web.Response:
        self.received.append(await request.read())
        self.sent = OK_COMPLETION
        return web.Response(body=self.sent, content_type="application/json")

    async def _signature(self, request: web.Request) -> web.Response:
        """vllm-proxy's per-response signature: personal_sign of `sha256(req):sha256(resp)`."""
        if self.mode == "sig_missing" or request.match_info["chat_id"] != "chatcmpl-1":
            return web.Response(status=404)
        resp = b"tampered" if self.mode == "sig_wrong_text" else self.sent
        text = f"{hashlib.sha256(self.received[-1]).hexdigest()}:{hashlib.sha256(resp).hexdigest()}"
        key = eth_keys.PrivateKey(bytes(31) + b"\x07") if self.mode == "sig_wrong_key" else SIGNER
        msg = b"\x19Ethereum Signed Message:\n" + str(len(text)).encode() + text.encode()
        sig = key.sign_msg_hash(phala._keccak256(msg)).to_bytes()
        sig = sig[:64] + bytes([sig[64] + 27])
        return web.json_response({"text": text, "signature": "0x" + sig.hex(),
                                  "signing_address": ADDRESS, "signing_algo": "ecdsa"})


async def _verify_against(provider: Provider, policy: dict[str, Any], tmp: Path,
                          https: bool = False) -> Any:
    """The lease phala.verify yields against `provider`, or its VerificationError."""
    await provider.start(tmp)
    try:
        async with httpx.AsyncClient() as client:
            return await phala.verify(client, provider.route(policy, https),
                                      Policy.from_dict(policy), now=1000.0)
    except VerificationError as e:
        return e
    finally:
        await provider.stop()


@pytest.fixture
def trust_test_gpus(monkeypatch):
    """Every Provider's GPU CA is trusted (a real NVIDIA chain cannot be minted in tests)."""
    trusted: set[str] = set()
    monkeypatch.setattr(nvidia, "TRUSTED_ROOTS", trusted)
    real_init = GpuTestCa.__init__

    def init(self: GpuTestCa) -> None:
        real_init(self)
        trusted.add(self.spki_sha256)

    monkeypatch.setattr(GpuTestCa, "__init__", init)


def test_honest_provider_yields_a_signing_address_lease(tmp_path, trust_test_gpus):
    p = Provider("honest")
    lease = asyncio.run(_verify_against(p, dict(OK_POLICY), tmp_path))
    assert lease.evidence == "phala-simulated" and lease.verified
    assert lease.binding == f"signing-address:{ADDRESS.lower()}"
    assert (lease.verified_at, lease.expires_at) == (1000.0, 1300.0)
    assert lease.evidence_digest == hashlib.sha256(p.bodies[0]).hexdigest()
    assert lease.facts == {"signing_address": ADDRESS.lower(), "mr_td": MR_TD.hex(),
                           "tcb_status": None, "simulated": True, "app_id": APP_ID,
                           "compose_hash": COMPOSE_HASH, "gpu": "unverified-offline",
                           "gpu_count": 2, "gpu_arch": "HOPPER",
                           "gpu_root_spki_sha256": p.ca.spki_sha256}
    (q,) = p.queries
    assert q["model"] == "phala/test-model" and q["signing_algo"] == "ecdsa"
    assert len(bytes.fromhex(q["nonce"])) == 32 and q["include_tls_fingerprint"] == "true"


def test_fresh_nonce_per_verification(tmp_path, trust_test_gpus):
    async def twice() -> list[str]:
        p = Provider("honest")
        await p.start(tmp_path)
        try:
            async with httpx.AsyncClient() as client:
                for _ in range(2):
                    await phala.verify(client, p.route(OK_POLICY), Policy.from_dict(OK_POLICY), 0)
        finally:
            await p.stop()
        return [q["nonce"] for q in p.queries]

    first, second = asyncio.run(twice())
    assert first != second


def test_tls_fingerprint_in_report_data_yields_a_tls_spki_lease(tmp_path, trust_test_gpus):
    p = Provider("honest", tls=True)
    lease = asyncio.run(_verify_against(p, dict(OK_POLICY), tmp_path, https=True))
    assert lease.binding == f"tls-spki:{p.spki}" and lease.tls_spki_sha256 == p.spki


def test_tls_fingerprint_on_a_plain_http_route_is_refused(tmp_path, trust_test_gpus):
    err = asyncio.run(_verify_against(Provider("honest", tls=True), dict(OK_POLICY), tmp_path))
    assert isinstance(err, VerificationError) and err.code == "binding_mismatch", err
    assert "not HTTPS" in err.reason


REFUSALS = [
    ("replayed", {}, "binding_mismatch", "report data"),
    ("unbound", {}, "binding_mismatch", "report data"),
    ("gpu_nonce", {}, "binding_mismatch", "GPU payload nonce"),
    ("event_log_forged", {}, "measurement_mismatch", "does not replay"),
    ("malformed", {}, "evidence_malformed", "not JSON"),
    ("oversized", {}, "evidence_malformed", "1 MiB"),
    ("missing", {}, "evidence_missing", "404"),
    ("honest", {"allowed_measurements": [{"mr_td": "00" * 48}]}, "measurement_mismatch",
     "allowed sets"),
    ("honest", {"compose_hash": "00" * 32}, "measurement_mismatch", "compose_hash"),
    ("honest", {"signing_address": "0x" + "11" * 20}, "binding_mismatch", "pinned"),
    ("honest", {"allow_simulated": False}, "simulated_not_allowed", "simulated"),
    ("honest", {"allow_gpu_unverified_offline": False}, "gpu_unverified", "NRAS"),
    ("honest", {"allow_signature_binding": False}, "binding_mismatch", "cannot be pinned"),
]


@pytest.mark.parametrize(("mode", "policy", "code", "why"), REFUSALS,
                         ids=[f"{m}-{'-'.join(p) or 'default'}" for m, p, _, _ in REFUSALS])
def test_refusals(tmp_path, trust_test_gpus, mode, policy, code, why):
    err = asyncio.run(_verify_against(Provider(mode), {**OK_POLICY, **policy}, tmp_path))
    assert isinstance(err, VerificationError), err
    assert err.code == code and why in err.reason, err


def test_pinned_values_that_match_are_accepted(tmp_path, trust_test_gpus):
    policy = {**OK_POLICY, "signing_address": ADDRESS.upper().replace("0X", "0x"),
              "app_id": APP_ID, "compose_hash": COMPOSE_HASH,
              "allowed_measurements": [{"mr_td": MR_TD.hex()}]}
    lease = asyncio.run(_verify_against(Provider("honest"), policy, tmp_path))
    assert lease.facts["compose_hash"] == COMPOSE_HASH


# --- through a real Gateway: refused routes receive zero prompt bytes ----------------------

def _routes(p: Provider, policy: str) -> str:
    return f"""
[[routes]]
id = "ph"
model = "chat-model"
provider = "phala"
base_url = "{f'https://127.0.0.1:{p.tls_port}' if p.tls else f'http://127.0.0.1:{p.http_port}'}/v1"
attestation_url = "http://127.0.0.1:{p.http_port}/v1/attestation/report"
upstream_model = "phala/test-model"
evidence = "phala"
[routes.policy]
{policy}
"""


def _through_gateway(tmp: Path, p: Provider, policy: str) -> httpx.Response:
    """One chat call through a real Gateway to `p`."""
    return _call_with_receipt(tmp, p, policy)[0]


GATEWAY_POLICY = "allow_simulated = true\nallow_gpu_unverified_offline = true"


@pytest.mark.parametrize(("mode", "code"), [("replayed", "binding_mismatch"),
                                            ("gpu_nonce", "binding_mismatch"),
                                            ("real", "quote_invalid")])
def test_gateway_refuses_and_no_prompt_byte_moves(tmp_path, trust_test_gpus, mode, code):
    p = Provider(mode)
    r = _through_gateway(tmp_path, p, GATEWAY_POLICY)
    assert r.status_code in (502, 503), r.text
    assert r.json()["error"]["code"] == code
    assert p.queries and p.received == []  # asked for evidence, never sent the prompt
    assert MARKER not in r.text


def test_gateway_serves_through_an_honest_provider_over_the_attested_tls_key(
        tmp_path, trust_test_gpus):
    p = Provider("honest", tls=True)
    r = _through_gateway(tmp_path, p, GATEWAY_POLICY)
    assert r.status_code == 200, r.text
    assert len(p.received) == 1 and MARKER.encode() in p.received[0]


def test_gateway_refuses_a_report_binding_no_tls_key_by_default(tmp_path, trust_test_gpus):
    p = Provider("honest")
    r = _through_gateway(tmp_path, p, GATEWAY_POLICY)
    assert r.status_code == 502 and r.json()["error"]["code"] == "binding_mismatch", r.text
    assert p.queries and p.received == []


SIGNED_POLICY = GATEWAY_POLICY + "\nallow_signature_binding = true"


def _call_with_receipt(tmp: Path, p: Provider, policy: str, stream: bool = False
                       ) -> tuple[httpx.Response, dict[str, Any]]:
    """One chat call through a real Gateway to `p`, and the receipt it got."""
    async def run() -> tuple[httpx.Response, dict[str, Any]]:
        await p.start(tmp)
        try:
            cfg = write_config(tmp, "unused", routes=_routes(p, policy))
            async with gateway(cfg, LeaseStore()) as url, httpx.AsyncClient() as c:
                r = await post_chat(url, stream=stream)
                rec = await c.get(f"{url}/v1/receipts/{r.headers['x-receipt-id']}")
                return r, rec.json()["receipt"]
        finally:
            await p.stop()

    return asyncio.run(run())


def test_signature_bound_route_serves_a_response_signed_by_the_attested_key(
        tmp_path, trust_test_gpus):
    p = Provider("honest")
    r, receipt = _call_with_receipt(tmp_path, p, SIGNED_POLICY)
    assert r.status_code == 200, r.text
    assert receipt["upstream"]["binding"] == f"signing-address:{ADDRESS.lower()}"
    assert receipt["upstream"]["response_signature"] == "verified"
    salt = bytes.fromhex(r.headers["x-receipt-salt"])
    assert receipt["provider_response_hash"] == receipts.digest(salt, p.sent)


@pytest.mark.parametrize("mode", ["sig_wrong_key", "sig_wrong_text", "sig_missing"])
def test_response_without_a_valid_signature_is_withheld(tmp_path, trust_test_gpus, mode):
    p = Provider(mode)
    r = _through_gateway(tmp_path, p, SIGNED_POLICY)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "response_signature_invalid"
    assert '"ok"' not in r.text  # the unverified completion never reaches the client


def test_signature_bound_route_refuses_streams_before_sending(tmp_path, trust_test_gpus):
    p = Provider("honest")
    r, receipt = _call_with_receipt(tmp_path, p, SIGNED_POLICY, stream=True)
    assert r.status_code == 502 and r.json()["error"]["code"] == "binding_mismatch", r.text
    assert p.received == []
    assert receipt["refusal"]["code"] == "binding_mismatch" and receipt["forwarded_hash"] is None
