"""The shipper's check of the log's answer: only a proof of exactly that entry counts."""

from __future__ import annotations

import json

import pytest

from gateway.shipper import ProofChecker, ShipError
from tlog import checkpoint, merkle, note, proof

SIGNER = note.generate_signer("log.test/x")
ENTRIES = [b"entry-%d" % i for i in range(5)]


def answer(index: int, entry: bytes | None = None, signer: note.Ed25519Signer = SIGNER,
           extra: bytes | None = None) -> bytes:
    leaves = [merkle.leaf_hash(e) for e in ENTRIES]
    if entry is not None:
        leaves[index] = merkle.leaf_hash(entry)
    cp = checkpoint.Checkpoint("log.test/x", len(leaves), merkle.root(leaves), ())
    p = proof.TlogProof(index, tuple(merkle.inclusion_proof(index, len(leaves), leaves)),
                        checkpoint.sign(cp, signer), extra if extra is not None else ENTRIES[index])
    return json.dumps({"index": index, "checkpoint": p.checkpoint.decode(),
                       "proof": p.format().decode()}).encode()


def test_valid_answer() -> None:
    p = ProofChecker(SIGNER.vkey).check(ENTRIES[3], answer(3))
    assert p.index == 3 and p.extra == ENTRIES[3]
    assert ProofChecker(None).check(ENTRIES[3], answer(3)).index == 3


@pytest.mark.parametrize("body", [
    b"not json",
    b"[]",
    b'{"index": "3", "proof": "x"}',
    b'{"index": true, "proof": "x"}',
    b'{"index": 3, "proof": "not a proof"}',
])
def test_malformed_answers(body: bytes) -> None:
    with pytest.raises(ShipError) as e:
        ProofChecker(SIGNER.vkey).check(ENTRIES[3], body)
    assert not e.value.log_down


def test_wrong_entry_index_or_key_is_refused() -> None:
    checker = ProofChecker(SIGNER.vkey)
    with pytest.raises(ShipError, match="does not match"):
        checker.check(b"other entry", answer(3))
    doc = json.loads(answer(3))
    doc["index"] = 2
    with pytest.raises(ShipError, match="does not match"):
        checker.check(ENTRIES[3], json.dumps(doc).encode())
    with pytest.raises(ShipError, match="does not verify"):  # tree holds another entry
        checker.check(b"forged", answer(3, entry=b"other", extra=b"forged"))
    with pytest.raises(ShipError, match="does not verify"):  # signed by someone else
        checker.check(ENTRIES[3], answer(3, signer=note.generate_signer("log.test/x")))
