"""RFC 6962 hashing and proofs: published vectors and properties."""

from __future__ import annotations

import base64
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog import merkle


def _b64(v: str | None) -> bytes:
    return base64.b64decode(v or "")


def _vectors(testdata, kind):
    files = sorted((testdata / "vectors" / "merkle" / kind).rglob("*.json"))
    assert files, f"no {kind} vectors"
    return [(f, json.loads(f.read_text())) for f in files]


def test_inclusion_vectors(testdata):
    cases = _vectors(testdata, "inclusion")
    results = {}
    for f, v in cases:
        try:
            merkle.verify_inclusion(
                _b64(v["leafHash"]), v["leafIdx"], v["treeSize"],
                [_b64(p) for p in v["proof"] or []], _b64(v["root"]),
            )
            failed = False
        except merkle.ProofError:
            failed = True
        results[f.name + v["desc"]] = failed == v["wantErr"]
    assert all(results.values()), [k for k, ok in results.items() if not ok]
    assert sum(v["wantErr"] for _, v in cases) > 50  # the negative probes ran


def test_consistency_vectors(testdata):
    cases = _vectors(testdata, "consistency")
    bad = []
    for f, v in cases:
        try:
            merkle.verify_consistency(
                v["size1"], v["size2"], [_b64(p) for p in v["proof"] or []],
                _b64(v["root1"]), _b64(v["root2"]),
            )
            failed = False
        except merkle.ProofError:
            failed = True
        if failed != v["wantErr"]:
            bad.append(f"{f.name}: {v['desc']}")
    assert not bad


def test_rfc6962_tree(testdata):
    t = json.loads((testdata / "vectors" / "merkle" / "rfc6962-test-tree.json").read_text())
    leaves = [bytes.fromhex(x) for x in t["leaf_inputs_hex"]]
    hashes = [merkle.leaf_hash(x) for x in leaves]
    assert [h.hex() for h in hashes] == t["leaf_hashes_hex"]
    for n, want in enumerate(t["root_hashes_hex"]):
        assert merkle.root(hashes[:n]).hex() == want


def test_empty_root_is_sha256_of_nothing():
    assert merkle.root([]).hex() == (
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    )


def test_proof_generation_matches_vectors(testdata):
    """Our prover regenerates the published happy-path proofs."""
    t = json.loads((testdata / "vectors" / "merkle" / "rfc6962-test-tree.json").read_text())
    hashes = [merkle.leaf_hash(bytes.fromhex(x)) for x in t["leaf_inputs_hex"]]
    checked = 0
    for _, v in _vectors(testdata, "inclusion") + _vectors(testdata, "consistency"):
        if v["wantErr"]:
            continue
        want = [_b64(p) for p in v["proof"] or []]
        if "leafIdx" in v and v["treeSize"] <= len(hashes) and _b64(v["leafHash"]) == hashes[v["leafIdx"]]:
            assert merkle.inclusion_proof(v["leafIdx"], v["treeSize"], hashes) == want
            checked += 1
        elif "size1" in v and v["size2"] <= len(hashes) and _b64(v["root2"]) == merkle.root(hashes[: v["size2"]]):
            assert merkle.consistency_proof(v["size1"], v["size2"], hashes) == want
            checked += 1
    assert checked >= 4


def test_consistency_from_zero_refused():
    with pytest.raises(merkle.ProofError):
        merkle.verify_consistency(0, 0, [], merkle.EMPTY_ROOT, merkle.EMPTY_ROOT)
    with pytest.raises(merkle.ProofError):
        merkle.consistency_proof(0, 3, [merkle.leaf_hash(b"x")] * 3)


def _leaves(n: int) -> list[bytes]:
    return [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n)]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 600), st.data())
def test_inclusion_roundtrip(size, data):
    leaves = _leaves(size)
    r = merkle.root(leaves)
    i = data.draw(st.integers(0, size - 1))
    proof = merkle.inclusion_proof(i, size, leaves)
    merkle.verify_inclusion(leaves[i], i, size, proof, r)
    # wrong index, wrong leaf and a flipped proof byte all fail
    with pytest.raises(merkle.ProofError):
        merkle.verify_inclusion(merkle.leaf_hash(b"other"), i, size, proof, r)
    if proof:
        k = data.draw(st.integers(0, len(proof) - 1))
        bad = list(proof)
        bad[k] = bytes([bad[k][0] ^ 1]) + bad[k][1:]
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(leaves[i], i, size, bad, r)
        with pytest.raises(merkle.ProofError):
            merkle.verify_inclusion(leaves[i], i, size, proof[:-1], r)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 700), st.data())
def test_batch_inclusion_proofs_equal_one_by_one(size, data):
    leaves = _leaves(size)
    node = merkle._list_reader(leaves)
    indices = data.draw(st.lists(st.integers(0, size - 1), max_size=40)
                        | st.integers(0, size - 1).flatmap(
                            lambda lo: st.just(list(range(lo, min(size, lo + 300))))))
    memo: dict[tuple[int, int], bytes] = {}
    paths = merkle.prove_inclusions(indices, size, node, memo)
    assert set(paths) == set(indices)
    for i in indices:  # the same path, with and without a memo shared across the batch
        assert list(paths[i]) == merkle.prove_inclusion(i, size, node)
        assert list(paths[i]) == merkle.prove_inclusion(i, size, node, memo)


