"""ACI E2EE: sensitive JSON fields sealed end to end to the attested E2EE key (pure).

docs/e2ee.md is the specification, with known-answer vectors; in short:

Request headers (both versions): `x-e2ee-version` (`aci-1`, or `2` for the
anchor gateway's frozen v2 in verifier/aci_v2.py), `x-client-pub-key` (the
key the response is sealed to), `x-model-pub-key` (must be the attested
`e2ee_public_key`), `x-e2ee-nonce` (64 hex digits, accepted once) and
`x-e2ee-timestamp` (Unix seconds, within ±300 s). `aci-1` adds `x-e2ee-enc`.

`aci-1`: keys are base64 of raw X25519 keys, as in the keyset. One RFC 9180
HPKE context per direction, base mode, DHKEM(X25519, HKDF-SHA256) /
HKDF-SHA256 / AES-256-GCM:

- request: the client encapsulates to the model key (`x-e2ee-enc`) with
  info = "pag/aci-1/request" 0x00 ‖ JCS({client_pub_key, model,
  model_pub_key, nonce (lower-case), timestamp}), so the headers and the
  model cannot be swapped without the request failing to open;
- response: the gateway encapsulates to the client key (response header
  `x-e2ee-enc`) with info = "pag/aci-1/response" 0x00 ‖ request enc.

Each sensitive field's value is replaced by the JSON string "aci-1:" ‖
base64(ciphertext of the value's compact JSON), the field's dotted path as
AEAD associated data, sealed in the order `request_fields` / `response_fields`
walk the object (the AEAD sequence number binds that order: a dropped,
duplicated or reordered field fails to open). Request fields: every member of
every message except `role`, `name`, `tool_call_id` and the `tool_calls`
structure (whose `function.arguments` are sealed), plus `tools`, `functions`,
`response_format`, `prediction`; embeddings `input`. Response fields: every
member not on a short clear list (ids, object, created, model, numeric usage,
`index`, `finish_reason`, `role`, tool-call ids, types and names), so a
provider's new content-bearing member is sealed too. Null values stay null.

`AciError.code` is one of `CODES`; messages never carry content.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import json
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import rfc8785
from pyhpke import AEADId, CipherSuite, KDFId, KEMId
from pyhpke.context_interface import ContextInterface
from pyhpke.exceptions import PyHPKEError

VERSION = "aci-1"
V2 = "2"
VERSIONS = (VERSION, V2)
H_VERSION = "x-e2ee-version"
H_CLIENT_KEY = "x-client-pub-key"
H_MODEL_KEY = "x-model-pub-key"
H_NONCE = "x-e2ee-nonce"
H_TIMESTAMP = "x-e2ee-timestamp"
H_ENC = "x-e2ee-enc"
H_APPLIED = "x-e2ee-applied"
REQUEST_HEADERS = (H_VERSION, H_CLIENT_KEY, H_MODEL_KEY, H_NONCE, H_TIMESTAMP)
E2EE_HEADERS = (*REQUEST_HEADERS, H_ENC)
WINDOW = 300
PREFIX = "aci-1:"
SUITE = CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256, AEADId.AES256_GCM)
REQUEST_INFO = b"pag/aci-1/request\x00"
RESPONSE_INFO = b"pag/aci-1/response\x00"
CODES = ("e2ee_header_missing", "e2ee_invalid_version", "e2ee_invalid_public_key",
         "e2ee_model_key_mismatch", "e2ee_invalid_nonce", "e2ee_replay_detected",
         "e2ee_invalid_timestamp", "e2ee_invalid_payload_model", "e2ee_decryption_failed",
         "e2ee_unsupported_endpoint", "e2ee_unsealable", "e2ee_response_invalid")
NONCE = re.compile(r"[0-9a-fA-F]{64}")
TIMESTAMP = re.compile(r"[0-9]{1,12}")

MESSAGE_CLEAR = frozenset({"role", "name", "tool_call_id", "tool_calls"})
REQUEST_SEALED = ("tools", "functions", "response_format", "prediction")
TOP_CLEAR = frozenset({"id", "object", "created", "model", "system_fingerprint",
                       "service_tier", "usage", "choices", "data"})
CHOICE_CLEAR = frozenset({"index", "finish_reason", "message", "delta"})
ANSWER_CLEAR = frozenset({"role", "tool_calls"})
TOOL_CALL_CLEAR = frozenset({"id", "type", "index", "function"})
DATA_CLEAR = frozenset({"object", "index"})

Draw = Callable[[int], bytes]
Field = tuple[Any, Any, str]  # (container, key or index, dotted path)


class AciError(ValueError):
    """An E2EE request or response refused; `code` is one of `CODES` (no content inside)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RequestHeaders:
    """The validated E2EE request headers."""

    version: str
    client_key: bytes
    model_key: bytes
    nonce: str  # exactly as sent (v2 binds it byte for byte)
    timestamp: int
    enc: bytes | None = None  # aci-1 only: the request's HPKE encapsulated key

    def replay_key(self) -> str:
        """What a replay cache remembers: (client key, model key, nonce bytes), hashed."""
        return hashlib.sha256(self.client_key + self.model_key
                              + bytes.fromhex(self.nonce)).hexdigest()


