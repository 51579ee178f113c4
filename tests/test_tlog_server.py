"""The log over HTTP, as `python -m tlog serve` runs it."""

from __future__ import annotations

import asyncio
import base64
import json
import stat

import httpx
import pytest

from tests.tlogutil import start_tlog, stop
from tlog import checkpoint, keys, merkle, note, proof, tiles


@pytest.fixture(scope="module")
def log(tmp_path_factory):
    data = tmp_path_factory.mktemp("tlog") / "log"
    proc, url = start_tlog(data)
    token = (data / "append.token").read_text().strip()
    verifier = note.verifier_from_vkey((data / "log.vkey").read_text())
    yield url, token, verifier, data
    stop(proc)


def add(url: str, token: str, entry: bytes) -> httpx.Response:
    return httpx.post(f"{url}/add", content=entry, headers={"Authorization": f"Bearer {token}"})


def test_files_and_modes(log):
    _, _, verifier, data = log
    for name in ("log.key", "append.token"):
        assert stat.S_IMODE((data / name).stat().st_mode) == 0o600
    v = note.verifier_from_vkey((data / "log.vkey").read_text())
    assert v.name == keys.default_origin(v.public_key)  # unique per key


def test_append_answer_is_a_valid_proof(log):
    url, token, verifier, _ = log
    entry = json.dumps({"request_hash": "ab" * 32, "x": 1}).encode()
    r = add(url, token, entry)
    assert r.status_code == 200
    body = r.json()
    cp, _ = checkpoint.open(body["checkpoint"].encode(), verifier)
    p = proof.parse(body["proof"].encode())
    assert p.extra == entry and p.index == body["index"] < cp.size
    got, _ = checkpoint.open(p.checkpoint, verifier)
    proof.check_inclusion(p, got)
    # lookup by request hash gives a proof for the same entry
    looked = httpx.get(f"{url}/proof/{'ab' * 32}")
    assert looked.status_code == 200
    lp = proof.parse(looked.content)
    assert lp.index == body["index"] and lp.extra == entry
    proof.check_inclusion(lp, checkpoint.open(lp.checkpoint, verifier)[0])


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"Authorization": "Bearer wrong"}, 401), ({"Authorization": "Basic x"}, 401)],
)
def test_appends_need_the_token(log, headers, status):
    url, *_ = log
    assert httpx.post(f"{url}/add", content=b"x", headers=headers).status_code == status


def test_an_entry_nested_too_deep_for_json_is_appended_not_refused_as_storage(log):
    """Before: its lookup key's parse raised RecursionError, a 503 storage_unavailable
    that no retry could clear."""
    url, token, verifier, _ = log
    deep = b'{"request_hash":"' + b"b" * 64 + b'","x":' + b"[" * 30000 + b"]" * 30000 + b"}"
    r = add(url, token, deep)
    assert r.status_code == 200, r.text
    assert r.json()["index"] >= 0
    assert httpx.get(f"{url}/proof/{'b' * 64}").status_code == 404  # not a receipt: no lookup


def test_oversized_and_empty_entries(log):
    url, token, *_ = log
    assert add(url, token, b"x" * 65536).status_code == 413
    assert add(url, token, b"").status_code == 400
    assert add(url, token, b"y" * 65535).status_code == 200


@pytest.mark.parametrize(
    ("path", "status"),
    [("/tile/0/0", 400), ("/tile/0/x000/001", 400), ("/tile/0/000.p/0", 400),
     ("/tile/99/000", 400), ("/tile/5/000.p/1", 404), ("/tile/0/x999/999", 404),
     ("/tile/entries/999", 404), ("/proof/ABC", 400), ("/proof/" + "0" * 64, 404),
     ("/consistency?old=0&new=1", 400), ("/consistency?old=5&new=2", 400),
     ("/consistency?old=1&new=999999", 400), ("/consistency?old=x", 400), ("/nope", 404),
     # hostile paths (issue 13): never a 5xx
     ("/tile/0/" + "x123/" * 1400 + "456", 400), ("/tile/entries/" + "9" * 7000, 400),
     ("/tile/0/x999/x999/x999/x999/x999/x999/999", 400), ("/tile/-1/000", 400),
     ("/tile/0/-001", 400), ("/tile/0/000.p/-1", 400), ("/tile/0/000.p/999", 400),
     ("/tile/0/000.p/01", 400), ("/tile/01/000", 400), ("/tile/0/%D9%A1%D9%A2%D9%A3", 400),
     ("/tile/0/000%00", 400), ("/tile/0/000/", 400), ("/tile/0/x000/000", 400),
     ("/tile/63/x036/x028/x797/x018/x963/967", 404), ("/tile/entries/000.p/256", 400),
     ("/consistency?old=1&new=" + "9" * 5000, 400), ("/consistency?old=01&new=2", 400),
     ("/consistency?old=%D9%A1&new=2", 400), ("/consistency?old=1&old=1&new=2", 400),
     ("/consistency?old=-1&new=2", 400), ("/consistency?old=1&new=9223372036854775808", 400),
     ("/proof/" + "a" * 7000, 400)],
)
def test_bad_reads_are_4xx(log, path, status):
    url, *_ = log
    assert httpx.get(url + path).status_code == status


