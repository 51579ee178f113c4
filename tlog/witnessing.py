"""The log's side of C2SP tlog-witness: submit checkpoints, keep verified cosignatures.

Each witness URL is tracked by the size it last cosigned (0 until known). A
409 answer carries the witness's size; the pool retries once from it. One
request at a time goes to each witness. A slow or down witness never holds
the log beyond `timeout` (a deadline for the whole round, not per read), and
the checkpoint itself is never changed: cosignatures are only ever appended
to it. With a quorum, a round returns as soon as K witnesses cosigned; the
others are still waited for until the deadline, and what they send is handed
to a `late` callback, so a witness slower than its peers still catches up.

What a witness answers is not trusted. Every returned line is checked
against the configured witness keys (`--witness-vkey`): a line from an
unknown key, a line that does not verify, or junk is dropped and counted as
that witness's failure. Only verified cosignatures are kept and served, one
per witness key, and the quorum counts DISTINCT witness keys with a valid
cosignature, never answers: two URLs answering with the same key count
once, and a fake witness answering 200 under an honest witness's key ID
counts for nothing.

Witnesses are reached over `tlog.http1`: one pool of keep-alive HTTP/1.1
connections (a connection is reused only after an answer that ended
cleanly), `http://` or `https://` with the certificate and host name
verified by the default SSL context. A witness URL is checked when the pool
is made (scheme, host, port; no credentials, query, fragment or blanks), so a
malformed one is refused at start-up, never at the first checkpoint. An
answer is read up to MAX_ANSWER bytes: a larger one is that witness's
"bad_answer", never held in memory. A connection refused, reset or closed
mid-answer, a TLS failure or malformed HTTP is "unreachable"; no answer by
the round's deadline is "timeout".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tlog import http1, note
from witness import request
from witness.cosignature import CosignatureVerifier

log = logging.getLogger("tlog.witnessing")

KeyRef = tuple[str, bytes]
"""A signature's (key name, key ID)."""
Late = Callable[[list[note.Signature]], Awaitable[None]]
"""Receives valid cosignatures that arrived after a round returned."""
MAX_ANSWER = 64 << 10
"""The largest witness answer read, in bytes (a cosignature is one line, a 409 a size)."""


class QuorumNotReached(Exception):
    """Fewer distinct witnesses than the quorum returned a valid cosignature in time."""


class WitnessFailure(Exception):
    """One witness did not cosign; `reason` is a stable label for metrics."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass
class WitnessStatus:
    """What the log knows of one witness URL (read by /metrics)."""

    size: int = 0
    """The size this witness last cosigned for us (0 until known)."""
    cosignatures: int = 0
    failures: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str) -> None:
        self.failures[reason] = self.failures.get(reason, 0) + 1


@dataclass(frozen=True)
class Endpoint:
    """Where one witness's add-checkpoint requests go: the http1 target and request head."""

    target: tuple[str, int, bool, None]
    head: bytes


def endpoint(url: str) -> Endpoint:
    """The add-checkpoint endpoint of a witness URL, `http(s)://host[:port][/prefix]`;
    ValueError, saying what is wrong, for anything else."""
    def bad(why: str) -> ValueError:
        return ValueError(f"bad witness URL {url!r}: {why} (use http(s)://host[:port][/prefix])")

    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise bad("blanks, control or non-ASCII characters")
    try:
        u = urlsplit(url)
        port = u.port
    except ValueError as e:
        raise bad(str(e)) from None
    if u.scheme not in ("http", "https"):
        raise bad("the scheme must be http or https")
    if not u.hostname:
        raise bad("no host")
    if port == 0:
        raise bad("port 0")
    if u.username is not None or u.password is not None:
        raise bad("credentials in the URL")
    if u.query or u.fragment or url.endswith(("?", "#")):
        raise bad("a query or fragment")
    tls = u.scheme == "https"
    head = f"POST {u.path.rstrip('/')}/add-checkpoint HTTP/1.1\r\nHost: {u.netloc}\r\n".encode()
    return Endpoint((u.hostname, port or (443 if tls else 80), tls, None), head)


def valid_cosignatures(text: bytes, sigs: Iterable[note.Signature],
                       verifiers: Sequence[CosignatureVerifier]) -> dict[KeyRef, note.Signature]:
    """The cosignatures among `sigs` that verify over checkpoint `text`, one per witness key.

    A signature whose (name, key ID) is not a configured witness key, or
    that fails under it, is left out.
    """
    keys = {(v.name, v.key_id): v for v in verifiers}
    out: dict[KeyRef, note.Signature] = {}
    for s in sigs:
        ref = (s.name, s.key_id)
        v = keys.get(ref)
        if v is not None and ref not in out and v.verify(text, s.sig):
            out[ref] = s
    return out