# -- headers -------------------------------------------------------------------------


def _b64_key(value: str, code: str, what: str) -> bytes:
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AciError(code, f"{what} is not base64") from None
    if len(raw) != 32:
        raise AciError(code, f"{what} is not a 32-byte X25519 key")
    return raw


def _hex_key(value: str, code: str, what: str) -> bytes:
    text = value[2:] if value[:2] in ("0x", "0X") else value
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise AciError(code, f"{what} is not hex") from None
    if len(raw) != 32:
        raise AciError(code, f"{what} is not a 32-byte X25519 key")
    return raw


def read_headers(headers: Mapping[str, str], now: float) -> RequestHeaders | None:
    """The E2EE headers of a request (lower-case names), checked; None when it carries none.

    Checks, in order: all present (`e2ee_header_missing`), a known version, the nonce
    form, the timestamp window, the key encodings. That the model key is the attested
    one, replay and decryption are checked by the caller (`check_model_key`,
    `RequestHeaders.replay_key`, `open_request`)."""
    present = {h: headers[h] for h in E2EE_HEADERS if h in headers}
    if not present:
        return None
    version = present.get(H_VERSION)
    if version is None:
        raise AciError("e2ee_header_missing", f"E2EE headers without {H_VERSION}")
    if version not in VERSIONS:
        raise AciError("e2ee_invalid_version",
                       f"{H_VERSION} must be one of {', '.join(VERSIONS)}")
    needed = REQUEST_HEADERS + ((H_ENC,) if version == VERSION else ())
    missing = [h for h in needed if h not in present]
    if missing:
        raise AciError("e2ee_header_missing", f"missing {', '.join(missing)}")
    if not NONCE.fullmatch(present[H_NONCE]):
        raise AciError("e2ee_invalid_nonce", f"{H_NONCE} must be exactly 64 hex digits")
    ts_text = present[H_TIMESTAMP]
    if not TIMESTAMP.fullmatch(ts_text):
        raise AciError("e2ee_invalid_timestamp", f"{H_TIMESTAMP} must be Unix seconds")
    ts = int(ts_text)
    if abs(now - ts) > WINDOW:
        raise AciError("e2ee_invalid_timestamp",
                       f"{H_TIMESTAMP} is more than {WINDOW} s from the gateway's clock")
    key = _b64_key if version == VERSION else _hex_key
    model_key = key(present[H_MODEL_KEY], "e2ee_model_key_mismatch", H_MODEL_KEY)
    client_key = key(present[H_CLIENT_KEY], "e2ee_invalid_public_key", H_CLIENT_KEY)
    enc = _b64_key(present[H_ENC], "e2ee_invalid_public_key", H_ENC) \
        if version == VERSION else None
    return RequestHeaders(version, client_key, model_key, present[H_NONCE], ts, enc)


