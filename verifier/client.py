"""The verifying client: the stock OpenAI SDK, with every proof checked for you.

    policy = Policy(allow_simulated=False, app_id=..., log_vkey=..., witness_vkeys=(...,))
    gw = connect("https://gateway.example:8443", policy)   # VerificationError if unproven
    client = openai.OpenAI(base_url=gw.base_url + "/v1", api_key=KEY,
                           http_client=gw.http_client(e2ee=True))
    gw.last_receipt                      # the verified receipt of the latest call
    gw.proof(gw.last_receipt["id"])      # its verified tlog-proof

`connect` fetches `/.well-known/attestation` with a fresh nonce and accepts the
gateway only if (`attest`, one verdict): the quote verifies (real TDX through
dcap-qvl with collateral from `collateral_file` or `pccs_url`; simulated only
under `allow_simulated`); its report data binds the keyset and the nonce; the
replayed event log gives the pinned app id / compose hash and the quote the
pinned measurements; and, when the policy names the log (`log_vkey`), the
keyset is in a logged `pag-keyset/1` entry whose checkpoint the policy's
witness quorum cosigned. The result is a `Lease`, refreshed before it expires.

`http_client()` / `async_http_client()` return httpx clients whose transport
(verifier/transport.py) seals and opens E2EE fields, pins the attested TLS key
on https (verifier/pinning.py), and accepts each model call's receipt
(`check_receipt`) before handing the answer to the SDK. Every failure raises a
`VerificationError` subclass with a stable `code`; nothing unproven is
returned as if it were. Pure Python on the base dependencies (plus dcap-qvl
for real quotes); no server code.
"""

from __future__ import annotations

import base64
import collections
import hmac
import json
import secrets
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from tlog import note
from tlog import proof as tproof
from verifier import keyset_entry, pinning, receipt, receipt_check
from verifier.tee import attestation, dcap
from witness import cosignature

MEASUREMENT_NAMES = ("mr_td", "rtmr0", "rtmr1", "rtmr2", "rtmr3")
MAX_DOCUMENT = 4 << 20
RECEIPTS_KEPT = 1000


class VerificationError(Exception):
    """Something the client was asked to trust was not proven. `code` is stable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class AttestationFailed(VerificationError):
    """The gateway's attestation (quote, keyset, pins, logged keyset) was not accepted."""


class ChannelError(VerificationError):
    """The connection is not the attested one (TLS key), or would carry plaintext."""


class E2eeError(VerificationError):
    """A call could not be sealed, or its answer did not open as sealed by the gateway."""


class ReceiptInvalid(VerificationError):
    """A call's receipt is missing, not signed by the attested key, or does not match."""


class ProofInvalid(VerificationError):
    """A receipt's inclusion proof, or its witness cosignatures, did not verify."""


