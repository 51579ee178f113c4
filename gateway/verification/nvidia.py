"""NVIDIA GPU attestation evidence (`nvidia_payload`): offline checks, never a pass.

The payload is what vllm-proxy style providers serve and NVIDIA's NRAS accepts:
`{"nonce": <64 hex>, "arch": "HOPPER", "evidence_list": [{"certificate":
<base64 PEM chain, leaf first>, "evidence": <base64 SPDM transcript>, "arch"}]}`.
Each evidence is an SPDM 1.1 GET_MEASUREMENTS request (version 0x11, code
0xE0, two parameter bytes, the 32-byte requester nonce, slot id) followed by
the MEASUREMENTS response, whose last 96 bytes are an ECDSA P-384 signature
(r || s) over SHA-384 of everything before it, made by the leaf key.

Checked offline, per GPU: the payload nonce and the nonce inside the signed
SPDM request are both ours; the certificate chain parses, every certificate is
signed by the next one (issuers are CAs), the last is self-signed and is
NVIDIA's Device Identity CA (pinned by SPKI SHA-256); the SPDM signature
verifies under the leaf key. Not checked offline: revocation (OCSP) and the
measurements against NVIDIA's reference values (RIM) -- that needs NRAS. So a
GPU is never reported verified: the result is `"gpu": "unverified-offline"`,
and only `allow_gpu_unverified_offline` turns that into an accepted fact.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

from gateway.verification.base import Policy, VerificationError

# SPKI SHA-256 of "NVIDIA Device Identity CA", byte-identical to
# certs/verifier_device_root.pem in NVIDIA/nvtrust's local GPU verifier.
NVIDIA_DEVICE_ROOT_SPKI_SHA256 = "a90c4eb5acfd3e3d03a25db6a26b84f720ad0503196c627c21ddd48dd85b06a4"
TRUSTED_ROOTS: frozenset[str] = frozenset({NVIDIA_DEVICE_ROOT_SPKI_SHA256})
ARCHES = ("HOPPER", "BLACKWELL")
SPDM_VERSION_11 = 0x11
SPDM_GET_MEASUREMENTS = 0xE0
SPDM_REQUEST_LEN = 37  # 4 header bytes, 32 nonce bytes, slot id
P384_SIGNATURE_LEN = 96


@dataclass(frozen=True)
class GpuEvidence:
    """One GPU's evidence: its certificate chain (leaf first) and SPDM transcript."""

    certs: tuple[x509.Certificate, ...]
    transcript: bytes


def check_gpu(payload: Any, nonce_hex: str, policy: Policy) -> dict[str, Any]:
    """Check NVIDIA GPU evidence bound to `nonce_hex`; return facts or raise.

    `payload` is the `nvidia_payload` object (dict) or its JSON text, or None.
    None: raises `evidence_missing` if `policy.require_gpu`, else returns
    `{"gpu": "absent"}`. Bad shape or unparsable certificates:
    `evidence_malformed`. A nonce (payload or signed SPDM request) other than
    `nonce_hex`: `binding_mismatch`. An SPDM version or key type other than
    1.1 / P-384: `unsupported_evidence`. A broken chain, an unknown root or a
    bad SPDM signature: `gpu_unverified`, whatever the policy. Otherwise raises
    `gpu_unverified` unless `policy.allow_gpu_unverified_offline`, in which
    case returns `{"gpu": "unverified-offline", "gpu_count", "gpu_arch",
    "gpu_root_spki_sha256"}`.
    """
    if payload is None:
        if policy.require_gpu:
            raise VerificationError("evidence_missing", "policy requires GPU evidence; none given")
        return {"gpu": "absent"}
    nonce, arch, gpus = parse_payload(payload)
    want = nonce_hex.lower().encode()
    if not hmac.compare_digest(nonce.lower().encode(), want):
        raise VerificationError("binding_mismatch", "GPU payload nonce is not ours")
    roots: set[str] = set()
    for i, gpu in enumerate(gpus):
        if not hmac.compare_digest(spdm_request_nonce(gpu.transcript, i).hex().encode(), want):
            raise VerificationError("binding_mismatch", f"GPU {i}: signed SPDM nonce is not ours")
        roots.add(check_chain(gpu.certs, i))
        check_transcript_signature(gpu, i)
    facts = {"gpu": "unverified-offline", "gpu_count": len(gpus), "gpu_arch": arch,
             "gpu_root_spki_sha256": ",".join(sorted(roots))}
    if not policy.allow_gpu_unverified_offline:
        raise VerificationError("gpu_unverified",
                                f"{len(gpus)} {arch} GPU(s) pass offline checks, but measurements "
                                "and revocation need NVIDIA NRAS; policy does not allow "
                                "allow_gpu_unverified_offline")
    return facts


