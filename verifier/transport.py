"""The verifying httpx transports (the OpenAI SDK's extension point): one model call as
named steps.

    check the origin and the channel → take the lease (re-attest when due)
      → prepare: choose the receipt salt, seal the fields (E2EE) → send (pinned TLS)
        (a pin mismatch or `e2ee_model_key_mismatch`: re-attest, retry once if the
         attested key changed; nothing was forwarded on the refused attempt)
      → open the answer: the JSON body, or each SSE event as it arrives
      → accept the receipt (verifier.client.check_receipt; a key the lease does not
        know: re-attest once) → if the policy asks, its inclusion proof
      → hand the opened answer to the SDK

`CallFlow` holds the steps that need no I/O, so the blocking and the async
transports only order them. Invariants: a sealed call's plaintext never goes
on the wire; an answer reaches the SDK only after its receipt verified (a
stream's events are released as they open, each authenticated by its AEAD,
and the receipt check ends the stream: a receipt that does not verify raises
from the stream); requests to another origin are refused.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import httpx

from verifier import aci, pinning, receipt, sse
from verifier.client import (
    ChannelError,
    E2eeError,
    Gateway,
    Lease,
    ReceiptInvalid,
    VerificationError,
    check_proof,
    check_receipt,
)

MODEL_PATHS = {"/v1/chat/completions": "chat", "/v1/embeddings": "embeddings"}
RECEIPT_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")
DROPPED = ("content-length", "content-encoding", "transfer-encoding")
MAX_RECEIPT = 1 << 20


def _verify(gw: Gateway, pin_tls: bool) -> Any:
    return pinning.verify_for(gw.base_url, lambda: gw.lease.tls_spki_sha256, pin_tls)


def _origin(url: str | httpx.URL) -> tuple[str, str, int | None]:
    u = urlsplit(str(url))
    return u.scheme, (u.hostname or "").lower(), u.port or (443 if u.scheme == "https" else 80)


def check_channel(gw: Gateway, request: httpx.Request, e2ee: bool,
                  allow_plaintext: bool) -> str | None:
    """The model call kind of `request` (None for any other request); ChannelError for
    another origin or a plaintext channel, E2eeError for a POST E2EE has no fields for
    (sent in clear otherwise)."""
    if _origin(request.url) != _origin(gw.base_url):
        raise ChannelError("origin_mismatch", "this client talks to the attested gateway only")
    if request.url.scheme != "https" and not e2ee and not allow_plaintext:
        raise ChannelError("channel_unprotected", "plain http without E2EE would carry the "
                           "prompt in clear (use https, e2ee=True, or allow_plaintext=True)")
    base_path = urlsplit(gw.base_url).path.rstrip("/")
    kind = MODEL_PATHS.get(request.url.path.removeprefix(base_path))
    if request.method != "POST":
        return None
    if kind is None and e2ee:
        raise E2eeError("e2ee_unsupported_endpoint", f"{request.url.path[:100]} has no sealed "
                        "fields: not sent")
    return kind


class CallFlow:
    """One model call's steps that need no I/O."""

    def __init__(self, gw: Gateway, lease: Lease, request: httpx.Request, kind: str,
                 e2ee: bool, now: float) -> None:
        self.gw, self.lease, self.request, self.kind = gw, lease, request, kind
        self.salt = receipt.new_salt()
        self.mode = aci.VERSION if e2ee else "none"
        self.opener: aci.Opener | None = None
        body = request.content
        headers = {k: v for k, v in request.headers.items() if k.lower() not in DROPPED}
        if e2ee:
            try:
                obj = json.loads(body)
                sealed, e2ee_headers, self.opener = aci.seal_request(obj, kind, lease.e2ee_key,
                                                                     now=now)
            except aci.AciError as e:
                raise E2eeError(e.code, e.message) from None
            except (ValueError, AttributeError) as e:
                raise E2eeError("e2ee_unsealable_request",
                                f"the request body cannot be sealed: {type(e).__name__}") from None
            body = json.dumps(sealed, separators=(",", ":"), ensure_ascii=False).encode()
            headers.update(e2ee_headers)
        headers["x-receipt-salt"] = self.salt.hex()
        headers["accept-encoding"] = "identity"  # the receipt covers the bytes as sent
        self.sent = body
        self.outgoing = httpx.Request(request.method, request.url, headers=headers,
                                      content=body, extensions=request.extensions)
        self.digest = receipt.digester(self.salt)
        self.parser = sse.SseParser()
        self.done: bytes | None = None

    def receipt_request(self, receipt_id: str) -> httpx.Request:
        """GET the receipt (with the caller's API key, which the gateway requires)."""
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        auth = self.request.headers.get("authorization")
        if auth:
            headers["authorization"] = auth
        return httpx.Request("GET", f"{self.gw.base_url}/v1/receipts/{receipt_id}",
                             headers=headers)

    def receipt_of(self, response: httpx.Response, status: int, body: bytes,
                   lease: Lease | None = None) -> dict[str, Any]:
        """Accept the receipt document `body` (GET /v1/receipts/{id}) for this call."""
        rid = response.headers.get("x-receipt-id", "")
        if status != 200 or len(body) > MAX_RECEIPT:
            raise ReceiptInvalid("receipt_unavailable", f"the gateway answered HTTP {status} "
                                 "for the call's receipt")
        try:
            rec = json.loads(body).get("receipt")
        except (ValueError, AttributeError):
            raise ReceiptInvalid("receipt_invalid", "the receipt document is not JSON") from None
        # An answered call must record the mode it used; a refusal may record "none"
        # (the gateway refused before the fields were opened).
        modes = (self.mode,) if response.status_code == 200 else (self.mode, "none")
        return check_receipt(rec, lease or self.lease, receipt_id=rid, salt=self.salt,
                             sent=self.sent, response_hash=self.digest.hexdigest(),
                             e2ee_modes=modes)

    @staticmethod
    def _code(response: httpx.Response) -> str:
        try:
            return str(json.loads(response.content)["error"]["code"])
        except (ValueError, KeyError, TypeError, httpx.ResponseNotRead):
            return ""

    def check_answer(self, response: httpx.Response) -> str | None:
        """The answer's receipt id, after checking the call may be answered like this."""
        rid = response.headers.get("x-receipt-id")
        if response.headers.get("x-receipt-salt") not in (None, self.salt.hex()):
            raise ReceiptInvalid("receipt_mismatch", "the gateway did not use the client's "
                                 "receipt salt")
        if rid is None and response.status_code == 200:
            raise ReceiptInvalid("receipt_missing", "a successful call carried no receipt")
        if rid is not None and not RECEIPT_ID.fullmatch(rid):
            raise ReceiptInvalid("receipt_invalid", "the receipt id is malformed")
        if self.opener is not None and response.status_code == 200:
            try:
                self.opener.start(response.headers)
            except aci.AciError as e:
                raise E2eeError(e.code, e.message) from None
        return rid

    def open_json(self, raw: bytes) -> bytes:
        """The body handed to the SDK: opened under E2EE, else as received."""
        self.digest.update(raw)
        if self.opener is None:
            return raw
        try:
            return _dumps(self.opener.open_response(json.loads(raw)))
        except aci.AciError as e:
            raise E2eeError(e.code, e.message) from None
        except ValueError:
            raise E2eeError("e2ee_response_invalid", "the sealed answer is not JSON") from None

    def stream_feed(self, chunk: bytes) -> tuple[bytes, bytes | None]:
        """(opened bytes to release, the `[DONE]` event if this chunk ends the stream).

        `[DONE]` is held back: the SDK stops reading there, so the receipt must be
        accepted before it is released (`stream_end`)."""
        self.digest.update(chunk)
        if self.done is not None:
            return b"", None  # after [DONE]: hashed for the receipt, never released
        try:
            events = self.parser.feed(chunk)
        except sse.SseError as e:
            raise E2eeError("e2ee_response_invalid", str(e)) from None
        out = []
        for ev in events:
            if ev.data == b"[DONE]" and ev.type == "message":
                self.done = ev.raw if self.opener is None else sse.encode(ev.data)
                break
            out.append(ev.raw if self.opener is None else self._open_event(ev))
        return b"".join(out), self.done

    def _open_event(self, ev: sse.Event) -> bytes:
        assert self.opener is not None  # noqa: S101 - type narrowing: set by the seal step
        try:
            obj = json.loads(ev.data)
        except ValueError:
            raise E2eeError("e2ee_response_invalid", "a stream event is not JSON") from None
        if isinstance(obj, dict) and set(obj) == {"error"}:
            return sse.encode(_dumps(obj))  # the gateway's own error event: no content
        try:
            return sse.encode(_dumps(self.opener.open_response(obj)))
        except aci.AciError as e:
            raise E2eeError(e.code, e.message) from None

    def stream_end(self) -> bytes:
        """The bytes still to release once the whole stream was read and its receipt
        accepted: `[DONE]`, or in clear what followed the last event; under E2EE an
        unfinished event is refused."""
        rest = self.parser.rest()
        if self.done is not None:
            return self.done
        if self.opener is not None:
            if rest.strip(b"\r\n"):
                raise E2eeError("e2ee_response_invalid", "the stream ended inside an event")
            return b""
        return rest

    def answer(self, response: httpx.Response, **kw: Any) -> httpx.Response:
        """The response handed to the SDK."""
        headers = [(k, v) for k, v in response.headers.multi_items() if k.lower() not in DROPPED]
        return httpx.Response(response.status_code, headers=headers, request=self.request,
                              **kw)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _retryable(flow: CallFlow, response: httpx.Response) -> bool:
    return response.status_code == 400 and flow._code(response) == "e2ee_model_key_mismatch"


