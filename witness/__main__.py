"""python -m witness serve|vkey — run a C2SP tlog-witness, or print its key."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from tlog import note
from tlog.service import add_limit_arguments, limits_from_args, listen_address
from witness import cosignature

DEFAULT_NAME = "pag.local/witness"


def load_signer(data: Path, name: str | None) -> cosignature.CosignatureSigner:
    """The witness cosigning key, created (0600) on first use."""
    from tlog.service import write_private, write_public

    data.mkdir(parents=True, exist_ok=True)
    key_file = data / "witness.key"
    if key_file.exists():
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m witness", description="C2SP tlog-witness")
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
    args = p.parse_args(argv)
    try:
        signer = load_signer(args.data, args.name)
        if args.cmd == "vkey":
            print(signer.vkey)
            return 0
        logs = parse_logs(args.log, args.config)
        limits = limits_from_args(args)
    except (ValueError, OSError) as e:
        print(f"witness: {e}", file=sys.stderr)
        return 2
    if not logs:
        print("witness: no logs configured (--log ORIGIN=VKEY)", file=sys.stderr)
        return 2
    import uvicorn

    from tlog.service import uvicorn_config
    from witness.server import Witness, WitnessApp
    from witness.state import State

    logging.basicConfig(level=logging.INFO, format="witness: %(message)s")
    state = State(args.data / "witness.db")
    app = WitnessApp(Witness(state, signer, logs))
    host, port = args.listen
    print(f"witness: {signer.name} witnessing {', '.join(sorted(logs))} on http://{host}:{port}",
          file=sys.stderr, flush=True)
    uvicorn.Server(uvicorn_config(app, limits, host=host, port=port, log_level="warning",
                                  access_log=False)).run()
    state.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
