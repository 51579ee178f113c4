"""python -m tlog serve|vkey — run the log, or print its verifier key."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from tlog.service import add_limit_arguments, limits_from_args, listen_address


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tlog", description="C2SP tlog-tiles log")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the log")
    s.add_argument("--data", type=Path, required=True, help="directory for keys and storage")
    s.add_argument("--listen", type=listen_address, required=True, metavar="HOST:PORT")
    s.add_argument("--origin", help="log origin and key name (first start only)")
    s.add_argument("--database", help="postgresql://… URL (default: SQLite in --data)")
    s.add_argument("--witness", action="append", default=[], metavar="URL",
                   help="witness to submit checkpoints to (repeat)")
    s.add_argument("--quorum", type=int, default=0,
                   help="answer appends only once K witnesses cosigned")
    s.add_argument("--witness-timeout", type=float, default=5.0)
    s.add_argument("--max-entry", type=int, default=65535, help="largest entry in bytes")
    s.add_argument("--dstack", default=os.environ.get("DSTACK_SIMULATOR_ENDPOINT"),
                   help="dstack guest-agent socket: derive the log key from its KMS")
    add_limit_arguments(s)
    v = sub.add_parser("vkey", help="print the log's verifier key (creating keys if needed)")
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--origin")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tlog import keys

    if args.cmd == "vkey":
        try:
            print(keys.load_signer(args.data, args.origin).vkey)
        except ValueError as e:
            print(f"tlog: {e}", file=sys.stderr)
            return 2
        return 0
    return serve(args)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tlog import keys
    from tlog.sequencer import Log
    from tlog.server import TlogApp
    from tlog.service import uvicorn_config
    from tlog.witnessing import WitnessPool

    logging.basicConfig(level=logging.INFO, format="tlog: %(message)s")
    if args.quorum > len(args.witness) or args.quorum < 0:
        print("tlog: --quorum must be between 0 and the number of --witness", file=sys.stderr)
        return 2
    if not 0 < args.max_entry <= 65535:
        print("tlog: --max-entry must be 1..65535", file=sys.stderr)
        return 2
    try:
        limits = limits_from_args(args)
    except ValueError as e:
        print(f"tlog: {e}", file=sys.stderr)
        return 2
    try:
        seed = None
        if args.dstack:
            seed = asyncio.run(keys.dstack_seed(args.dstack, "pag/tlog/note-key"))
        signer = keys.load_signer(args.data, args.origin, seed)
        token = keys.load_token(args.data)
        store = open_store(args.data, args.database)
    except (ValueError, OSError) as e:
        print(f"tlog: {e}", file=sys.stderr)
        return 2
    pool = WitnessPool(args.witness, quorum=args.quorum, timeout=args.witness_timeout) \
        if args.witness else None
    log = Log(store, signer, witnesses=pool)
    app = TlogApp(log, token, args.max_entry)
    host, port = args.listen
    config = uvicorn_config(app, limits, host=host, port=port, log_level="warning",
                            lifespan="on", access_log=False)
    server = uvicorn.Server(config)
    print(f"tlog: {signer.name} serving on http://{host}:{port} (size {log.head.size})",
          file=sys.stderr, flush=True)
    server.run()
    store.close()
    return 0


def open_store(data: Path, database: str | None):  # noqa: ANN201 - a Storage backend
    """The storage backend: SQLite in DIR, or PostgreSQL for a postgresql:// URL."""
    data.mkdir(parents=True, exist_ok=True)
    if database is None:
        from tlog.sqlite_store import SQLiteStore

        return SQLiteStore(data / "log.db")
    if database.startswith(("postgresql://", "postgres://")):
        from tlog.postgres_store import PostgresStore

        return PostgresStore(database)
    raise ValueError(f"unsupported --database {database!r} (use postgresql://…)")


if __name__ == "__main__":
    sys.exit(main())
