"""The Tinfoil adapter: a real Sigstore release, real attestation documents, and
adversarial providers end to end through a real Gateway (zero prompt bytes).

Fixtures and their sources: tests/fixtures/providers/tinfoil/SOURCE.md.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway.verification import tdx, tinfoil
from gateway.verification.base import Policy, VerificationError
from gateway.verification.lease import LeaseStore
from gateway.verification.sigstore_release import ReleaseError, parse_statement, verify_release
from tests.test_gateway_fakes import (
    API_KEY,
    MARKER,
    RecordingProvider,
    post_chat,
    tls_server_context,
    write_config,
)
from tests.test_verification_failclosed import gateway as running_gateway
from tlog.http1 import spki_sha256
from verifier.tee.quote import build_simulated_quote

FIX = Path(__file__).parent / "fixtures" / "providers" / "tinfoil"
BUNDLE = FIX / "sigstore_bundle.json"
ROOT = str(FIX / "trusted_root.json")
RELEASE = json.loads((FIX / "sigstore_bundle.expected.json").read_text())
REAL_TDX = json.loads((FIX / "tdx_attestation.expected.json").read_text())
# Platform hw1 of tinfoilsh/hardware-measurements (see SOURCE.md).
HW_MRTD = "7357a10d2e2724dffe68813e3cc4cfcde6814d749f2fb62e3953e54f6e0b50a219786afe2cd478f684b52c61837e1114"
HW_RTMR0 = "5c70e5e513f82d930e4740228a51a96fb981dd8e63a583aae5d71c84caaa06c1241c4eaf46faab066d0120e44bf5a1e1"
NOW = float(RELEASE["rekor_integrated_time"] + 86400 * 300)  # any fixed time: no wall clock


def policy(**kw: Any) -> Policy:
    base: dict[str, Any] = {"allow_simulated": True, "sigstore_bundle": str(BUNDLE),
                            "sigstore_identity": RELEASE["identity"], "sigstore_trusted_root": ROOT,
                            "allowed_measurements": ({"mr_td": HW_MRTD, "rtmr0": HW_RTMR0},)}
    base.update(kw)
    return Policy(**base)


def tampered_statement(bundle: dict, old: str, new: str) -> dict:
    """The bundle with one byte of its DSSE statement changed (signature untouched)."""
    env = bundle["dsseEnvelope"]
    payload = base64.b64decode(env["payload"])
    assert payload.count(old.encode()) == 1
    env = dict(env, payload=base64.b64encode(payload.replace(old.encode(), new.encode())).decode())
    return dict(bundle, dsseEnvelope=env)


# --- (a) the real release bundle, verified offline ----------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a: Any, **k: Any) -> None:
        raise AssertionError("network access during offline verification")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_real_bundle_verifies_offline_and_yields_the_released_measurements(no_network):
    rel = verify_release(BUNDLE.read_bytes(), ROOT, RELEASE["identity"], RELEASE["issuer"])
    assert (rel.predicate_type, rel.subject_name, rel.digest) == (
        RELEASE["predicate_type"], RELEASE["subject_name"], RELEASE["digest"])
    assert (rel.snp_measurement, rel.rtmr1, rel.rtmr2) == (
        RELEASE["snp_measurement"], RELEASE["rtmr1"], RELEASE["rtmr2"])


@pytest.mark.parametrize(("identity", "issuer", "why"), [
    (RELEASE["identity"].replace("v0.0.38", "v0.0.39"), RELEASE["issuer"], "SANs"),
    (RELEASE["identity"].replace("confidential-model-router", "confidential-other"),
     RELEASE["issuer"], "SANs"),
    (RELEASE["identity"], "https://accounts.google.com", "OIDCIssuerV2"),
], ids=["other-tag", "other-repo", "other-issuer"])
def test_wrong_signer_identity_is_refused(identity, issuer, why):
    with pytest.raises(ReleaseError, match=why):
        verify_release(BUNDLE.read_bytes(), ROOT, identity, issuer)


def test_one_byte_change_to_the_statement_is_refused():
    bundle = json.loads(BUNDLE.read_text())
    rtmr1 = RELEASE["rtmr1"]
    bad = tampered_statement(bundle, rtmr1, ("b" if rtmr1[0] != "b" else "c") + rtmr1[1:])
    with pytest.raises(ReleaseError, match="invalid signature"):
        verify_release(json.dumps(bad).encode(), ROOT, RELEASE["identity"], RELEASE["issuer"])


def test_a_trusted_root_without_the_signers_is_refused(tmp_path):
    root = json.loads(Path(ROOT).read_text())
    root["certificateAuthorities"] = root["certificateAuthorities"][:1]  # the retired CA only
    (tmp_path / "root.json").write_text(json.dumps(root))
    with pytest.raises(ReleaseError, match="chain"):
        verify_release(BUNDLE.read_bytes(), str(tmp_path / "root.json"), RELEASE["identity"],
                       RELEASE["issuer"])


def _statement(**over: Any) -> bytes:
    st: dict[str, Any] = {
        "_type": "https://in-toto.io/Statement/v1",
        "subject": [{"name": "x", "digest": {"sha256": RELEASE["digest"]}}],
        "predicateType": RELEASE["predicate_type"],
        "predicate": {"snp_measurement": RELEASE["snp_measurement"],
                      "tdx_measurement": {"rtmr1": RELEASE["rtmr1"], "rtmr2": RELEASE["rtmr2"]}}}
    st.update(over)
    return json.dumps(st).encode()


@pytest.mark.parametrize(("payload_type", "payload"), [
    ("application/json", _statement()),
    ("application/vnd.in-toto+json", _statement(extra=1)),
    ("application/vnd.in-toto+json",
     _statement(predicateType="https://tinfoil.sh/predicate/hardware-measurements/v1")),
    ("application/vnd.in-toto+json", _statement(subject=[])),
    ("application/vnd.in-toto+json", _statement(predicate={"snp_measurement": "00" * 48,
                                                           "tdx_measurement": {"rtmr1": "00"}})),
], ids=["payload-type", "unknown-field", "predicate-type", "no-subject", "short-rtmr"])
def test_statement_is_parsed_strictly(payload_type, payload):
    assert parse_statement("application/vnd.in-toto+json", _statement()).rtmr2 == RELEASE["rtmr2"]
    with pytest.raises(ReleaseError):
        parse_statement(payload_type, payload)


# --- (b) real attestation documents --------------------------------------------

def test_real_tdx_document_decodes_to_the_layout_tinfoil_states():
    doc = tinfoil.decode_document((FIX / "tdx_attestation.json").read_bytes())
    assert doc.format == tinfoil.TDX_GUEST_V2 == REAL_TDX["format"]
    q = tdx.parse(doc.report)
    assert (q.version, q.report.td_attributes.hex()) == (4, "0000001000000000")
    assert tinfoil.split_report_data(q.report.report_data) == (
        REAL_TDX["tls_public_key"], REAL_TDX["hpke_public_key"])
    m = tdx.VerifiedQuote(q, False, None).measurements()
    assert [m[k] for k in ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3")] == REAL_TDX["registers"]
    tinfoil.check_td(q.report)  # a production TD passes the TD-shape checks


def test_real_report_data_binds_the_real_enclave_certificate():
    """SEV-SNP report data (offset 0x50) begins with the fingerprint as this adapter computes it."""
    atc = json.loads((FIX / "atc_bundle_sev.json").read_text())
    doc = tinfoil.decode_document(json.dumps(atc["enclaveAttestationReport"]).encode())
    assert doc.format == tinfoil.SEV_GUEST_V2 and len(doc.report) == 1184
    tls_fp, hpke = tinfoil.split_report_data(doc.report[0x50:0x90])
    cert = x509.load_pem_x509_certificate(atc["enclaveCert"].encode())
    assert tls_fp == spki_sha256(cert.public_bytes(serialization.Encoding.DER)).hex()
    assert atc["digest"] == RELEASE["digest"]  # the same release as the Sigstore fixture


@dataclass
class Route:
    base_url: str = "https://enclave.test/v1"
    attestation_url: str = ""
    id: str = "t"
    provider: str = "tinfoil"


async def _verify_served(body: bytes, pol: Policy, status: int = 200) -> Any:
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        return httpx.Response(status, content=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
        try:
            return await tinfoil.verify(client, Route(), pol, NOW)
        finally:
            assert seen in ([], ["https://enclave.test/.well-known/tinfoil-attestation"])


@pytest.mark.parametrize(("fixture", "code"), [
    ("tdx_attestation.json", "quote_invalid"), ("sev", "unsupported_evidence")])
def test_real_documents_without_a_verifier_are_refused(fixture, code):
    if fixture == "sev":
        atc = json.loads((FIX / "atc_bundle_sev.json").read_text())
        body = json.dumps(atc["enclaveAttestationReport"]).encode()
    else:
        body = (FIX / fixture).read_bytes()
    with pytest.raises(VerificationError) as e:
        asyncio.run(_verify_served(body, policy()))  # no collateral configured
    assert e.value.code == code


def _doc(report: bytes, fmt: str = tinfoil.TDX_GUEST_V2) -> bytes:
    return json.dumps({"format": fmt,
                       "body": base64.b64encode(gzip.compress(report)).decode()}).encode()


@pytest.mark.parametrize(("body", "code"), [
    (b"{not json", "evidence_malformed"),
    (b'{"format": "https://tinfoil.sh/predicate/tdx-guest/v2"}', "evidence_malformed"),
    (b'{"format": "https://tinfoil.sh/predicate/tdx-guest/v2", "body": "!!"}',
     "evidence_malformed"),
    (json.dumps({"format": tinfoil.TDX_GUEST_V2,
                 "body": base64.b64encode(b"not gzip").decode()}).encode(), "evidence_malformed"),
    (_doc(bytes(1 << 20)), "evidence_malformed"),  # a gzip bomb: 1 MiB of zeros
    (_doc(b"x", fmt="https://tinfoil.sh/predicate/tdx-guest/v9"), "evidence_malformed"),
    (_doc(b"\x04\x00" + bytes(100)), "quote_invalid"),
    (b" " * ((1 << 20) + 1), "evidence_malformed"),
], ids=["not-json", "no-body", "not-base64", "not-gzip", "gzip-bomb", "unknown-format",
        "not-a-quote", "too-large"])
def test_malformed_documents_are_refused(body, code):
    with pytest.raises(VerificationError) as e:
        asyncio.run(_verify_served(body, policy()))
    assert e.value.code == code


@pytest.mark.parametrize(("kw", "code"), [
    ({"sigstore_bundle": None}, "upstream_unverified"),
    ({"sigstore_identity": RELEASE["identity"].replace("v0.0.38", "v0.0.1")},
     "measurement_mismatch"),
], ids=["no-bundle", "wrong-identity"])
def test_release_problems_refuse_before_contacting_the_provider(kw, code):
    with pytest.raises(VerificationError) as e:
        asyncio.run(_verify_served(b"", policy(**kw), status=500))
    assert e.value.code == code


# --- (c) end to end: a local HTTPS provider under test control -----------------

def _hex(h: str) -> bytes:
    return bytes.fromhex(h)


class Provider(RecordingProvider):
    """A Tinfoil-shaped enclave on loopback TLS, recording every chat body it gets."""

    def __init__(self, mode: str, tmp: Path) -> None:
        super().__init__()
        self.mode, self.tmp = mode, tmp
        self.hpke = os.urandom(32)

    def document(self) -> bytes:
        fp = _hex(self.attested_spki)
        rtmr1 = RELEASE["rtmr1"]
        if self.mode == "report_data_unbound":
            fp = bytes(32)
        if self.mode in ("not_released", "bundle_tampered"):
            rtmr1 = "00" * 48  # code other than the release's
        debug = bytes([self.mode == "debug_td"]) + bytes(7)
        quote = build_simulated_quote(fp + self.hpke, mr_td=_hex(HW_MRTD), rtmrs=(
            _hex(HW_RTMR0), _hex(rtmr1), _hex(RELEASE["rtmr2"]), bytes(48)), td_attributes=debug)
        if self.mode == "malformed":
            return json.dumps({"format": tinfoil.TDX_GUEST_V2, "body": quote.hex()}).encode()
        return _doc(quote)

    async def start(self) -> None:
        d = self.tmp / "attested"
        d.mkdir()
        attested_ctx, self.attested_spki = tls_server_context(d)
        ctx: ssl.SSLContext = attested_ctx
        if self.mode in ("tls_key_swapped", "tls_key_swapped_on_attestation"):
            ctx, _ = tls_server_context(self.tmp)  # serves a key other than the attested one
        app = web.Application()
        app.router.add_get(tinfoil.ATTESTATION_PATH, self._attest)
        app.router.add_post("/v1/chat/completions", self._chat)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        tls = web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx)
        await tls.start()
        plain = web.TCPSite(self.runner, "127.0.0.1", 0)
        await plain.start()
        self.tls_port = tls._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.http_port = plain._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def _attest(self, request: web.Request) -> web.Response:
        return web.Response(body=self.document(), content_type="application/json")

    def routes(self, *, https: bool = True, attest_over_tls: bool = True,
               policy_toml: str = "allow_simulated = true") -> str:
        base = (f"https://127.0.0.1:{self.tls_port}/v1" if https
                else f"http://127.0.0.1:{self.http_port}/v1")
        attest = (f"https://127.0.0.1:{self.tls_port}" if attest_over_tls
                  else f"http://127.0.0.1:{self.http_port}") + tinfoil.ATTESTATION_PATH
        return f"""