@dataclass(frozen=True)
class Policy:
    """What the client requires of a gateway (the first ten fields are the contract).

    `measurements` is one allowed set (`{"mr_td": HEX, "rtmr0": HEX, ...}`) or a
    sequence of them; `quorum` defaults to every witness key given. Extensions:
    `lease_seconds` (how long an attestation is trusted) and `refresh_before`
    (re-attest this long before it lapses); `require_logged_release`: refuse a
    gateway whose attested release (compose hash, keyset) is not in the log with
    at least one witness cosignature (needs `log_vkey` and witnesses); `timeout`
    for the client's own requests (attestation, receipts, proofs)."""

    allow_simulated: bool = False
    app_id: str | None = None
    compose_hash: str | None = None
    measurements: Mapping[str, str] | Sequence[Mapping[str, str]] | None = None
    log_vkey: str | None = None
    witness_vkeys: tuple[str, ...] = ()
    quorum: int | None = None
    require_inclusion: bool = False
    collateral_file: str | None = None
    pccs_url: str | None = None
    lease_seconds: float = 300.0
    refresh_before: float = 60.0
    require_logged_release: bool = False
    timeout: float = 30.0

    def measurement_sets(self) -> tuple[dict[str, str], ...]:
        """The allowed measurement sets, lower-case; AttestationFailed if malformed."""
        m = self.measurements
        if m is None:
            return ()
        sets = (m,) if isinstance(m, Mapping) else tuple(m)
        out = []
        for s in sets:
            if not isinstance(s, Mapping) or not s or any(k not in MEASUREMENT_NAMES
                                                           for k in s):
                raise AttestationFailed("policy_invalid", "each measurement set is a non-empty "
                                        f"mapping of {', '.join(MEASUREMENT_NAMES)}")
            out.append({k: str(v).lower().removeprefix("0x") for k, v in s.items()})
        return tuple(out)

    def witnesses(self) -> tuple[list[cosignature.CosignatureVerifier], int]:
        """(witness verifiers, cosignatures required)."""
        try:
            ws = [cosignature.verifier_from_vkey(v) for v in self.witness_vkeys]
        except (ValueError, note.NoteError) as e:
            raise AttestationFailed("policy_invalid", f"witness key: {e}") from None
        quorum = len(ws) if self.quorum is None else self.quorum
        if not 0 <= quorum <= len(ws):
            raise AttestationFailed("policy_invalid",
                                    f"quorum {quorum} with {len(ws)} witness keys")
        return ws, quorum

    def log_verifier(self, keyset: Mapping[str, str]) -> note.Ed25519Verifier:
        """The log's note verifier: the policy's `log_vkey`, else the attested keyset's."""
        vkey = self.log_vkey or keyset.get("log_vkey") or ""
        try:
            return note.verifier_from_vkey(vkey)
        except (ValueError, note.NoteError) as e:
            raise ProofInvalid("log_unknown", f"no usable log key: {e}") from None


@dataclass(frozen=True)
class Lease:
    """What `attest` established about the gateway, and until when it is trusted."""

    keyset: dict[str, str]
    keyset_hash: str
    app_id: str
    compose_hash: str
    simulated: bool
    measurements: dict[str, str]
    verified_at: float
    expires_at: float
    keyset_index: int | None = None  # the logged keyset entry, when the policy names the log
    cosigners: tuple[str, ...] = ()
    keyset_checkpoint: tuple[int, bytes] | None = None  # (size, root) its proof was checked in

    @property
    def receipt_key(self) -> bytes:
        """The attested Ed25519 receipt signing key (raw)."""
        return base64.b64decode(self.keyset["receipt_signing_key"])

    @property
    def e2ee_key(self) -> bytes:
        """The attested X25519 E2EE key (raw)."""
        return base64.b64decode(self.keyset["e2ee_public_key"])

    @property
    def tls_spki_sha256(self) -> str:
        """The attested TLS key's SPKI SHA-256 (hex)."""
        return self.keyset["tls_spki_sha256"]


# -- attestation -----------------------------------------------------------------------


def quote_verifier(policy: Policy, now: float) -> Any:
    """dcap-qvl for real quotes (collateral from the file, or the PCCS), or None."""
    if policy.collateral_file is None and policy.pccs_url is None:
        return None
    col: Any = None
    if policy.collateral_file is not None:
        try:
            with open(policy.collateral_file, encoding="utf-8") as f:
                col = dcap.load_collateral(f.read())
        except OSError as e:
            raise AttestationFailed("policy_invalid",
                                    f"cannot read collateral file: {e.strerror}") from None
        except dcap.DcapError as e:
            raise AttestationFailed(e.code, e.message) from None

    def verify(raw: bytes) -> dcap.DcapResult:
        c = col
        if c is None:
            import asyncio

            assert policy.pccs_url is not None  # noqa: S101 - type narrowing: checked just above
            c = dcap.load_collateral(asyncio.run(dcap.fetch_collateral(policy.pccs_url, raw)))
        result = dcap.verify(raw, c, now)
        if result.tcb_status != "UpToDate":
            raise dcap.DcapError("quote_invalid", f"TCB status {result.tcb_status}")
        return result

    return verify


