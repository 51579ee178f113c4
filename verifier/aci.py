"""ACI E2EE mode "aci-1": sensitive JSON fields sealed with RFC 9180 HPKE (pure).

Suite: DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, base mode.

Request (client -> gateway), headers:
  x-e2ee: aci-1
  x-e2ee-enc: base64(enc)             HPKE encapsulated key to the attested E2EE key
  x-e2ee-client-key: base64(pk)       the client's X25519 key for the response
One sender context with info = "pag/aci-1/request" || 0x00 || client pk seals,
in document order, every sensitive field: each message's `content` string (or
each `text` of its content parts), and the embeddings `input` string(s). A
sealed field is the JSON string "aci-1:" + base64(ciphertext) with
aad = the field's dotted path (e.g. "messages.0.content"). In aci-1 mode every
such field must be sealed; a plaintext one is rejected.

Response (gateway -> client), headers x-e2ee: aci-1 and x-e2ee-enc:
base64(enc) to the client key, info = "pag/aci-1/response" || 0x00 || request
enc. Sealed in order: `choices.N.message.content` (JSON),
`choices.N.delta.content` (each SSE event in stream order) and
`data.N.embedding` (the JSON array text of the vector).
"""

from __future__ import annotations

import base64
import binascii
import copy
import json
from collections.abc import Iterator
from typing import Any

from pyhpke import AEADId, CipherSuite, KDFId, KEMId, KEMKey
from pyhpke.context_interface import ContextInterface
from pyhpke.exceptions import PyHPKEError

MODE = "aci-1"
PREFIX = "aci-1:"
REQUEST_INFO = b"pag/aci-1/request\x00"
RESPONSE_INFO = b"pag/aci-1/response\x00"
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES128_GCM)


class AciError(ValueError):
    """A malformed or undecryptable E2EE request or response (no content in the message)."""


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise AciError(f"{what} is not base64") from e


def _public(raw: bytes) -> Any:
    if len(raw) != 32:
        raise AciError("X25519 public key must be 32 bytes")
    return SUITE.kem.deserialize_public_key(raw)


def _private(raw: bytes) -> Any:
    if len(raw) != 32:
        raise AciError("X25519 private key must be 32 bytes")
    return SUITE.kem.deserialize_private_key(raw)


def public_key(private_raw: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    return KEMKey.from_pyca_cryptography_key(
        _x25519(private_raw).public_key()).to_public_bytes()


def _x25519(raw: bytes) -> Any:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    return X25519PrivateKey.from_private_bytes(raw)


def _request_fields(obj: dict[str, Any], kind: str) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, path) of each sensitive request field, in document order."""
    if kind == "chat":
        for i, m in enumerate(obj.get("messages") or []):
            if not isinstance(m, dict):
                continue
            c = m.get("content")
            if isinstance(c, str):
                yield m, "content", f"messages.{i}.content"
            elif isinstance(c, list):
                for j, part in enumerate(c):
                    if isinstance(part, dict) and isinstance(part.get("text"), str):
                        yield part, "text", f"messages.{i}.content.{j}.text"
    else:
        inp = obj.get("input")
        if isinstance(inp, str):
            yield obj, "input", "input"
        elif isinstance(inp, list):
            for i, v in enumerate(inp):
                if isinstance(v, str):
                    yield inp, i, f"input.{i}"


def _response_fields(obj: dict[str, Any]) -> Iterator[tuple[Any, Any, str]]:
    """(container, key, path) of each sensitive response field, in document order."""
    for i, ch in enumerate(obj.get("choices") or []):
        if not isinstance(ch, dict):
            continue
        for part in ("message", "delta"):
            m = ch.get(part)
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                yield m, "content", f"choices.{i}.{part}.content"
    for i, d in enumerate(obj.get("data") or []):
        if isinstance(d, dict) and "embedding" in d:
            yield d, "embedding", f"data.{i}.embedding"


def _seal(ctx: ContextInterface, plain: bytes, path: str) -> str:
    return PREFIX + base64.b64encode(ctx.seal(plain, path.encode())).decode()


def _open(ctx: ContextInterface, value: Any, path: str) -> bytes:
    if not isinstance(value, str) or not value.startswith(PREFIX):
        raise AciError(f"field {path} is not sealed")
    try:
        return ctx.open(_b64(value[len(PREFIX):], f"field {path}"), path.encode())
    except (PyHPKEError, ValueError) as e:
        raise AciError(f"field {path} does not decrypt") from e


def _copy(obj: Any) -> Any:
    return copy.deepcopy(obj)


class Sealer:
    """Gateway side: seals response fields to the client's key, in order."""

    def __init__(self, client_key: bytes, request_enc: bytes) -> None:
        self.enc, self._ctx = SUITE.create_sender_context(
            _public(client_key), RESPONSE_INFO + request_enc)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Response headers announcing the mode and the response enc."""
        return [(b"x-e2ee", MODE.encode()), (b"x-e2ee-enc", base64.b64encode(self.enc))]

    def seal_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of a response object (or one stream chunk) with its fields sealed."""
        out = _copy(obj)
        for holder, key, path in _response_fields(out):
            v = holder[key]
            plain = v.encode() if isinstance(v, str) else json.dumps(v, separators=(",", ":")).encode()
            holder[key] = _seal(self._ctx, plain, path)
        return out


