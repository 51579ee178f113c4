"""The log's keys: a note signing key and the append token, kept in DIR.

`log.key` (Go skey format) and `append.token` are written 0600 and fsynced
before use; `log.vkey` holds the public verifier key. Inside dstack the note
key is derived from the dstack KMS instead (`dstack_seed`), so it never
touches the disk.
"""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

from tlog import note
from tlog.service import write_private, write_public

DEFAULT_ORIGIN = "pag.local/log"


async def dstack_seed(endpoint: str, path: str) -> bytes:
    """A 32-byte Ed25519 seed derived from the dstack KMS key at `path`."""
    from dstack_sdk import AsyncDstackClient

    key = await AsyncDstackClient(endpoint=endpoint).get_key(path)
    return hashlib.sha256(b"pag-note-key\x00" + key.decode_key()).digest()


def load_signer(data_dir: Path, origin: str | None = None, seed: bytes | None = None) -> note.Ed25519Signer:
    """The log's note signer, created on first use; key name = origin.

    With `seed` (from the dstack KMS) nothing secret is stored. A different
    `origin` than the stored key's name is refused.
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    key_file = data_dir / "log.key"
    if seed is not None:
        signer = note.Ed25519Signer(origin or DEFAULT_ORIGIN, seed)
    elif key_file.exists():
        signer = note.parse_skey(key_file.read_text())
        if origin is not None and origin != signer.name:
            raise ValueError(f"{key_file} is the key of origin {signer.name!r}, not {origin!r}")
    else:
        signer = note.generate_signer(origin or DEFAULT_ORIGIN)
        write_private(key_file, signer.skey + "\n")
    write_public(data_dir / "log.vkey", signer.vkey + "\n")
    return signer


def load_token(data_dir: Path) -> str:
    """The bearer token for appends, created on first use."""
    path = data_dir / "append.token"
    if not path.exists():
        write_private(path, secrets.token_urlsafe(32) + "\n")
    return path.read_text().strip()
