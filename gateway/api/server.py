"""`python -m gateway serve --config FILE --listen HOST:PORT`: run the gateway.

Start-up order: load the config; get the keys and workload identity from the
dstack guest agent (`[dstack] endpoint`); open the outbox; start the shipper
process (`python -m gateway.receipts.shipper`, which dies with the gateway); serve the
ASGI app with uvicorn (uvloop, httptools). When listening, one JSON line goes to
stdout: `{"gateway": URL, "receipt_signing_key": B64, "keyset_hash": HEX}`.
SIGTERM/SIGINT stop it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.api import config as gconfig
from gateway.receipts.outbox import Outbox, ReceiptSigner
from gateway.receipts.shipper import LogStatus
from gateway.upstream.leases import Leases
from tlog.service import listen_address, uvicorn_config

log = logging.getLogger("gateway.api.server")
LEASE_MAC_PATH = "pag/gateway/lease-cache"


@dataclass
class Identity:
    """Keys and workload identity obtained from dstack."""

    receipt_key: Ed25519PrivateKey
    e2ee_private: bytes
    gateway: dict[str, str]
    attest: Any
    lease_mac_key: bytes = b""


async def bootstrap(cfg: gconfig.Config) -> Identity:
    """Derive the keys through the dstack guest agent; the workload identity (app id,
    compose hash) is read from the gateway's own attestation, as clients will see it."""
    from dstack_sdk import AsyncDstackClient

    from gateway.identity import attestation, keys

    client = AsyncDstackClient(cfg.dstack_endpoint) if cfg.dstack_endpoint \
        else AsyncDstackClient()
    keyset = await keys.load(client, log_vkey=cfg.log.vkey or "")
    doc = await attestation.build(client, keyset, None)
    mac = await keys.derive_seed(client, LEASE_MAC_PATH) if cfg.leases.redis_url else b""

    async def attest(nonce: str | None) -> dict[str, Any]:
        return await attestation.build(client, keyset, nonce)

    return Identity(
        receipt_key=keyset.receipt_key,
        e2ee_private=keyset.e2ee_private_bytes(),
        gateway={"app_id": str(doc["app_id"]), "compose_hash": str(doc["compose_hash"]),
                 "keyset_hash": keyset.keyset_hash()},
        attest=attest, lease_mac_key=mac)


def lease_source(cfg: gconfig.Config, mac_key: bytes = b"") -> Leases:
    """The provider-verification engine's lease store behind the gateway's adapter;
    shared through Redis when `[leases].redis_url` is set (entries MACed with a key
    every replica of this app derives from dstack KMS)."""
    from gateway.verification.base import VerificationError
    from gateway.verification.lease import LeaseStore
    from gateway.verification.shared import SharedLeases

    shared = SharedLeases(cfg.leases.redis_url, mac_key, cfg.leases.prefix) \
        if cfg.leases.redis_url else None
    return Leases(LeaseStore(shared=shared), VerificationError)


def start_shipper(cfg: gconfig.Config) -> subprocess.Popen[bytes] | None:
    """Start `python -m gateway.receipts.shipper` for the configured log (None without a log)."""
    if not cfg.log.url:
        return None
    cmd = [sys.executable, "-m", "gateway.receipts.shipper", "--data", str(cfg.gateway.data_dir),
           "--log", cfg.log.url, "--concurrency", str(cfg.log.concurrency),
           "--parent", str(os.getpid())]
    if cfg.log.token_file:
        cmd += ["--token-file", str(cfg.log.token_file)]
    if cfg.log.vkey:
        cmd += ["--vkey", cfg.log.vkey]
    return subprocess.Popen(cmd)


def stop_process(proc: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def serve(cfg: gconfig.Config, host: str, port: int) -> None:
    """Run until SIGTERM/SIGINT."""
    import uvicorn

    from gateway.api.app import Gateway

    ident = await bootstrap(cfg)
    outbox = Outbox(cfg.gateway.data_dir, cfg.gateway.outbox_durability)
    shipper = start_shipper(cfg)

    async def watchdog() -> None:
        nonlocal shipper
        while shipper is not None:
            await asyncio.sleep(1.0)
            if shipper.poll() is not None:
                log.error("receipt shipper exited with %s; restarting it", shipper.returncode)
                shipper = start_shipper(cfg)

    watch = asyncio.create_task(watchdog())
    try:
        app = Gateway(cfg, signer=ReceiptSigner(ident.receipt_key), identity=ident.gateway,
                      outbox=outbox, status=LogStatus(outbox, shipper is not None),
                      leases=lease_source(cfg, ident.lease_mac_key), attest=ident.attest,
                      e2ee_key=ident.e2ee_private)
        server = uvicorn.Server(uvicorn_config(
            app, cfg.server, host=host, port=port, lifespan="on", loop="none",
            access_log=False, log_level="warning", timeout_graceful_shutdown=5,
            proxy_headers=False, server_header=False))
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.02)
        if server.started:
            print(json.dumps({
                "gateway": f"http://{host}:{port}",
                "receipt_signing_key": base64.b64encode(
                    ident.receipt_key.public_key().public_bytes_raw()).decode(),
                "keyset_hash": ident.gateway["keyset_hash"]}), flush=True)
        await task
    finally:
        watch.cancel()
        stop_process(shipper)
        outbox.close()


def main(argv: list[str]) -> int:
    """Entry point of `python -m gateway serve`."""
    ap = argparse.ArgumentParser(prog="python -m gateway serve")
    ap.add_argument("--config", required=True)
    ap.add_argument("--listen", required=True, type=listen_address, metavar="HOST:PORT")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        cfg = gconfig.load(a.config)
    except (gconfig.ConfigError, ValueError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(cfg, *a.listen))
    return 0
