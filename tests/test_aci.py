"""ACI E2EE mode aci-1: HPKE-sealed request and response fields."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from verifier import aci

GW = X25519PrivateKey.generate()
GW_PRIV = GW.private_bytes_raw()
GW_PUB = GW.public_key().public_bytes_raw()
CLIENT = bytes(range(1, 33))
CHAT = {"model": "m", "messages": [
    {"role": "system", "content": "sys secret"},
    {"role": "user", "content": [{"type": "text", "text": "part secret"},
                                 {"type": "image_url", "image_url": {"url": "u"}}]},
    {"role": "assistant", "content": None}]}


def gateway_open(sealed: dict, headers: dict[str, str], kind: str = "chat"):
    return aci.open_request(sealed, kind, headers["x-e2ee"], headers["x-e2ee-client-key"],
                            headers["x-e2ee-enc"], GW_PRIV)


def test_public_key_matches_cryptography() -> None:
    assert aci.public_key(GW_PRIV) == GW_PUB


def test_chat_round_trip_and_response() -> None:
    sealed, headers, opener = aci.seal_request(CHAT, "chat", GW_PUB, CLIENT)
    text = json.dumps(sealed)
    assert "secret" not in text
    assert sealed["messages"][1]["content"][1] == CHAT["messages"][1]["content"][1]
    plain, sealer = gateway_open(sealed, headers)
    assert plain == CHAT
    resp = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "answer"}}]}
    out = sealer.seal_response(resp)
    assert out["choices"][0]["message"]["content"].startswith(aci.PREFIX)
    hdr = dict(sealer.headers())
    opener.start(hdr[b"x-e2ee-enc"].decode())
    assert opener.open_response(out) == resp


def test_stream_chunks_open_in_order() -> None:
    sealed, headers, opener = aci.seal_request(CHAT, "chat", GW_PUB, CLIENT)
    _, sealer = gateway_open(sealed, headers)
    chunks = [{"choices": [{"index": 0, "delta": {"content": w}}]} for w in ("a", "b", "c")]
    sealed_chunks = [sealer.seal_response(c) for c in chunks]
    opener.start(base64.b64encode(sealer.enc).decode())
    assert [opener.open_response(c) for c in sealed_chunks] == chunks
    opener2 = aci.Opener(CLIENT, base64.b64decode(headers["x-e2ee-enc"]))
    opener2.start(base64.b64encode(sealer.enc).decode())
    with pytest.raises(aci.AciError):  # out of order: the nonce sequence differs
        opener2.open_response(sealed_chunks[1])


def test_embeddings_input_and_vectors() -> None:
    req = {"model": "e", "input": ["one", "two"]}
    sealed, headers, opener = aci.seal_request(req, "embeddings", GW_PUB, CLIENT)
    assert all(v.startswith(aci.PREFIX) for v in sealed["input"])
    plain, sealer = gateway_open(sealed, headers, "embeddings")
    assert plain == req
    resp = {"data": [{"index": 0, "embedding": [0.5, -1.25]}]}
    out = sealer.seal_response(resp)
    assert isinstance(out["data"][0]["embedding"], str)
    opener.start(base64.b64encode(sealer.enc).decode())
    assert opener.open_response(out) == resp


def test_rejections() -> None:
    sealed, headers, _ = aci.seal_request(CHAT, "chat", GW_PUB, CLIENT)
    plain = json.loads(json.dumps(sealed))
    plain["messages"][0]["content"] = "not sealed"
    with pytest.raises(aci.AciError, match="not sealed"):
        gateway_open(plain, headers)
    swapped = json.loads(json.dumps(sealed))
    m = swapped["messages"]
    m[0]["content"], m[1]["content"][0]["text"] = m[1]["content"][0]["text"], m[0]["content"]
    with pytest.raises(aci.AciError, match="does not decrypt"):
        gateway_open(swapped, headers)
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    with pytest.raises(aci.AciError):  # a swapped client key changes the request info
        gateway_open(sealed, {**headers, "x-e2ee-client-key": base64.b64encode(other).decode()})
    with pytest.raises(aci.AciError, match="unsupported"):
        gateway_open(sealed, {**headers, "x-e2ee": "aci-2"})
    with pytest.raises(aci.AciError):  # low-order point
        gateway_open(sealed, {**headers, "x-e2ee-client-key": base64.b64encode(bytes(32)).decode()})
    for bad in ("!!", base64.b64encode(b"short").decode(), base64.b64encode(bytes(32)).decode()):
        with pytest.raises(aci.AciError):
            gateway_open(sealed, {**headers, "x-e2ee-enc": bad})
        with pytest.raises(aci.AciError):
            gateway_open(sealed, {**headers, "x-e2ee-client-key": bad})


def test_sse_splitter() -> None:
    s = aci.SseSplitter()
    assert s.feed(b"data: {\"a\"") == []
    assert s.feed(b": 1}\n\ndata: [DONE]\n\nda") == [b'data: {"a": 1}\n\n', b"data: [DONE]\n\n"]
    assert s.rest() == b"da"
    assert aci.sse_data(b'data: {"a": 1}\n\n') == b'{"a": 1}'
    assert aci.sse_data(b"data:x\n\n") == b"x"
    assert aci.sse_data(b": comment\n\n") is None
    assert aci.sse_data(b"data: a\ndata: b\n\n") is None