def open_request(obj: dict[str, Any], kind: str, mode: str, client_key_b64: str,
                 enc_b64: str, private_key: bytes) -> tuple[dict[str, Any], Sealer]:
    """Gateway side: the plaintext request and the response sealer."""
    if mode != MODE:
        raise AciError(f"unsupported E2EE mode {mode[:32]!r}")
    client_key = _b64(client_key_b64, "x-e2ee-client-key")
    enc = _b64(enc_b64, "x-e2ee-enc")
    _public(client_key)
    try:
        ctx = SUITE.create_recipient_context(enc, _private(private_key),
                                             REQUEST_INFO + client_key)
    except (PyHPKEError, ValueError) as e:
        raise AciError("x-e2ee-enc is not a valid encapsulated key") from e
    out = _copy(obj)
    for holder, key, path in list(_request_fields(out, kind)):
        try:
            holder[key] = _open(ctx, holder[key], path).decode()
        except UnicodeDecodeError as e:
            raise AciError(f"field {path} is not UTF-8") from e
    try:
        sealer = Sealer(client_key, enc)
    except (PyHPKEError, ValueError) as e:
        raise AciError("x-e2ee-client-key is not a usable X25519 key") from e
    return out, sealer


class Opener:
    """Client side: opens response fields sealed by the gateway, in order."""

    def __init__(self, client_private: bytes, request_enc: bytes) -> None:
        self._sk = _private(client_private)
        self._request_enc = request_enc
        self._ctx: ContextInterface | None = None

    def start(self, response_enc_b64: str) -> None:
        """Set up from the response's x-e2ee-enc header."""
        try:
            self._ctx = SUITE.create_recipient_context(
                _b64(response_enc_b64, "x-e2ee-enc"), self._sk,
                RESPONSE_INFO + self._request_enc)
        except (PyHPKEError, ValueError) as e:
            raise AciError("x-e2ee-enc is not a valid encapsulated key") from e

    def open_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of a response object (or stream chunk) with its fields opened."""
        if self._ctx is None:
            raise AciError("response enc not set: call start() first")
        out = _copy(obj)
        for holder, key, path in _response_fields(out):
            plain = _open(self._ctx, holder[key], path)
            holder[key] = json.loads(plain) if path.endswith(".embedding") else plain.decode()
        return out


def seal_request(obj: dict[str, Any], kind: str, gateway_key: bytes,
                 client_private: bytes) -> tuple[dict[str, Any], dict[str, str], Opener]:
    """Client side: (sealed request, headers to send, response opener)."""
    client_pub = public_key(client_private)
    enc, ctx = SUITE.create_sender_context(_public(gateway_key), REQUEST_INFO + client_pub)
    out = _copy(obj)
    for holder, key, path in list(_request_fields(out, kind)):
        holder[key] = _seal(ctx, holder[key].encode(), path)
    headers = {"x-e2ee": MODE, "x-e2ee-enc": base64.b64encode(enc).decode(),
               "x-e2ee-client-key": base64.b64encode(client_pub).decode()}
    return out, headers, Opener(client_private, enc)


class SseSplitter:
    """Splits a byte stream into complete SSE events (each ending in a blank line)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """Complete events (with their terminating blank line) now available."""
        buf = self._buf + chunk
        out: list[bytes] = []
        start = 0
        while True:
            i = buf.find(b"\n\n", start)
            if i < 0:
                break
            out.append(buf[start:i + 2])
            start = i + 2
        self._buf = buf[start:]
        return out

    def rest(self) -> bytes:
        """Bytes of an unterminated final event, if any."""
        rest, self._buf = self._buf, b""
        return rest


def sse_data(event: bytes) -> bytes | None:
    """The payload of a single-line `data:` SSE event, else None."""
    if not event.startswith(b"data:"):
        return None
    body = event[5:].rstrip(b"\n")
    if b"\n" in body:
        return None
    return body[1:] if body.startswith(b" ") else body
