"""The compact `/add-batch` answer (tlog/batch.py): one checkpoint, each entry's index, one
proof of them all; the tlog-proof text `POST /add` answers rebuilt from it byte for byte; the
default answer unchanged."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.tlogutil import start_tlog, stop
from tlog import batch, checkpoint, merkle, note, proof, tiles
from tlog.sequencer import QUORUM_NOT_REACHED, Added, AppendError, Log, Paths
from tlog.server import TlogApp
from tlog.sqlite_store import SQLiteStore

H = bytes(range(32))


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    data = tmp_path_factory.mktemp("tlog") / "log"
    proc, url = start_tlog(data)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    yield url, token, verifier
    stop(proc)


def post(url: str, token: str, path: str, body: bytes, compact: bool = False) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"}
    if compact:
        headers["Accept"] = batch.MEDIA_TYPE
    return httpx.post(f"{url}{path}", content=body, headers=headers)


def test_compact_answer_rebuilds_exactly_what_add_and_the_default_batch_answer(log) -> None:
    url, token, verifier = log
    entries = [json.dumps({"request_hash": f"{i:064x}", "compact": True}).encode()
               for i in range(40)]
    r = post(url, token, "/add-batch", tiles.encode_bundle(entries), compact=True)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == batch.MEDIA_TYPE
    answer = batch.parse(r.json())
    cp, _ = checkpoint.open(answer.checkpoint, verifier)  # the one signature to check
    root, proofs = batch.rebuild(answer, entries, cp.size)
    assert root == cp.root_hash
    assert len(answer.proof) < 2 * 64  # not one path per entry
    rebuilt = []
    for entry, p in zip(entries, proofs, strict=True):
        assert isinstance(p, proof.TlogProof) and p.extra == entry
        proof.check_inclusion(p, cp)
        rebuilt.append(p.format().decode())
    assert len(set(answer.entries)) == len(entries)
    # the same entries again (appends are idempotent, the tree does not change): the
    # default answer and POST /add carry exactly the text rebuilt from the compact one
    old = post(url, token, "/add-batch", tiles.encode_bundle(entries))
    assert old.headers["content-type"] == "application/json"
    items = old.json()["entries"]
    assert [it["proof"] for it in items] == rebuilt
    assert {it["checkpoint"] for it in items} == {answer.checkpoint.decode()}
    single = post(url, token, "/add", entries[7]).json()
    assert single["proof"] == rebuilt[7] and single["index"] == answer.entries[7]


def test_the_compact_answer_carries_the_checkpoint_once(log) -> None:
    url, token, _ = log
    entries = [b'{"size": %d}' % i for i in range(256)]
    full = post(url, token, "/add-batch", tiles.encode_bundle(entries)).content
    compact = post(url, token, "/add-batch", tiles.encode_bundle(entries), compact=True).content
    origin = batch.parse(orjson.loads(compact)).checkpoint.split(b"\n", 1)[0]
    assert compact.count(origin) == 2  # its first line and its signature line
    assert full.count(origin) == 2 * 2 * len(entries)  # per entry: checkpoint and proof
    assert len(compact) * 50 < len(full)  # and one proof, not a path per entry


def test_bad_batches_are_refused_whole_in_either_form(log) -> None:
    url, token, _ = log
    for compact in (False, True):
        r = post(url, token, "/add-batch", b"\x00\x00", compact=compact)
        assert r.status_code == 400 and r.json()["code"] == "bad_batch"
        r = httpx.post(f"{url}/add-batch", content=tiles.encode_bundle([b"x"]),
                       headers={"Accept": batch.MEDIA_TYPE})
        assert r.status_code == 401


def test_mixed_heads_are_answered_under_the_newest_and_refusals_kept(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, note.generate_signer("test.example/batch"))
    first, second = [b"first %d" % i for i in range(5)], [b"second %d" % i for i in range(9)]
    head1, idx1 = log._commit(first)  # noqa: SLF001 - two checkpoints without a server
    head2, idx2 = log._commit(second)  # noqa: SLF001
    log.served = head2
    refused = AppendError(QUORUM_NOT_REACHED, "not witnessed yet")
    results: list[Added | AppendError] = [
        Added(idx1[2], head1, Paths([idx1[2]], head1.size, log.node), first[2]),
        refused,
        Added(idx2[4], head2, Paths([idx2[4]], head2.size, log.node), second[4])]
    answer = batch.parse(orjson.loads(TlogApp(log, "t")._compact(results)))  # noqa: SLF001
    assert answer.checkpoint == head2.note
    cp, _ = checkpoint.open(head2.note, log.signer.verifier())
    root, (a, r, b) = batch.rebuild(answer, [first[2], b"refused", second[4]], cp.size)
    assert root == cp.root_hash
    assert r == batch.Refused("not witnessed yet", QUORUM_NOT_REACHED)
    for p, entry in ((a, first[2]), (b, second[4])):
        assert isinstance(p, proof.TlogProof) and p.extra == entry
        proof.check_inclusion(p, cp)
    assert a.index == idx1[2] and a.hashes != results[0].hashes  # type: ignore[union-attr]
    store.close()


def test_a_batch_of_add_answers_shares_its_base64_and_formats_each_proof_alone(
        tmp_path: Path) -> None:
    """`POST /add` answers of one batch format their proofs with one memo of base64 hashes;
    each text is byte for byte the proof formatted alone, and verifies."""
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, note.generate_signer("test.example/memo"))
    log.served = log._commit([b"before %d" % i for i in range(37)])[0]  # noqa: SLF001
    entries = [b"entry %d" % i for i in range(21)]
    head, indices = log._commit(entries)  # noqa: SLF001
    log.served = head
    answers = log._answers(entries, indices)  # noqa: SLF001
    cp, _ = checkpoint.open(head.note, log.signer.verifier())
    for a, entry in zip(answers, entries, strict=True):
        alone = proof.TlogProof(a.index, a.hashes, head.note, entry).format()
        assert a.proof == alone
        parsed = proof.parse(a.proof)
        assert parsed.extra == entry
        proof.check_inclusion(parsed, cp)
    memo = answers[0].paths.b64
    assert all(a.paths.b64 is memo for a in answers)
    assert len(memo) < sum(len(a.hashes) for a in answers) / 2  # neighbours' paths shared
    assert all(memo[h] == base64.b64encode(h) for h in memo)
    store.close()


def test_an_answer_of_refusals_only_has_no_proof(tmp_path: Path) -> None:
    log = Log(SQLiteStore(tmp_path / "log.db"), note.generate_signer("test.example/refused"))
    log.served = log._commit([b"one"])[0]  # noqa: SLF001
    refused = AppendError(QUORUM_NOT_REACHED, "not witnessed yet")
    answer = batch.parse(orjson.loads(TlogApp(log, "t")._compact([refused, refused])))  # noqa: SLF001
    assert answer.proof == ()
    assert batch.rebuild(answer, [b"a", b"b"], 1) == (None, [batch.Refused(
        "not witnessed yet", QUORUM_NOT_REACHED)] * 2)
    with pytest.raises(merkle.ProofError):  # hashes where no entry is acknowledged
        batch.rebuild(batch.BatchAnswer(answer.checkpoint, answer.entries, (H,)), [b"a", b"b"], 1)


@pytest.mark.parametrize(("accept", "wanted"), [
    (b"application/vnd.pag.batch-proof+json", True),
    (b"application/json, Application/VND.pag.batch-PROOF+JSON; q=0.9", True),
    (b"", False),
    (b"*/*", False),
    (b"application/json", False),
    (b"application/vnd.pag.batch+json", False),  # the older compact answer, gone
    (b"application/vnd.pag.batch-proof+json-not", False),
])
def test_only_the_media_type_asks_for_the_compact_answer(accept: bytes, wanted: bool) -> None:
    assert batch.wanted(accept) is wanted


def test_round_trip() -> None:
    items = (0, 7, batch.Refused("storage failed", "storage_unavailable"))
    assert batch.parse(orjson.loads(batch.encode(b"note\n", items, [H, H[::-1]]))) == \
        batch.BatchAnswer(b"note\n", items, (H, H[::-1]))


B64 = "A" * 43 + "="


@pytest.mark.parametrize("doc", [
    [], "x", {}, {"checkpoint": "", "entries": [], "proof": []},
    {"checkpoint": 1, "entries": [], "proof": []},
    {"checkpoint": "n", "entries": [], "proof": None},
    {"checkpoint": "n", "entries": []},
    {"checkpoint": "n", "entries": {}, "proof": []},
    {"checkpoint": "n", "entries": [1], "proof": []},
    {"checkpoint": "n", "entries": [{"index": -1}], "proof": []},
    {"checkpoint": "n", "entries": [{"index": True}], "proof": []},
    {"checkpoint": "n", "entries": [{"index": "1"}], "proof": []},
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": "AAAA"},
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": ["AAAA"]},  # 3 bytes
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": ["!" * 44]},
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": ["\u00e9" * 44]},  # not ASCII
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": ["A" * 42 + "=="]},  # 31 bytes
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": [1]},
    {"checkpoint": "n", "entries": [{"index": 1}], "proof": [B64] * (256 * 64 + 1)},
    {"checkpoint": "n", "entries": [{"error": "e"}], "proof": []},
    {"checkpoint": "n", "entries": [{"error": 1, "code": "c"}], "proof": []},
])
def test_malformed_answers_are_refused(doc: object) -> None:
    with pytest.raises(batch.BatchFormatError):
        batch.parse(doc)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=50),
                    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                        max_size=4),
                    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.fixed_dictionaries({"checkpoint": JSON, "entries": JSON, "proof": JSON}) | JSON)
def test_any_json_parses_or_raises_only_the_format_error(doc: object) -> None:
    try:
        answer = batch.parse(doc)
    except batch.BatchFormatError:
        return
    assert all(len(h) == merkle.HASH_SIZE for h in answer.proof)
    for item in answer.entries:
        assert isinstance(item, batch.Refused) or (isinstance(item, int) and item >= 0)


def test_an_empty_add_many_answers_nothing_and_the_log_goes_on(tmp_path: Path, caplog) -> None:
    import asyncio

    async def run() -> tuple[list, list]:
        log = Log(SQLiteStore(tmp_path / "log.db"), note.generate_signer("test.example/empty"))
        await log.start()
        try:
            return await log.add_many([]), await log.add_many([b"after the empty one"])
        finally:
            await log.close()

    empty, after = asyncio.run(run())
    assert empty == []
    assert not [r for r in caplog.records if r.levelname == "ERROR"]  # no batch failed
    assert isinstance(after[0], Added) and after[0].index == 0