def attest(doc: Any, nonce: str, policy: Policy, now: float,
           verify_quote: Any = None) -> Lease:
    """The one verdict on a gateway's attestation document (see module docstring).

    `verify_quote` defaults to `quote_verifier(policy, now)`. AttestationFailed codes:
    those of verifier/tee/attestation.py, `measurement_mismatch`, `policy_invalid`,
    `log_key_mismatch`, `keyset_not_logged`, `keyset_entry_invalid`,
    `release_not_witnessed`."""
    vq = verify_quote if verify_quote is not None else quote_verifier(policy, now)
    try:
        facts = attestation.check(doc, nonce=nonce, allow_simulated=policy.allow_simulated,
                                  expected_app_id=policy.app_id,
                                  expected_compose_hash=policy.compose_hash, verify_quote=vq)
    except attestation.AttestationError as e:
        raise AttestationFailed(e.code, e.message) from None
    have = dict(zip(MEASUREMENT_NAMES, (facts.mr_td, *facts.rtmrs), strict=True))
    sets = policy.measurement_sets()
    if sets and not any(all(have[k] == v for k, v in s.items()) for s in sets):
        raise AttestationFailed("measurement_mismatch",
                                "the quote's measurements match no allowed set")
    index, cosigners, logged_in = None, (), None
    if policy.require_logged_release and not (policy.log_vkey and policy.witness_vkeys):
        raise AttestationFailed("policy_invalid", "require_logged_release needs log_vkey and "
                                "witness_vkeys")
    if policy.log_vkey:
        index, cosigners, logged_in = check_logged_keyset(doc, facts, policy, vq)
        if policy.require_logged_release and not cosigners:
            raise AttestationFailed("release_not_witnessed", "the release's keyset entry is "
                                    "not cosigned by any witness")
    return Lease(keyset=dict(facts.keyset), keyset_hash=facts.keyset_hash, app_id=facts.app_id,
                 compose_hash=facts.compose_hash, simulated=facts.simulated,
                 measurements=have, verified_at=now, expires_at=now + policy.lease_seconds,
                 keyset_index=index, cosigners=cosigners, keyset_checkpoint=logged_in)


def check_logged_keyset(doc: Mapping[str, Any], facts: attestation.AttestationFacts,
                        policy: Policy, verify_quote: Any
                        ) -> tuple[int, tuple[str, ...], tuple[int, bytes]]:
    """(index, cosigners, (size, root) of the checkpoint it was proven in) of the logged
    `pag-keyset/1` entry holding the attested keyset.

    The gateway shows it as `keyset_index` and `keyset_proof` (a tlog-proof whose
    `extra` is the entry) in its attestation document; nothing there is trusted: the
    proof's checkpoint must be signed by the policy's log and cosigned by its witness
    quorum, the entry included at that index, and the entry itself must verify (its own
    attestation, under the same policy) and name exactly the attested keyset."""
    if facts.keyset.get("log_vkey") != policy.log_vkey:
        raise AttestationFailed("log_key_mismatch",
                                "the attested keyset names another log than the policy's")
    index, text = doc.get("keyset_index"), doc.get("keyset_proof")
    if not isinstance(index, int) or isinstance(index, bool) or not isinstance(text, str):
        raise AttestationFailed("keyset_not_logged", "the attestation does not show where "
                                "the log holds this keyset (keyset_index, keyset_proof)")
    log_v = policy.log_verifier(facts.keyset)
    ws, quorum = policy.witnesses()
    try:
        p = tproof.parse(text.encode())
        w = cosignature.verify_witnessed(p.checkpoint, log_v, ws, quorum)
        if p.index != index or p.extra is None:
            raise ValueError("the proof is for another index, or carries no entry")
        tproof.check_inclusion(p, w.checkpoint, p.extra)
        entry = json.loads(p.extra)
    except (ValueError, RecursionError, cosignature.QuorumError) as e:
        raise AttestationFailed("keyset_not_logged", f"keyset entry proof: {e}") from None
    try:
        ks = keyset_entry.check(entry, log_verifier=log_v, allow_simulated=policy.allow_simulated,
                                app_id=policy.app_id, compose_hash=policy.compose_hash,
                                measurements=policy.measurement_sets(),
                                verify_quote=verify_quote, index=index)
    except keyset_entry.KeysetEntryError as e:
        raise AttestationFailed("keyset_entry_invalid", e.message) from None
    if not hmac.compare_digest(ks.keyset_hash, facts.keyset_hash):
        raise AttestationFailed("keyset_not_logged",
                                "the logged keyset entry holds another keyset")
    return index, tuple(w.cosigners), (w.checkpoint.size, w.checkpoint.root_hash)


