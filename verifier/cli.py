"""python -m verifier checkpoint|proof|audit|receipt|monitor — check, exit 0 only if it holds.

Every failure prints one line `verifier: <reason>` on stderr and exits 1
(2 for usage errors). `--json` prints a machine-readable result on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from tlog import merkle, note, proof
from verifier import audit as auditing
from verifier import log_reader, receipt, receipt_check, version
from verifier.source import SourceError, read_source
from witness import cosignature


class Failure(Exception):
    """A verification failure; its message is the one-line reason."""


def _key_text(value: str) -> str:
    """A vkey given inline or as a path to a file holding it."""
    p = Path(value)
    if "+" not in value or p.is_file():
        try:
            return p.read_text().strip()
        except OSError as e:
            raise Failure(f"cannot read key file {value}: {e.strerror}") from e
    return value.strip()


def _log_verifier(vkey: str) -> note.Ed25519Verifier:
    try:
        return note.verifier_from_vkey(_key_text(vkey))
    except note.NoteError as e:
        raise Failure(f"log key: {e}") from e


def _witnesses(args: argparse.Namespace) -> tuple[list[cosignature.CosignatureVerifier], int]:
    try:
        ws = [cosignature.verifier_from_vkey(_key_text(v)) for v in args.witness]
    except note.NoteError as e:
        raise Failure(f"witness key: {e}") from e
    quorum = len(ws) if args.quorum is None else args.quorum
    if quorum < 0:
        raise Failure("--quorum must not be negative")
    return ws, quorum


def _open_checkpoint(note_bytes: bytes, args: argparse.Namespace) -> cosignature.Witnessed:
    ws, quorum = _witnesses(args)
    try:
        return cosignature.verify_witnessed(note_bytes, _log_verifier(args.vkey), ws, quorum,
                                            origin=getattr(args, "origin", None))
    except (ValueError, cosignature.QuorumError) as e:
        raise Failure(f"checkpoint: {e}") from e


def cmd_checkpoint(args: argparse.Namespace) -> dict[str, Any]:
    w = _open_checkpoint(read_source(args.src), args)
    return {"ok": True, "origin": w.checkpoint.origin, "size": w.checkpoint.size,
            "root": w.checkpoint.root_hash.hex(), **_witness_facts(w, args)}


# -- what a receipt check needs: the policy, the log, and the one verdict -----------------


def _measurement_sets(values: list[str]) -> tuple[dict[str, str], ...]:
    """`--measurement NAME=HEX[,NAME=HEX...]` (repeated: alternatives) as allowed sets."""
    from verifier.client import MEASUREMENT_NAMES

    sets = []
    for v in values:
        s: dict[str, str] = {}
        for part in v.split(","):
            name, sep, hexval = part.partition("=")
            name, hexval = name.strip().lower(), hexval.strip().lower().removeprefix("0x")
            if not sep or name not in MEASUREMENT_NAMES or not hexval:
                raise Failure(f"--measurement {v[:80]!r}: expected NAME=HEX[,NAME=HEX...] "
                              f"with NAME one of {', '.join(MEASUREMENT_NAMES)}")
            try:
                bytes.fromhex(hexval)
            except ValueError:
                raise Failure(f"--measurement {name}: not hex") from None
            s[name] = hexval
        sets.append(s)
    return tuple(sets)


def _keyset_policy(args: argparse.Namespace) -> receipt_check.KeysetPolicy:
    collateral = None
    if args.collateral is not None:
        try:
            collateral = Path(args.collateral).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise Failure(f"cannot read collateral file {args.collateral}: {e}") from e
    return receipt_check.KeysetPolicy(
        allow_simulated=args.allow_simulated, app_id=args.app_id,
        compose_hash=args.compose_hash, measurements=_measurement_sets(args.measurement),
        collateral=collateral, pccs_url=args.pccs_url)


def is_receipt_entry(entry: bytes) -> dict[str, Any] | None:
    """The entry as an object when it claims to be a receipt (any `pag-receipt/` version:
    a retired one must be refused, not passed over), else None."""
    try:
        obj = json.loads(entry)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    if isinstance(obj, dict) and str(obj.get("v", "")).startswith("pag-receipt/"):
        return obj
    return None


def _lookup(reader: log_reader.EntryReader, cp: Any, log_v: note.Verifier,
            policy: receipt_check.KeysetPolicy) -> receipt_check.Lookup:
    """Keyset entry `i` read from the log, proven in the same checkpoint, checked."""
    def lookup(index: int) -> receipt_check.TrustedKeyset:
        try:
            raw = reader.entry(index, cp)
        except log_reader.LogReadError as e:
            raise LookupError(str(e)) from None
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            obj = None
        return receipt_check.trusted_keyset(obj, index, log_verifier=log_v, policy=policy)
    return lookup


def _accept(rec: Any, index: int, w: cosignature.Witnessed, log: str, log_v: note.Verifier,
            policy: receipt_check.KeysetPolicy, digests: dict[str, str] | None = None,
            entry: bytes | None = None) -> receipt_check.Accepted:
    with httpx.Client(timeout=30) as c:
        reader = log_reader.EntryReader(log_reader.getter(log, c))
        try:
            return receipt_check.accept(rec, _lookup(reader, w.checkpoint, log_v, policy),
                                        receipt_index=index, digests=digests, entry=entry)
        except receipt_check.ReceiptRefused as e:
            raise Failure(f"receipt: {e}") from e


def cmd_proof(args: argparse.Namespace) -> dict[str, Any]:
    policy = _keyset_policy(args)
    try:
        p = proof.parse(read_source(args.src))
    except proof.ProofFormatError as e:
        raise Failure(f"proof: {e}") from e
    w = _open_checkpoint(p.checkpoint, args)
    entry = p.extra
    if args.entry is not None:
        entry = read_source(args.entry)
    if entry is None and args.leaf_hash is None:
        raise Failure("proof carries no entry (extra); give --entry FILE or --leaf-hash HEX")
    if args.leaf_hash is not None:
        try:
            leaf = bytes.fromhex(args.leaf_hash)
        except ValueError:
            raise Failure("--leaf-hash is not hex") from None
        if entry is not None and merkle.leaf_hash(entry) != leaf:
            raise Failure("the proof's entry (extra or --entry) is not the entry with that "
                          "leaf hash; nothing about it is proven")
    else:
        leaf = merkle.leaf_hash(entry)
    try:
        merkle.verify_inclusion(leaf, p.index, w.checkpoint.size, list(p.hashes),
                                w.checkpoint.root_hash)
    except (merkle.ProofError, ValueError) as e:
        raise Failure(f"inclusion: {e}") from e
    out: dict[str, Any] = {"ok": True, "origin": w.checkpoint.origin, "index": p.index,
                           "size": w.checkpoint.size, "leaf_hash": leaf.hex(),
                           **_witness_facts(w, args)}
    rec = is_receipt_entry(entry) if entry is not None else None
    if rec is not None and not args.inclusion_only:
        if args.log is None:
            raise Failure(f"entry {p.index} is a receipt: give --log URL|DIR so its keyset "
                          "entry can be read and checked (or --inclusion-only)")
        acc = _accept(rec, p.index, w, args.log, _log_verifier(args.vkey), policy,
                      entry=entry)
        out.update(_accepted(acc))
    elif rec is not None:
        out["receipt_checked"] = False
    return out


def _witness_facts(w: cosignature.Witnessed, args: argparse.Namespace) -> dict[str, Any]:
    return {"cosigners": list(w.cosigners), "witness_keys": len(args.witness),
            "witnessed": bool(w.cosigners)}


def _accepted(acc: receipt_check.Accepted) -> dict[str, Any]:
    ks = acc.keyset
    return {"receipt": _summary(acc.receipt), "receipt_checked": True,
            "keyset": {"index": ks.index, "app_id": ks.app_id, "compose_hash": ks.compose_hash,
                       "keyset_hash": ks.keyset_hash, "tcb_status": ks.tcb_status},
            "simulated": ks.simulated, "digests_checked": list(acc.digests_checked),
            "digests_unchecked": list(acc.digests_unchecked)}


def _summary(r: dict[str, Any]) -> dict[str, Any]:
    route, up = r.get("route", {}), r.get("upstream", {})
    return {"id": r.get("id"), "time": r.get("time"), "request_hash": r.get("request_hash"),
            "route": route.get("route_id"), "model": route.get("model"),
            "provider": route.get("provider"), "verified": up.get("verified"),
            "evidence": up.get("evidence"), "e2ee": r.get("e2ee", {}).get("mode"),
            "refusal": (r.get("refusal") or {}).get("code") if isinstance(
                r.get("refusal"), dict) else None,
            "signing_key": r.get("signature", {}).get("key")}


def _audit_with_policy(args: argparse.Namespace) -> dict[str, Any]:
    """One monitor poll, silent: the audit plus every entry checked against the policy."""
    from verifier import monitor

    ws, quorum = _witnesses(args)
    try:
        policy = monitor.Policy.load(args.policy)
        m = monitor.Monitor(args.log, _log_verifier(args.vkey), policy, witnesses=ws,
                            quorum=quorum, witness_urls=[], state_path=args.state,
                            webhook=None, quiet=True)
    except (ValueError, OSError, TypeError, auditing.AuditError) as e:
        raise Failure(f"policy: {e}") from e
    previous = m.state.size if m.state else 0
    asyncio.run(m.poll())
    if m.alerts:
        a = m.alerts[0]
        where = f" at entry {a['index']}" if "index" in a else ""
        raise Failure(f"{len(m.alerts)} alert(s); first {a['alert']}{where}: {a['reason']}")
    if m.state is None:  # poll() sets it or raises
        raise Failure("the log answered no checkpoint")
    return {"ok": True, "origin": m.state.origin, "size": m.state.size,
            "root": m.state.root.hex(), "previous_size": previous,
            "cosigners": list(m.state.cosigners), "witness_keys": len(args.witness),
            "witnessed": bool(m.state.cosigners), "entries": m.entries,
            "simulated": any(k.simulated for k in m.keysets.values())}


def cmd_audit(args: argparse.Namespace) -> dict[str, Any]:
    if args.policy is not None:
        return _audit_with_policy(args)
    ws, quorum = _witnesses(args)
    state = auditing.load_state(args.state)
    progress = auditing.progress_bar if (args.progress or sys.stderr.isatty()) else None

    async def run() -> auditing.State:
        fetcher = auditing.Fetcher(args.log)
        try:
            return await auditing.audit(fetcher, _log_verifier(args.vkey), witnesses=ws,
                                        quorum=quorum, state=state, progress=progress)
        finally:
            await fetcher.close()

    try:
        new = asyncio.run(run())
    except auditing.AuditError as e:
        raise Failure(str(e)) from e
    if args.state is not None:
        auditing.save_state(args.state, new)
    return {"ok": True, "origin": new.origin, "size": new.size, "root": new.root.hex(),
            "previous_size": state.size if state else 0, "cosigners": list(new.cosigners),
            "witness_keys": len(args.witness), "witnessed": bool(new.cosigners)}


def cmd_releases(args: argparse.Namespace) -> dict[str, Any]:
    from verifier import releases

    ws, quorum = _witnesses(args)
    policy = _keyset_policy(args)

    async def run() -> tuple[auditing.State, list[releases.Release]]:
        fetcher = auditing.Fetcher(args.log)
        try:
            return await releases.list_releases(fetcher, _log_verifier(args.vkey), ws, quorum,
                                                policy)
        finally:
            await fetcher.close()

    try:
        state, found = asyncio.run(run())
    except auditing.AuditError as e:
        raise Failure(str(e)) from e
    out = {"ok": True, "origin": state.origin, "size": state.size,
           "cosigners": list(state.cosigners), "witness_keys": len(args.witness),
           "witnessed": bool(state.cosigners),
           "simulated": any(r.simulated for r in found if r.refusal is None),
           "releases": [dataclasses.asdict(r) for r in found]}
    refused = [r for r in found if r.refusal is not None]
    if refused and not args.json:
        print(_human("releases", out))
        raise Failure(f"release at entry {refused[0].index} is not verified: "
                      f"{refused[0].refusal}")
    return out


def _get_json(c: httpx.Client, url: str, what: str, **kw: Any) -> tuple[int, Any]:
    try:
        r = c.get(url, **kw)
    except httpx.HTTPError as e:
        raise Failure(f"{what}: cannot reach the gateway ({type(e).__name__})") from e
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, None


def _live_keyset(c: httpx.Client, base: str, args: argparse.Namespace) -> Any:
    """The gateway's current attestation, checked with a fresh nonce under the policy."""
    from verifier import client as vc

    nonce = secrets.token_hex(32)
    status, doc = _get_json(c, f"{base}/.well-known/attestation", "attestation",
                            params={"nonce": nonce})
    if status != 200:
        raise Failure(f"attestation: gateway answered {status}")
    policy = vc.Policy(allow_simulated=args.allow_simulated, app_id=args.app_id,
                       compose_hash=args.compose_hash,
                       measurements=_measurement_sets(args.measurement) or None,
                       collateral_file=args.collateral, pccs_url=args.pccs_url)
    try:
        return vc.attest(doc, nonce, policy, time.time())
    except vc.VerificationError as e:
        raise Failure(f"attestation: {e}") from e


