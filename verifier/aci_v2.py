"""ACI E2EE version `2`: the anchor gateway's frozen compatibility protocol (pure).

Implemented from its specification (Dstack-TEE/private-ai-gateway,
spec/e2ee-v2.md), X25519 suite only (the attested keyset holds one X25519
E2EE key; a secp256k1 model key is not ours: `e2ee_model_key_mismatch`).
docs/e2ee.md restates it; the differences from `aci-1` are:

- keys in headers are hex (optional `0x`); response headers
  `x-e2ee-applied: true`, `x-e2ee-version: 2`, `x-e2ee-algo`;
- every field is sealed on its own: a fresh ephemeral X25519 key, key =
  HKDF-SHA256(salt none, ECDH output, info "aci.e2ee.v2.x25519", 32),
  AES-256-GCM with a fresh 12-byte nonce; the value is lower-case hex of
  ephemeral public key ‖ nonce ‖ ciphertext ‖ tag;
- associated data is the RFC 8785 JSON of {purpose, algo, model, field,
  nonce, ts} (responses add the response `id`), so a field is bound to its
  path and to the request, but fields are not chained: order and truncation
  are covered by the receipt's `response_hash`;
- request fields: `messages.M.content` (a string; a structured array
  serialised to JSON), or per part `…content.C.text`, `…image_url.url`,
  `…input_audio.data`; embeddings `input` / `input.I`. At least one field
  must be sealed, and every string at those places must open;
- response fields: message/delta `content`, `reasoning`, `reasoning_content`,
  `audio.data`; `data.I.embedding` (compact JSON). `choices`/`data` paths use
  the entry's `index`. v2 defines nothing else, so a response carrying
  other content (tool calls, logprobs, refusals, unknown members) cannot be
  sealed: the gateway refuses to send it (`e2ee_unsealable`) rather than
  leak it in clear.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from verifier.aci import (
    H_APPLIED,
    H_VERSION,
    V2,
    AciError,
    RequestHeaders,
    json_bytes,
)

ALGO = "x25519-aes-256-gcm-hkdf-sha256"
INFO = b"aci.e2ee.v2.x25519"
REQUEST_PURPOSE = "aci.e2ee.request.v2"
RESPONSE_PURPOSE = "aci.e2ee.response.v2"
H_ALGO = "x-e2ee-algo"
MIN_FIELD = 32 + 12 + 16
TOP_CLEAR = frozenset({"id", "object", "created", "model", "system_fingerprint",
                       "service_tier", "usage", "choices", "data"})
CHOICE_CLEAR = frozenset({"index", "finish_reason", "message", "delta"})
ANSWER_SEALED = ("content", "reasoning", "reasoning_content")
AUDIO_CLEAR = frozenset({"id", "expires_at"})

Draw = Callable[[int], bytes]
Field = tuple[Any, Any, str]


def request_aad(model: str, field: str, nonce: str, ts: int) -> bytes:
    """The associated data of a request field (RFC 8785 bytes)."""
    return rfc8785.dumps({"purpose": REQUEST_PURPOSE, "algo": ALGO, "model": model,
                          "field": field, "nonce": nonce, "ts": ts})


def response_aad(model: str, response_id: str, field: str, nonce: str, ts: int) -> bytes:
    """The associated data of a response field (RFC 8785 bytes)."""
    return rfc8785.dumps({"purpose": RESPONSE_PURPOSE, "algo": ALGO, "model": model,
                          "id": response_id, "field": field, "nonce": nonce, "ts": ts})


def _key(shared: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(shared)


def check_public_key(raw: bytes) -> None:
    """`e2ee_invalid_public_key` unless `raw` is a usable X25519 public key (not low order)."""
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError:
        raise AciError("e2ee_invalid_public_key", "not a usable X25519 public key") from None


def encrypt_field(recipient: bytes, plain: bytes, aad: bytes, draw: Draw = os.urandom) -> str:
    """One sealed field: hex(ephemeral public ‖ nonce ‖ ciphertext ‖ tag)."""
    eph = X25519PrivateKey.from_private_bytes(draw(32))
    try:
        shared = eph.exchange(X25519PublicKey.from_public_bytes(recipient))
    except ValueError:
        raise AciError("e2ee_invalid_public_key", "not a usable X25519 public key") from None
    nonce = draw(12)
    ct = AESGCM(_key(shared)).encrypt(nonce, plain, aad)
    return (eph.public_key().public_bytes_raw() + nonce + ct).hex()


def decrypt_field(private: bytes, value: Any, aad: bytes, code: str) -> bytes:
    """The plaintext of one sealed field, or AciError(`code`)."""
    try:
        if not isinstance(value, str):
            raise ValueError("not a string")
        text = value[2:] if value[:2] in ("0x", "0X") else value
        raw = bytes.fromhex(text)
        if len(raw) < MIN_FIELD:
            raise ValueError("too short")
        shared = X25519PrivateKey.from_private_bytes(private).exchange(
            X25519PublicKey.from_public_bytes(raw[:32]))
        return AESGCM(_key(shared)).decrypt(raw[32:44], raw[44:], aad)
    except (ValueError, InvalidTag):
        raise AciError(code, "a sealed field does not open") from None


def _index(entry: Any, position: int) -> int:
    i = entry.get("index") if isinstance(entry, dict) else None
    return i if isinstance(i, int) and not isinstance(i, bool) and i >= 0 else position


# -- requests --------------------------------------------------------------------------


def _request_places(obj: dict[str, Any], kind: str, sealing: bool) -> Iterator[Field]:
    """The request's sealable places holding a string (the gateway opens every one)."""
    if kind == "embeddings":
        inp = obj.get("input")
        if isinstance(inp, str):
            yield obj, "input", "input"
        elif isinstance(inp, list):
            for i, v in enumerate(inp):
                if isinstance(v, str):
                    yield inp, i, f"input.{i}"
        return
    msgs = obj.get("messages")
    if not isinstance(msgs, list):
        return
    for m, msg in enumerate(msgs):
        if not isinstance(msg, dict):
            continue
        content = msg.get("content")
        if isinstance(content, str):
            yield msg, "content", f"messages.{m}.content"
        elif isinstance(content, list):
            if sealing and not all(_known_part(p) for p in content):
                yield msg, "content", f"messages.{m}.content"
                continue
            for c, part in enumerate(content):
                if not isinstance(part, dict):
                    continue
                typ, base = part.get("type"), f"messages.{m}.content.{c}"
                if typ == "text" and isinstance(part.get("text"), str):
                    yield part, "text", f"{base}.text"
                elif typ in ("image_url", "input_audio"):
                    inner = part.get(typ)
                    member = "url" if typ == "image_url" else "data"
                    if isinstance(inner, dict) and isinstance(inner.get(member), str):
                        yield inner, member, f"{base}.{typ}.{member}"