class VerifyingTransport(httpx.BaseTransport):
    """The blocking transport (`Gateway.http_client`)."""

    def __init__(self, gw: Gateway, *, e2ee: bool, pin_tls: bool, allow_plaintext: bool
                 ) -> None:
        self.gw, self.e2ee, self.allow_plaintext = gw, e2ee, allow_plaintext
        self._inner = httpx.HTTPTransport(verify=_verify(gw, pin_tls))

    def close(self) -> None:
        self._inner.close()

    def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return self._inner.handle_request(request)
        except httpx.TransportError as e:
            m = pinning.find_mismatch(e)
            if m is None:
                raise
            raise ChannelError("tls_pin_mismatch", str(m)) from None

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        import time

        kind = check_channel(self.gw, request, self.e2ee, self.allow_plaintext)
        if kind is None:
            return self._send(request)
        request.read()
        for attempt in (0, 1):
            lease = self.gw.current()
            flow = CallFlow(self.gw, lease, request, kind, self.e2ee, time.time())
            try:
                response = self._send(flow.outgoing)
            except ChannelError as e:
                if attempt or e.code != "tls_pin_mismatch" or \
                        self.gw.refresh().tls_spki_sha256 == lease.tls_spki_sha256:
                    raise
                continue
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                response.read()
                response.close()
                if not attempt and _retryable(flow, response) and \
                        self.gw.refresh().e2ee_key != lease.e2ee_key:
                    continue
                return self._finish_json(flow, response)
            return self._finish_stream(flow, response)
        raise AssertionError("unreachable")

    def _receipt(self, flow: CallFlow, response: httpx.Response) -> dict[str, Any]:
        r = self._send(flow.receipt_request(response.headers["x-receipt-id"]))
        body = r.read()
        r.close()
        try:
            rec = flow.receipt_of(response, r.status_code, body)
        except ReceiptInvalid as e:
            if e.code != "receipt_key_mismatch":
                raise
            lease = self.gw.refresh()  # a rotated key is accepted only once attested
            rec = flow.receipt_of(response, r.status_code, body, lease)
        if self.gw.policy.require_inclusion:
            check_proof(self.gw._wait_proof(rec, self.gw.policy.timeout), rec, self.gw.lease,
                        self.gw.policy)
        self.gw.record(rec)
        return rec

    def _finish_json(self, flow: CallFlow, response: httpx.Response) -> httpx.Response:
        if flow.check_answer(response) is None:
            return flow.answer(response, content=response.content)
        body = flow.open_json(response.content) if response.status_code == 200 else \
            _plain(flow, response.content)
        self._receipt(flow, response)
        return flow.answer(response, content=body)

    def _finish_stream(self, flow: CallFlow, response: httpx.Response) -> httpx.Response:
        try:
            flow.check_answer(response)
        except VerificationError:
            response.close()
            raise
        transport = self

        class Stream(httpx.SyncByteStream):
            def __iter__(self) -> Iterator[bytes]:
                for chunk in response.iter_raw():
                    out, _ = flow.stream_feed(chunk)
                    if out:
                        yield out
                tail = flow.stream_end()
                transport._receipt(flow, response)
                if tail:
                    yield tail

            def close(self) -> None:
                response.close()

        return flow.answer(response, stream=Stream())