# -- receipts and proofs ---------------------------------------------------------------


def _lease_lookup(lease: Lease) -> receipt_check.Lookup:
    """`receipt_check`'s lookup for a lease: its attested keyset is the one trusted one,
    at the logged keyset entry's index when the lease has one."""
    trusted = receipt_check.TrustedKeyset(
        lease.keyset["receipt_signing_key"], lease.keyset_hash, lease.app_id,
        lease.compose_hash, lease.simulated, lease.keyset_index)

    def lookup(index: int) -> receipt_check.TrustedKeyset:
        if lease.keyset_index is not None and index != lease.keyset_index:
            raise receipt_check.ReceiptRefused("receipt_mismatch", "the receipt names another "
                                               "keyset entry than the logged one")
        return trusted
    return lookup


def check_receipt(rec: Any, lease: Lease, *, receipt_id: str, salt: bytes, sent: bytes,
                  response_hash: str, e2ee_modes: tuple[str, ...]) -> dict[str, Any]:
    """Accept one call's receipt at call time, against the lease the call was made under.

    The verdict is `receipt_check.accept` with the lease's attested keyset as the trusted
    one: signature by the attested receipt key; `id` as announced; the gateway identity and
    keyset hash the attested ones (and the logged keyset entry's index when the lease
    has one); `request_hash` and `response_hash` recomputed from the exact bytes sent
    and received with the salt the client chose; the E2EE mode the call used.
    ReceiptInvalid codes: `receipt_invalid`, `receipt_key_mismatch`, `receipt_mismatch`,
    `digest_mismatch`."""
    try:
        receipt_check.accept(rec, _lease_lookup(lease), digests={
            "request_hash": receipt.digest(salt, sent), "response_hash": response_hash})
    except receipt_check.ReceiptRefused as e:
        raise ReceiptInvalid(e.code, e.message) from None
    if rec["id"] != receipt_id:
        raise ReceiptInvalid("receipt_mismatch", "the receipt is for another call")
    if rec["e2ee"].get("mode") not in e2ee_modes:
        raise ReceiptInvalid("receipt_mismatch", f"the receipt records E2EE mode "
                             f"{str(rec['e2ee'].get('mode'))[:16]!r}, the call used "
                             f"{e2ee_modes[0]}")
    return rec


def remember_root(seen: dict[int, bytes], size: int, root: bytes) -> None:
    """Add a verified checkpoint's root to `seen` (size -> root); ProofInvalid `log_fork`
    if that size was seen with another root: the log showed this client a split view."""
    if seen.setdefault(size, root) != root:
        raise ProofInvalid("log_fork", f"the log showed two roots for size {size}: a "
                           "split view (keep both proofs as evidence)")


def check_proof(text: str, rec: dict[str, Any], lease: Lease, policy: Policy,
                seen: dict[int, bytes] | None = None) -> str:
    """A receipt's tlog-proof, verified: checkpoint signed by the log and cosigned by the
    policy's witness quorum, this exact receipt entry included, after its keyset entry
    (when the lease knows that entry, decided by `receipt_check.accept` with the proof's
    index as the receipt's: `keyset_not_before`).

    `seen` (size -> root of every checkpoint this client verified, updated here): a
    checkpoint with a size seen before and another root is a fork of the log, shown to
    this client, and refused (`log_fork`). A smaller size than seen before is no signal:
    the gateway keeps each receipt's proof from when it was logged."""
    log_v = policy.log_verifier(lease.keyset)
    ws, quorum = policy.witnesses()
    try:
        p = tproof.parse(text.encode())
        w = cosignature.verify_witnessed(p.checkpoint, log_v, ws, quorum)
        tproof.check_inclusion(p, w.checkpoint, receipt.entry(rec))
    except (ValueError, cosignature.QuorumError) as e:
        raise ProofInvalid("proof_invalid", str(e)) from None
    if seen is not None:
        remember_root(seen, w.checkpoint.size, w.checkpoint.root_hash)
    if lease.keyset_index is not None:
        try:
            receipt_check.accept(rec, _lease_lookup(lease), receipt_index=p.index)
        except receipt_check.ReceiptRefused as e:
            raise ProofInvalid(e.code, e.message) from None
    return text


