"""`python -m gateway serve --config FILE --listen HOST:PORT [--tls | --no-tls]
[--tls-listen HOST:PORT]`: run the gateway.

Start-up order: load the config (a `[log]` url is required); check the data
directory and bind the listening sockets (so a used port fails at once); get the
keys and workload identity from the dstack guest agent (`[dstack] endpoint`);
make sure the keyset entry is in the log (gateway/receipts/keysets.py: reused
from the data directory, or appended; until then nothing is served: connections
wait in the backlog and /healthz does not answer); open the outbox; start the shipper process (`python -m gateway.receipts.shipper`, which
dies with the gateway); serve the ASGI app with uvicorn (uvloop, httptools),
its connections corked (tlog/cork.py: a whole answer in one write).
When listening, one JSON line goes to stdout: `{"gateway": URL,
"receipt_signing_key": B64, "keyset_hash": HEX, "keyset_index": INT,
"tls_spki_sha256": HEX}` plus `"gateway_tls": URL` with `--tls-listen`.
SIGTERM/SIGINT stop it cleanly, both listeners at once: no new connections; calls in
flight get up to `[gateway] shutdown_grace` to finish, then what still runs is cancelled
and answered 503 `gateway_stopping`, with its receipt (`pipeline.stopped`); calls waiting
for the log (`require_log_inclusion`) are answered 503 `log_unavailable` LOG_WAIT_MARGIN
before that (their receipts stay queued for the next start); a shipper that exits
meanwhile is not restarted.

Attested TLS: HTTPS is served with the TLS key derived from dstack KMS
(gateway/identity/keys.py), whose SPKI SHA-256 is `tls_spki_sha256` in the
attested keyset, so a client pins it instead of trusting a CA. `--listen`
serves HTTPS unless `[tls] enabled = false` or `--no-tls`; `--tls-listen` adds
an HTTPS listener beside a plain one (the demo uses it). The key and its
self-signed certificate are written to `DATA_DIR/tls/` (key mode 0600) for
uvicorn.

A start-up step that fails stops the command with one line on stderr,
`gateway: <what is wrong>` (never a traceback): exit status 2 for a bad command
line or config, 1 for the environment (port in use, data directory unusable,
no dstack guest agent, outbox unopenable). Once running, every log line is JSON
(`tlog.service.JsonFormatter`; the call line: gateway/api/jsonlog.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import gc
import hashlib
import json
import logging
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from gateway.api import config as gconfig
from gateway.api import errors
from gateway.api.health import Check, Readiness, agent_probe, log_probe, redis_probe
from gateway.api.routes import now_rfc3339
from gateway.identity.keys import GatewayKeys
from gateway.receipts import keysets
from gateway.receipts.evidence import EvidenceLog
from gateway.receipts.logclient import LogClient, LogError
from gateway.receipts.outbox import Outbox, ReceiptSigner
from gateway.receipts.shipper import LogStatus
from gateway.upstream.leases import Leases
from tlog.service import (
    StopSignal,
    bind,
    check_data_dir,
    listen_address,
    log_json,
    uvicorn_config,
)

log = logging.getLogger("gateway.api.server")
LEASE_MAC_PATH = "pag/gateway/lease-cache"
SHARED_MAC_PATH = "pag/gateway/shared-state"
LOG_WAIT_MARGIN = 3.0  # seconds before `shutdown_grace` runs out (at most half of it) by
# which calls still waiting for the log are answered 503 log_unavailable, never cancelled
OUTSIDE_TEE_HINT = ("to run outside a TEE use `python -m gateway demo --data DIR --listen "
                    "HOST:PORT`, or start the simulator `python -m gateway.identity.dstack_sim "
                    "--socket PATH --data DIR` and set [dstack] endpoint = PATH")


class StartupError(Exception):
    """A start-up step failed; the message is the one line the user sees."""


@dataclass
class Identity:
    """Keys and workload identity obtained from dstack."""

    receipt_key: Ed25519PrivateKey
    e2ee_private: bytes
    gateway: dict[str, str]
    attest: Any
    keys: GatewayKeys
    lease_mac_key: bytes = b""
    shared_mac_key: bytes | None = None  # [shared]: MACs the receipt index in Redis
    app_compose: str | None = None  # the attested app-compose document, when dstack gives it
    agent: Any = None  # the AsyncDstackClient (the readiness probe asks it for Info)


async def bootstrap(cfg: gconfig.Config) -> Identity:
    """Derive the keys through the dstack guest agent; the workload identity (app id,
    compose hash) is read from the gateway's own attestation, as clients will see it."""
    from dstack_sdk import AsyncDstackClient

    from gateway.identity import attestation, keys

    client = AsyncDstackClient(cfg.dstack_endpoint) if cfg.dstack_endpoint \
        else AsyncDstackClient()
    keyset = await keys.load(client, log_vkey=cfg.log.vkey or "")
    doc = await attestation.build(client, keyset, None)
    app_compose = await attested_app_compose(client, str(doc["compose_hash"]))
    mac = await keys.derive_seed(client, LEASE_MAC_PATH) if cfg.lease_redis else b""
    shared_mac = await keys.derive_seed(client, SHARED_MAC_PATH) if cfg.shared.redis_url \
        else None

    async def attest(nonce: str | None) -> dict[str, Any]:
        return await attestation.build(client, keyset, nonce)

    return Identity(
        receipt_key=keyset.receipt_key,
        e2ee_private=keyset.e2ee_private_bytes(),
        gateway={"app_id": str(doc["app_id"]), "compose_hash": str(doc["compose_hash"]),
                 "keyset_hash": keyset.keyset_hash()},
        attest=attest, keys=keyset, lease_mac_key=mac, shared_mac_key=shared_mac,
        app_compose=app_compose, agent=client)


