"""ACI E2EE (verifier/aci.py, verifier/aci_v2.py): known answers both ways, headers, every
sensitive field, and tampering at each point."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from verifier import aci, aci_v2

ROOT = Path(__file__).resolve().parents[1]
KAT = json.loads((ROOT / "tests" / "fixtures" / "e2ee-kat.json").read_text())
GW_PRIV = X25519PrivateKey.generate().private_bytes_raw()
GW_PUB = aci.public_key(GW_PRIV)
NOW = 1_800_000_000.0
SECRET = "sensitive-prompt-7c1e"
CHAT: dict[str, Any] = {"model": "m", "tools": [{"type": "function", "function": {
    "name": "lookup", "description": "secret tool description"}}], "messages": [
    {"role": "system", "content": "sys " + SECRET},
    {"role": "user", "content": [{"type": "text", "text": "part " + SECRET},
                                 {"type": "image_url", "image_url": {"url": "data:" + SECRET}}]},
    {"role": "assistant", "content": None, "reasoning_content": "thinking " + SECRET,
     "tool_calls": [{"id": "call_1", "type": "function",
                     "function": {"name": "lookup", "arguments": '{"q": "' + SECRET + '"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "tool result " + SECRET}]}


def drawer(values: list[str]) -> Callable[[int], bytes]:
    """A `draw` that hands out the recorded random values, in order."""
    queue = [bytes.fromhex(v) for v in values]

    def draw(n: int) -> bytes:
        v = queue.pop(0)
        assert len(v) == n
        return v
    return draw


def seal(obj: dict[str, Any], kind: str = "chat", version: str = aci.VERSION
         ) -> tuple[dict[str, Any], dict[str, str], Any]:
    return aci.seal_request(obj, kind, GW_PUB, now=NOW, version=version)


def gateway_open(sealed: dict[str, Any], headers: dict[str, str], kind: str = "chat",
                 now: float = NOW) -> tuple[dict[str, Any], Any]:
    h = aci.read_headers(headers, now)
    assert h is not None
    aci.check_model_key(h, GW_PUB)
    return aci.open_request(sealed, kind, h, GW_PRIV)


def code_of(fn: Callable[[], Any]) -> str:
    with pytest.raises(aci.AciError) as e:
        fn()
    return e.value.code


# -- known answers -----------------------------------------------------------------------


@pytest.mark.parametrize("vec", KAT["vectors"], ids=lambda v: f"{v['version']}-{v['name']}")
def test_known_answer_vectors_both_directions(vec: dict[str, Any]) -> None:
    gsk = bytes.fromhex(KAT["model_private_key"])
    gpk = aci.public_key(gsk)
    assert gpk.hex() == KAT["model_public_key"]
    ts = KAT["timestamp"]
    # Sealing direction: the same random values give exactly the recorded bytes.
    sealed, headers, opener = aci.seal_request(vec["request"], vec["kind"], gpk, now=ts,
                                               version=vec["version"],
                                               draw=drawer(vec["client_draws"]))
    assert (sealed, headers) == (vec["sealed_request"], vec["request_headers"])
    h = aci.read_headers(vec["request_headers"], ts)
    assert h is not None
    _, sealer = aci.open_request(vec["sealed_request"], vec["kind"], h, gsk,
                                 draw=drawer(vec["gateway_draws"]))
    assert [sealer.seal_response(r) for r in vec["responses"]] == vec["sealed_responses"]
    assert {k.decode(): v.decode() for k, v in sealer.headers()} == vec["response_headers"]
    # Opening direction: the recorded bytes open to the recorded plaintext.
    plain, _ = aci.open_request(vec["sealed_request"], vec["kind"], h, gsk)
    assert plain == vec["request"]
    opener.start(vec["response_headers"])
    assert [opener.open_response(r) for r in vec["sealed_responses"]] == vec["responses"]


def test_docs_carry_the_vectors() -> None:
    doc = (ROOT / "docs" / "e2ee.md").read_text()
    for vec in KAT["vectors"]:
        for h in vec["request_headers"].values():
            assert h in doc
        assert json.dumps(vec["sealed_request"], separators=(",", ":")) in doc


def test_v2_associated_data_matches_the_anchor_spec_vectors() -> None:
    # spec/e2ee-v2-test-vectors.md of Dstack-TEE/private-ai-gateway (fixed inputs there).
    nonce = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    assert aci.public_key(bytes([3]) * 32).hex() == \
        "5dfedd3b6bd47f6fa28ee15d969d5bb0ea53774d488bdaf9df1c6e0124b3ef22"
    assert aci_v2.request_aad("demo-model", "messages.0.content", nonce, 1750000000) == (
        b'{"algo":"x25519-aes-256-gcm-hkdf-sha256","field":"messages.0.content",'
        b'"model":"demo-model","nonce":"' + nonce.encode() + b'",'
        b'"purpose":"aci.e2ee.request.v2","ts":1750000000}')
    assert aci_v2.response_aad("demo-model", "chatcmpl-123", "choices.0.message.content",
                               nonce, 1750000000) == (
        b'{"algo":"x25519-aes-256-gcm-hkdf-sha256","field":"choices.0.message.content",'
        b'"id":"chatcmpl-123","model":"demo-model","nonce":"' + nonce.encode() + b'",'
        b'"purpose":"aci.e2ee.response.v2","ts":1750000000}')


# -- coverage of sensitive fields ------------------------------------------------------------


@pytest.mark.parametrize("version", aci.VERSIONS)
def test_every_sensitive_request_field_is_sealed(version: str) -> None:
    req = CHAT if version == aci.VERSION else {"model": "m", "messages": [
        m for m in CHAT["messages"] if m["role"] in ("system", "user", "tool")]}
    sealed, headers, _ = seal(req, version=version)
    assert SECRET not in json.dumps(sealed)
    plain, _ = gateway_open(sealed, headers)
    assert plain == req
    emb = {"model": "e", "input": ["one " + SECRET, "two"]}
    sealed, headers, _ = seal(emb, "embeddings", version)
    assert SECRET not in json.dumps(sealed)
    assert gateway_open(sealed, headers, "embeddings")[0] == emb


def test_every_response_member_but_the_clear_ones_is_sealed() -> None:
    sealed, headers, opener = seal(CHAT)
    _, sealer = gateway_open(sealed, headers)
    resp = {"id": "c", "object": "chat.completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "finish_reason": "tool_calls",
                         "logprobs": {"content": [{"token": SECRET, "logprob": -0.1}]},
                         "message": {"role": "assistant", "content": SECRET,
                                     "reasoning_content": SECRET, "refusal": None,
                                     "annotations": [{"url": SECRET}],
                                     "tool_calls": [{"id": "t", "type": "function",
                                                     "function": {"name": "f",
                                                                  "arguments": SECRET}}]}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
                      "prompt_tokens_details": {"cached_tokens": 0}},
            "provider_extra": SECRET}
    out = sealer.seal_response(resp)
    text = json.dumps(out)
    assert SECRET not in text
    assert out["usage"] == resp["usage"] and out["choices"][0]["finish_reason"] == "tool_calls"
    assert out["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "f"
    opener.start({k.decode(): v.decode() for k, v in sealer.headers()})
    assert opener.open_response(out) == resp


def test_embeddings_float_and_base64_round_trip() -> None:
    for fmt_value in ([0.5, -1.25, 3e-07], base64.b64encode(b"\x00\x00\x80?").decode()):
        sealed, headers, opener = seal({"model": "e", "input": "x"}, "embeddings")
        _, sealer = gateway_open(sealed, headers, "embeddings")
        resp = {"object": "list", "data": [{"object": "embedding", "index": 0,
                                            "embedding": fmt_value}], "model": "e"}
        out = sealer.seal_response(resp)
        assert isinstance(out["data"][0]["embedding"], str)
        assert json.dumps(fmt_value) not in json.dumps(out)
        opener.start({k.decode(): v.decode() for k, v in sealer.headers()})
        assert opener.open_response(out) == resp


def test_v2_refuses_to_seal_what_it_cannot_and_drops_empty_deltas() -> None:
    sealed, headers, opener = seal({"model": "m", "messages": [{"role": "user",
                                                                "content": "hi"}]},
                                   version=aci.V2)
    _, sealer = gateway_open(sealed, headers)
    for bad in ({"choices": [{"index": 0, "message": {"role": "assistant", "tool_calls": [
                    {"id": "t", "function": {"name": "f", "arguments": SECRET}}]}}]},
                {"choices": [{"index": 0, "logprobs": {"content": SECRET},
                              "message": {"content": "x"}}]},
                {"choices": [{"index": 0, "message": {"content": "x", "refusal": SECRET}}]},
                {"choices": "not a list"}, {"extra": SECRET}):
        assert code_of(lambda b=bad: sealer.seal_response(b)) == "e2ee_unsealable"
    chunk = {"id": "c", "choices": [{"index": 3, "delta": {"role": "assistant", "content": ""}}]}
    out = sealer.seal_response(chunk)
    assert out["choices"][0]["delta"] == {"role": "assistant"}
    opener.start({k.decode(): v.decode() for k, v in sealer.headers()})
    chunk2 = {"id": "c", "choices": [{"index": 3, "delta": {"content": "ok"}}]}
    assert opener.open_response(sealer.seal_response(chunk2)) == chunk2


# -- headers -------------------------------------------------------------------------------


def test_header_checks_and_their_codes() -> None:
    _, headers, _ = seal(CHAT)
    assert aci.read_headers({}, NOW) is None
    cases: list[tuple[dict[str, str], str]] = [
        ({k: v for k, v in headers.items() if k != aci.H_VERSION}, "e2ee_header_missing"),
        ({k: v for k, v in headers.items() if k != aci.H_NONCE}, "e2ee_header_missing"),
        ({k: v for k, v in headers.items() if k != aci.H_ENC}, "e2ee_header_missing"),
        ({**headers, aci.H_VERSION: "aci-2"}, "e2ee_invalid_version"),
        ({**headers, aci.H_VERSION: "1"}, "e2ee_invalid_version"),
        ({**headers, aci.H_NONCE: "ab" * 31}, "e2ee_invalid_nonce"),
        ({**headers, aci.H_NONCE: "0x" + "ab" * 31}, "e2ee_invalid_nonce"),
        ({**headers, aci.H_NONCE: "zz" * 32}, "e2ee_invalid_nonce"),
        ({**headers, aci.H_TIMESTAMP: str(int(NOW) - 301)}, "e2ee_invalid_timestamp"),
        ({**headers, aci.H_TIMESTAMP: str(int(NOW) + 301)}, "e2ee_invalid_timestamp"),
        ({**headers, aci.H_TIMESTAMP: "-5"}, "e2ee_invalid_timestamp"),
        ({**headers, aci.H_TIMESTAMP: "1e9"}, "e2ee_invalid_timestamp"),
        ({**headers, aci.H_MODEL_KEY: "not base64!"}, "e2ee_model_key_mismatch"),
        ({**headers, aci.H_CLIENT_KEY: base64.b64encode(b"short").decode()},
         "e2ee_invalid_public_key"),
    ]
    for hdrs, code in cases:
        assert code_of(lambda h=hdrs: aci.read_headers(h, NOW)) == code, hdrs
    assert aci.read_headers({**headers, aci.H_TIMESTAMP: str(int(NOW) - 300)}, NOW)
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    h = aci.read_headers({**headers, aci.H_MODEL_KEY: base64.b64encode(other).decode()}, NOW)
    assert h is not None
    assert code_of(lambda: aci.check_model_key(h, GW_PUB)) == "e2ee_model_key_mismatch"
    h = aci.read_headers(headers, NOW)
    assert h is not None and h.replay_key() == aci.read_headers(
        {**headers, aci.H_NONCE: headers[aci.H_NONCE].upper()}, NOW).replay_key()


# -- tampering ------------------------------------------------------------------------------


@pytest.mark.parametrize("version", aci.VERSIONS)
def test_tampered_requests_do_not_open(version: str) -> None:
    req = {"model": "m", "messages": [{"role": "system", "content": "a " + SECRET},
                                      {"role": "user", "content": "b " + SECRET}]}
    sealed, headers, _ = seal(req, version=version)

    def flip(value: str) -> str:
        if version == aci.VERSION:
            raw = bytearray(base64.b64decode(value[len(aci.PREFIX):]))
            raw[-1] ^= 1
            return aci.PREFIX + base64.b64encode(raw).decode()
        return value[:-2] + ("00" if value[-2:] != "00" else "01")

    flipped = copy.deepcopy(sealed)
    flipped["messages"][1]["content"] = flip(flipped["messages"][1]["content"])
    swapped = copy.deepcopy(sealed)
    m = swapped["messages"]
    m[0]["content"], m[1]["content"] = m[1]["content"], m[0]["content"]
    plain = copy.deepcopy(sealed)
    plain["messages"][0]["content"] = "in clear"
    renamed = {**sealed, "model": "other-model"}
    for bad in (flipped, swapped, plain, renamed):
        assert code_of(lambda b=bad: gateway_open(b, headers)) == "e2ee_decryption_failed"
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    enc = base64.b64encode(other).decode() if version == aci.VERSION else other.hex()
    if version == aci.VERSION:  # the client key is bound: a swapped one does not open
        assert code_of(lambda: gateway_open(sealed, {**headers, aci.H_CLIENT_KEY: enc})) \
            == "e2ee_decryption_failed"
    low_order = base64.b64encode(bytes(32)).decode() if version == aci.VERSION else "00" * 32
    assert code_of(lambda: gateway_open(sealed, {**headers, aci.H_CLIENT_KEY: low_order})) \
        == "e2ee_invalid_public_key"
    other_ts = {**headers, aci.H_TIMESTAMP: str(int(NOW) + 1)}
    assert code_of(lambda: gateway_open(sealed, other_ts)) == "e2ee_decryption_failed"


@pytest.mark.parametrize("version", aci.VERSIONS)
def test_tampered_responses_are_refused_by_the_client(version: str) -> None:
    sealed, headers, opener = seal({"model": "m", "messages": [{"role": "user",
                                                                "content": "q"}]},
                                   version=version)
    _, sealer = gateway_open(sealed, headers)
    chunks = [{"id": "c", "choices": [{"index": 0, "delta": {"content": w}}]}
              for w in ("one", "two", "three")]
    out = [sealer.seal_response(c) for c in chunks]
    opener.start({k.decode(): v.decode() for k, v in sealer.headers()})
    assert opener.open_response(out[0]) == chunks[0]
    in_clear = copy.deepcopy(out[1])
    in_clear["choices"][0]["delta"]["content"] = "forged"
    assert code_of(lambda: opener.open_response(in_clear)) == "e2ee_response_invalid"
    if version == aci.VERSION:  # chained: a dropped event makes the next one fail
        assert code_of(lambda: opener.open_response(out[2])) == "e2ee_response_invalid"
    moved = copy.deepcopy(out[1])
    moved["choices"][0]["index"] = 1
    if version == aci.V2:  # v2 binds the choice index into the associated data
        assert code_of(lambda: opener.open_response(moved)) == "e2ee_response_invalid"
    assert code_of(lambda: opener.start({})) == "e2ee_response_invalid"


def test_aci1_response_needs_its_headers() -> None:
    sealed, headers, opener = seal({"model": "m", "messages": [{"role": "user",
                                                                "content": "q"}]})
    _, sealer = gateway_open(sealed, headers)
    hdrs = {k.decode(): v.decode() for k, v in sealer.headers()}
    other = X25519PrivateKey.generate().public_key().public_bytes_raw()
    opener.start({**hdrs, aci.H_ENC: base64.b64encode(other).decode()})
    out = sealer.seal_response({"choices": [{"index": 0, "message": {"content": "x"}}]})
    assert code_of(lambda: opener.open_response(out)) == "e2ee_response_invalid"


def test_a_request_without_a_model_string_is_refused() -> None:
    assert code_of(lambda: seal({"messages": []})) == "e2ee_invalid_payload_model"
