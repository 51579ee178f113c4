"""C2SP signed notes and checkpoints against Go's and transparency-dev's vectors."""

from __future__ import annotations

import json

import pytest

from tlog import checkpoint, note
from witness import cosignature


def _verifier(vkey: str):
    """A note verifier for either alg 0x01 or 0x04 keys."""
    alg = note.parse_vkey(vkey)[2]
    if alg == cosignature.ALG_COSIGNATURE:
        return cosignature.verifier_from_vkey(vkey)
    return note.verifier_from_vkey(vkey)


def test_note_vectors(testdata):
    d = testdata / "vectors" / "notes"
    cases = json.loads((d / "expected.json").read_text())["cases"]
    assert len(cases) >= 10
    for case in cases:
        verifiers = [_verifier((d / v).read_text().strip()) for v in case["vkeys"]]
        msg = (d / case["file"]).read_bytes()
        if case["expect"] == "fail":
            with pytest.raises(note.NoteError):
                opened = note.open(msg, verifiers)
                if case.get("kind") == "checkpoint":
                    checkpoint.parse(opened.text)
            continue
        opened = note.open(msg, verifiers)
        if "verified" in case:
            assert sorted(s.name for s in opened.sigs) == sorted(case["verified"]), case
        if case.get("kind") == "checkpoint":
            cp = checkpoint.parse(opened.text)
            assert (cp.origin, cp.size) == (case["origin"], case["size"])


def test_sign_reproduces_go_note(testdata):
    """Ed25519 is deterministic: our signer reproduces Go's signed note byte for byte."""
    d = testdata / "vectors" / "notes"
    signer = note.parse_skey((d / "PeterNeumann.skey").read_text())
    assert signer.vkey == (d / "PeterNeumann.vkey").read_text().strip()
    msg = (d / "peter.note").read_bytes()
    text, _ = note.split(msg)
    assert note.sign(text, [signer]) == msg


def test_skey_vkey_roundtrip_and_key_id():
    s = note.generate_signer("example.com/log")
    assert note.parse_skey(s.skey).vkey == s.vkey
    name, kid, alg, pub = note.parse_vkey(s.vkey)
    assert (name, alg, pub, kid) == ("example.com/log", 1, s.public_key, s.key_id)
    with pytest.raises(note.NoteError):  # key ID must match the key
        note.parse_vkey(s.vkey.replace(s.key_id.hex(), "00000000"))


@pytest.mark.parametrize("name", ["", "a b", "a+b", "tab\there"])
def test_invalid_names_refused(name):
    with pytest.raises(note.NoteError):
        note.Ed25519Signer(name, b"\x00" * 32)


def test_unknown_signatures_ignored_known_bad_refused():
    a, b = note.generate_signer("a"), note.generate_signer("b")
    msg = note.sign(b"hello\n", [a, b])
    opened = note.open(msg, [a.verifier()])
    assert [s.name for s in opened.sigs] == ["a"] and [s.name for s in opened.unverified] == ["b"]
    tampered = msg.replace(b"hello", b"jello")
    with pytest.raises(note.InvalidNoteSignature):
        note.open(tampered, [a.verifier()])
    with pytest.raises(note.UnverifiedNote):
        note.open(msg, [note.generate_signer("c").verifier()])


def test_signature_limit():
    s = note.generate_signer("a")
    msg = note.sign(b"t\n", [s])
    extra = b"".join(
        note.Signature(f"x{i}", b"\x00\x00\x00\x01", b"\x00" * 64).line()
        for i in range(note.MAX_SIGNATURES)
    )
    with pytest.raises(note.NoteError, match="too many"):
        note.open(msg + extra, [s.verifier()])


def test_checkpoint_roundtrip_and_parse_errors():
    signer = note.generate_signer("example.com/log")
    cp = checkpoint.Checkpoint("example.com/log", 42, b"\x07" * 32, ("ext line",))
    got, opened = checkpoint.open(checkpoint.sign(cp, signer), signer.verifier())
    assert got == cp
    with pytest.raises(checkpoint.CheckpointError, match="origin"):
        checkpoint.open(checkpoint.sign(cp, signer), signer.verifier(), origin="other")
    for bad in [b"o\n042\nAAAA\n", b"o\n1\n" + b"QUJD\n", b"\n1\n" + b"A" * 43 + b"=\n", b"o\n1\n"]:
        with pytest.raises(checkpoint.CheckpointError):
            checkpoint.parse(bad)


def test_checkpoint_requires_log_signature():
    log, other = note.generate_signer("log"), note.generate_signer("other")
    cp = checkpoint.Checkpoint("log", 1, b"\x01" * 32)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.open(checkpoint.sign(cp, other), log.verifier(), [other.verifier()])


def test_rekor_v2_cosigned_checkpoint(testdata):
    d = testdata / "vectors" / "rekor-v2"
    log = note.verifier_from_vkey((d / "keys" / "log2025-alpha3.vkey").read_text())
    witnesses = cosignature.parse_vkeys(
        p.read_text() for p in sorted((d / "keys").glob("witness-*.vkey"))
    )
    msg = (d / "checkpoints" / "log2025-alpha3-4026479.cosigned.checkpoint").read_bytes()
    w = cosignature.verify_witnessed(msg, log, witnesses, quorum=3)
    assert w.checkpoint.size == 4026479 and len(w.cosigners) == 3
    bad = (d / "checkpoints" / "log2025-alpha3-4026479.bad-cosignature.checkpoint").read_bytes()
    cosignature.verify_witnessed(bad, log)  # unknown cosigners are ignored
    with pytest.raises(checkpoint.CheckpointError):
        cosignature.verify_witnessed(bad, log, witnesses, quorum=2)
    with pytest.raises(cosignature.QuorumError):
        cosignature.verify_witnessed(msg, log, witnesses[:1], quorum=2)


def test_cosignature_roundtrip_and_key_type():
    log = note.generate_signer("log")
    w = cosignature.generate_signer("witness.example")
    assert note.parse_vkey(w.vkey)[2] == 0x04
    assert cosignature.parse_skey(w.skey).vkey == w.vkey
    with pytest.raises(note.NoteError):
        note.verifier_from_vkey(w.vkey)  # a cosigner key is not a log key
    cp_note = checkpoint.sign(checkpoint.Checkpoint("log", 3, b"\x02" * 32), log)
    sig = cosignature.cosign(cp_note, w)
    assert cosignature.timestamp(sig) > 0 and len(sig.sig) == 72
    res = cosignature.verify_witnessed(cp_note + sig.line(), log.verifier(), [w.verifier()], 1)
    assert res.cosigners == ("witness.example",)
    other = cp_note.replace(b"\n3\n", b"\n4\n")
    with pytest.raises(note.NoteError):  # cosignature does not carry over to another body
        note.open(other + sig.line(), [w.verifier()])
