"""`python -m gateway revoke-key --config FILE --sha256 HEX [--undo]`: revoke an API key on
every replica sharing the config's `[shared]` Redis (gateway/api/apikeys.py), or undo it.

Every replica refuses the key (401 `invalid_api_key`) within a second. Revocation lives in
Redis, so it lasts until undone or Redis loses its data: remove the key from the
configuration at the next release. Exit 0 done, 1 Redis unreachable, 2 bad arguments or a
config without `[shared] redis_url`; one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from gateway.api import config as gconfig
from gateway.api import shared
from gateway.api.apikeys import revoke


def main(argv: list[str]) -> int:
    """Entry point of `python -m gateway revoke-key`."""
    ap = argparse.ArgumentParser(prog="python -m gateway revoke-key")
    ap.add_argument("--config", required=True)
    ap.add_argument("--sha256", required=True, help="the key's SHA-256, as in [[api_keys]]")
    ap.add_argument("--undo", action="store_true", help="take the key out of the revoked set")
    a = ap.parse_args(argv)
    try:
        cfg = gconfig.load(a.config)
    except gconfig.ConfigError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    if not gconfig.HEX64.fullmatch(a.sha256):
        print("gateway: --sha256 must be 64 lower-case hex digits", file=sys.stderr)
        return 2
    if not cfg.shared.redis_url:
        print("gateway: revoke-key needs [shared] redis_url (without it, remove the key from "
              "the configuration)", file=sys.stderr)
        return 2
    known = any(k.sha256 == a.sha256 for k in cfg.api_keys)

    async def run() -> bool:
        client = shared.connect(cfg.shared)
        try:
            return await revoke(client, cfg.shared.prefix, a.sha256, a.undo)
        finally:
            await client.aclose()
    try:
        changed = asyncio.run(run())
    except shared.errors() as e:
        print(f"gateway: Redis at {cfg.shared.redis_url} did not answer: {type(e).__name__}",
              file=sys.stderr)
        return 1
    verb = "no longer revoked" if a.undo else "revoked"
    state = "" if changed else " (it already was)"
    note = "" if known else "; no [[api_keys]] entry of this config has that hash"
    print(f"key {a.sha256[:16]}… {verb}{state}{note}")
    return 0