def parse_payload(payload: Any) -> tuple[str, str, list[GpuEvidence]]:
    """(nonce, arch, per-GPU evidence) of a payload dict or JSON text; `evidence_malformed`."""
    def bad(reason: str) -> VerificationError:
        return VerificationError("evidence_malformed", f"nvidia_payload: {reason}")

    if isinstance(payload, (str, bytes)):
        try:
            payload = json.loads(payload)
        except ValueError as e:
            raise bad("not JSON") from e
    if not isinstance(payload, dict):
        raise bad("not an object")
    nonce, arch, items = payload.get("nonce"), payload.get("arch"), payload.get("evidence_list")
    if not isinstance(nonce, str) or not isinstance(arch, str):
        raise bad("nonce and arch must be strings")
    if arch.upper() not in ARCHES:
        raise bad(f"unknown GPU architecture {arch!r}")
    if not isinstance(items, list) or not items:
        raise bad("evidence_list must be a non-empty list")
    gpus = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"evidence {i} is not an object")
        if str(item.get("arch", arch)).upper() != arch.upper():
            raise bad(f"evidence {i} architecture differs from the payload's")
        try:
            chain = base64.b64decode(item["certificate"], validate=True)
            transcript = base64.b64decode(item["evidence"], validate=True)
            certs = tuple(x509.load_pem_x509_certificates(chain))
        except (KeyError, TypeError, binascii.Error, ValueError) as e:
            raise bad(f"evidence {i}: certificate chain or evidence unreadable") from e
        gpus.append(GpuEvidence(certs, transcript))
    return nonce, arch.upper(), gpus


def spdm_request_nonce(transcript: bytes, index: int = 0) -> bytes:
    """The requester nonce inside an SPDM 1.1 GET_MEASUREMENTS transcript."""
    if len(transcript) < SPDM_REQUEST_LEN + P384_SIGNATURE_LEN or transcript[1] != SPDM_GET_MEASUREMENTS:
        raise VerificationError("evidence_malformed",
                                f"GPU {index}: evidence is not an SPDM GET_MEASUREMENTS transcript")
    if transcript[0] != SPDM_VERSION_11:
        raise VerificationError("unsupported_evidence",
                                f"GPU {index}: SPDM version 0x{transcript[0]:02x}; only 1.1 is checked")
    return transcript[4:36]


def check_chain(certs: tuple[x509.Certificate, ...], index: int = 0) -> str:
    """Verify each certificate is issued by the next and the root is trusted; root SPKI SHA-256."""
    for cert, issuer in zip(certs, certs[1:] + certs[-1:], strict=True):
        try:
            ca = issuer.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            ca = False
        try:
            if not ca:
                raise ValueError("issuer is not a CA")
            cert.verify_directly_issued_by(issuer)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise VerificationError("gpu_unverified",
                                    f"GPU {index}: certificate chain broken at "
                                    f"{cert.subject.rfc4514_string()}: {e or 'bad signature'}") from e
    root = hashlib.sha256(certs[-1].public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()
    if root not in TRUSTED_ROOTS:
        raise VerificationError("gpu_unverified",
                                f"GPU {index}: chain ends at an untrusted root (SPKI {root})")
    return root


def check_transcript_signature(gpu: GpuEvidence, index: int = 0) -> None:
    """The leaf key's P-384 signature over the SPDM transcript verifies."""
    key = gpu.certs[0].public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        raise VerificationError("unsupported_evidence", f"GPU {index}: leaf key is not ECDSA P-384")
    body, sig = gpu.transcript[:-P384_SIGNATURE_LEN], gpu.transcript[-P384_SIGNATURE_LEN:]
    der = utils.encode_dss_signature(int.from_bytes(sig[:48], "big"), int.from_bytes(sig[48:], "big"))
    try:
        key.verify(der, body, ec.ECDSA(hashes.SHA384()))
    except InvalidSignature as e:
        raise VerificationError("gpu_unverified",
                                f"GPU {index}: SPDM measurement signature does not verify") from e