[[routes]]
id = "tf"
model = "chat-model"
provider = "tinfoil-test"
base_url = "{base}"
attestation_url = "{attest}"
upstream_model = "u"
evidence = "tinfoil"
[routes.policy]
{policy_toml}
sigstore_bundle = "{self.bundle}"
sigstore_identity = "{RELEASE["identity"]}"
sigstore_trusted_root = "{ROOT}"
allowed_measurements = [{{mr_td = "{HW_MRTD}", rtmr0 = "{HW_RTMR0}"}}]
"""

    @property
    def bundle(self) -> str:
        if self.mode != "bundle_tampered":
            return str(BUNDLE)
        bad = tampered_statement(json.loads(BUNDLE.read_text()), RELEASE["rtmr1"],
                                 "00" * 48)  # the statement now "releases" what the TD runs
        path = self.tmp / "tampered.json"
        path.write_text(json.dumps(bad))
        return str(path)


def _run(tmp_path: Path, mode: str, **route_kw: Any) -> tuple[httpx.Response, Provider, dict]:
    async def run() -> tuple[httpx.Response, Provider, dict]:
        prov = Provider(mode, tmp_path)
        try:
            await prov.start()
            cfg = write_config(tmp_path, "unused", routes=prov.routes(**route_kw))
            async with running_gateway(cfg, LeaseStore()) as url, \
                    httpx.AsyncClient(timeout=30) as c:
                r = await post_chat(url)
                rec = {}
                if r.status_code == 200:
                    rec = (await c.get(f"{url}/v1/receipts/{r.headers['x-receipt-id']}",
                                  headers={"Authorization": f"Bearer {API_KEY}"})).json()
                return r, prov, rec
        finally:
            await prov.stop()

    return asyncio.run(run())


def test_honest_enclave_is_verified_and_served(tmp_path):
    r, prov, rec = _run(tmp_path, "honest")
    assert r.status_code == 200, r.text
    assert len(prov.received) == 1 and MARKER.encode() in prov.received[0]
    up = rec["receipt"]["upstream"]
    assert up["verified"] is True and up["evidence"] == "tinfoil-simulated"
    assert up["binding"] == f"tls-spki:{prov.attested_spki}"


def test_lease_facts_record_hpke_key_release_and_measurements(tmp_path):
    async def run() -> tuple[Any, Provider]:
        prov = Provider("honest", tmp_path)
        await prov.start()
        try:
            route = Route(base_url=f"https://127.0.0.1:{prov.tls_port}/v1")
            async with httpx.AsyncClient(verify=False) as client:  # noqa: S501 - pinned by quote
                return await tinfoil.verify(client, route, policy(), NOW), prov
        finally:
            await prov.stop()

    lease, prov = asyncio.run(run())
    assert lease.binding == f"tls-spki:{prov.attested_spki}"
    assert lease.facts["hpke_public_key"] == prov.hpke.hex()
    assert lease.facts["release_digest"] == RELEASE["digest"]
    assert lease.facts["measurements"]["rtmr1"] == RELEASE["rtmr1"]
    assert lease.facts["simulated"] is True and lease.expires_at == NOW + 300


CASES = [
    ("not_released", {}, "measurement_mismatch"),
    ("report_data_unbound", {}, "binding_mismatch"),
    ("tls_key_swapped_on_attestation", {}, "binding_mismatch"),
    ("tls_key_swapped", {"attest_over_tls": False}, "binding_mismatch"),
    ("malformed", {}, "evidence_malformed"),
    ("debug_td", {}, "quote_invalid"),
    ("bundle_tampered", {}, "measurement_mismatch"),
    ("honest", {"https": False}, "binding_mismatch"),
    ("honest", {"policy_toml": "allow_simulated = false"}, "simulated_not_allowed"),
]


@pytest.mark.parametrize(("mode", "route_kw", "code"), CASES,
                         ids=[f"{m}-{c}" for m, _, c in CASES])
def test_refused_and_no_prompt_byte_moves(tmp_path, mode, route_kw, code):
    r, prov, _ = _run(tmp_path, mode, **route_kw)
    assert r.status_code in (502, 503), r.text
    err = r.json()["error"]
    assert err["code"] == code, err
    assert "tf" in err["message"]
    assert prov.received == []
    assert MARKER not in r.text


def test_unpinned_platform_is_refused():
    """RTMR1/2 alone do not vouch for the firmware: MRTD and RTMR0 must be pinned."""
    have = {"mr_td": HW_MRTD, "rtmr0": HW_RTMR0, "rtmr1": RELEASE["rtmr1"],
            "rtmr2": RELEASE["rtmr2"], "rtmr3": "00" * 48}
    rel = verify_release(BUNDLE.read_bytes(), ROOT, RELEASE["identity"], RELEASE["issuer"])
    tinfoil.check_measurements(have, rel, policy())
    for pinned in ((), ({"rtmr1": RELEASE["rtmr1"]},), ({"mr_td": HW_MRTD, "rtmr0": "00" * 48},)):
        with pytest.raises(VerificationError) as e:
            tinfoil.check_measurements(have, rel, policy(allowed_measurements=pinned))
        assert e.value.code == "measurement_mismatch"
    with pytest.raises(VerificationError):
        tinfoil.check_measurements(dict(have, rtmr3="01" * 48), rel, policy())


def test_attestation_served_under_another_tls_key_is_refused_at_verification(tmp_path):
    """Without waiting for the pin: the key that served the document must be the attested one."""
    async def run() -> None:
        prov = Provider("tls_key_swapped_on_attestation", tmp_path)
        await prov.start()
        try:
            route = Route(base_url=f"https://127.0.0.1:{prov.tls_port}/v1")
            async with httpx.AsyncClient(verify=False) as client:  # noqa: S501 - pinned by quote
                await tinfoil.verify(client, route, policy(), NOW)
        finally:
            await prov.stop()

    with pytest.raises(VerificationError, match="serving the attestation") as e:
        asyncio.run(run())
    assert e.value.code == "binding_mismatch"


@pytest.mark.parametrize(("kw", "code"), [
    ({"td_attributes": bytes([1]) + bytes(7)}, "quote_invalid"),
    ({"mr_config_id": b"\x01" + bytes(47)}, "measurement_mismatch"),
    ({"mr_owner": b"\x01" + bytes(47)}, "measurement_mismatch"),
    ({"mr_owner_config": b"\x01" + bytes(47)}, "measurement_mismatch"),
], ids=["debug-td", "mr_config_id", "mr_owner", "mr_owner_config"])
def test_td_shape_is_enforced(kw, code):
    def report(**k: Any) -> Any:
        return tdx.parse(build_simulated_quote(bytes(64), mr_td=bytes(48),
                                               rtmrs=(bytes(48),) * 4, **k)).report

    tinfoil.check_td(report(td_attributes=bytes.fromhex("0000001000000000")))
    with pytest.raises(VerificationError) as e:
        tinfoil.check_td(report(**kw))
    assert e.value.code == code
