"""NVIDIA GPU evidence: a real 8 x H100 payload, and tampered or synthetic ones.

The real payload (tests/fixtures/providers/nvidia/SOURCE.md) passes every
offline check, yet is never reported verified: `gpu_unverified` unless the
policy allows `unverified-offline`.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from gateway.verification import nvidia
from gateway.verification.base import Policy, VerificationError

FIXTURE = Path(__file__).parent / "fixtures" / "providers" / "nvidia" / "nvidia_payload_8xh100.json"
REAL_NONCE = "deadbeef00000000000000000000000000000000000000000000000000000001"
ALLOW = Policy(allow_gpu_unverified_offline=True)


def real_payload() -> dict:
    return json.loads(FIXTURE.read_text())


def code_of(payload, nonce: str = REAL_NONCE, policy: Policy = ALLOW) -> str:
    with pytest.raises(VerificationError) as e:
        nvidia.check_gpu(payload, nonce, policy)
    return e.value.code


# --- a synthetic payload in the same format, signed by a test CA ---------------------------

def _cert(name: str, key, issuer: x509.Name, signer, ca: bool) -> x509.Certificate:
    start = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
    return (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start).not_valid_after(start + datetime.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(signer, hashes.SHA384()))


class GpuTestCa:
    """A root and a per-GPU leaf, like NVIDIA's chain but shorter."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP384R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Test Device Identity CA")])
        self.root = _cert("Test Device Identity CA", self.root_key, name, self.root_key, True)
        self.spki_sha256 = hashlib.sha256(self.root.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()

    def payload(self, nonce_hex: str, gpus: int = 2, spdm_nonce: str | None = None) -> str:
        """JSON text of a payload for `nonce_hex` (the signed SPDM nonce may differ)."""
        items = []
        for i in range(gpus):
            key = ec.generate_private_key(ec.SECP384R1())
            leaf = _cert(f"Test GPU {i}", key, self.root.subject, self.root_key, False)
            pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, self.root))
            body = (bytes([0x11, 0xE0, 0x01, 0xFF]) + bytes.fromhex(spdm_nonce or nonce_hex)
                    + b"\x00" + b"\x61\x01" + bytes(64))  # request, then a response stand-in
            r, s = utils.decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA384())))
            transcript = body + r.to_bytes(48, "big") + s.to_bytes(48, "big")
            items.append({"arch": "HOPPER", "certificate": base64.b64encode(pem).decode(),
                          "evidence": base64.b64encode(transcript).decode()})
        return json.dumps({"nonce": nonce_hex, "arch": "HOPPER", "evidence_list": items})


# --- the real payload ----------------------------------------------------------------------

def test_real_payload_passes_offline_checks_but_is_only_unverified_offline():
    facts = nvidia.check_gpu(FIXTURE.read_text(), REAL_NONCE, ALLOW)
    assert facts == {"gpu": "unverified-offline", "gpu_count": 8, "gpu_arch": "HOPPER",
                     "gpu_root_spki_sha256": nvidia.NVIDIA_DEVICE_ROOT_SPKI_SHA256}
    assert nvidia.check_gpu(real_payload(), REAL_NONCE.upper(), ALLOW) == facts  # dict form too


def test_real_payload_is_refused_when_policy_wants_verified_gpus():
    assert code_of(FIXTURE.read_text(), policy=Policy()) == "gpu_unverified"


def test_real_transcripts_carry_the_payload_nonce_in_the_signed_request():
    _, _, gpus = nvidia.parse_payload(FIXTURE.read_text())
    assert {nvidia.spdm_request_nonce(g.transcript).hex() for g in gpus} == {REAL_NONCE}
    assert all(len(g.certs) == 5 for g in gpus)


def test_real_payload_for_another_nonce_is_a_binding_mismatch():
    assert code_of(FIXTURE.read_text(), nonce="00" * 32) == "binding_mismatch"


def test_payload_nonce_rewritten_but_signed_nonce_kept_is_a_binding_mismatch():
    p = real_payload()
    p["nonce"] = "11" * 32
    assert code_of(p, nonce="11" * 32) == "binding_mismatch"


