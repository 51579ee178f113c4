"""Parser fuzzing (issue 17): every reader of hostile bytes raises only its documented error.

Each module that reads input an adversary controls has one error type (the log's
`NoteError`, `CheckpointError`, `TileError`, `ProofFormatError`; the witness's
`RequestError`, `QuorumError`; the gateway's parse step, a 400 `GatewayError`; the client's `AciError`, `SseError`, `QuoteError`,
`EventLogError`, `AttestationError`, `KeysetError`, `ReceiptError`,
`KeysetEntryError`, `EvidenceEntryError`; the gateway's `VerificationError` for every
provider evidence adapter and `ReleaseError` for Sigstore statements). Hypothesis
feeds each one random input and mutations of a valid one (bytes flipped, inserted,
dropped, truncated; JSON members replaced, removed or retyped), and any other
exception (a KeyError, TypeError, IndexError, RecursionError...) fails the test.
Example counts are bounded so the whole module runs in well under a minute.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.verification import dstack, nearai, nvidia, phala, sigstore_release, tinfoil
from gateway.verification.base import Policy, VerificationError
from tlog import checkpoint, merkle, note, proof, tiles
from verifier import aci, evidence_entry, keyset_entry, receipt, sse
from verifier.tee import attestation, eventlog, quote
from verifier.tee import keyset as keyset_fmt
from witness import cosignature, request

FIX = Path(__file__).parent / "fixtures" / "providers"
NOW = 1_780_000_000.0
FUZZ = settings(max_examples=150, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
SLOW = settings(FUZZ, max_examples=40)  # each example verifies signatures or quotes

LOG = note.generate_signer("fuzz.example/log")
WITNESS = cosignature.generate_signer("fuzz.example/witness")
LEAVES = [merkle.leaf_hash(b"entry %d" % i) for i in range(7)]
CP = checkpoint.sign(checkpoint.Checkpoint(LOG.name, 7, merkle.root(LEAVES)), LOG)
CP_WITNESSED = CP + cosignature.cosign(CP, WITNESS).line()


# -- mutation strategies ---------------------------------------------------------------

@st.composite
def mutated_bytes(draw: st.DrawFn, seed: bytes) -> bytes:
    """`seed` with one to four edits: a byte changed, inserted, dropped, a cut, a copy."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["set", "insert", "delete", "truncate", "duplicate"]))
        if op == "set" and i < len(data):
            data[i] = draw(st.integers(0, 255))
        elif op == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8) | st.sampled_from(
                [b"\n", b"\n\n", b" ", b"\x00", b"\xff", b"=", b"-", b"0", b"\xe2\x80\x94"]))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 8))]
        elif op == "truncate":
            del data[i:]
        elif op == "duplicate":
            data[i:i] = data[max(0, i - 16):i]
    return bytes(data)


def fuzzed(seed: bytes, max_size: int = 512) -> st.SearchStrategy[bytes]:
    """Random bytes, or mutations of a valid `seed` (which reach deeper)."""
    return st.one_of(st.binary(max_size=max_size), mutated_bytes(seed), st.just(seed))


JSON_LEAF = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(),
                      st.text(max_size=12), st.just(""), st.just("00" * 32))
JSON_ANY = st.recursive(JSON_LEAF, lambda c: st.lists(c, max_size=3)
                        | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)