def cosigned_note(note_bytes: bytes, log_key: KeyRef, new: Iterable[note.Signature],
                  verifiers: Sequence[CosignatureVerifier]) -> tuple[bytes, int]:
    """The checkpoint with the log's signature and every valid cosignature, and their count.

    Cosignatures already on `note_bytes` are checked again like `new` ones,
    so a note stored by an older, trusting version loses its junk lines.
    """
    text, sigs = note.split(note_bytes)
    own = [s for s in sigs if (s.name, s.key_id) == log_key]
    valid = valid_cosignatures(text, [*sigs, *new], verifiers)
    lines = b"".join(s.line() for s in [*own[:1], *valid.values()])
    return text + b"\n" + lines, len(valid)


class WitnessPool:
    """Witnesses a log submits its checkpoints to, and the keys their answers must verify under."""

    def __init__(self, urls: Sequence[str], verifiers: Sequence[CosignatureVerifier], *,
                 quorum: int = 0, timeout: float = 5.0) -> None:
        distinct = {(v.name, v.key_id) for v in verifiers}
        if not 0 <= quorum <= len(distinct):
            raise ValueError(f"quorum {quorum} is not between 0 and the {len(distinct)} "
                             "witness keys")
        if quorum > len(urls):
            raise ValueError(f"quorum {quorum} exceeds the {len(urls)} witness URLs")
        self.urls = [u.rstrip("/") for u in urls]
        self._endpoints = {u: endpoint(u) for u in self.urls}
        self.verifiers = list(verifiers)
        self.quorum = quorum
        self.timeout = timeout
        self.status = {u: WitnessStatus() for u in self.urls}
        self._pool: http1.Pool | None = None
        self._busy = {u: asyncio.Lock() for u in self.urls}
        self._stragglers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._pool = http1.Pool()

    async def close(self) -> None:
        for t in list(self._stragglers):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._pool is not None:
            self._pool.close()

    def count(self, note_bytes: bytes) -> int:
        """Distinct witness keys with a valid cosignature on a checkpoint note."""
        text, sigs = note.split(note_bytes)
        return len(valid_cosignatures(text, sigs, self.verifiers))

    async def _post(self, url: str, body: bytes, deadline: float) -> tuple[int, str, bytes]:
        """(status, content type, body) of one add-checkpoint request on a pooled
        connection, by the loop-time `deadline`; WitnessFailure otherwise."""
        assert self._pool is not None  # noqa: S101 - type narrowing: opened by start()
        ep = self._endpoints[url]
        data = ep.head + b"Content-Length: %d\r\n\r\n" % len(body) + body
        conn: http1.Connection | None = None
        try:
            async with asyncio.timeout_at(deadline):
                conn, status, headers = await http1.exchange(self._pool, ep.target, data,
                                                              body_limit=MAX_ANSWER)
                answer = await conn.body()
        except BaseException as e:
            if conn is not None:
                conn.close()
            if isinstance(e, TimeoutError):
                raise WitnessFailure("timeout", f"witness {url} did not answer by the "
                                                "round's deadline") from e
            if isinstance(e, http1.TooLarge):
                raise WitnessFailure("bad_answer", f"witness {url} answered over "
                                                   f"{MAX_ANSWER} bytes") from e
            if isinstance(e, OSError | http1.ProtocolError):
                raise WitnessFailure("unreachable", f"witness {url}: {e!r}") from e
            raise
        self._pool.release(conn)
        return status, headers.get(b"content-type", b"").decode("latin-1"), answer

    async def _submit(self, url: str, note_bytes: bytes, size: int,
                      prove: Callable[[int, int], list[bytes]],
                      deadline: float) -> dict[KeyRef, note.Signature]:
        """Ask one witness; its valid cosignatures, or WitnessFailure."""
        st = self.status[url]
        text, _ = note.split(note_bytes)
        for _ in range(2):
            old = st.size
            if old > size:
                raise WitnessFailure("ahead", f"witness {url} is at size {old}, beyond {size}")
            proof = prove(old, size) if 0 < old < size else []
            status, ctype, answer = await self._post(
                url, request.format(old, proof, note_bytes), deadline)
            if status == 409 and ctype.startswith(request.SIZE_CONTENT_TYPE):
                got = answer.strip()
                if not got.isdigit() or len(got) > 19:
                    raise WitnessFailure("bad_answer", f"witness {url} sent a malformed size")
                st.size = int(got)
                continue
            if status != 200:
                raise WitnessFailure(f"http_{status}" if 400 <= status < 600 else "bad_answer",
                                     f"witness {url} answered {status}: "
                                     f"{answer.decode('utf-8', 'replace').strip()[:200]!r}")
            try:
                _, sigs = note.split(text + b"\n" + answer)
            except note.NoteError as e:
                raise WitnessFailure("bad_answer", f"witness {url}: malformed answer: {e}") from e
            valid = valid_cosignatures(text, sigs, self.verifiers)
            if not valid:
                raise WitnessFailure("invalid_cosignature",
                                     f"witness {url} answered 200 without a valid cosignature "
                                     "from a configured witness key")
            st.size = size
            return valid
        raise WitnessFailure("conflict", f"witness {url} kept answering 409")

    async def _ask(self, url: str, note_bytes: bytes, size: int,
                   prove: Callable[[int, int], list[bytes]],
                   deadline: float) -> dict[KeyRef, note.Signature]:
        """`_submit`, with the outcome counted in `status`; a failure gives no cosignature."""
        st = self.status[url]
        try:
            async with self._busy[url]:
                valid = await self._submit(url, note_bytes, size, prove, deadline)
        except WitnessFailure as e:
            log.warning("%s", e)
            st.fail(e.reason)
            return {}
        except Exception as e:  # noqa: BLE001 - one witness failing is not the log failing
            log.warning("witness %s: %r", url, e)
            st.fail("error")
            return {}
        st.cosignatures += 1
        return valid

    async def cosign(self, note_bytes: bytes, size: int,
                     prove: Callable[[int, int], list[bytes]],
                     late: Late | None = None) -> list[note.Signature]:
        """Valid cosignatures from the witnesses for this signed checkpoint, one per key.

        With a quorum K, returns as soon as K distinct witness keys cosigned
        (QuorumNotReached once `timeout` has passed without); the witnesses
        still pending are then waited for in the background until the same
        deadline and their valid cosignatures go to `late`. Without a quorum,
        returns what arrived within `timeout`. A witness still pending at the
        deadline counts a "timeout" failure.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        tasks = {asyncio.create_task(self._ask(u, note_bytes, size, prove, deadline)): u
                 for u in self.urls}
        got: dict[KeyRef, note.Signature] = {}
        pending = set(tasks)
        try:
            while pending and not (self.quorum and len(got) >= self.quorum):
                done, pending = await asyncio.wait(pending, timeout=deadline - loop.time(),
                                                   return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    break
                for t in done:
                    for ref, sig in t.result().items():
                        got.setdefault(ref, sig)
        except BaseException:
            await self._expire(pending, tasks, count=False)
            raise
        if pending and late is not None and self.quorum and len(got) >= self.quorum:
            straggle = asyncio.create_task(self._straggle(pending, tasks, deadline, got, late))
            self._stragglers.add(straggle)
            straggle.add_done_callback(self._stragglers.discard)
        else:
            await self._expire(pending, tasks, count=len(got) < self.quorum or not self.quorum)
        if len(got) < self.quorum:
            raise QuorumNotReached(f"{len(got)} of {self.quorum} witnesses cosigned")
        return list(got.values())

    async def _straggle(self, pending: set[asyncio.Task[dict[KeyRef, note.Signature]]],
                        tasks: dict[asyncio.Task[dict[KeyRef, note.Signature]], str],
                        deadline: float, got: dict[KeyRef, note.Signature], late: Late) -> None:
        """Wait for the witnesses a round left pending, until its deadline; pass on the
        cosignatures from keys the round did not already have."""
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            done, pending = await asyncio.wait(pending, timeout=timeout)
        finally:
            await self._expire(pending, tasks, count=True)
        more: dict[KeyRef, note.Signature] = {}
        for t in done:
            for ref, sig in t.result().items():
                if ref not in got:
                    more.setdefault(ref, sig)
        if more:
            await late(list(more.values()))

    async def _expire(self, pending: Iterable[asyncio.Task[dict[KeyRef, note.Signature]]],
                      tasks: dict[asyncio.Task[dict[KeyRef, note.Signature]], str], *,
                      count: bool) -> None:
        """Cancel requests still pending; with `count`, each is that witness's "timeout"."""
        for t in pending:
            if not t.done():
                if count:
                    self.status[tasks[t]].fail("timeout")
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
