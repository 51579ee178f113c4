"""c2sp.org/tlog-proof@v1 parsing and checking, with real Rekor v2 proofs."""

from __future__ import annotations

import json

import pytest

from tlog import checkpoint, merkle, note, proof
from witness import cosignature


def _check(src: bytes, vkey: str, witness_vkeys: list[str], quorum: int) -> None:
    p = proof.parse(src)
    w = cosignature.verify_witnessed(
        p.checkpoint, note.verifier_from_vkey(vkey), cosignature.parse_vkeys(witness_vkeys), quorum
    )
    proof.check_inclusion(p, w.checkpoint)


def test_rekor_v2_cases(testdata):
    d = testdata / "vectors" / "rekor-v2"
    cases = [c for c in json.loads((d / "expected.json").read_text())["cases"] if c["command"] == "proof"]
    assert len(cases) >= 8
    for c in cases:
        args = ((d / c["src"]).read_bytes(), (d / c["vkey"]).read_text(),
                [(d / w).read_text() for w in c["witness"]], c["quorum"] or 0)
        if c["expect"] == "ok":
            _check(*args)
        else:
            with pytest.raises((ValueError, merkle.ProofError)):
                _check(*args)


def test_roundtrip_and_errors():
    signer = note.generate_signer("log")
    leaves = [merkle.leaf_hash(b"e%d" % i) for i in range(5)]
    cp = checkpoint.Checkpoint("log", 5, merkle.root(leaves))
    p = proof.TlogProof(2, tuple(merkle.inclusion_proof(2, 5, leaves)), checkpoint.sign(cp, signer), b"e2")
    text = p.format()
    assert proof.parse(text) == p
    got, _ = checkpoint.open(proof.parse(text).checkpoint, signer.verifier())
    proof.check_inclusion(proof.parse(text), got)
    with pytest.raises(merkle.ProofError):
        proof.check_inclusion(proof.parse(text), got, entry=b"e3")
    for bad in [text.replace(b"index 2", b"index 02"), text.replace(b"@v1", b"@v2"),
                text.split(b"\n\n")[0], text.replace(b"extra ", b"extra !")]:
        with pytest.raises(proof.ProofFormatError):
            proof.parse(bad)
