"""A dstack guest-agent simulator speaking the real guest-agent protocol.

`python -m gateway.identity.dstack_sim --socket PATH --data DIR [--app-id HEX] [--compose-hash HEX]`

HTTP over a unix socket; each RPC is `POST /<Method>` with a JSON body and a
JSON answer, bytes as lower-case hex, exactly the shapes `dstack_sdk`'s
`DstackClient` / `AsyncDstackClient` send and parse: `GetKey`, `GetQuote`,
`Info`, `Version`, `EmitEvent`, `GetTlsKey`. Errors are HTTP 400 with
`{"error": MESSAGE}`.

Invariants:

* Keys are deterministic: `GetKey(path)` returns HKDF-SHA256 of the app key,
  itself HKDF-SHA256 of the 32-byte seed in `DIR/sim-seed` (created once, mode
  0600) and the app id. As in dstack, the key depends on the path only (not on
  `purpose` or `algorithm`); a restart with the same DIR and app id gives the
  same keys.
* Every quote is built by `verifier.tee.quote.build_simulated_quote`, so
  `verifier.tee.quote.is_simulated` is true of it; its report data is the caller's
  (zero-padded to 64 bytes) and its RTMR3 is the replay of the event log
  returned with it (`verifier.tee.eventlog.replay_rtmr3`).
* The `signature_chain` of `GetKey` is *simulated*: secp256k1 signatures over
  SHA-256 (RFC 6979, deterministic) by a simulated app key and KMS root (no
  Ethereum-style recovery id: the last byte is 0xff). Nothing should treat it
  as a KMS proof.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import hashlib
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import NameOID

from verifier.tee import eventlog, quote

SIM_VERSION = "0.5.4-pag-simulator"
SEED_FILE = "sim-seed"
_SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)


def _measure(label: str) -> bytes:
    """A fixed 48-byte fake measurement (clearly not a real one)."""
    return hashlib.sha384(b"PAG-SIMULATED " + label.encode()).digest()


def default_app_compose(app_name: str) -> str:
    """The simulated app-compose JSON (its SHA-256 is the default compose hash)."""
    return json.dumps({"manifest_version": 2, "name": app_name, "runner": "docker-compose",
                       "docker_compose_file": "# simulated by gateway.identity.dstack_sim\n",
                       "kms_enabled": True, "key_provider": "kms", "simulated": True},
                      separators=(",", ":"), sort_keys=True)


def _parse_hex(value: str | None, size: int, what: str) -> bytes | None:
    if value is None:
        return None
    raw = bytes.fromhex(value)
    if len(raw) != size:
        raise ValueError(f"{what} must be {size} bytes of hex")
    return raw


def load_seed(data_dir: str | os.PathLike[str]) -> bytes:
    """The simulator's 32-byte root seed, created on first use (mode 0600)."""
    path = Path(data_dir) / SEED_FILE
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        seed = path.read_bytes()
        if len(seed) != 32:
            raise ValueError(f"{path} must hold 32 bytes") from None
        return seed
    seed = os.urandom(32)
    with os.fdopen(fd, "wb") as f:
        f.write(seed)
        f.flush()
        os.fsync(f.fileno())
    return seed