def _paths(doc: Any, at: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield at
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _paths(v, (*at, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _paths(v, (*at, i))


@st.composite
def mutated_json(draw: st.DrawFn, seed: Any) -> Any:
    """A deep copy of `seed` with one to three nodes replaced by any JSON value, removed,
    or (strings) mutated as bytes."""
    doc = copy.deepcopy(seed)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(list(_paths(doc))))
        if not path:
            return draw(JSON_ANY)
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key, value = path[-1], parent[path[-1]]
        op = draw(st.sampled_from(["replace", "remove", "edit"]))
        if op == "remove":
            del parent[key]
        elif op == "edit" and isinstance(value, str):
            parent[key] = draw(mutated_bytes(value.encode())).decode("utf-8", "replace")
        else:
            parent[key] = draw(JSON_ANY)
    return doc


def fuzzed_json(seed: Any) -> st.SearchStrategy[Any]:
    return st.one_of(JSON_ANY, mutated_json(seed), st.just(copy.deepcopy(seed)))


def _doc_bytes(doc: Any) -> bytes:
    return json.dumps(doc).encode() if not isinstance(doc, bytes) else doc


# -- the log's formats -----------------------------------------------------------------

@FUZZ
@given(fuzzed(CP_WITNESSED))
def test_signed_notes_raise_only_note_error(data: bytes) -> None:
    try:
        note.split(data)
        note.open(data, [LOG.verifier(), cosignature.verifier_from_vkey(WITNESS.vkey)])
    except note.NoteError:
        pass


@FUZZ
@given(st.one_of(st.text(max_size=80), mutated_bytes(LOG.vkey.encode()).map(
    lambda b: b.decode("utf-8", "replace"))))
def test_verifier_keys_raise_only_note_error(vkey: str) -> None:
    try:
        note.parse_vkey(vkey)
        note.verifier_from_vkey(vkey)
    except note.NoteError:
        pass
    with contextlib.suppress(note.NoteError):
        cosignature.verifier_from_vkey(vkey)


@FUZZ
@given(fuzzed(CP_WITNESSED))
def test_checkpoints_raise_only_checkpoint_error(data: bytes) -> None:
    with contextlib.suppress(note.NoteError, checkpoint.CheckpointError):
        checkpoint.parse(note.split(data)[0])
    with contextlib.suppress(checkpoint.CheckpointError):
        checkpoint.open(data, LOG.verifier())


@FUZZ
@given(fuzzed(CP_WITNESSED), st.integers(0, 2))
def test_witnessed_checkpoints_raise_only_checkpoint_or_quorum_errors(data: bytes,
                                                                     quorum: int) -> None:
    with contextlib.suppress(checkpoint.CheckpointError, cosignature.QuorumError):
        cosignature.verify_witnessed(data, LOG.verifier(),
                                     [cosignature.verifier_from_vkey(WITNESS.vkey)], quorum)


@FUZZ
@given(st.one_of(st.text(max_size=60), mutated_bytes(b"tile/entries/x001/x234/067.p/17").map(
    lambda b: b.decode("utf-8", "replace")), mutated_bytes(tiles.path(2, 1234567, 5).encode()).map(
    lambda b: b.decode("utf-8", "replace"))))
def test_tile_paths_raise_only_tile_error(p: str) -> None:
    try:
        t = tiles.parse_path(p)
    except tiles.TileError:
        return
    again = tiles.entries_path(t.index, t.width) if t.level is None else \
        tiles.path(t.level, t.index, t.width)
    assert again == p  # a parsed path has exactly one spelling


@FUZZ
@given(fuzzed(tiles.encode_bundle([b"a", b"", b"x" * 300, b"{}"])))
def test_entry_bundles_raise_only_tile_error(data: bytes) -> None:
    try:
        entries = tiles.decode_bundle(data)
    except tiles.TileError:
        return
    assert tiles.encode_bundle(entries) == data


PROOF = proof.TlogProof(3, tuple(merkle.inclusion_proof(3, 7, LEAVES)), CP, b"entry 3").format()


@FUZZ
@given(fuzzed(PROOF, 2048))
def test_tlog_proofs_raise_only_their_errors(data: bytes) -> None:
    try:
        p = proof.parse(data)
        proof.check_inclusion(p, checkpoint.open(p.checkpoint, LOG.verifier())[0], p.extra)
    except (proof.ProofFormatError, checkpoint.CheckpointError, merkle.ProofError):
        pass


@FUZZ
@given(fuzzed(request.format(3, merkle.consistency_proof(3, 7, LEAVES), CP), 2048))
def test_witness_request_bodies_raise_only_request_error(data: bytes) -> None:
    try:
        req = request.parse(data)
    except request.RequestError:
        return
    assert req.old_size >= 0 and all(len(h) == merkle.HASH_SIZE for h in req.proof)


@pytest.fixture(scope="module")
def witness_rules() -> Iterator[Any]:
    """The witness's add-checkpoint rules over a real state database, at size 3 of LEAVES."""
    from witness.server import Witness
    from witness.state import State

    tmp = Path(tempfile.mkdtemp(prefix="pagfz-w-", dir="/tmp"))
    state = State(tmp / "witness.db")
    w = Witness(state, WITNESS, {LOG.name: LOG.verifier()})
    cp3 = checkpoint.sign(checkpoint.Checkpoint(LOG.name, 3, merkle.root(LEAVES[:3])), LOG)
    assert isinstance(asyncio.run(w.add_checkpoint(request.format(0, [], cp3))), bytes)
    try:
        yield w
    finally:
        state.close()
        shutil.rmtree(tmp, ignore_errors=True)


GROWTH = request.format(3, merkle.consistency_proof(3, 7, LEAVES), CP)


@FUZZ
@given(fuzzed(GROWTH, 2048))
def test_the_witness_answers_hostile_bodies_with_a_cosignature_or_a_refusal(
        witness_rules: Any, body: bytes) -> None:
    """Past the parser: signature, origin, sizes and consistency checked on mutated bodies
    (the state moves on when a valid one is cosigned); never an exception."""
    from witness.server import Refusal

    out = asyncio.run(witness_rules.add_checkpoint(body))
    if isinstance(out, Refusal):
        assert out.status in (400, 403, 404, 409, 422)
    else:
        assert out.startswith("\u2014 ".encode())


CHAT_BODY = json.dumps({"model": "m", "stream": True, "stream_options": {"include_usage": True},
                        "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
                       ).encode()


@FUZZ
@given(st.one_of(fuzzed(CHAT_BODY, 1024), fuzzed_json(json.loads(CHAT_BODY)).map(_doc_bytes)),
       st.sampled_from(["chat", "embeddings"]))
def test_model_call_bodies_raise_only_a_400(body: bytes, kind: str) -> None:
    """The gateway's parse step: a Request, or a 400 GatewayError with a code."""
    from gateway.api import pipeline
    from gateway.api.errors import GatewayError

    try:
        pipeline.parse(body, kind, max_messages=8, max_depth=8)
    except GatewayError as e:
        assert e.status == 400 and e.code


@FUZZ
@given(st.binary(max_size=80) | mutated_bytes(b"ab" * 32))
def test_receipt_salt_headers_raise_only_a_400(value: bytes) -> None:
    from gateway.api import pipeline
    from gateway.api.errors import GatewayError

    try:
        assert len(pipeline.receipt_salt({b"x-receipt-salt": value})) == 32
    except GatewayError as e:
        assert (e.status, e.code) == (400, "invalid_receipt_salt")


# -- E2EE ------------------------------------------------------------------------------

MODEL_KEY = X25519PrivateKey.generate()
MODEL_PUB = MODEL_KEY.public_key().public_bytes_raw()
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hello"},
                                   {"role": "user", "content": [{"type": "text", "text": "x"}]}]}


def _sealed(version: str) -> tuple[dict[str, Any], dict[str, str]]:
    obj, headers, _ = aci.seal_request(copy.deepcopy(CHAT), "chat", MODEL_PUB, now=NOW,
                                       version=version)
    return obj, {k.lower(): v for k, v in headers.items()}


SEALED = {v: _sealed(v) for v in aci.VERSIONS}
HEADER_TEXT = st.one_of(st.text(max_size=70), st.sampled_from(["", "0" * 64, "aci-1", "2"]))


@FUZZ
@given(st.sampled_from(aci.VERSIONS), st.data())
def test_e2ee_headers_raise_only_aci_error(version: str, data: st.DataObject) -> None:
    headers = dict(SEALED[version][1])
    for name in data.draw(st.lists(st.sampled_from(sorted(headers)), max_size=3,
                                                unique=True)):
        if data.draw(st.booleans()):
            del headers[name]
        else:
            headers[name] = data.draw(st.one_of(HEADER_TEXT, mutated_bytes(
                headers[name].encode()).map(lambda b: b.decode("utf-8", "replace"))))
    try:
        aci.read_headers(headers, NOW)
    except aci.AciError as e:
        assert e.code in aci.CODES


@FUZZ
@given(st.sampled_from(aci.VERSIONS), st.data())
def test_e2ee_envelopes_raise_only_aci_error(version: str, data: st.DataObject) -> None:
    obj, headers = SEALED[version]
    fuzzed_obj = data.draw(mutated_json(obj))
    h = aci.read_headers(headers, NOW)
    assert h is not None
    try:
        if not isinstance(fuzzed_obj, dict):
            raise aci.AciError("e2ee_decryption_failed", "not an object")  # the pipeline's check
        aci.open_request(fuzzed_obj, data.draw(st.sampled_from(["chat", "embeddings"])), h,
                         MODEL_KEY.private_bytes_raw())
    except aci.AciError as e:
        assert e.code in aci.CODES


@FUZZ
@given(st.sampled_from(aci.VERSIONS), st.data())
def test_sealed_responses_raise_only_aci_error(version: str, data: st.DataObject) -> None:
    """The client opening a hostile gateway's answer."""
    obj, headers, opener = aci.seal_request(copy.deepcopy(CHAT), "chat", MODEL_PUB, now=NOW,
                                            version=version)
    h = aci.read_headers({k.lower(): v for k, v in headers.items()}, NOW)
    assert h is not None
    _, sealer = aci.open_request(obj, "chat", h, MODEL_KEY.private_bytes_raw())
    answer = {"id": "c", "choices": [{"index": 0, "message": {"role": "assistant",
                                                               "content": "hi"}}]}
    sealed = sealer.seal_response(answer)
    resp_headers = {k.decode(): v.decode() for k, v in sealer.headers()}
    if data.draw(st.booleans()):
        name = data.draw(st.sampled_from(sorted(resp_headers)))
        resp_headers[name] = data.draw(HEADER_TEXT)
    try:
        opener.start(resp_headers)
        opener.open_response(data.draw(fuzzed_json(sealed)))
    except aci.AciError as e:
        assert e.code in aci.CODES


# -- SSE -------------------------------------------------------------------------------

SSE_SEED = (b"\xef\xbb\xbfdata: {\"a\": 1}\r\n\r\n: keep-alive\n\nevent: x\ndata: y\nid: 7\n"
            b"retry: 10\n\ndata\n\ndata: [DONE]\n\n")


@FUZZ
@given(fuzzed(SSE_SEED, 400), st.lists(st.integers(0, 400), max_size=6),
       st.integers(1, 64))
def test_sse_parsing_raises_only_sse_error_and_keeps_every_byte(
        data: bytes, cuts: list[int], max_event: int) -> None:
    parser = sse.SseParser(max_event=max_event)
    out = b""
    bounds = sorted({0, len(data), *(c for c in cuts if c < len(data))})
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            out += b"".join(ev.raw for ev in parser.feed(data[a:b]))
    except sse.SseError:
        return
    assert out + parser.rest() == data


# -- TEE evidence ----------------------------------------------------------------------

SIM_QUOTE = quote.build_simulated_quote(b"\x01" * 64, mr_td=b"\x02" * 48,
                                        rtmrs=[b"\x03" * 48] * 4)
EVENTS = [eventlog.event_to_json(eventlog.runtime_event(name, payload)) for name, payload in
          [("app-id", b"\xaa" * 20), ("compose-hash", b"\xbb" * 32), ("key-provider", b"{}")]]


@FUZZ
@given(fuzzed(SIM_QUOTE, 1200))
def test_quotes_raise_only_quote_error(data: bytes) -> None:
    with contextlib.suppress(quote.QuoteError):
        quote.parse_quote(data)
    quote.is_simulated(data)
    quote.looks_simulated(data)


@FUZZ
@given(st.one_of(fuzzed_json(EVENTS), fuzzed(json.dumps(EVENTS).encode()),
                 fuzzed(json.dumps(EVENTS).encode()).map(lambda b: b.decode("utf-8", "replace"))))
def test_event_logs_raise_only_event_log_error(data: Any) -> None:
    with contextlib.suppress(eventlog.EventLogError):
        eventlog.replay(data)


@pytest.fixture(scope="module")
def sim() -> Iterator[dict[str, Any]]:
    """Documents made by the dstack simulator: an attestation document, a keyset entry."""
    import dstack_sdk

    from gateway.identity import attestation as identity_attestation
    from gateway.identity import keys
    from gateway.identity.dstack_sim import SimulatorServer

    tmp = Path(tempfile.mkdtemp(prefix="pagfz-", dir="/tmp"))

    async def build() -> dict[str, Any]:
        async with SimulatorServer(tmp / "s.sock", tmp / "data", app_id="a1" * 20,
                                   compose_hash="c0" * 32):
            client = dstack_sdk.AsyncDstackClient(str(tmp / "s.sock"))
            gk = await keys.load(client, log_vkey=LOG.vkey)
            doc = await identity_attestation.build(client, gk, "ab" * 32)
            entry_doc = await identity_attestation.build(client, gk,
                                                         keyset_entry.nonce_for(CP))
            return {"doc": doc, "entry": keyset_entry.build(entry_doc, CP,
                                                            "2026-12-04T00:00:00Z")}

    try:
        yield asyncio.run(build())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@SLOW
@given(st.data())
def test_attestation_documents_raise_only_attestation_error(sim: dict[str, Any],
                                                            data: st.DataObject) -> None:
    doc = data.draw(fuzzed_json(sim["doc"]))
    with contextlib.suppress(attestation.AttestationError):
        attestation.check(doc, nonce="ab" * 32, allow_simulated=True)


@FUZZ
@given(st.data())
def test_keysets_raise_only_keyset_error(sim: dict[str, Any], data: st.DataObject) -> None:
    with contextlib.suppress(keyset_fmt.KeysetError):
        keyset_fmt.Keyset.from_json(data.draw(fuzzed_json(sim["doc"]["keyset"])))


@SLOW
@given(st.data())
def test_keyset_entries_raise_only_keyset_entry_error(sim: dict[str, Any],
                                                      data: st.DataObject) -> None:
    obj = data.draw(fuzzed_json(sim["entry"]))
    with contextlib.suppress(keyset_entry.KeysetEntryError):
        keyset_entry.check(obj, log_verifier=LOG.verifier(), allow_simulated=True)


EVIDENCE, EVIDENCE_PARTS = evidence_entry.build(
    route={"route_id": "r1", "model": "m", "provider": "p", "upstream_model": "u"},
    kind="dstack", evidence="dstack-simulated", binding="tls-spki:00", lease_id="l1",
    verified_at="2026-12-04T00:00:00Z", expires_at="2026-12-04T00:05:00Z", nonce="ab" * 32,
    document=b'{"quote": "00"}', collateral=None, facts={"app_id": "aa"},
    time="2026-12-04T00:00:01Z")


@FUZZ
@given(fuzzed_json(EVIDENCE))
def test_evidence_entries_raise_only_evidence_entry_error(obj: Any) -> None:
    try:
        ev = evidence_entry.parse(obj)
        evidence_entry.recheck(ev, evidence_entry.decode_document(obj), allow_simulated=True)
    except evidence_entry.EvidenceEntryError:
        pass


# -- receipts ----------------------------------------------------------------------------

RECEIPT_KEY = Ed25519PrivateKey.generate()
SALT = receipt.new_salt()
RECEIPT = receipt.sign({
    "v": "pag-receipt/2", "id": "0" * 32, "time": "2026-12-04T00:00:00Z",
    "gateway": {"app_id": "aa" * 20, "compose_hash": "cc" * 32, "keyset_hash": "ee" * 32},
    "request_hash": receipt.digest(SALT, b"req"), "forwarded_hash": receipt.digest(SALT, b"fw"),
    "route": {"route_id": "r1", "model": "m", "provider": "p", "upstream_model": "u"},
    "upstream": {"verified": True, "evidence": "dstack", "binding": "tls-spki:00",
                 "lease_id": "l", "verified_at": "2026-12-04T00:00:00Z",
                 "expires_at": "2026-12-04T00:05:00Z"},
    "provider_request_hash": None, "provider_response_hash": None,
    "response_hash": receipt.digest(SALT, b"resp"), "keyset_index": 0,
    "e2ee": {"mode": "none"}}, RECEIPT_KEY)


@FUZZ
@given(st.one_of(fuzzed_json(RECEIPT), fuzzed(receipt.entry(RECEIPT), 2048).map(
    lambda b: json.loads(b) if _is_json(b) else b)))
def test_receipts_raise_only_receipt_error(obj: Any) -> None:
    key = RECEIPT_KEY.public_key().public_bytes_raw()
    try:
        receipt.verify(obj, key)
        receipt.check_digest(obj, "request_hash", SALT, b"req")
    except receipt.ReceiptError:
        pass


def _is_json(b: bytes) -> bool:
    try:
        json.loads(b)
    except ValueError:
        return False
    return True


# -- provider evidence adapters ------------------------------------------------------------

def _served(adapter: Any, body: bytes, route: Any, policy: Policy) -> None:
    """Run `adapter.verify` against a provider that serves `body` as its evidence."""
    async def go() -> None:
        transport = httpx.MockTransport(lambda req: httpx.Response(200, content=body))
        async with httpx.AsyncClient(transport=transport) as client:
            await adapter.verify(client, route, policy, NOW)

    with contextlib.suppress(VerificationError):
        asyncio.run(go())


def _route(**kw: Any) -> SimpleNamespace:
    fields = {"id": "r", "provider": "p", "base_url": "https://provider.test/v1",
              "attestation_url": "", "upstream_model": "upstream-model", "e2ee": False}
    return SimpleNamespace(**{**fields, **kw})


PHALA = json.loads((FIX / "phala" / "attestation_report.json").read_text())
NEARAI = json.loads((FIX / "nearai" / "attestation_report_20260424.json").read_text())
NVIDIA = json.loads((FIX / "nvidia" / "nvidia_payload_8xh100.json").read_text())
TINFOIL = (FIX / "tinfoil" / "tdx_attestation.json").read_bytes()


@SLOW
@given(st.data())
def test_dstack_adapter_raises_only_verification_error(sim: dict[str, Any],
                                                       data: st.DataObject) -> None:
    body = data.draw(st.one_of(fuzzed_json(sim["doc"]).map(_doc_bytes),
                               fuzzed(_doc_bytes(sim["doc"]), 4096)))
    _served(dstack, body, _route(), Policy(allow_simulated=True))


@SLOW
@given(st.data())
def test_phala_adapter_raises_only_verification_error(data: st.DataObject) -> None:
    body = data.draw(st.one_of(fuzzed_json(PHALA).map(_doc_bytes),
                               mutated_bytes(_doc_bytes(PHALA))))
    _served(phala, body, _route(attestation_url="https://provider.test/attestation",
                                upstream_model=PHALA["model_name"]),
            Policy(allow_simulated=True, allow_signature_binding=True))


@SLOW
@given(st.data())
def test_nearai_adapter_raises_only_verification_error(data: st.DataObject) -> None:
    body = data.draw(st.one_of(fuzzed_json(NEARAI).map(_doc_bytes),
                               mutated_bytes(_doc_bytes(NEARAI))))
    _served(nearai, body, _route(), Policy(allow_simulated=True))


@SLOW
@given(fuzzed(TINFOIL, 4096))
def test_tinfoil_documents_raise_only_verification_error(body: bytes) -> None:
    try:
        doc = tinfoil.decode_document(body)
        tinfoil.split_report_data(doc.report[0x50:0x90])
    except VerificationError:
        pass


@SLOW
@given(st.one_of(fuzzed_json(NVIDIA), st.just(NVIDIA)))
def test_gpu_evidence_raises_only_verification_error(payload: Any) -> None:
    nonce = NVIDIA["nonce"]
    with contextlib.suppress(VerificationError):
        nvidia.check_gpu(payload, nonce, Policy(allow_gpu_unverified_offline=True))


STATEMENT = json.dumps({"_type": "https://in-toto.io/Statement/v1", "subject": [
    {"name": "repo", "digest": {"sha256": "ab" * 32}}],
    "predicateType": "https://tinfoil.sh/predicate/snp-tdx-multiplatform/v1",
    "predicate": {"snp_measurement": "00" * 48, "tdx_measurement": {
        "rtmr1": "11" * 48, "rtmr2": "22" * 48}}}).encode()


@FUZZ
@given(st.one_of(fuzzed(STATEMENT, 1024), fuzzed_json(json.loads(STATEMENT)).map(_doc_bytes)))
def test_release_statements_raise_only_release_error(payload: bytes) -> None:
    with contextlib.suppress(sigstore_release.ReleaseError):
        sigstore_release.parse_statement(sigstore_release.PAYLOAD_TYPE, payload)


def test_the_seeds_are_valid() -> None:
    """The mutations start from documents that parse (else they would test nothing)."""
    note.open(CP_WITNESSED, [LOG.verifier()])
    proof.parse(PROOF)
    assert sse.SseParser().feed(SSE_SEED)
    assert quote.is_simulated(SIM_QUOTE)
    eventlog.replay(EVENTS)
    receipt.verify(RECEIPT, RECEIPT_KEY.public_key().public_bytes_raw())
    evidence_entry.parse(EVIDENCE)
    assert base64.b64decode(json.loads(TINFOIL)["body"])
    tinfoil.decode_document(TINFOIL)
    for version in aci.VERSIONS:
        assert aci.read_headers(SEALED[version][1], NOW) is not None


def test_non_ascii_base64_is_a_format_error_not_a_crash() -> None:
    """Found by the fuzzers: `base64.b64decode` of a str with a non-ASCII character raises a
    bare ValueError, not binascii.Error; every str decoder now maps it to its own error."""
    text, _ = note.split(CP)
    with pytest.raises(note.NoteError):
        note.split(text + "\n— fuzz.example/log AAAA\u1000\n".encode())
    lines = text.decode().split("\n")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.parse("\n".join([lines[0], lines[1], "\u1000" * 4, ""]).encode())
    with pytest.raises(note.NoteError):
        note.parse_skey("PRIVATE+KEY+fuzz.example/log+01020304+\u1000\u1000")
    bad = dict(EVIDENCE, document="\u1000", document_encoding="base64")
    with pytest.raises(evidence_entry.EvidenceEntryError):
        evidence_entry.decode_document(bad)