def agent_endpoint(cfg: gconfig.Config) -> str:
    """Where the dstack guest agent is: `[dstack] endpoint`, else dstack-sdk's default."""
    from dstack_sdk.dstack_client import get_endpoint

    return get_endpoint(cfg.dstack_endpoint)


async def identity_from_agent(cfg: gconfig.Config) -> Identity:
    """`bootstrap`, with a missing or silent guest agent as a StartupError (and a hint)."""
    endpoint = agent_endpoint(cfg)
    if "://" not in endpoint and not os.path.exists(endpoint):
        raise StartupError(f"no dstack guest agent socket at {endpoint} (not inside a dstack "
                           f"CVM, or the socket is not mounted); {OUTSIDE_TEE_HINT}")
    try:
        return await bootstrap(cfg)
    except Exception as e:  # noqa: BLE001 - any failure here is "no usable guest agent"
        raise StartupError(f"the dstack guest agent at {endpoint} did not give the gateway its "
                           f"keys ({type(e).__name__}: {e}); {OUTSIDE_TEE_HINT}") from None


def listening_socket(cfg: gconfig.Config, host: str, port: int) -> socket.socket:
    """Check the data directory, then bind HOST:PORT (before anything else starts), or a
    StartupError."""
    try:
        check_data_dir(cfg.gateway.data_dir)
        return bind(host, port)
    except (ValueError, OSError) as e:
        raise StartupError(str(e)) from None