def _known_part(part: Any) -> bool:
    return isinstance(part, dict) and part.get("type") in ("text", "image_url", "input_audio")


def open_request(obj: dict[str, Any], kind: str, h: RequestHeaders, model: str,
                 private_key: bytes, draw: Draw = os.urandom) -> tuple[dict[str, Any], Sealer]:
    """Gateway side: (the request with its fields opened, the response sealer)."""
    check_public_key(h.client_key)
    out = copy.deepcopy(obj)
    opened = 0
    for holder, key, path in list(_request_places(out, kind, sealing=False)):
        plain = decrypt_field(private_key, holder[key], request_aad(model, path, h.nonce,
                                                                    h.timestamp),
                              "e2ee_decryption_failed")
        try:
            text = plain.decode()
        except UnicodeDecodeError:
            raise AciError("e2ee_decryption_failed", f"field {path} is not UTF-8") from None
        holder[key] = _restore(text) if path.endswith(".content") else text
        opened += 1
    if not opened:
        raise AciError("e2ee_decryption_failed", "a v2 request must seal at least one field")
    return out, Sealer(h, model, draw)


def _restore(text: str) -> Any:
    """Whole message content: a JSON array is structured content, anything else a string."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return text
    return value if isinstance(value, list) else text


def seal_request(obj: dict[str, Any], kind: str, model_key: bytes, model: str, nonce: str,
                 ts: int, draw: Draw = os.urandom) -> dict[str, Any]:
    """Client side: the request with every v2 field sealed to `model_key`."""
    out = copy.deepcopy(obj)
    for holder, key, path in list(_request_places(out, kind, sealing=True)):
        value = holder[key]
        plain = value.encode() if isinstance(value, str) else json_bytes(value)
        holder[key] = encrypt_field(model_key, plain, request_aad(model, path, nonce, ts), draw)
    return out


# -- responses -------------------------------------------------------------------------


def _response_places(obj: dict[str, Any]) -> Iterator[Field]:
    """Where v2 seals a response; AciError(`e2ee_unsealable`) for content it cannot seal."""
    def unsealable(path: str) -> AciError:
        return AciError("e2ee_unsealable", f"v2 cannot seal response member {path}")

    for k, v in obj.items():
        if v is None or (k == "usage" and isinstance(v, dict)):
            continue
        if k not in TOP_CLEAR or (k in ("choices", "data") and not isinstance(v, list)):
            raise unsealable(k)
    for pos, d in enumerate(obj.get("data") or ()):
        if not isinstance(d, dict) or set(d) - {"object", "index", "embedding"}:
            raise unsealable(f"data.{pos}")
        if d.get("embedding") is not None:
            yield d, "embedding", f"data.{_index(d, pos)}.embedding"
    for pos, ch in enumerate(obj.get("choices") or ()):
        if not isinstance(ch, dict):
            raise unsealable(f"choices.{pos}")
        i = _index(ch, pos)
        for k, v in ch.items():
            if v is not None and k not in CHOICE_CLEAR:
                raise unsealable(f"choices.{i}.{k}")
        for part in ("message", "delta"):
            m = ch.get(part)
            if m is None:
                continue
            if not isinstance(m, dict):
                raise unsealable(f"choices.{i}.{part}")
            yield from _answer_places(m, f"choices.{i}.{part}", unsealable)


def _answer_places(m: dict[str, Any], path: str,
                   unsealable: Callable[[str], AciError]) -> Iterator[Field]:
    for k, v in m.items():
        if v is None or k == "role" or (isinstance(v, list) and not v):
            continue
        if k in ANSWER_SEALED:
            if not isinstance(v, str):
                raise unsealable(f"{path}.{k}")
            yield m, k, f"{path}.{k}"
        elif k == "audio" and isinstance(v, dict) and not path.endswith("delta"):
            for ak, av in v.items():
                if av is not None and ak not in AUDIO_CLEAR and ak != "data":
                    raise unsealable(f"{path}.audio.{ak}")
            if isinstance(v.get("data"), str):
                yield v, "data", f"{path}.audio.data"
        else:
            raise unsealable(f"{path}.{k}")


class Sealer:
    """Gateway side of v2: seals each response field to the client key."""

    mode = V2

    def __init__(self, h: RequestHeaders, model: str, draw: Draw = os.urandom) -> None:
        self._client = h.client_key
        self._model, self._nonce, self._ts = model, h.nonce, h.timestamp
        self._draw = draw

    def headers(self) -> list[tuple[bytes, bytes]]:
        """`x-e2ee-applied`, `x-e2ee-version` and `x-e2ee-algo`."""
        return [(H_APPLIED.encode(), b"true"), (H_VERSION.encode(), V2.encode()),
                (H_ALGO.encode(), ALGO.encode())]

    def seal_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy with every v2 field sealed (an empty streamed `delta.content` is dropped)."""
        out = copy.deepcopy(obj)
        rid = out.get("id") if isinstance(out.get("id"), str) else ""
        for ch in out.get("choices") or ():
            delta = ch.get("delta") if isinstance(ch, dict) else None
            if isinstance(delta, dict) and delta.get("content") == "":
                del delta["content"]
        for holder, key, path in list(_response_places(out)):
            value = holder[key]
            plain = json_bytes(value) if path.endswith(".embedding") else value.encode()
            holder[key] = encrypt_field(self._client, plain, response_aad(
                self._model, rid, path, self._nonce, self._ts), self._draw)
        return out