def check_model_key(h: RequestHeaders, attested: bytes) -> None:
    """`e2ee_model_key_mismatch` unless the request was sealed to the attested key (after a
    key rotation a client re-fetches the attestation and retries)."""
    if not hmac.compare_digest(h.model_key, attested):
        raise AciError("e2ee_model_key_mismatch",
                       f"{H_MODEL_KEY} is not this gateway's attested E2EE key")


def public_key(private_raw: bytes) -> bytes:
    """The X25519 public key of a raw 32-byte private key."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private_raw).public_key().public_bytes_raw()


def json_bytes(value: Any) -> bytes:
    """Compact JSON (UTF-8, no ASCII escaping): the plaintext of a sealed field."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()


def request_model(obj: Mapping[str, Any]) -> str:
    """The request's clear `model`, bound into the encryption (`e2ee_invalid_payload_model`)."""
    model = obj.get("model")
    if not isinstance(model, str):
        raise AciError("e2ee_invalid_payload_model", "an E2EE request needs a string 'model'")
    return model


# -- aci-1 field walks -----------------------------------------------------------------


def request_fields(obj: dict[str, Any], kind: str) -> Iterator[Field]:
    """The sensitive request fields in sealing order (null values are skipped)."""
    if kind == "embeddings":
        if obj.get("input") is not None:
            yield obj, "input", "input"
        return
    msgs = obj.get("messages")
    if isinstance(msgs, list):
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                continue
            for k, v in m.items():
                if v is None:
                    continue
                if k == "tool_calls" and isinstance(v, list):
                    yield from _tool_call_fields(v, f"messages.{i}.tool_calls")
                elif k not in MESSAGE_CLEAR or k == "tool_calls":
                    yield m, k, f"messages.{i}.{k}"
    for k in REQUEST_SEALED:
        if obj.get(k) is not None:
            yield obj, k, k


def _tool_call_fields(calls: list[Any], path: str) -> Iterator[Field]:
    for j, tc in enumerate(calls):
        if not isinstance(tc, dict):
            if tc is not None:
                yield calls, j, f"{path}.{j}"
            continue
        for k, v in tc.items():
            if v is None:
                continue
            if k == "function" and isinstance(v, dict):
                for fk, fv in v.items():
                    if fk != "name" and fv is not None:
                        yield v, fk, f"{path}.{j}.function.{fk}"
            elif k not in TOOL_CALL_CLEAR or k == "function":
                yield tc, k, f"{path}.{j}.{k}"


def _numeric(v: Any) -> bool:
    if isinstance(v, dict):
        return all(_numeric(x) for x in v.values())
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool))


def response_fields(obj: dict[str, Any]) -> Iterator[Field]:
    """The sealed members of a response object or stream chunk, in order: everything not on
    the clear lists (a member of unexpected shape is sealed whole)."""
    for k, v in obj.items():
        if v is None:
            continue
        if k == "choices" and isinstance(v, list):
            yield from _choice_fields(v)
        elif k == "data" and isinstance(v, list):
            yield from _list_fields(v, "data", DATA_CLEAR, None)
        elif k == "usage" and isinstance(v, dict) and _numeric(v):
            continue
        elif k not in TOP_CLEAR or k in ("choices", "data", "usage"):
            yield obj, k, k


def _list_fields(items: list[Any], path: str, clear: frozenset[str],
                 walk: Callable[[dict[str, Any], str], Iterator[Field]] | None
                 ) -> Iterator[Field]:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            if item is not None:
                yield items, i, f"{path}.{i}"
            continue
        for k, v in item.items():
            if v is None:
                continue
            if walk is not None and k in ("message", "delta") and isinstance(v, dict):
                yield from walk(v, f"{path}.{i}.{k}")
            elif k not in clear or k in ("message", "delta"):
                yield item, k, f"{path}.{i}.{k}"