# -- the gateway -----------------------------------------------------------------------


def _base(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ChannelError("url_invalid", f"not an http(s) URL: {url[:200]!r}")
    return url.rstrip("/")


def _attestation_request(base: str) -> tuple[str, str]:
    nonce = secrets.token_hex(32)
    return nonce, f"{base}/.well-known/attestation?nonce={nonce}"


def _document(status: int, body: bytes) -> Any:
    if status != 200:
        raise AttestationFailed("attestation_unavailable", f"the gateway answered HTTP {status}")
    if len(body) > MAX_DOCUMENT:
        raise AttestationFailed("malformed", "attestation document too large")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise AttestationFailed("malformed", "attestation document is not JSON") from None


class Gateway:
    """A gateway whose attestation was verified: its lease, clients and receipts."""

    def __init__(self, base_url: str, policy: Policy, lease: Lease) -> None:
        self.base_url = base_url
        self.policy = policy
        self._lease = lease
        self._lock = threading.Lock()
        self.receipts: collections.deque[dict[str, Any]] = collections.deque(
            maxlen=RECEIPTS_KEPT)
        self.last_receipt: dict[str, Any] | None = None
        self.checkpoints: dict[int, bytes] = {}  # size -> root of each verified checkpoint
        self._remember(lease)

    @property
    def lease(self) -> Lease:
        """The current lease (not refreshed here; `current` refreshes)."""
        return self._lease

    # The attestation proves itself (a quote over the keyset and our nonce), so it is
    # fetched without CA checks; every later connection pins the TLS key it attests.

    # Nothing vouches for this connection yet, so anyone on the path may answer: the body
    # is read only up to one byte past MAX_DOCUMENT (`_document` refuses it then).

    def _fetch(self, url: str) -> tuple[int, bytes]:
        try:
            with (httpx.Client(timeout=self.policy.timeout, verify=False) as c,  # noqa: S501 - the attestation proves itself (above)
                    c.stream("GET", url) as r):
                body = bytearray()
                for chunk in r.iter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        break
                return r.status_code, bytes(body)
        except httpx.HTTPError as e:
            raise AttestationFailed("attestation_unavailable",
                                    f"cannot reach the gateway: {type(e).__name__}") from None

    async def _afetch(self, url: str) -> tuple[int, bytes]:
        try:
            async with (httpx.AsyncClient(timeout=self.policy.timeout, verify=False) as c,  # noqa: S501 - the attestation proves itself (above)
                    c.stream("GET", url) as r):
                body = bytearray()
                async for chunk in r.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_DOCUMENT:
                        break
                return r.status_code, bytes(body)
        except httpx.HTTPError as e:
            raise AttestationFailed("attestation_unavailable",
                                    f"cannot reach the gateway: {type(e).__name__}") from None

    def refresh(self) -> Lease:
        """Re-attest now (fresh nonce); the new lease, or AttestationFailed."""
        nonce, url = _attestation_request(self.base_url)
        lease = attest(_document(*self._fetch(url)), nonce, self.policy, time.time())
        self._remember(lease)
        self._lease = lease
        return lease

    async def arefresh(self) -> Lease:
        """`refresh` without blocking the event loop (the checks run in a thread)."""
        import asyncio

        nonce, url = _attestation_request(self.base_url)
        doc = _document(*await self._afetch(url))
        lease = await asyncio.to_thread(attest, doc, nonce, self.policy, time.time())
        self._remember(lease)
        self._lease = lease
        return lease

    def _remember(self, lease: Lease) -> None:
        """The checkpoint a lease's keyset entry was proven in joins the roots this client
        saw (ProofInvalid `log_fork` if it forks one: the lease is not taken)."""
        if lease.keyset_checkpoint is not None:
            remember_root(self.checkpoints, *lease.keyset_checkpoint)

    def _due(self, now: float) -> bool:
        return now >= self._lease.expires_at - self.policy.refresh_before

    def current(self) -> Lease:
        """The lease to make a call under: refreshed when it is about to lapse; if the
        refresh fails the old lease serves until it expires, then the call is refused."""
        now = time.time()
        if not self._due(now):
            return self._lease
        with self._lock:
            if self._due(time.time()):
                try:
                    return self.refresh()
                except AttestationFailed:
                    if time.time() >= self._lease.expires_at:
                        raise
        return self._lease

    async def acurrent(self) -> Lease:
        """`current` for async callers."""
        now = time.time()
        if not self._due(now):
            return self._lease
        try:
            return await self.arefresh()
        except AttestationFailed:
            if time.time() >= self._lease.expires_at:
                raise
        return self._lease

    def record(self, rec: dict[str, Any]) -> None:
        """Keep a verified receipt."""
        self.receipts.append(rec)
        self.last_receipt = rec

    def http_client(self, e2ee: bool = True, *, pin_tls: bool = True,
                    allow_plaintext: bool = False, **kwargs: Any) -> httpx.Client:
        """An `httpx.Client` for `openai.OpenAI(http_client=...)` that verifies every call.

        `e2ee`: seal sensitive fields to the attested key (ACI `aci-1`). `pin_tls`: on
        https, accept only the attested TLS key (turn off only to run E2EE through a
        TLS-terminating proxy). Without E2EE, plain http is refused unless
        `allow_plaintext` (nothing would protect the prompt on the wire)."""
        from verifier.transport import VerifyingTransport

        t = VerifyingTransport(self, e2ee=e2ee, pin_tls=pin_tls,
                               allow_plaintext=allow_plaintext)
        return httpx.Client(transport=t, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def async_http_client(self, e2ee: bool = True, *, pin_tls: bool = True,
                          allow_plaintext: bool = False, **kwargs: Any) -> httpx.AsyncClient:
        """`http_client` for `openai.AsyncOpenAI`."""
        from verifier.transport import AsyncVerifyingTransport

        t = AsyncVerifyingTransport(self, e2ee=e2ee, pin_tls=pin_tls,
                                    allow_plaintext=allow_plaintext)
        return httpx.AsyncClient(transport=t, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def proof(self, receipt_id: str, timeout: float = 30.0) -> str:
        """The verified tlog-proof of a receipt this client verified (waits until logged).

        ProofInvalid: `receipt_unknown` (not a receipt of this client), `proof_timeout`,
        `proof_invalid`, `log_fork`."""
        rec = next((r for r in reversed(self.receipts) if r.get("id") == receipt_id), None)
        if rec is None:
            raise ProofInvalid("receipt_unknown", "no receipt with that id was verified by this "
                               "client")
        return check_proof(self._wait_proof(rec, timeout), rec, self._lease, self.policy,
                           self.checkpoints)

    def _wait_proof(self, rec: dict[str, Any], timeout: float) -> str:
        url = f"{self.base_url}/v1/receipts/by-request-hash/{rec['request_hash']}"
        deadline = time.monotonic() + timeout
        verify = pinning.verify_for(self.base_url, lambda: self._lease.tls_spki_sha256)
        with httpx.Client(verify=verify, timeout=self.policy.timeout) as c:
            while True:
                try:
                    r = c.get(url)
                    doc = r.json() if r.status_code == 200 else {}
                except (httpx.HTTPError, ValueError, RecursionError):
                    doc = {}
                text = doc.get("proof") if isinstance(doc, dict) else None
                if isinstance(text, str):
                    return text
                if time.monotonic() >= deadline:
                    raise ProofInvalid("proof_timeout", "the receipt was not logged in time")
                time.sleep(0.1)

    async def aproof(self, receipt_id: str, timeout: float = 30.0) -> str:
        """`proof` for async callers."""
        import asyncio

        return await asyncio.to_thread(self.proof, receipt_id, timeout)


def connect(base_url: str, policy: Policy) -> Gateway:
    """Verify the gateway at `base_url` under `policy`; VerificationError if not proven."""
    base = _base(base_url)
    gw = Gateway(base, policy, Lease({}, "", "", "", False, {}, 0.0, 0.0))
    gw.refresh()
    return gw
