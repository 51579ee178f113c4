"""The gateway's keys, all derived from the dstack KMS through the guest agent.

Every key is a deterministic function of `get_key(path).key` for a fixed path,
so a restart of the same app (same dstack app id) gets the same keys:

* receipt signing key (Ed25519): seed = HKDF-SHA256(k, info="pag/ed25519-seed/v1|" path);
* E2EE key (X25519): private = HKDF-SHA256(k, info="pag/x25519/v1|" path);
* TLS key (ECDSA P-256): scalar = HKDF-SHA256(k, 48 bytes, info="pag/p256/v1|" path)
  mod (n - 1) + 1, with a self-signed certificate whose validity does not
  depend on the clock (notBefore 2024-01-01, notAfter 9999-12-31).

`get_key` is called with the default algorithm (secp256k1), which every
dstack OS version supports; dstack derives the key bytes from the path only.

The public half is the attested `Keyset` (verifier/tee/keyset.py, the format
clients check).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from verifier.tee.keyset import Keyset, spki_sha256

RECEIPT_KEY_PATH = "pag/gateway/receipt-signing"
E2EE_KEY_PATH = "pag/gateway/e2ee"
TLS_KEY_PATH = "pag/gateway/tls"
_P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
TLS_NOT_BEFORE = datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC)
TLS_NOT_AFTER = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


class KeyClient(Protocol):
    """What we need of `dstack_sdk.AsyncDstackClient`."""

    async def get_key(self, path: str | None = None, purpose: str | None = None,
                      algorithm: str = "secp256k1") -> Any: ...


def _hkdf(ikm: bytes, info: str, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None,
                info=info.encode()).derive(ikm)


async def _kms_key(client: KeyClient, path: str, purpose: str) -> bytes:
    resp = await client.get_key(path, purpose)
    key = bytes.fromhex(resp.key) if isinstance(resp.key, str) else bytes(resp.key)
    if len(key) < 32:
        raise ValueError(f"dstack returned a {len(key)}-byte key for {path!r}")
    return key


async def derive_seed(client: KeyClient, path: str) -> bytes:
    """A 32-byte Ed25519 seed for `path` from dstack KMS (e.g. a log/witness note key).

    Same app + same path -> same seed; distinct paths -> independent seeds.
    """
    return _hkdf(await _kms_key(client, path, "ed25519-seed"), "pag/ed25519-seed/v1|" + path)


@dataclass(frozen=True)
class GatewayKeys:
    """The gateway's private keys and the public `keyset` they make."""

    receipt_key: Ed25519PrivateKey
    e2ee_key: X25519PrivateKey
    tls_key: ec.EllipticCurvePrivateKey
    keyset: Keyset

    def to_json(self) -> dict[str, str]:
        """The public keyset object."""
        return self.keyset.to_json()

    def keyset_hash(self) -> str:
        """See `Keyset.keyset_hash`."""
        return self.keyset.keyset_hash()

    def e2ee_private_bytes(self) -> bytes:
        """Raw 32-byte X25519 private key."""
        return self.e2ee_key.private_bytes_raw()

    def tls_key_pem(self) -> bytes:
        """The TLS private key, PKCS#8 PEM, unencrypted."""
        return self.tls_key.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    def tls_cert_pem(self, hostnames: tuple[str, ...] = ("localhost",),
                     ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1")) -> bytes:
        """A self-signed certificate for the TLS key (PEM). Its SPKI is the attested one."""
        import ipaddress

        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pag-gateway-attested-tls")])
        serial = int.from_bytes(hashlib.sha256(self.keyset.tls_spki_sha256.encode()).digest()[:16],
                                "big") >> 1
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hostnames]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(self.tls_key.public_key()).serial_number(serial or 1)
                   .not_valid_before(TLS_NOT_BEFORE).not_valid_after(TLS_NOT_AFTER)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), True))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.tls_key, hashes.SHA256()).public_bytes(
            serialization.Encoding.PEM)


def keys_from_secrets(receipt: bytes, e2ee: bytes, tls: bytes, log_vkey: str) -> GatewayKeys:
    """Build the keys from three dstack `get_key` outputs (pure; used by `load`)."""
    receipt_key = Ed25519PrivateKey.from_private_bytes(
        _hkdf(receipt, "pag/ed25519-seed/v1|" + RECEIPT_KEY_PATH))
    e2ee_key = X25519PrivateKey.from_private_bytes(_hkdf(e2ee, "pag/x25519/v1|" + E2EE_KEY_PATH))
    scalar = int.from_bytes(_hkdf(tls, "pag/p256/v1|" + TLS_KEY_PATH, 48), "big") % (
        _P256_N - 1) + 1
    tls_key = ec.derive_private_key(scalar, ec.SECP256R1())
    keyset = Keyset(
        receipt_signing_key=base64.b64encode(receipt_key.public_key().public_bytes_raw()).decode(),
        e2ee_public_key=base64.b64encode(e2ee_key.public_key().public_bytes_raw()).decode(),
        tls_spki_sha256=spki_sha256(tls_key.public_key()),
        log_vkey=log_vkey)
    return GatewayKeys(receipt_key=receipt_key, e2ee_key=e2ee_key, tls_key=tls_key,
                       keyset=keyset)


async def load(client: KeyClient, log_vkey: str = "") -> GatewayKeys:
    """Derive all gateway keys from dstack KMS (`client` is an `AsyncDstackClient`)."""
    return keys_from_secrets(
        await _kms_key(client, RECEIPT_KEY_PATH, "receipt-signing"),
        await _kms_key(client, E2EE_KEY_PATH, "e2ee"),
        await _kms_key(client, TLS_KEY_PATH, "tls"),
        log_vkey)


def write_tls_files(keys: GatewayKeys, directory: str | os.PathLike[str], *,
                    hostnames: tuple[str, ...] = ("localhost",),
                    ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1")) -> tuple[Path, Path]:
    """Write `tls-cert.pem` and `tls-key.pem` (mode 0600) for uvicorn; returns (cert, key)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = d / "tls-cert.pem", d / "tls-key.pem"
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(keys.tls_key_pem())
    os.chmod(key_path, 0o600)
    cert_path.write_bytes(keys.tls_cert_pem(hostnames, ip_addresses))
    return cert_path, key_path