def _plain(flow: CallFlow, raw: bytes) -> bytes:
    flow.digest.update(raw)
    return raw


class AsyncVerifyingTransport(httpx.AsyncBaseTransport):
    """The async transport (`Gateway.async_http_client`)."""

    def __init__(self, gw: Gateway, *, e2ee: bool, pin_tls: bool, allow_plaintext: bool
                 ) -> None:
        self.gw, self.e2ee, self.allow_plaintext = gw, e2ee, allow_plaintext
        self._inner = httpx.AsyncHTTPTransport(verify=_verify(gw, pin_tls))

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._inner.handle_async_request(request)
        except httpx.TransportError as e:
            m = pinning.find_mismatch(e)
            if m is None:
                raise
            raise ChannelError("tls_pin_mismatch", str(m)) from None

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        import time

        kind = check_channel(self.gw, request, self.e2ee, self.allow_plaintext)
        if kind is None:
            return await self._send(request)
        await request.aread()
        for attempt in (0, 1):
            lease = await self.gw.acurrent()
            flow = CallFlow(self.gw, lease, request, kind, self.e2ee, time.time())
            try:
                response = await self._send(flow.outgoing)
            except ChannelError as e:
                if attempt or e.code != "tls_pin_mismatch" or \
                        (await self.gw.arefresh()).tls_spki_sha256 == lease.tls_spki_sha256:
                    raise
                continue
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                await response.aread()
                await response.aclose()
                if not attempt and _retryable(flow, response) and \
                        (await self.gw.arefresh()).e2ee_key != lease.e2ee_key:
                    continue
                return await self._finish_json(flow, response)
            return await self._finish_stream(flow, response)
        raise AssertionError("unreachable")

    async def _receipt(self, flow: CallFlow, response: httpx.Response) -> dict[str, Any]:
        import asyncio

        r = await self._send(flow.receipt_request(response.headers["x-receipt-id"]))
        body = await r.aread()
        await r.aclose()
        try:
            rec = flow.receipt_of(response, r.status_code, body)
        except ReceiptInvalid as e:
            if e.code != "receipt_key_mismatch":
                raise
            rec = flow.receipt_of(response, r.status_code, body, await self.gw.arefresh())
        if self.gw.policy.require_inclusion:
            text = await asyncio.to_thread(self.gw._wait_proof, rec, self.gw.policy.timeout)
            check_proof(text, rec, self.gw.lease, self.gw.policy)
        self.gw.record(rec)
        return rec

    async def _finish_json(self, flow: CallFlow, response: httpx.Response) -> httpx.Response:
        if flow.check_answer(response) is None:
            return flow.answer(response, content=response.content)
        body = flow.open_json(response.content) if response.status_code == 200 else \
            _plain(flow, response.content)
        await self._receipt(flow, response)
        return flow.answer(response, content=body)

    async def _finish_stream(self, flow: CallFlow, response: httpx.Response) -> httpx.Response:
        try:
            flow.check_answer(response)
        except VerificationError:
            await response.aclose()
            raise
        transport = self

        class Stream(httpx.AsyncByteStream):
            async def __aiter__(self) -> AsyncIterator[bytes]:
                async for chunk in response.aiter_raw():
                    out, _ = flow.stream_feed(chunk)
                    if out:
                        yield out
                tail = flow.stream_end()
                await transport._receipt(flow, response)
                if tail:
                    yield tail

            async def aclose(self) -> None:
                await response.aclose()

        return flow.answer(response, stream=Stream())
