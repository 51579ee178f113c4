"""python -m tlog serve|vkey — run the log, or print its verifier key."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from tlog.service import (
    add_limit_arguments,
    dstack_seed,
    limits_from_args,
    listen_address,
    package_version,
    seconds,
)

DSTACK_KEY_PATH = "pag/tlog/note-key"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tlog", description="C2SP tlog-tiles log")
    p.add_argument("--version", action="version",
                   version=f"%(prog)s (private-ai-gateway) {package_version()}")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="run the log")
    s.add_argument("--data", type=Path, required=True, help="directory for keys and storage")
    s.add_argument("--listen", type=listen_address, required=True, metavar="HOST:PORT")
    s.add_argument("--origin", help="log origin and key name (first start only)")
    s.add_argument("--database", help="postgresql://… URL (default: SQLite in --data); "
                   "several processes on one database are replicas, one of which sequences")
    s.add_argument("--lease-ttl", type=float, default=3.0, metavar="SECONDS",
                   help="PostgreSQL: how long the sequencer lease lasts without renewal")
    s.add_argument("--advertise", metavar="URL",
                   help="PostgreSQL: this replica's URL as other replicas name it to clients "
                        "(default http://HOST:PORT of --listen)")
    s.add_argument("--witness", action="append", default=[], metavar="URL",
                   help="witness to submit checkpoints to, http(s)://host[:port][/prefix] "
                        "(repeat)")
    s.add_argument("--witness-vkey", action="append", default=[], metavar="VKEY",
                   help="a witness's cosignature key, or a file holding it (repeat); only "
                        "cosignatures that verify under one of these are kept, served and "
                        "counted")
    s.add_argument("--quorum", type=int, default=0,
                   help="answer appends only once K distinct witness keys cosigned")
    s.add_argument("--witness-timeout", type=seconds, default=5.0)
    s.add_argument("--max-entry", type=int, default=65535, help="largest entry in bytes")
    s.add_argument("--dstack", default=os.environ.get("DSTACK_SIMULATOR_ENDPOINT"),
                   help="dstack guest-agent socket: derive the log key from its KMS")
    add_limit_arguments(s)
    v = sub.add_parser("vkey", help="print the log's verifier key (creating keys if needed)")
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--origin")
    v.add_argument("--dstack", default=os.environ.get("DSTACK_SIMULATOR_ENDPOINT"),
                   help="dstack guest-agent socket: the key derived from its KMS (as serve)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from tlog import keys

    if args.cmd == "vkey":
        from tlog.service import check_data_dir

        try:
            check_data_dir(args.data)
        except ValueError as e:
            return fail(EXIT_USAGE, str(e))
        try:
            seed = kms_seed(args.dstack)
        except RuntimeError as e:
            return fail(EXIT_ENVIRONMENT, str(e))
        try:
            print(keys.load_signer(args.data, args.origin, seed).vkey)
        except (ValueError, OSError) as e:
            return fail(EXIT_USAGE, str(e))
        return 0
    return serve(args)


EXIT_USAGE = 2
"""Exit status for a command line or data directory that cannot work as given."""
EXIT_ENVIRONMENT = 1
"""Exit status for what the environment refused: port in use, data dir locked by another
process, database or key service unreachable, stored log unusable."""


CRASH_AFTER = "PAG_TLOG_CRASH_AFTER"
"""Test hook: set to a storage step name (tlog.storage.STEPS), the process exits at once,
as if killed, right after the first time that step completes."""


def crash_after(step: str | None):  # noqa: ANN201 - tlog.storage.FaultHook | None
    """The FaultHook for CRASH_AFTER (None when unset)."""
    if not step:
        return None

    def hook(name: str) -> None:
        if name == step:
            os._exit(137)

    return hook


def kms_seed(endpoint: str | None) -> bytes | None:
    """The log key's seed from the dstack KMS through the guest agent at `endpoint` (None
    without one); RuntimeError, in one line, if the agent does not give it."""
    if not endpoint:
        return None
    try:
        return asyncio.run(dstack_seed(endpoint, DSTACK_KEY_PATH))
    except Exception as e:  # noqa: BLE001 - any failure of the key service, one line
        raise RuntimeError(f"cannot derive the log key from dstack at {endpoint}: "
                           f"{type(e).__name__}: {e}") from None


def fail(status: int, message: str) -> int:
    """Print the one-line reason and return the exit status."""
    print(f"tlog: {message}", file=sys.stderr, flush=True)
    return status


def serve(args: argparse.Namespace) -> int:
    """Check the arguments, bind the port, load keys and storage, then serve until SIGTERM."""
    import uvicorn

    from tlog import keys, note
    from tlog.sequencer import Log
    from tlog.server import TlogApp
    from tlog.service import (
        LockHeld,
        StopSignal,
        bind,
        check_data_dir,
        limit_malloc_arenas,
        uvicorn_config,
    )
    from tlog.storage import StorageError

    limit_malloc_arenas()  # before the store's and the server's threads start
    logging.basicConfig(level=logging.INFO, format="tlog: %(message)s")
    stop = StopSignal()  # SIGTERM: stop serving, then close the store (exit 0)
    if not 0 < args.max_entry <= 65535:
        return fail(EXIT_USAGE, "--max-entry must be 1..65535")
    if not 0.5 <= args.lease_ttl <= 600:
        return fail(EXIT_USAGE, "--lease-ttl must be between 0.5 and 600 seconds")
    try:
        pool = witness_pool(args)
        limits = limits_from_args(args)
        check_data_dir(args.data)
    except ValueError as e:
        return fail(EXIT_USAGE, str(e))
    host, port = args.listen
    try:
        sock = bind(host, port)
        port = sock.getsockname()[1]
    except OSError as e:
        return fail(EXIT_ENVIRONMENT, str(e))
    try:
        seed = kms_seed(args.dstack)
    except RuntimeError as e:
        return fail(EXIT_ENVIRONMENT, str(e))
    try:
        signer = keys.load_signer(args.data, args.origin, seed)
        token = keys.load_token(args.data)
    except (ValueError, OSError) as e:  # note.NoteError is a ValueError
        return fail(EXIT_USAGE, f"{e}" if not isinstance(e, note.NoteError)
                    else f"{args.data / 'log.key'}: {e}")
    try:
        store = open_store(args.data, args.database)
    except LockHeld:
        return fail(EXIT_ENVIRONMENT, f"another tlog serve is using {args.data} "
                                      f"({args.data / 'log.lock'} is locked); a log has "
                                      "one writer")
    except (StorageError, OSError) as e:
        return fail(EXIT_ENVIRONMENT, str(e))
    lease = None
    if args.database is not None:
        from tlog.election import PostgresLease

        shown = f"[{host}]" if ":" in host else host
        advertise = args.advertise or f"http://{shown}:{port}"
        lease = PostgresLease(args.database, advertise, args.lease_ttl)
    try:
        log = Log(store, signer, witnesses=pool, lease=lease,
                  faults=crash_after(os.environ.get(CRASH_AFTER)))
    except Exception as e:  # noqa: BLE001 - recovery failed: say why in one line
        store.close()
        return fail(EXIT_ENVIRONMENT, f"cannot open the stored log: {type(e).__name__}: {e}")
    app = TlogApp(log, token, args.max_entry)
    config = uvicorn_config(app, limits, log_level="warning", lifespan="on", access_log=False)
    role = "replica" if lease is not None else "sequencer"
    print(f"tlog: {signer.name} serving on http://{host}:{port} (size {log.head.size}, "
          f"{role})", file=sys.stderr, flush=True)
    if not stop.received:
        uvicorn.Server(config).run(sockets=[sock])
    store.close()
    return 0


def key_text(value: str) -> str:
    """A key given inline, or the one line of the file it names (as the verifier's flags:
    a value without `+`, or an existing file, is a path). ValueError if unreadable."""
    path = Path(value)
    if "+" in value and not path.is_file():
        return value
    try:
        return path.read_text().strip()
    except OSError as e:
        raise ValueError(f"bad --witness-vkey {value}: not a key, and not a readable file "
                         f"({e.strerror})") from None


def witness_pool(args: argparse.Namespace):  # noqa: ANN201 - WitnessPool | None
    """The witnesses from --witness/--witness-vkey/--quorum, checked (ValueError if unusable)."""
    from tlog import note
    from tlog.witnessing import WitnessPool, endpoint
    from witness import cosignature

    for url in args.witness:
        endpoint(url)  # a malformed URL is refused here, before any other check
    try:
        verifiers = cosignature.parse_vkeys([key_text(v) for v in args.witness_vkey])
    except note.NoteError as e:
        raise ValueError(f"bad --witness-vkey: {e}") from e
    keys = {(v.name, v.key_id) for v in verifiers}
    if args.quorum < 0 or args.quorum > len(keys):
        raise ValueError(f"--quorum {args.quorum} must be between 0 and the number of distinct "
                         f"--witness-vkey keys ({len(keys)})")
    if args.quorum > len(args.witness):
        raise ValueError(f"--quorum {args.quorum} exceeds the number of --witness URLs "
                         f"({len(args.witness)})")
    if args.witness and not verifiers:
        raise ValueError("--witness needs the witnesses' --witness-vkey: the log keeps and serves "
                         "only cosignatures it verified")
    if not args.witness:
        return None
    return WitnessPool(args.witness, verifiers, quorum=args.quorum,
                       timeout=args.witness_timeout)


def open_store(data: Path, database: str | None):  # noqa: ANN201 - a Storage backend
    """The storage backend: SQLite in DIR (locked: one writer), or PostgreSQL for a
    postgresql:// URL."""
    from tlog.storage import StorageError

    if database is None:
        from tlog.sqlite_store import SQLiteStore

        return SQLiteStore(data / "log.db")
    if database.startswith(("postgresql://", "postgres://")):
        from tlog.postgres_store import PostgresStore

        return PostgresStore(database)
    raise StorageError("unsupported --database URL (use postgresql://…)")


if __name__ == "__main__":
    sys.exit(main())