def _digests(args: argparse.Namespace) -> tuple[str | None, dict[str, str]]:
    """(request hash, {member: D(bytes)}) from --salt and the --request/--response files."""
    if args.salt is None:
        if args.request or args.response:
            raise Failure("--request/--response need --salt (the x-receipt-salt of the call)")
        return None, {}
    try:
        salt = receipt.parse_salt(args.salt)
    except receipt.ReceiptError as e:
        raise Failure(f"--salt: {e}") from e
    if not (args.request or args.response):
        raise Failure("--salt checks nothing alone: give --request and/or --response, the "
                      "exact bytes to recompute the digests from")
    out = {}
    for member, src in (("request_hash", args.request), ("response_hash", args.response)):
        if src is not None:
            out[member] = receipt.digest(salt, read_source(src))
    return out.get("request_hash"), out


def cmd_receipt(args: argparse.Namespace) -> dict[str, Any]:
    policy = _keyset_policy(args)
    base = args.gateway.rstrip("/")
    computed, digests = _digests(args)
    rh = args.request_hash or computed
    if rh is None or not receipt.HEX64.fullmatch(rh):
        raise Failure("give --request-hash HEX (64 lower-case hex: x-request-hash), or --salt "
                      "with --request FILE")
    if computed is not None and computed != rh:
        raise Failure("receipt: --request with --salt does not give --request-hash (other "
                      "bytes, or another salt)")
    out: dict[str, Any] = {"ok": True}
    # Nothing is trusted from this connection (the attestation carries our fresh nonce, the
    # receipt its signature, the proof the log's), so the gateway's attested self-signed
    # TLS key is accepted here as any other.
    with httpx.Client(timeout=30, verify=False) as c:  # noqa: S501

        status, body = _get_json(c, f"{base}/v1/receipts/by-request-hash/{rh}", "receipt")
        if status != 200 or not isinstance(body, dict):
            raise Failure(f"receipt: gateway answered {status}")
        live = None
        if args.vkey is None:
            live = _live_keyset(c, base, args)
            args.vkey = live.keyset["log_vkey"]
    rec, text = body.get("receipt"), body.get("proof")
    if not isinstance(rec, dict) or rec.get("request_hash") != rh:
        raise Failure("receipt: the gateway's answer is not a receipt for that request hash")
    if not isinstance(text, str):
        raise Failure("receipt: not logged yet (no proof); try again shortly")
    log = args.log or body.get("log")
    if not isinstance(log, str) or not (args.log or log.startswith(("http://", "https://"))):
        raise Failure("receipt: the gateway does not name an http(s) log URL: give --log URL")
    try:
        p = proof.parse(text.encode())
    except proof.ProofFormatError as e:
        raise Failure(f"proof: {e}") from e
    w = _open_checkpoint(p.checkpoint, args)
    try:
        proof.check_inclusion(p, w.checkpoint, receipt.entry(rec))
    except (merkle.ProofError, ValueError) as e:
        raise Failure(f"inclusion: {e}") from e
    acc = _accept(rec, p.index, w, log, _log_verifier(args.vkey), policy, digests)
    out.update({"origin": w.checkpoint.origin, "index": p.index, "size": w.checkpoint.size,
                "log": log, **_witness_facts(w, args), **_accepted(acc)})
    if live is not None:
        out["live"] = {"app_id": live.app_id, "compose_hash": live.compose_hash,
                       "keyset_hash": live.keyset_hash, "simulated": live.simulated,
                       "current": live.keyset_hash == acc.keyset.keyset_hash}
        out["simulated"] = out["simulated"] or live.simulated
    return out