def url_of(sock: socket.socket) -> str:
    """The http:// URL of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def open_outbox(cfg: gconfig.Config) -> Outbox:
    """The receipt outbox in the data directory, or a StartupError."""
    try:
        g = cfg.gateway
        return Outbox(g.data_dir, g.outbox_durability, max_bytes=g.outbox_max_bytes,
                      retention=g.receipt_retention_seconds)
    except (sqlite3.Error, OSError) as e:
        raise StartupError(f"cannot open the receipt outbox in {cfg.gateway.data_dir}: "
                           f"{e}") from None


def tracer(cfg: gconfig.Config) -> Any:
    """The OpenTelemetry tracer for `[gateway] traces = true` (None when off). Spans go
    wherever the process's OpenTelemetry SDK sends them (e.g. run under
    `opentelemetry-instrument`); with the API alone they are dropped."""
    if not cfg.gateway.traces:
        return None
    try:
        from opentelemetry import trace
    except ImportError:
        raise StartupError("[gateway] traces = true needs the opentelemetry-api package "
                           "(pip install opentelemetry-api)") from None
    return trace.get_tracer("pag.gateway")


def readiness(cfg: gconfig.Config, ident: Identity, outbox: Outbox,
              shipper_running: Any) -> Readiness:
    """The dependencies `/readyz` checks (gateway/api/health.py)."""
    checks = [Check("outbox", outbox.probe)]
    if cfg.log.url:
        checks.append(Check("log", log_probe(cfg.log.url, cfg.log.vkey)))

        async def shipper() -> None:
            if not shipper_running():
                raise RuntimeError("the receipt shipper process is not running")
        checks.append(Check("shipper", shipper))
    if ident.agent is not None:
        checks.append(Check("key_agent", agent_probe(ident.agent)))
    if cfg.shared.redis_url:  # limits, budgets and nonces: no call is served without it
        checks.append(Check("shared_redis", redis_probe(cfg.shared.redis_url)))
    if cfg.leases.redis_url:
        checks.append(Check("leases_redis", redis_probe(cfg.leases.redis_url), required=False))
    return Readiness(checks)


async def attested_app_compose(client: Any, compose_hash: str) -> str | None:
    """The app-compose document from the guest agent's `Info`, if it hashes to the attested
    compose hash (else None: logging a document the quote does not attest would be a lie)."""
    try:
        text = (await client.info()).tcb_info.app_compose
    except Exception as e:  # noqa: BLE001 - an agent without it: the entry goes without
        log.warning("no app-compose document from the guest agent (%s)", type(e).__name__)
        return None
    if not isinstance(text, str) or hashlib.sha256(text.encode()).hexdigest() != compose_hash:
        log.warning("the guest agent's app-compose document is not the attested one; "
                    "the keyset entry goes without it")
        return None
    return text


def lease_source(cfg: gconfig.Config, mac_key: bytes = b"",
                 evidence: EvidenceLog | None = None) -> Leases:
    """The provider-verification engine's lease store behind the gateway's adapter;
    shared through Redis when `[leases]` or `[shared]` names one (entries MACed with a key
    every replica of this app derives from dstack KMS). With `evidence`, every lease's
    evidence is logged before the lease serves."""
    from gateway.verification.base import VerificationError
    from gateway.verification.lease import LeaseStore
    from gateway.verification.shared import SharedLeases

    where = cfg.lease_redis
    shared = SharedLeases(where[0], mac_key, where[1]) if where else None
    return Leases(LeaseStore(shared=shared, publish=evidence_hook(evidence) if evidence
                             else None), VerificationError)


def evidence_hook(evidence: EvidenceLog) -> Any:
    """The lease store's publish hook: log the lease's evidence, or refuse the lease with
    `log_unavailable` (nothing is sent upstream under a lease whose evidence is unlogged)."""
    from gateway.verification.base import VerificationError

    async def publish(route: Any, lease: Any) -> Any:
        try:
            return await evidence.publish(route, lease)
        except LogError as e:
            raise VerificationError("log_unavailable",
                                    f"the lease's evidence entry was not logged: {e}") from e

    return publish


def log_client(cfg: gconfig.Config) -> LogClient:
    """The checked single-entry client of the configured log (keyset and evidence entries)."""
    assert cfg.log.url is not None and cfg.log.vkey is not None  # noqa: S101 - type narrowing: config load requires both with a log
    token = cfg.log.token_file.read_text().strip() if cfg.log.token_file else None
    return LogClient(cfg.log.url, token, cfg.log.vkey, cfg.log.witness_vkeys, cfg.log.quorum)


def start_shipper(cfg: gconfig.Config, outbox: Outbox,
                  status: LogStatus) -> subprocess.Popen[bytes] | None:
    """Start `python -m gateway.receipts.shipper` for the configured log (None without a log),
    with two new doorbell pipes (gateway/receipts/doorbell.py): the outbox's (its read end
    inherited, its write end the outbox's ringer's) and the ledger's (its write end
    inherited, its read end what `status` listens to)."""
    if not cfg.log.url:
        return None
    cmd = [sys.executable, "-m", "gateway.receipts.shipper", "--data", str(cfg.gateway.data_dir),
           "--log", cfg.log.url, "--concurrency", str(cfg.log.concurrency),
           "--parent", str(os.getpid()),
           "--outbox-max-bytes", str(cfg.gateway.outbox_max_bytes)]
    if cfg.log.token_file:
        cmd += ["--token-file", str(cfg.log.token_file)]
    if cfg.log.vkey:
        cmd += ["--vkey", cfg.log.vkey]
    for w in cfg.log.witness_vkeys:
        cmd += ["--witness-vkey", w]
    cmd += ["--quorum", str(cfg.log.quorum)]
    if cfg.gateway.require_log_inclusion:  # answers wait for the log: send receipts at once
        cmd += ["--batch-interval", "0"]
    bell, ring = os.pipe()
    acked, ack = os.pipe()
    try:
        proc = subprocess.Popen([*cmd, "--bell-fd", str(bell), "--ack-fd", str(ack)],  # noqa: S603 - our own interpreter and module; args from the operator's config, no shell
                                pass_fds=(bell, ack))
    except BaseException:
        os.close(ring)
        os.close(acked)
        raise
    finally:
        os.close(bell)
        os.close(ack)
    outbox.ringer.attach(ring)
    status.listen(acked)
    return proc


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


def url(scheme: str, sock: socket.socket) -> str:
    """The URL of a bound listener (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"


def freeze_startup_heap() -> int:
    """Move every object alive now (modules, config, keys, routes: about 70k once the
    gateway listens) out of the garbage collector's view, so its full collections under
    load walk only what was made since; how many were moved. They are still freed when
    no longer referenced; only a cycle among them would now stay. (Under 16 clients a
    full collection took 31-48 ms, seven times in 15 s, and set the gateway's p99.)"""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def log_wait_on_shutdown(grace: float) -> float:
    """Seconds calls waiting for the log may still wait once a stop begins that gives calls
    in flight `grace` seconds: LOG_WAIT_MARGIN less, or half if it is that short."""
    return grace - min(LOG_WAIT_MARGIN, grace / 2)


def draining_server(config: Any, status: LogStatus,
                    stopping: Callable[[], None] = lambda: None) -> Any:
    """A `uvicorn.Server` for `config` whose shutdown (a signal, or `should_exit`) first
    calls `stopping` and drains `status` (`log_wait_on_shutdown` of the config's
    `timeout_graceful_shutdown`), then waits that long for the calls in flight and
    cancels the rest."""
    import uvicorn

    class Server(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            stopping()
            status.drain(log_wait_on_shutdown(self.config.timeout_graceful_shutdown))
            await super().shutdown(sockets)

    return Server(config)


async def serve(cfg: gconfig.Config, sock: socket.socket, stop: StopSignal, *,
                tls: bool | None = None, tls_sock: socket.socket | None = None) -> None:
    """Run on the bound `sock` (and `tls_sock`, always HTTPS) until SIGTERM/SIGINT;
    `tls` None means `[tls] enabled`. StartupError if a step fails."""
    import uvicorn

    from gateway.api.app import Gateway
    from gateway.identity.keys import write_tls_files

    tls = cfg.tls.enabled if tls is None else tls
    spans = tracer(cfg)
    ident = await identity_from_agent(cfg)
    if stop.received:
        return
    logc = log_client(cfg)
    try:
        logged = await keysets.ensure_logged(logc, ident.attest, ident.gateway["keyset_hash"],
                                             cfg.log.vkey or "", cfg.gateway.data_dir,
                                             now_rfc3339, ident.app_compose)
    except BaseException:
        await logc.close()
        raise
    if stop.received:
        await logc.close()
        return
    try:
        outbox = open_outbox(cfg)
    except BaseException:
        await logc.close()
        raise
    status = LogStatus(outbox, bool(cfg.log.url))
    shipper = start_shipper(cfg, outbox, status)
    cert = key = None
    if tls or tls_sock is not None:
        cert, key = write_tls_files(ident.keys, cfg.gateway.data_dir / "tls",
                                    hostnames=cfg.tls.hostnames,
                                    ip_addresses=cfg.tls.ip_addresses)

    stopping = False

    async def watchdog() -> None:
        nonlocal shipper
        while shipper is not None and not stopping:
            await asyncio.sleep(1.0)
            if shipper.poll() is not None and not stopping:
                log.error("receipt shipper exited with %s; restarting it", shipper.returncode)
                shipper = start_shipper(cfg, outbox, status)

    servers: list[tuple[uvicorn.Server, socket.socket]] = []

    def stop_watching() -> None:
        nonlocal stopping
        stopping = True  # a shipper that exits now (a signal to the group) stays down
        for s, _ in servers:  # the signal reaches one server: both stop now, in one grace
            s.should_exit = True

    def server(app: Any, with_tls: bool, lifespan: str) -> uvicorn.Server:
        config = uvicorn_config(
            app, cfg.server, errors.MALFORMED, lifespan=lifespan, loop="none", log_config=None,
            access_log=False, log_level="warning",
            timeout_graceful_shutdown=cfg.gateway.shutdown_grace,
            ssl_certfile=str(cert) if with_tls else None,
            ssl_keyfile=str(key) if with_tls else None)
        return draining_server(config, status, stop_watching)

    watch = asyncio.create_task(watchdog())
    try:
        ready = readiness(cfg, ident, outbox,
                          lambda: shipper is not None and shipper.poll() is None)
        app = Gateway(cfg, signer=ReceiptSigner(ident.receipt_key), identity=ident.gateway,
                      outbox=outbox, status=status,
                      leases=lease_source(cfg, ident.lease_mac_key,
                                          EvidenceLog(logc, now_rfc3339)),
                      attest=ident.attest, e2ee_key=ident.e2ee_private,
                      keyset_index=logged.index, keyset_proof=logged.proof,
                      readiness=ready, tracer=spans, shared_mac_key=ident.shared_mac_key)
        servers.append((server(app, tls, "on"), sock))
        if tls_sock is not None:  # the app's lifespan runs once, with the main listener
            servers.append((server(app, True, "off"), tls_sock))
        tasks = [asyncio.create_task(s.serve(sockets=[k])) for s, k in servers]
        while not all(s.started for s, _ in servers) and not any(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        if stop.received:  # a signal before uvicorn took over the handlers
            for s, _ in servers:
                s.should_exit = True
        elif all(s.started for s, _ in servers):
            line = {"gateway": url("https" if tls else "http", sock),
                    "receipt_signing_key": base64.b64encode(
                        ident.receipt_key.public_key().public_bytes_raw()).decode(),
                    "keyset_hash": ident.gateway["keyset_hash"],
                    "keyset_index": logged.index,
                    "tls_spki_sha256": ident.keys.keyset.tls_spki_sha256}
            if tls_sock is not None:
                line["gateway_tls"] = url("https", tls_sock)
            freeze_startup_heap()
            print(json.dumps(line), flush=True)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for s, _ in servers:  # one stopped (a signal, or a failure): stop the other too
            s.should_exit = True
        await asyncio.gather(*tasks)
    finally:
        watch.cancel()
        stop_process(shipper)
        outbox.close()
        await logc.close()


def main(argv: list[str]) -> int:
    """Entry point of `python -m gateway serve`."""
    ap = argparse.ArgumentParser(prog="python -m gateway serve")
    ap.add_argument("--config", required=True)
    ap.add_argument("--listen", required=True, type=listen_address, metavar="HOST:PORT")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tls", dest="tls", action="store_true", default=None,
                      help="serve HTTPS with the attested TLS key on --listen (the default "
                      "unless [tls] enabled = false)")
    mode.add_argument("--no-tls", dest="tls", action="store_false",
                      help="serve plain HTTP on --listen")
    ap.add_argument("--tls-listen", type=listen_address, metavar="HOST:PORT",
                    help="also serve HTTPS with the attested TLS key here")
    a = ap.parse_args(argv)
    try:
        cfg = gconfig.load(a.config)
    except (gconfig.ConfigError, ValueError) as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 2
    if not cfg.log.url:
        print("gateway: [log] url is required: every receipt names the log index of the "
              "gateway's keyset entry, which is logged before the first receipt", file=sys.stderr)
        return 2
    if cfg.log.token_file is not None and not os.access(cfg.log.token_file, os.R_OK):
        print(f"gateway: cannot read [log].token_file {cfg.log.token_file}", file=sys.stderr)
        return 2
    log_json()
    import uvloop

    stop = StopSignal()
    socks: list[socket.socket] = []
    try:
        socks.append(listening_socket(cfg, *a.listen))
        if a.tls_listen is not None:
            socks.append(listening_socket(cfg, *a.tls_listen))
        uvloop.run(serve(cfg, socks[0], stop, tls=a.tls,
                         tls_sock=socks[1] if len(socks) > 1 else None))
    except StartupError as e:
        print(f"gateway: {e}", file=sys.stderr)
        return 1
    except LogError as e:
        print(f"gateway: the keyset entry cannot be logged: {e}", file=sys.stderr)
        return 1
    finally:
        for s in socks:
            s.close()
    return 0
