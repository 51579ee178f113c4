"""Intel collateral for real TDX quotes: a configured file, or fetched from a PCCS and cached.

Collateral (TCB info, QE identity, CRLs and their issuer chains) is what
dcap-qvl verifies a quote against. Sources, in policy order:
- `collateral_file`: a QuoteCollateralV3 JSON file (offline deployments, tests);
- `pccs_url`: fetched with dcap-qvl for the quote's platform, kept in memory
  and, with `collateral_cache_dir`, on disk (one JSON file per platform, keyed
  by the SHA-256 of the quote's certification data, written atomically).
  A cached copy is reused for `CACHE_SECONDS`; if a refresh fails the cached
  copy is still used, and verification at the request's "now" refuses it once
  it has expired (`evidence_expired`). With neither source a real quote is
  refused: there is nothing to verify it against.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from gateway.verification.base import Policy, VerificationError
from verifier.tee import dcap

CACHE_SECONDS = 3600.0
_memory: dict[tuple[str, str], tuple[float, str]] = {}
_locks: dict[tuple[str, str], asyncio.Lock] = {}


def platform_key(raw: bytes) -> str:
    """Cache key: SHA-256 of the quote's signature data (the same platform, the same chain)."""
    from verifier.tee import quote as tdxquote

    return hashlib.sha256(tdxquote.parse_quote(raw).signature_data[-4096:]).hexdigest()


def load(text: str) -> Any:
    """Parse QuoteCollateralV3 JSON, or `quote_invalid`."""
    try:
        return dcap.load_collateral(text)
    except dcap.DcapError as e:
        raise VerificationError(e.code, e.message) from e


async def for_quote(raw: bytes, policy: Policy) -> Any:
    """The collateral to verify `raw` against under `policy` (see module docstring)."""
    if policy.collateral_file:
        try:
            return load(Path(policy.collateral_file).read_text())
        except OSError as e:
            raise VerificationError("quote_invalid",
                                    f"cannot read collateral file: {e.strerror}") from e
    if not policy.pccs_url:
        raise VerificationError("quote_invalid",
                                "real quote but no collateral_file or pccs_url in policy")
    try:
        key = (policy.pccs_url, platform_key(raw))
    except ValueError as e:
        raise VerificationError("quote_invalid", f"cannot parse TDX quote: {e}") from e
    lock = _locks.setdefault(key, asyncio.Lock())
    async with lock:
        cached = _memory.get(key) or _read_disk(policy, key[1])
        if cached is not None and time.time() - cached[0] < CACHE_SECONDS:
            _memory[key] = cached
            return load(cached[1])
        try:
            text = await dcap.fetch_collateral(policy.pccs_url, raw)
        except dcap.DcapError as e:  # any fetch failure falls back to the cache
            if cached is None:
                raise VerificationError("evidence_missing",
                                        f"collateral fetch from PCCS failed: {e}") from e
            return load(cached[1])
        entry = (time.time(), text)
        _memory[key] = entry
        _write_disk(policy, key[1], entry)
        return load(text)


def _cache_path(policy: Policy, key: str) -> Path | None:
    return Path(policy.collateral_cache_dir) / f"{key}.json" if policy.collateral_cache_dir else None


def _read_disk(policy: Policy, key: str) -> tuple[float, str] | None:
    p = _cache_path(policy, key)
    if p is None or not p.exists():
        return None
    try:
        return p.stat().st_mtime, p.read_text()
    except OSError:
        return None


def _write_disk(policy: Policy, key: str, entry: tuple[float, str]) -> None:
    p = _cache_path(policy, key)
    if p is None:
        return
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".collateral-")
    with os.fdopen(fd, "w") as f:
        f.write(entry[1])
        f.flush()
        os.fsync(f.fileno())
    os.utime(tmp, (entry[0], entry[0]))
    os.replace(tmp, p)