def _choice_fields(choices: list[Any]) -> Iterator[Field]:
    return _list_fields(choices, "choices", CHOICE_CLEAR, _answer_fields)


def _answer_fields(m: dict[str, Any], path: str) -> Iterator[Field]:
    for k, v in m.items():
        if v is None:
            continue
        if k == "tool_calls" and isinstance(v, list):
            yield from _tool_call_fields(v, f"{path}.tool_calls")
        elif k not in ANSWER_CLEAR or k == "tool_calls":
            yield m, k, f"{path}.{k}"


# -- aci-1 sealing ---------------------------------------------------------------------


def request_info(h: RequestHeaders, model: str) -> bytes:
    """The request context's HPKE info: binds the headers and the model."""
    return REQUEST_INFO + rfc8785.dumps({
        "client_pub_key": base64.b64encode(h.client_key).decode(),
        "model": model, "model_pub_key": base64.b64encode(h.model_key).decode(),
        "nonce": h.nonce.lower(), "timestamp": h.timestamp})


def _seal_field(ctx: ContextInterface, value: Any, path: str) -> str:
    try:
        plain = json_bytes(value)
    except ValueError:
        raise AciError("e2ee_unsealable", f"field {path} is not JSON") from None
    return PREFIX + base64.b64encode(ctx.seal(plain, path.encode())).decode()


def _open_field(ctx: ContextInterface, value: Any, path: str, code: str) -> Any:
    if not isinstance(value, str) or not value.startswith(PREFIX):
        raise AciError(code, f"field {path} is not sealed")
    try:
        raw = base64.b64decode(value[len(PREFIX):], validate=True)
        return json.loads(ctx.open(raw, path.encode()))
    except (binascii.Error, PyHPKEError, ValueError):
        raise AciError(code, f"field {path} does not open") from None


def _kem_keys(private_raw: bytes) -> Any:
    return SUITE.kem.deserialize_private_key(private_raw)


def _sender(recipient: bytes, info: bytes, draw: Draw) -> tuple[bytes, ContextInterface]:
    eph = SUITE.kem.derive_key_pair(draw(32))
    try:
        return SUITE.create_sender_context(SUITE.kem.deserialize_public_key(recipient), info,
                                           eks=eph)
    except (PyHPKEError, ValueError):
        raise AciError("e2ee_invalid_public_key", "not a usable X25519 public key") from None