def _human(cmd: str, out: dict[str, Any]) -> str:
    if cmd == "checkpoint":
        lines = [f"OK checkpoint {out['origin']} size {out['size']} root {out['root'][:16]}… "
                 f"{_cosigned(out)}"]
    elif cmd == "audit":
        lines = [f"OK audit {out['origin']}: size {out['size']} (was {out['previous_size']}), "
                 f"root {out['root'][:16]}… {_cosigned(out)}"]
        if "entries" in out:
            lines.append("   checked against the policy: " + ", ".join(
                f"{n} {k}" for k, n in out["entries"].items() if n))
    elif cmd == "releases":
        ok = sum(1 for r in out["releases"] if r["refusal"] is None)
        lines = [f"{'OK' if ok == len(out['releases']) else 'FAIL'} releases of "
                 f"{out['origin']} at size {out['size']}, {_cosigned(out)}: "
                 f"{len(out['releases'])} logged, {ok} verified"]
        for r in out["releases"]:
            verdict = f"NOT verified: {r['refusal']}" if r["refusal"] else \
                ("SIMULATED: verified" if r["simulated"] else "verified")
            lines.append(f"   release at entry {r['index']} ({r['time']}): app {r['app_id']} "
                         f"compose {r['compose_hash']} keyset {r['keyset_hash']} {verdict}")
            lines += [f"      image {name} {d}" for name, d in r["image_digests"].items()]
    else:
        lines = [f"OK entry {out['index']} in {out.get('origin', 'the log')} size "
                 f"{out['size']}, {_cosigned(out)}"]
        lines += _receipt_lines(out)
    if out.get("simulated"):
        lines.append("   SIMULATED evidence accepted (--allow-simulated): a simulated, "
                     "non-TEE attestation proves nothing about real hardware")
    if not out.get("witnessed", True):
        lines.append("   UNWITNESSED (0 witness cosignatures checked): nothing shows that "
                     "others see the same log; give --witness VKEY")
    return "\n".join(lines)


