"""python -m witness serve|vkey — run a C2SP tlog-witness, or print its key."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from pathlib import Path

from tlog import note
from tlog.service import (
    ServerLimits,
    add_limit_arguments,
    limits_from_args,
    listen_address,
    package_version,
)
from witness import cosignature

DEFAULT_NAME = "pag.local/witness"
DSTACK_KEY_PATH = "pag/witness/cosign-key"


def load_signer(data: Path, name: str | None, seed: bytes | None = None
                ) -> cosignature.CosignatureSigner:
    """The witness cosigning key, created (0600) on first use; with `seed` (derived from
    the dstack KMS) nothing secret is stored, only `witness.vkey`."""
    from tlog.service import write_private, write_public

    data.mkdir(parents=True, exist_ok=True)
    key_file = data / "witness.key"
    if seed is not None:
        signer = cosignature.CosignatureSigner(name or DEFAULT_NAME, seed)
    elif key_file.exists():
        signer = cosignature.parse_skey(key_file.read_text())
        if name is not None and name != signer.name:
            raise ValueError(f"{key_file} is the key of {signer.name!r}, not {name!r}")
    else:
        signer = cosignature.CosignatureSigner(name or DEFAULT_NAME, secrets.token_bytes(32))
        write_private(key_file, signer.skey + "\n")
    write_public(data / "witness.vkey", signer.vkey + "\n")
    return signer


def parse_logs(specs: list[str], config: Path | None) -> dict[str, note.Ed25519Verifier]:
    """Logs to witness from `ORIGIN=VKEY` flags and a config file of such lines.

    The config file has one `ORIGIN=VKEY` (or a bare VKEY, origin = key name)
    per line; blank lines and lines starting with # are ignored.
    """
    lines = list(specs)
    if config is not None:
        lines += [ln.strip() for ln in config.read_text().splitlines()
                  if ln.strip() and not ln.strip().startswith("#")]
    logs: dict[str, note.Ed25519Verifier] = {}
    for spec in lines:
        origin, sep, vkey = spec.partition("=")
        if not sep:
            origin, vkey = "", spec
        v = note.verifier_from_vkey(vkey)
        logs[origin or v.name] = v
    return logs


EXIT_USAGE = 2
"""Exit status for a command line or data directory that cannot work as given."""
EXIT_ENVIRONMENT = 1
"""Exit status for what the environment refused (port in use, state unusable)."""


def fail(status: int, message: str) -> int:
    """Print the one-line reason and return the exit status."""
    print(f"witness: {message}", file=sys.stderr, flush=True)
    return status


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m witness", description="C2SP tlog-witness")
    p.add_argument("--version", action="version",
                   version=f"%(prog)s (private-ai-gateway) {package_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--data", type=Path, required=True)
    s.add_argument("--listen", type=listen_address, required=True, metavar="HOST:PORT")
    s.add_argument("--log", action="append", default=[], metavar="ORIGIN=VKEY")
    s.add_argument("--config", type=Path, help="file of ORIGIN=VKEY lines")
    s.add_argument("--name", help="witness key name (first start only)")
    add_limit_arguments(s)
    v = sub.add_parser("vkey")
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--name")
    for sp in (s, v):
        sp.add_argument("--dstack", default=os.environ.get("DSTACK_SIMULATOR_ENDPOINT"),
                        help="dstack guest-agent socket: derive the witness key from its KMS")
    return p


def kms_seed(endpoint: str | None) -> bytes | None:
    """The witness key's seed from the dstack KMS through the guest agent at `endpoint`
    (None without one); RuntimeError, in one line, if the agent does not give it."""
    if not endpoint:
        return None
    from tlog.service import dstack_seed

    try:
        return asyncio.run(dstack_seed(endpoint, DSTACK_KEY_PATH))
    except Exception as e:  # noqa: BLE001 - any failure of the key service, one line
        raise RuntimeError(f"cannot derive the witness key from dstack at {endpoint}: "
                           f"{type(e).__name__}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    from tlog.service import check_data_dir

    args = parser().parse_args(argv)
    try:
        seed = kms_seed(args.dstack)
    except RuntimeError as e:
        return fail(EXIT_ENVIRONMENT, str(e))
    try:
        check_data_dir(args.data)
        signer = load_signer(args.data, args.name, seed)
        if args.cmd == "vkey":
            print(signer.vkey)
            return 0
        logs = parse_logs(args.log, args.config)
        limits = limits_from_args(args)
    except (ValueError, OSError) as e:
        return fail(EXIT_USAGE, str(e))
    if not logs:
        return fail(EXIT_USAGE, "no logs configured (--log ORIGIN=VKEY)")
    return serve(args, signer, logs, limits)


def serve(args: argparse.Namespace, signer: cosignature.CosignatureSigner,
          logs: dict[str, note.Ed25519Verifier], limits: ServerLimits) -> int:
    """Bind the port, open the state, then serve until SIGTERM."""
    import sqlite3

    import uvicorn

    from tlog.service import StopSignal, bind, uvicorn_config
    from witness.server import Witness, WitnessApp
    from witness.state import State

    logging.basicConfig(level=logging.INFO, format="witness: %(message)s")
    stop = StopSignal()  # SIGTERM: stop serving, then close the state (exit 0)
    host, port = args.listen
    try:
        sock = bind(host, port)
        port = sock.getsockname()[1]
    except OSError as e:
        return fail(EXIT_ENVIRONMENT, str(e))
    try:
        state = State(args.data / "witness.db")
    except sqlite3.Error as e:
        return fail(EXIT_ENVIRONMENT, f"cannot open {args.data / 'witness.db'}: {e}")
    app = WitnessApp(Witness(state, signer, logs))
    print(f"witness: {signer.name} witnessing {', '.join(sorted(logs))} on http://{host}:{port}",
          file=sys.stderr, flush=True)
    if not stop.received:
        uvicorn.Server(uvicorn_config(app, limits, log_level="warning", access_log=False)).run(
            sockets=[sock])
    state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