class Opener:
    """Client side of v2: opens each sealed response field."""

    mode = V2

    def __init__(self, client_private: bytes, model: str, nonce: str, ts: int) -> None:
        self._sk = client_private
        self._model, self._nonce, self._ts = model, nonce, ts

    def start(self, headers: Mapping[str, str]) -> None:
        """Check the response announces v2 with our suite."""
        if headers.get(H_VERSION) != V2 or headers.get(H_ALGO) != ALGO:
            raise AciError("e2ee_response_invalid", "the response is not sealed with v2")

    def open_response(self, obj: dict[str, Any]) -> dict[str, Any]:
        """A copy with every v2 field opened (each must open)."""
        if not isinstance(obj, dict):
            raise AciError("e2ee_response_invalid", "response is not a JSON object")
        out = copy.deepcopy(obj)
        rid = out.get("id") if isinstance(out.get("id"), str) else ""
        try:
            places = list(_response_places(out))
        except AciError as e:
            raise AciError("e2ee_response_invalid", e.message) from None
        for holder, key, path in places:
            plain = decrypt_field(self._sk, holder[key], response_aad(
                self._model, rid, path, self._nonce, self._ts), "e2ee_response_invalid")
            try:
                holder[key] = json.loads(plain) if path.endswith(".embedding") \
                    else plain.decode()
            except (ValueError, RecursionError):
                raise AciError("e2ee_response_invalid", f"field {path} is malformed") from None
        return out