def test_concurrent_appends_batch_and_tiles_recompute_root(log):
    url, token, verifier, _ = log

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(timeout=30) as c:
            rs = await asyncio.gather(*[
                c.post(f"{url}/add", content=b"burst %d" % i,
                       headers={"Authorization": f"Bearer {token}"}) for i in range(300)
            ])
        return [r.json() for r in rs]

    answers = asyncio.run(burst())
    indexes = sorted(a["index"] for a in answers)
    assert len(set(indexes)) == 300
    sizes = {checkpoint.open(a["checkpoint"].encode(), verifier)[0].size for a in answers}
    assert len(sizes) < 300  # several appends shared one checkpoint

    r = httpx.get(f"{url}/checkpoint")
    assert r.headers["content-type"].startswith("text/plain")
    cp, _ = checkpoint.open(r.content, verifier)
    leaves: list[bytes] = []
    for b in tiles.bundles_for_size(cp.size):
        resp = httpx.get(f"{url}/{b}")
        assert resp.status_code == 200
        leaves += [merkle.leaf_hash(e) for e in tiles.decode_bundle(resp.content)]
    assert merkle.root(leaves) == cp.root_hash
    for t in tiles.tiles_for_size(cp.size):
        resp = httpx.get(f"{url}/{t}")
        assert resp.headers["content-type"] == "application/octet-stream"
        if not t.partial:
            assert "immutable" in resp.headers["cache-control"]
        if t.level == 0:
            assert resp.content == b"".join(leaves[t.index * 256 : t.index * 256 + t.width])
    # consistency between an early checkpoint and now
    old = min(sizes)
    c = httpx.get(f"{url}/consistency", params={"old": old, "new": cp.size}).json()
    merkle.verify_consistency(old, cp.size, [base64.b64decode(h) for h in c["proof"]],
                              merkle.root(leaves[:old]), cp.root_hash)


def add_batch(url: str, token: str, body: bytes) -> httpx.Response:
    return httpx.post(f"{url}/add-batch", content=body,
                      headers={"Authorization": f"Bearer {token}"})


def test_batch_append_answers_a_valid_proof_per_entry_in_order(log):
    url, token, verifier, _ = log
    entries = [json.dumps({"request_hash": f"{i:064x}", "batch": True}).encode() for i in range(5)]
    r = add_batch(url, token, tiles.encode_bundle(entries))
    assert r.status_code == 200, r.text
    items = r.json()["entries"]
    assert len(items) == 5 and len({it["index"] for it in items}) == 5
    for entry, it in zip(entries, items, strict=True):
        p = proof.parse(it["proof"].encode())
        assert p.extra == entry and p.index == it["index"]
        proof.check_inclusion(p, checkpoint.open(p.checkpoint, verifier)[0])
    looked = httpx.get(f"{url}/proof/{3:064x}")
    assert proof.parse(looked.content).extra == entries[3]


@pytest.mark.parametrize(("body", "status"), [
    (b"", 400),                                   # no entry
    (b"\x00\x05abc", 400),                        # truncated
    (b"\x00\x00", 400),                           # an empty entry
    (tiles.encode_bundle([b"x"] * 257), 400),      # more than 256 entries
    (b"\x00\x01" + b"x" * 70000, 400),            # trailing bytes form a truncated entry
])
def test_bad_batches_are_refused_whole(log, body, status):
    url, token, _, _ = log
    size = httpx.get(f"{url}/").json()["size"]
    r = add_batch(url, token, body)
    assert r.status_code == status, r.text
    assert httpx.get(f"{url}/").json()["size"] == size  # nothing of it was appended


def test_batch_append_needs_the_token(log):
    url, _, _, _ = log
    r = httpx.post(f"{url}/add-batch", content=tiles.encode_bundle([b"x"]))
    assert r.status_code == 401
    assert httpx.get(f"{url}/add-batch").status_code == 405