class SimulatedAgent:
    """The guest agent's state and RPC logic (no transport)."""

    def __init__(self, data_dir: str | os.PathLike[str], *, app_id: str | None = None,
                 compose_hash: str | None = None, app_name: str = "pag-simulated-app",
                 instance_id: str | None = None) -> None:
        self.seed = load_seed(data_dir)
        self.app_name = app_name
        self.app_compose = default_app_compose(app_name)
        self.compose_hash = _parse_hex(compose_hash, 32, "compose hash") or hashlib.sha256(
            self.app_compose.encode()).digest()
        # dstack's default app id is the compose hash truncated to 20 bytes.
        self.app_id = _parse_hex(app_id, 20, "app id") or self.compose_hash[:20]
        self.instance_id = _parse_hex(instance_id, 20, "instance id") or _hkdf(
            self.seed, b"pag-sim", b"instance-id|" + self.app_id, 20)
        self.device_id = _hkdf(self.seed, b"pag-sim", b"device-id", 32)
        self.os_image_hash = hashlib.sha256(b"PAG-SIMULATED os image").digest()
        self.app_key = _hkdf(self.seed, self.app_id, b"pag-sim app key")
        self.kms_root = self._k256(_hkdf(self.seed, b"pag-sim", b"kms root key"))
        self.key_provider = {"name": "kms", "id": self._k256_pub(self.kms_root).hex()}
        self.mr_td = _measure("mr_td")
        self.boot_rtmrs = (_measure("rtmr0"), _measure("rtmr1"), _measure("rtmr2"))
        self._lock = threading.Lock()
        self.events: list[eventlog.Event] = [
            eventlog.runtime_event("system-preparing", b""),
            eventlog.runtime_event("app-id", self.app_id),
            eventlog.runtime_event("compose-hash", self.compose_hash),
            eventlog.runtime_event("instance-id", self.instance_id),
            eventlog.runtime_event("boot-mr-done", b""),
            eventlog.runtime_event("os-image-hash", self.os_image_hash),
            eventlog.runtime_event("key-provider", json.dumps(
                self.key_provider, separators=(",", ":")).encode()),
            eventlog.runtime_event("storage-fs", b"ext4"),
            eventlog.runtime_event("system-ready", b""),
        ]

    # -- helpers ---------------------------------------------------------------
    @staticmethod
    def _k256(secret: bytes) -> ec.EllipticCurvePrivateKey:
        scalar = int.from_bytes(secret, "big") % (_SECP256K1_N - 1) + 1
        return ec.derive_private_key(scalar, ec.SECP256K1())

    @staticmethod
    def _k256_pub(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.public_key().public_bytes(serialization.Encoding.X962,
                                             serialization.PublicFormat.CompressedPoint)

    @staticmethod
    def _k256_sign(key: ec.EllipticCurvePrivateKey, msg: bytes) -> bytes:
        r, s = decode_dss_signature(
            key.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big") + b"\xff"

    def derive_key(self, path: str) -> bytes:
        """The 32-byte key for `path` (valid as an Ed25519 seed and a secp256k1 scalar)."""
        for counter in range(256):
            key = _hkdf(self.app_key, b"pag-sim get-key",
                        path.encode() + (b"" if counter == 0 else bytes([counter])))
            if 0 < int.from_bytes(key, "big") < _SECP256K1_N:
                return key
        raise RuntimeError("key derivation failed")  # probability ~2^-32768

    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """Current (RTMR0..RTMR3); RTMR3 is the replay of the event log."""
        with self._lock:
            events = list(self.events)
        return (*self.boot_rtmrs, eventlog.replay_rtmr3(events))

    def event_log_json(self) -> str:
        """The event log as dstack returns it."""
        with self._lock:
            return eventlog.dumps_event_log(self.events)

    def vm_config(self) -> str:
        """A simulated VM config JSON string."""
        return json.dumps({"spec_version": 1, "os_image_hash": self.os_image_hash.hex(),
                           "cpu_count": 1, "memory_size": 1 << 30, "simulated": True},
                          separators=(",", ":"))

    # -- RPCs ------------------------------------------------------------------
    def get_key(self, req: dict[str, Any]) -> dict[str, Any]:
        """`GetKey`: {path, purpose, algorithm} -> {key, signature_chain}."""
        path, purpose = str(req.get("path", "")), str(req.get("purpose", ""))
        algorithm = str(req.get("algorithm", "") or "secp256k1").lower()
        key = self.derive_key(path)
        if algorithm == "ed25519":
            pub = ed25519.Ed25519PrivateKey.from_private_bytes(key).public_key().public_bytes_raw()
        elif algorithm in ("secp256k1", "k256"):
            pub = self._k256_pub(self._k256(key))
        else:
            raise ValueError("Unsupported algorithm")
        app_k256 = self._k256(self.app_key)
        sig = self._k256_sign(app_k256, f"{purpose}:{pub.hex()}".encode())
        root_sig = self._k256_sign(self.kms_root, b"dstack-kms-issued:" + self.app_id
                                   + self._k256_pub(app_k256))
        return {"key": key.hex(), "signature_chain": [sig.hex(), root_sig.hex()]}

    def get_quote(self, req: dict[str, Any]) -> dict[str, Any]:
        """`GetQuote`: {report_data: HEX<=64 bytes} -> {quote, event_log, report_data, vm_config}."""
        report_data = bytes.fromhex(str(req.get("report_data", "")))
        if len(report_data) > 64:
            raise ValueError("Report data is too long")
        report_data = report_data.ljust(64, b"\x00")
        with self._lock:
            events = list(self.events)
        rtmrs = (*self.boot_rtmrs, eventlog.replay_rtmr3(events))
        q = quote.build_simulated_quote(report_data, mr_td=self.mr_td, rtmrs=rtmrs,
                                        mr_seam=_measure("mr_seam"),
                                        td_attributes=bytes(8), xfam=bytes.fromhex(
                                            "e702060000000000"))
        return {"quote": q.hex(), "event_log": eventlog.dumps_event_log(events),
                "report_data": report_data.hex(), "vm_config": self.vm_config()}

    def emit_event(self, req: dict[str, Any]) -> dict[str, Any]:
        """`EmitEvent`: {event, payload: HEX} extends RTMR3 (in memory only)."""
        name = str(req.get("event", ""))
        if not name:
            raise ValueError("event name cannot be empty")
        payload = bytes.fromhex(str(req.get("payload", "")))
        with self._lock:
            self.events.append(eventlog.runtime_event(name, payload))
        return {}

    def info(self, req: dict[str, Any]) -> dict[str, Any]:
        """`Info`: app identity and TCB info (tcb_info is a JSON string, as in dstack)."""
        rtmrs = self.rtmrs()
        with self._lock:
            events = [eventlog.event_to_json(e) for e in self.events]
        mr_aggregated = hashlib.sha256(self.mr_td + b"".join(rtmrs)).digest()
        tcb_info = {"mrtd": self.mr_td.hex(), "rtmr0": rtmrs[0].hex(), "rtmr1": rtmrs[1].hex(),
                    "rtmr2": rtmrs[2].hex(), "rtmr3": rtmrs[3].hex(),
                    "mr_aggregated": mr_aggregated.hex(),
                    "os_image_hash": self.os_image_hash.hex(),
                    "compose_hash": self.compose_hash.hex(), "device_id": self.device_id.hex(),
                    "event_log": events, "app_compose": self.app_compose}
        return {"app_id": self.app_id.hex(), "instance_id": self.instance_id.hex(),
                "app_cert": "", "tcb_info": json.dumps(tcb_info, indent=2),
                "app_name": self.app_name, "device_id": self.device_id.hex(),
                "mr_aggregated": mr_aggregated.hex(), "os_image_hash": self.os_image_hash.hex(),
                "key_provider_info": json.dumps(self.key_provider, separators=(",", ":")),
                "compose_hash": self.compose_hash.hex(), "vm_config": self.vm_config(),
                "cloud_vendor": "", "cloud_product": ""}

    def version(self, req: dict[str, Any]) -> dict[str, Any]:
        """`Version`."""
        return {"version": SIM_VERSION, "rev": "simulated"}

    def get_tls_key(self, req: dict[str, Any]) -> dict[str, Any]:
        """`GetTlsKey`: a fresh P-256 key and a self-signed certificate (PEM)."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = str(req.get("subject", "") or "dstack-simulated")
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
        now = datetime.datetime.now(datetime.UTC)
        not_before = req.get("not_before")
        not_after = req.get("not_after")
        builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(datetime.datetime.fromtimestamp(int(not_before), datetime.UTC)
                                     if not_before is not None else now)
                   .not_valid_after(datetime.datetime.fromtimestamp(int(not_after), datetime.UTC)
                                    if not_after is not None
                                    else now + datetime.timedelta(days=365)))
        alt = [x509.DNSName(str(n)) for n in req.get("alt_names", []) or []]
        if alt:
            builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        cert = builder.sign(key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()).decode()
        return {"key": key_pem,
                "certificate_chain": [cert.public_bytes(serialization.Encoding.PEM).decode()]}

    def dispatch(self, method: str, req: dict[str, Any]) -> dict[str, Any]:
        """Run one RPC by name; raises KeyError for an unknown method."""
        table = {"GetKey": self.get_key, "GetQuote": self.get_quote, "Info": self.info,
                 "Version": self.version, "EmitEvent": self.emit_event,
                 "GetTlsKey": self.get_tls_key}
        return table[method](req)


class SimulatorServer:
    """The simulator on a unix socket. Use `start`/`stop` inside a running event loop,
    or `start_in_thread`/`stop_in_thread` from synchronous code (its own loop)."""

    def __init__(self, socket_path: str | os.PathLike[str], data_dir: str | os.PathLike[str],
                 *, app_id: str | None = None, compose_hash: str | None = None,
                 app_name: str = "pag-simulated-app", instance_id: str | None = None) -> None:
        self.socket_path = str(socket_path)
        self.agent = SimulatedAgent(data_dir, app_id=app_id, compose_hash=compose_hash,
                                    app_name=app_name, instance_id=instance_id)
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    def make_app(self) -> web.Application:
        """The aiohttp application serving the RPCs."""

        async def handle(request: web.Request) -> web.Response:
            method = request.match_info["method"]
            if method.startswith("prpc/"):
                method = method.split(".", 1)[-1] if "." in method else method[5:]
            body = await request.read()
            try:
                req = json.loads(body) if body.strip() else {}
                if not isinstance(req, dict):
                    raise ValueError("request body must be a JSON object")
            except ValueError as e:
                return web.json_response({"error": f"bad request: {e}"}, status=400)
            try:
                result = self.agent.dispatch(method, req)
            except KeyError:
                return web.json_response({"error": f"method not found: {method}"}, status=404)
            except ValueError as e:
                return web.json_response({"error": str(e)}, status=400)
            return web.json_response(result)

        app = web.Application()
        app.router.add_route("*", "/{method:.+}", handle)
        return app

    async def start(self) -> None:
        """Listen on the socket (an existing stale socket file is replaced)."""
        path = Path(self.socket_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._runner = web.AppRunner(self.make_app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        await web.UnixSite(self._runner, self.socket_path).start()

    async def stop(self) -> None:
        """Stop listening and remove the socket file."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        with contextlib.suppress(FileNotFoundError):
            Path(self.socket_path).unlink()

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def start_in_thread(self) -> None:
        """Serve from a daemon thread with its own loop; returns once listening."""
        ready = threading.Event()
        error: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            self._stopped = asyncio.Event()
            try:
                loop.run_until_complete(self.start())
            except BaseException as e:
                error.append(e)
                ready.set()
                loop.close()
                return
            ready.set()
            loop.run_until_complete(self._stopped.wait())
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=run, name="dstack-sim", daemon=True)
        self._thread.start()
        ready.wait()
        if error:
            raise error[0]

    def stop_in_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started by `start_in_thread` and join its thread."""
        if self._thread is None or self._loop is None or self._stopped is None:
            return
        self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(timeout)
        self._thread = None


async def _serve(args: argparse.Namespace) -> None:
    server = SimulatorServer(args.socket, args.data, app_id=args.app_id,
                             compose_hash=args.compose_hash, app_name=args.app_name)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(json.dumps({"socket": server.socket_path, "app_id": server.agent.app_id.hex(),
                      "compose_hash": server.agent.compose_hash.hex(), "simulated": True}),
          flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop()


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m gateway.identity.dstack_sim`."""
    ap = argparse.ArgumentParser(prog="python -m gateway.identity.dstack_sim",
                                 description="dstack guest-agent simulator (simulated quotes)")
    ap.add_argument("--socket", required=True, help="unix socket path to listen on")
    ap.add_argument("--data", required=True, help="directory holding the simulator seed")
    ap.add_argument("--app-id", help="20-byte app id, hex (default: compose hash[:20])")
    ap.add_argument("--compose-hash", help="32-byte compose hash, hex")
    ap.add_argument("--app-name", default="pag-simulated-app")
    args = ap.parse_args(argv)
    try:
        asyncio.run(_serve(args))
    except ValueError as e:
        print(f"dstack_sim: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
