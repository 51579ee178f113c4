"""The keyset entry (pag-keyset/1): built from a real simulator attestation, checked, attacked."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from tests.test_attestation import APP_ID, COMPOSE, _with_sim
from tlog import checkpoint, merkle, note
from verifier import keyset_entry

LOG = note.generate_signer("example.com/log")
CP = checkpoint.sign(checkpoint.Checkpoint(LOG.name, 3, merkle.root([merkle.leaf_hash(b"x")] * 3)),
                     LOG)


def _entry(short_dir: Path, cp: bytes = CP, nonce: str | None = None) -> dict[str, Any]:
    async def fn(client: Any, srv: Any) -> dict[str, Any]:
        gk = await keys.load(client, log_vkey=LOG.vkey)
        doc = await identity_attestation.build(
            client, gk, keyset_entry.nonce_for(cp) if nonce is None else nonce)
        return keyset_entry.build(doc, cp, "2026-12-04T00:00:00Z")

    return _with_sim(short_dir, fn)


def _check(obj: Any, **kw: Any) -> keyset_entry.KeysetFacts:
    return keyset_entry.check(obj, log_verifier=LOG.verifier(), **kw)


def test_entry_verifies_and_names_the_signing_key(short_dir: Path) -> None:
    obj = _entry(short_dir)
    facts = _check(obj, allow_simulated=True, app_id=APP_ID, compose_hash=COMPOSE)
    assert facts.receipt_signing_key == obj["keyset"]["receipt_signing_key"]
    assert facts.checkpoint_size == 3 and facts.simulated
    # the log entry is canonical and round-trips
    assert keyset_entry.entry(obj) == keyset_entry.entry(dict(reversed(list(obj.items()))))


def test_simulated_quote_needs_allow_simulated(short_dir: Path) -> None:
    with pytest.raises(keyset_entry.KeysetEntryError) as e:
        _check(_entry(short_dir))
    assert e.value.code == "attestation_invalid" and "simulated" in e.value.message


def test_pins_are_enforced(short_dir: Path) -> None:
    obj = _entry(short_dir)
    for kw, code in (({"app_id": "b2" * 20}, "app_id_mismatch"),
                     ({"compose_hash": "d0" * 32}, "compose_hash_mismatch"),
                     ({"measurements": ({"mr_td": "00" * 48},)}, "measurement_mismatch"),
                     ({"measurements": ({},)}, "measurement_mismatch")):
        with pytest.raises(keyset_entry.KeysetEntryError) as e:
            _check(obj, allow_simulated=True, **kw)
        assert e.value.code == code, kw


def test_forgeries_are_refused(short_dir: Path) -> None:
    obj = _entry(short_dir)
    other_log = note.generate_signer("example.com/log")
    forged_cp = checkpoint.sign(checkpoint.parse(note.split(CP)[0]), other_log)
    attacks = {
        # a quote made before (or without) the checkpoint: the nonce does not match
        "stale quote": lambda o: o.__setitem__("checkpoint", forged_cp.decode()),
        "swapped keyset": lambda o: o["keyset"].__setitem__(
            "receipt_signing_key", "A" * 43 + "="),
        "claimed app id": lambda o: o.__setitem__("app_id", "ff" * 20),
        "not an entry": lambda o: o.__setitem__("v", "pag-keyset/0"),
        "no checkpoint": lambda o: o.pop("checkpoint"),
    }
    for name, mutate in attacks.items():
        bad = copy.deepcopy(obj)
        mutate(bad)
        with pytest.raises(keyset_entry.KeysetEntryError):
            _check(bad, allow_simulated=True)
        assert name


def test_quote_not_made_for_the_checkpoint_is_refused(short_dir: Path) -> None:
    obj = _entry(short_dir, nonce="00" * 32)  # a fresh quote, but not bound to this checkpoint
    with pytest.raises(keyset_entry.KeysetEntryError) as e:
        _check(obj, allow_simulated=True)
    assert "nonce" in e.value.message