class Sealer:
    """Gateway side of `aci-1`: seals response fields to the client key, in order."""

    mode = VERSION

    def __init__(self, h: RequestHeaders, draw: Draw = os.urandom) -> None:
        assert h.enc is not None  # noqa: S101 - type narrowing: read_headers sets enc for aci-1
        self.enc, self._ctx = _sender(h.client_key, RESPONSE_INFO + h.enc, draw)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """The response headers: the version applied and the response's encapsulated key."""
        return [(H_VERSION.encode(), VERSION.encode()), (H_APPLIED.encode(), b"true"),
                (H_ENC.encode(), base64.b64encode(self.enc))]

    def seal_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of a response object (or one stream chunk) with its fields sealed."""
        out = copy.deepcopy(obj)
        for holder, key, path in list(response_fields(out)):
            holder[key] = _seal_field(self._ctx, holder[key], path)
        return out


def open_request(obj: dict[str, Any], kind: str, h: RequestHeaders, private_key: bytes,
                 draw: Draw = os.urandom) -> tuple[dict[str, Any], Any]:
    """Gateway side: (the request with its fields opened, the response sealer).

    Every sensitive field must be sealed (`e2ee_decryption_failed` otherwise)."""
    model = request_model(obj)
    if h.version == V2:
        from verifier import aci_v2

        return aci_v2.open_request(obj, kind, h, model, private_key, draw)
    assert h.enc is not None  # noqa: S101 - type narrowing: read_headers sets enc for aci-1
    sealer = Sealer(h, draw)  # first: a bad client key is refused before any decryption
    try:
        ctx = SUITE.create_recipient_context(h.enc, _kem_keys(private_key),
                                             request_info(h, model))
    except (PyHPKEError, ValueError):
        raise AciError("e2ee_invalid_public_key", f"{H_ENC} is not a usable key") from None
    out = copy.deepcopy(obj)
    for holder, key, path in list(request_fields(out, kind)):
        holder[key] = _open_field(ctx, holder[key], path, "e2ee_decryption_failed")
    return out, sealer


class Opener:
    """Client side of `aci-1`: opens the response's sealed fields, in order."""

    mode = VERSION

    def __init__(self, client_private: bytes, request_enc: bytes) -> None:
        self._sk = _kem_keys(client_private)
        self._request_enc = request_enc
        self._ctx: ContextInterface | None = None

    def start(self, headers: Mapping[str, str]) -> None:
        """Set up from the response headers (lower-case names); `e2ee_response_invalid`
        unless they announce `aci-1` with a usable encapsulated key."""
        if headers.get(H_VERSION) != VERSION or H_ENC not in headers:
            raise AciError("e2ee_response_invalid", "the response is not sealed with aci-1")
        enc = _b64_key(headers[H_ENC], "e2ee_response_invalid", H_ENC)
        try:
            self._ctx = SUITE.create_recipient_context(enc, self._sk,
                                                       RESPONSE_INFO + self._request_enc)
        except (PyHPKEError, ValueError):
            raise AciError("e2ee_response_invalid", f"{H_ENC} is not a usable key") from None

    def open_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy of a response object (or stream chunk) with its fields opened; any field
        in clear that should be sealed, or that does not open, is `e2ee_response_invalid`."""
        if self._ctx is None:
            raise AciError("e2ee_response_invalid", "response headers not read")
        if not isinstance(obj, dict):
            raise AciError("e2ee_response_invalid", "response is not a JSON object")
        out = copy.deepcopy(obj)
        for holder, key, path in list(response_fields(out)):
            holder[key] = _open_field(self._ctx, holder[key], path, "e2ee_response_invalid")
        return out


def seal_request(obj: dict[str, Any], kind: str, model_key: bytes, *, now: float,
                 version: str = VERSION, draw: Draw = os.urandom
                 ) -> tuple[dict[str, Any], dict[str, str], Any]:
    """Client side: (sealed request, headers to send, response opener).

    `draw(n)` supplies the random bytes, in this order: the client's X25519 private key
    (32), the nonce (32), then for aci-1 the HPKE ephemeral `ikmE` (32); for v2 each
    field's ephemeral key (32) and AES-GCM nonce (12). Tests pass fixed bytes."""
    model = request_model(obj)
    client_private = draw(32)
    client_pub = public_key(client_private)
    nonce = draw(32).hex()
    ts = int(now)
    if version == V2:
        from verifier import aci_v2

        sealed = aci_v2.seal_request(obj, kind, model_key, model, nonce, ts, draw)
        headers = {H_VERSION: V2, H_CLIENT_KEY: client_pub.hex(),
                   H_MODEL_KEY: model_key.hex(), H_NONCE: nonce, H_TIMESTAMP: str(ts)}
        return sealed, headers, aci_v2.Opener(client_private, model, nonce, ts)
    if version != VERSION:
        raise AciError("e2ee_invalid_version", f"unknown E2EE version {version[:16]!r}")
    h = RequestHeaders(VERSION, client_pub, model_key, nonce, ts)
    enc, ctx = _sender(model_key, request_info(h, model), draw)
    out = copy.deepcopy(obj)
    for holder, key, path in list(request_fields(out, kind)):
        holder[key] = _seal_field(ctx, holder[key], path)
    headers = {H_VERSION: VERSION, H_CLIENT_KEY: base64.b64encode(client_pub).decode(),
               H_MODEL_KEY: base64.b64encode(model_key).decode(), H_NONCE: nonce,
               H_TIMESTAMP: str(ts), H_ENC: base64.b64encode(enc).decode()}
    return out, headers, Opener(client_private, enc)