def _cosigned(out: dict[str, Any]) -> str:
    if not out.get("cosigners"):
        return "UNWITNESSED (0 witness cosignatures checked)"
    return f"cosigned by {len(out['cosigners'])} of {out.get('witness_keys', 0)} witness keys"


def _receipt_lines(out: dict[str, Any]) -> list[str]:
    if out.get("receipt_checked") is False:
        return ["   the entry is a receipt, NOT checked (--inclusion-only): only its inclusion "
                "is proven"]
    r = out.get("receipt")
    if not r:
        return []
    ks = out["keyset"]
    how = "SIMULATED" if out["simulated"] and ks.get("tcb_status") is None else \
        f"TDX quote, TCB {ks['tcb_status']}"
    lines = [f"   receipt {r['id']} at {r['time']}: route {r['route']} → provider "
             f"{r['provider']} ({r['model']}), upstream verified={r['verified']} by "
             f"{r['evidence']}, e2ee {r['e2ee']}"
             + (f", refused: {r['refusal']}" if r.get("refusal") else ""),
             f"   signed by the key of keyset entry {ks['index']} (app {ks['app_id']}, compose "
             f"{ks['compose_hash'][:16]}…), attestation verified ({how})"]
    if out["digests_checked"]:
        lines.append(f"   digests checked against content: {', '.join(out['digests_checked'])}")
    if out["digests_unchecked"]:
        lines.append(f"   digests NOT checked: {', '.join(out['digests_unchecked'])} (only the "
                     "call's salt recomputes a digest: `verifier receipt --salt` with "
                     "--request/--response checks the caller's own bytes; the forwarded and "
                     "provider digests cover bytes only the gateway saw)")
    live = out.get("live")
    if live:
        lines.append(f"   gateway now attested as app {live['app_id']}"
                     f"{' (SIMULATED)' if live['simulated'] else ''}; the receipt's keyset is "
                     f"{'the current one' if live['current'] else 'an earlier one'}")
    return lines


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m verifier")
    p.add_argument("--version", action="version", version=f"pag-verify {version()}")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp: argparse.ArgumentParser, vkey: bool = True) -> None:
        if vkey:
            sp.add_argument("--vkey", required=True, help="log verifier key, or a file holding it")
        sp.add_argument("--witness", action="append", default=[], metavar="VKEY",
                        help="witness cosigner key (repeat); file or inline")
        sp.add_argument("--quorum", type=int, help="cosignatures required (default: all given)")
        sp.add_argument("--json", action="store_true", help="print a JSON result")

    def keyset_policy(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--allow-simulated", action="store_true",
                        help="accept a simulated (non-TEE) attestation")
        sp.add_argument("--app-id", help="required app id of the gateway")
        sp.add_argument("--compose-hash", help="required compose hash of the gateway")
        sp.add_argument("--measurement", action="append", default=[],
                        metavar="NAME=HEX[,NAME=HEX...]",
                        help="an allowed measurement set (mr_td, rtmr0..rtmr3); repeat for "
                        "alternatives")
        sp.add_argument("--collateral", help="QuoteCollateralV3 JSON to verify real TDX quotes")
        sp.add_argument("--pccs-url", help="PCCS to fetch collateral for real TDX quotes")

    c = sub.add_parser("checkpoint", help="verify a signed checkpoint")
    common(c)
    c.add_argument("--origin", help="required origin line")
    c.add_argument("src", help="file, - or URL")
    pr = sub.add_parser("proof", help="verify a c2sp.org/tlog-proof@v1 (and a receipt in it)")
    common(pr)
    pr.add_argument("--origin")
    pr.add_argument("--entry", help="the entry (file, - or URL) when the proof has no extra")
    pr.add_argument("--leaf-hash", help="hex leaf hash instead of an entry")
    pr.add_argument("--log", help="log base URL or directory, to read the keyset entry a "
                    "receipt names")
    pr.add_argument("--inclusion-only", action="store_true",
                    help="prove only the entry's inclusion, even when it is a receipt")
    keyset_policy(pr)
    pr.add_argument("src")
    a = sub.add_parser("audit", help="audit a whole C2SP tlog-tiles log")
    common(a)
    a.add_argument("--log", required=True, help="log base URL or directory")
    a.add_argument("--state", type=Path, help="state file to check against and update")
    a.add_argument("--progress", action="store_true")
    a.add_argument("--policy", type=Path, help="also check every keyset entry and receipt "
                   "against this monitor policy (JSON; docs/verifier.md)")
    r = sub.add_parser("receipt", help="fetch and verify a gateway receipt, its proof and "
                       "its logged keyset")
    common(r, vkey=False)
    r.add_argument("--gateway", required=True)
    r.add_argument("--request-hash", help="x-request-hash of the call (or give --salt and "
                   "--request)")
    r.add_argument("--salt", help="x-receipt-salt of the call (64 hex)")
    r.add_argument("--request", help="the exact request body bytes sent (file, - or URL)")
    r.add_argument("--response", help="the exact response bytes received (file or -)")
    r.add_argument("--vkey", help="log verifier key (default: the gateway's live attested "
                   "keyset names it)")
    r.add_argument("--log", help="log base URL or directory (default: where the gateway "
                   "says)")
    keyset_policy(r)
    rl = sub.add_parser("releases", help="list and check every release (keyset entry) a "
                        "gateway logged")
    common(rl)
    rl.add_argument("--log", required=True, help="log base URL or directory")
    keyset_policy(rl)
    m = sub.add_parser("monitor", help="tail a log and check receipts against a policy")
    from verifier import monitor

    monitor.add_arguments(m)
    common(m)
    return p


COMMANDS = {"checkpoint": cmd_checkpoint, "proof": cmd_proof, "audit": cmd_audit,
            "receipt": cmd_receipt, "releases": cmd_releases}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        if args.cmd == "monitor":
            from verifier import monitor

            return monitor.run(args)
        out = COMMANDS[args.cmd](args)
    except (Failure, SourceError) as e:
        if getattr(args, "json", False):
            print(json.dumps({"ok": False, "error": str(e)}))
        print(f"verifier: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out) if args.json else _human(args.cmd, out))
    return 0