def test_one_flipped_measurement_bit_breaks_the_signature():
    p = real_payload()
    t = bytearray(base64.b64decode(p["evidence_list"][3]["evidence"]))
    t[200] ^= 1
    p["evidence_list"][3]["evidence"] = base64.b64encode(bytes(t)).decode()
    with pytest.raises(VerificationError) as e:
        nvidia.check_gpu(p, REAL_NONCE, ALLOW)
    assert e.value.code == "gpu_unverified" and "GPU 3" in e.value.reason


def test_leaf_from_another_gpu_breaks_the_chain():
    p = real_payload()
    chain0 = base64.b64decode(p["evidence_list"][0]["certificate"]).decode()
    chain1 = base64.b64decode(p["evidence_list"][1]["certificate"]).decode()
    end = "-----END CERTIFICATE-----\n"
    leaf1, rest0 = chain1.split(end)[0] + end, chain0.split(end, 1)[1]
    p["evidence_list"][0]["certificate"] = base64.b64encode((leaf1 + rest0).encode()).decode()
    with pytest.raises(VerificationError) as e:
        nvidia.check_gpu(p, REAL_NONCE, ALLOW)
    assert e.value.code == "gpu_unverified" and "chain broken" in e.value.reason


# --- synthetic payloads --------------------------------------------------------------------

def test_well_formed_chain_to_an_unknown_root_is_refused():
    ca = GpuTestCa()
    with pytest.raises(VerificationError) as e:
        nvidia.check_gpu(ca.payload("ab" * 32), "ab" * 32, ALLOW)
    assert e.value.code == "gpu_unverified" and ca.spki_sha256 in e.value.reason


def test_synthetic_payload_passes_once_its_root_is_trusted(monkeypatch):
    ca = GpuTestCa()
    monkeypatch.setattr(nvidia, "TRUSTED_ROOTS", frozenset({ca.spki_sha256}))
    facts = nvidia.check_gpu(ca.payload("ab" * 32, gpus=3), "ab" * 32, ALLOW)
    assert facts["gpu_count"] == 3 and facts["gpu_root_spki_sha256"] == ca.spki_sha256
    assert code_of(ca.payload("ab" * 32, spdm_nonce="cd" * 32), "ab" * 32) == "binding_mismatch"


def test_absent_payload_depends_on_require_gpu():
    assert nvidia.check_gpu(None, REAL_NONCE, Policy()) == {"gpu": "absent"}
    assert code_of(None, policy=Policy(require_gpu=True)) == "evidence_missing"


def _mutate(**changes):
    p = real_payload()
    for k, v in changes.items():
        if v is None:
            del p[k]
        else:
            p[k] = v
    return p


def _item(**changes):
    p = real_payload()
    p["evidence_list"][0].update(changes)
    return p


@pytest.mark.parametrize("payload", [
    "{not json", "[1, 2]", 42, _mutate(nonce=None), _mutate(arch="VOLTA"),
    _mutate(evidence_list=[]), _mutate(evidence_list="x"), _mutate(evidence_list=[1]),
    _item(certificate="%%%"), _item(evidence=None), _item(arch="BLACKWELL"),
    _item(certificate=base64.b64encode(b"not a pem").decode()),
    _item(evidence=base64.b64encode(b"\x11\x00" + bytes(200)).decode()),
    _item(evidence=base64.b64encode(b"\x11\xe0" + bytes(100)).decode()),
], ids=["not-json", "list", "number", "no-nonce", "unknown-arch", "empty-list", "list-not-list",
        "item-not-object", "bad-base64", "no-evidence", "arch-differs", "not-pem",
        "not-get-measurements", "truncated"])
def test_malformed_payloads(payload):
    assert code_of(payload) == "evidence_malformed"


def test_other_spdm_versions_are_unsupported_not_passed():
    p = real_payload()
    t = bytearray(base64.b64decode(p["evidence_list"][0]["evidence"]))
    t[0] = 0x12
    p["evidence_list"][0]["evidence"] = base64.b64encode(bytes(t)).decode()
    assert code_of(p) == "unsupported_evidence"
