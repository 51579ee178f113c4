"""The shipper records a receipt as logged only under a checkpoint cosigned by the configured
witness quorum; an entry the log holds but has not had witnessed is not appended twice."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from gateway.api import config
from gateway.receipts.outbox import Outbox
from gateway.receipts.shipper import ProofChecker, ShipError, Shipper
from tests.test_gateway_fakes import FakeLog
from tlog import checkpoint, merkle, note, proof
from witness import cosignature

LOG = note.generate_signer("log.test/q")
WITNESS = cosignature.generate_signer("witness.test/a")
OTHER = cosignature.generate_signer("witness.test/b")
ENTRY = b'{"request_hash":"' + b"ab" * 32 + b'"}'


def answer(*cosigners: cosignature.CosignatureSigner, junk_under: bytes | None = None) -> bytes:
    """A `POST /add` answer for ENTRY at index 0 of a one-entry log, cosigned as given."""
    leaves = [merkle.leaf_hash(ENTRY)]
    signed = checkpoint.sign(checkpoint.Checkpoint(LOG.name, 1, merkle.root(leaves)), LOG)
    for w in cosigners:
        signed += cosignature.cosign(signed, w).line()
    if junk_under is not None:  # a line under an honest witness's name and key id
        signed += note.Signature(WITNESS.name, junk_under, b"\x00" * 72).line()
    p = proof.TlogProof(0, (), signed, ENTRY)
    return json.dumps({"index": 0, "checkpoint": signed.decode(),
                       "proof": p.format().decode()}).encode()


def test_proof_meets_the_quorum_only_with_valid_distinct_cosignatures() -> None:
    checker = ProofChecker(LOG.vkey, [WITNESS.vkey, OTHER.vkey], quorum=2)
    assert checker.check(ENTRY, answer(WITNESS, OTHER)).index == 0
    for cosigners in ((), (WITNESS,), (WITNESS, WITNESS)):
        with pytest.raises(ShipError) as e:
            ProofChecker(LOG.vkey, [WITNESS.vkey, OTHER.vkey], quorum=2).check(
                ENTRY, answer(*cosigners))
        assert e.value.appended and e.value.log_down  # in the log, not yet witnessed


def test_unconfigured_witness_and_junk_lines_do_not_count() -> None:
    stranger = cosignature.generate_signer("witness.test/a")  # same name, other key
    with pytest.raises(ShipError, match="not witnessed"):
        ProofChecker(LOG.vkey, [WITNESS.vkey], 1).check(ENTRY, answer(stranger))
    with pytest.raises(ShipError):
        ProofChecker(LOG.vkey, [WITNESS.vkey], 1).check(
            ENTRY, answer(junk_under=WITNESS.key_id))


def test_checker_refuses_an_impossible_policy() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        ProofChecker(LOG.vkey, [WITNESS.vkey], quorum=2)
    with pytest.raises(ValueError, match="vkey"):
        ProofChecker(None, [WITNESS.vkey], quorum=1)


@pytest.mark.parametrize("table, message", [
    ('vkey = "{log}"\nwitness_vkeys = ["{w}"]\nquorum = 2\n', "quorum must be between"),
    ('vkey = "{log}"\nwitness_vkeys = ["{w}", "{w}"]\n', "the same witness key twice"),
    ('vkey = "{log}"\nwitness_vkeys = ["w+01234567+AAAA"]\n', "bad verifier key"),
    ('url = "http://127.0.0.1:1"\n', "vkey is required"),
])
def test_config_refuses_a_witness_policy_it_cannot_check(tmp_path: Path, table: str,
                                                           message: str) -> None:
    (tmp_path / "g.toml").write_text("[log]\n" + table.format(log=LOG.vkey, w=WITNESS.vkey))
    with pytest.raises(config.ConfigError, match=message):
        config.load(tmp_path / "g.toml")


def test_config_quorum_defaults_to_every_witness(tmp_path: Path) -> None:
    (tmp_path / "g.toml").write_text(
        f'[log]\nvkey = "{LOG.vkey}"\nwitness_vkeys = ["{WITNESS.vkey}", "{OTHER.vkey}"]\n')
    assert config.load(tmp_path / "g.toml").log.quorum == 2


def test_unwitnessed_receipts_wait_and_are_appended_once(tmp_path: Path) -> None:
    """While the log's checkpoints lack the witness, nothing is recorded as logged and no
    entry is appended twice; once cosigned, each receipt's fresher proof is recorded."""
    async def go() -> None:
        log = FakeLog(witness=WITNESS)
        log.cosign = False
        await log.start()
        box = Outbox(tmp_path)
        ship = Shipper(tmp_path, log.url, log.token, log.vkey, concurrency=4,
                       witnesses=[WITNESS.vkey], quorum=1)
        try:
            entries = [json.dumps({"id": i, "request_hash": f"{i:064x}"}).encode()
                       for i in range(6)]
            for i, e in enumerate(entries):
                await box.put(f"{i:032x}", f"{i:064x}", e)
            await ship.start()
            for _ in range(200):
                if log.entries:
                    break
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.5)  # several retry rounds
            assert box.counts() == (6, 6)
            assert log.entries and len(set(log.entries)) == len(log.entries)  # none twice
            assert box.state()["log_down"] == "1"
            log.cosign = True
            for _ in range(500):
                if box.counts()[1] == 0:
                    break
                await asyncio.sleep(0.02)
            assert box.counts() == (6, 0)
            assert sorted(log.entries) == sorted(entries)
            w = [WITNESS.verifier()]
            for i, e in enumerate(entries):
                row = box.get(f"{i:032x}")
                assert row is not None and row.proof is not None
                p = proof.parse(row.proof.encode())
                wit = cosignature.verify_witnessed(
                    p.checkpoint, note.verifier_from_vkey(log.vkey), w, 1)
                proof.check_inclusion(p, wit.checkpoint, e)
        finally:
            await ship.close()
            box.close()
            await log.stop()
    asyncio.run(go())