@pytest.mark.parametrize("indices", [[-1], [0, 5], [4]])
def test_batch_inclusion_proofs_refuse_indices_outside_the_tree(indices):
    with pytest.raises(merkle.ProofError):
        merkle.prove_inclusions(indices, 4 if indices != [0, 5] else 5, merkle._list_reader(
            _leaves(5)))


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 700), st.data())
def test_one_batch_proof_gives_the_root_and_every_single_path(size, data):
    leaves = _leaves(size)
    node = merkle._list_reader(leaves)
    indices = data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=40)
                        | st.integers(0, size - 1).flatmap(
                            lambda lo: st.just(list(range(lo, min(size, lo + 300))))))
    proof = merkle.prove_batch(indices, size, node)
    got = {i: leaves[i] for i in indices}
    root, paths = merkle.root_from_batch(got, size, proof)
    assert root == merkle.root(leaves)
    for i in indices:
        assert paths[i] == merkle.prove_inclusion(i, size, node)
    assert len(proof) <= sum(len(paths[i]) for i in set(indices))  # never more than apart
    if proof:  # every hash matters and its place matters
        k = data.draw(st.integers(0, len(proof) - 1))
        flipped = [*proof[:k], bytes(32), *proof[k + 1:]]
        assert merkle.root_from_batch(got, size, flipped)[0] != root
        with pytest.raises(merkle.ProofError):
            merkle.root_from_batch(got, size, proof[:k] + proof[k + 1:])
    with pytest.raises(merkle.ProofError):
        merkle.root_from_batch(got, size, [*proof, leaves[0]])
    other = {**got, indices[0]: merkle.leaf_hash(b"not this leaf")}
    assert merkle.root_from_batch(other, size, proof)[0] != root


def test_a_run_of_leaves_needs_about_two_paths_of_hashes():
    size = 100_000
    node = merkle._list_reader(_leaves(size))
    proof = merkle.prove_batch(range(70_000, 70_256), size, node)
    assert len(proof) <= 2 * len(merkle.prove_inclusion(70_000, size, node))


@pytest.mark.parametrize(("leaves", "size", "proof"), [
    ({}, 4, []),  # nothing to prove
    ({4: bytes(32)}, 4, []),  # past the tree
    ({-1: bytes(32)}, 4, []),
    ({0: bytes(31)}, 4, [bytes(32)] * 2),  # a leaf hash of the wrong size
    ({0: bytes(32)}, 4, [bytes(32), bytes(33)]),
])
def test_a_batch_proof_with_bad_inputs_is_refused(leaves, size, proof):
    with pytest.raises(merkle.ProofError):
        merkle.root_from_batch(leaves, size, proof)
    if leaves and min(leaves) < 0 or max(leaves, default=0) >= size:
        with pytest.raises(merkle.ProofError):
            merkle.prove_batch(leaves, size, merkle._list_reader(_leaves(4)))


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 600), st.data())
def test_consistency_roundtrip(new, data):
    leaves = _leaves(new)
    old = data.draw(st.integers(1, new))
    proof = merkle.consistency_proof(old, new, leaves)
    r_old, r_new = merkle.root(leaves[:old]), merkle.root(leaves)
    merkle.verify_consistency(old, new, proof, r_old, r_new)
    if old < new:
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(old, new, proof, r_new, r_new)
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(old, new, proof + [r_old], r_old, r_new)
        forked = leaves[: old - 1] + [merkle.leaf_hash(b"fork")] + leaves[old:]
        with pytest.raises(merkle.ProofError):
            merkle.verify_consistency(old, new, proof, merkle.root(forked[:old]), r_new)


def _mth(hashes: list[bytes]) -> bytes:
    """RFC 6962 MTH, written straight from the definition as a reference."""
    if not hashes:
        return hashlib.sha256(b"").digest()
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return hashlib.sha256(b"\x01" + _mth(hashes[:k]) + _mth(hashes[k:])).digest()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(max_size=8), max_size=300))
def test_builder_and_root_match_definition(entries):
    b = merkle.Builder()
    hashes = [merkle.leaf_hash(e) for e in entries]
    for h in hashes:
        b.append(h)
    assert b.size == len(entries)
    assert b.root() == merkle.root(hashes) == _mth(hashes)
    node = lambda level, index: _mth(hashes[index << level : (index + 1) << level])  # noqa: E731
    assert merkle.tree_root(len(hashes), node) == _mth(hashes)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0, 2, 4]), max_size=12), st.integers(0, 9))
def test_builder_append_subtree_equals_leaves(levels, tail):
    a, b = merkle.Builder(), merkle.Builder()
    n = 0
    for level in sorted(levels, reverse=True):  # largest first keeps every subtree aligned
        leaves = [merkle.leaf_hash(b"%d" % (n + i)) for i in range(1 << level)]
        for h in leaves:
            a.append(h)
        b.append_subtree(merkle.root(leaves), level)
        n += 1 << level
    assert (a.size, a.root()) == (b.size, b.root())
    for i in range(tail):
        a.append(merkle.leaf_hash(b"t%d" % i))
    if a.size % 2:
        with pytest.raises(merkle.ProofError):
            a.append_subtree(bytes(32), 1)
