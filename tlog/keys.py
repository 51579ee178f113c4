"""The log's keys: a note signing key and the append token, kept in DIR.

`log.key` (Go skey format) and `append.token` are written 0600 and fsynced
before use; `log.vkey` holds the public verifier key. Inside dstack the note
key is derived from the dstack KMS instead (`tlog.service.dstack_seed`), so it
never touches the disk.

A log's origin is also its key name. Unless `--origin` says otherwise, it is
derived from the public key, `pag.local/log/<first 16 hex digits of
SHA-256(public key)>`, so two logs never share an origin (a witness or a
verifier keyed by origin cannot confuse them). An existing `log.key` keeps
the name it was created with.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tlog import note
from tlog.service import write_private, write_public

ORIGIN_PREFIX = "pag.local/log/"


def default_origin(public_key: bytes) -> str:
    """The origin of a log created without --origin: unique per key."""
    return ORIGIN_PREFIX + hashlib.sha256(public_key).hexdigest()[:16]


def _new_signer(origin: str | None, seed: bytes) -> note.Ed25519Signer:
    """A signer for `seed` named `origin`, or the key-derived default origin."""
    if origin is not None:
        return note.Ed25519Signer(origin, seed)
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    return note.Ed25519Signer(default_origin(public), seed)


def _stored_name(vkey_file: Path, seed: bytes) -> str | None:
    """The name in an existing `log.vkey` for the key of `seed` (a KMS-derived key keeps
    the origin it was first served under), else None."""
    try:
        v = note.verifier_from_vkey(vkey_file.read_text())
    except (OSError, note.NoteError):
        return None
    public = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes_raw()
    return v.name if v.public_key == public else None


def load_signer(data_dir: Path, origin: str | None = None, seed: bytes | None = None) -> note.Ed25519Signer:
    """The log's note signer, created on first use; key name = origin.

    With `seed` (from the dstack KMS) nothing secret is stored. A different
    `origin` than the stored key's name is refused. Without `origin`, a new
    key is named `default_origin(public key)`.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "log.key"
    if seed is not None:
        signer = _new_signer(origin or _stored_name(data_dir / "log.vkey", seed), seed)
    elif key_file.exists():
        signer = note.parse_skey(key_file.read_text())
        if origin is not None and origin != signer.name:
            raise ValueError(f"{key_file} is the key of origin {signer.name!r}, not {origin!r}")
    else:
        signer = _new_signer(origin, secrets.token_bytes(32))
        write_private(key_file, signer.skey + "\n")
    write_public(data_dir / "log.vkey", signer.vkey + "\n")
    return signer


def load_token(data_dir: Path) -> str:
    """The bearer token for appends, created on first use."""
    path = data_dir / "append.token"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
