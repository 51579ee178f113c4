"""The receipt outbox: durable group commits, logged marks, and the receipt signer."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.receipts.outbox import Ledger, Outbox, ReceiptSigner, canonical
from tlog import proof
from verifier import receipt

receipt_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**53) + 1, max_value=2**53 - 1)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(st.characters(max_codepoint=127), max_size=8), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(receipt_values)
def test_canonical_equals_rfc8785_for_receipt_values(value: object) -> None:
    assert canonical(value) == rfc8785.dumps(value)


def body() -> dict[str, object]:
    return {"v": receipt.VERSION, "id": "ab" * 16, "time": "2026-01-01T00:00:00.000Z",
            "gateway": {"app_id": "x", "compose_hash": "0" * 64, "keyset_hash": "1" * 64},
            "request_hash": "2" * 64, "forwarded_hash": None, "route": {},
            "upstream": {"verified": False, "evidence": "none"},
            "provider_request_hash": None, "provider_response_hash": None,
            "response_hash": "3" * 64, "e2ee": {"mode": "none"},
            "refusal": {"code": "no_route", "status": 502}, "usage": {"total_tokens": 3},
            "keyset_index": 4}


def test_signer_matches_reference_receipt_module() -> None:
    key = Ed25519PrivateKey.generate()
    signed, entry = ReceiptSigner(key).sign(body())
    pub = key.public_key().public_bytes_raw()
    assert receipt.verify(signed, expected_key=pub) == pub
    assert signed == receipt.sign(body(), key)  # Ed25519 is deterministic
    assert entry == receipt.entry(signed)


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_outbox_ledger_and_reopen(tmp_path: Path, durability: str) -> None:
    data = tmp_path / "o"

    async def go() -> None:
        ob = Outbox(data, durability)
        await asyncio.gather(*(ob.put(f"{i:032x}", f"{i % 3:064x}", b"entry%d" % i)
                               for i in range(50)))
        ledger = Ledger(data)
        p = proof.TlogProof(7, (b"h" * 32,), b"checkpoint note\n", b"entry7")
        seq7 = next(q for q, i, _ in ob.unlogged_after(0) if i == f"{7:032x}")
        await ledger.record(seq7, p)
        await ledger.set_state(True, "log unreachable: OSError")
        assert ob.counts() == (50, 49)
        assert ob.logged_among([f"{7:032x}", f"{8:032x}"]) == {f"{7:032x}"}
        assert ob.state() == {"log_down": "1", "last_error": "log unreachable: OSError"}
        row = ob.get(f"{7:032x}")
        assert row is not None and (row.log_index, row.proof) == (7, p.format().decode())
        assert ob.get(f"{8:032x}").proof is None  # type: ignore[union-attr]
        newest = ob.by_request_hash(f"{1:064x}")
        assert newest is not None and newest.id == f"{49:032x}"
        assert ob.get("missing") is None
        ledger.close()
        ob.close()

    asyncio.run(go())
    reader = Outbox(data, writable=False)
    pending = reader.unlogged_after(0)
    assert len(pending) == 49 and pending[0][1:] == (f"{0:032x}", b"entry0")
    assert f"{7:032x}" not in [i for _, i, _ in pending]
    assert [i for _, i, _ in reader.unlogged_after(pending[10][0], 5)] == \
        [i for _, i, _ in pending[11:16]]
    reader.close()


@pytest.mark.parametrize("durability", ["process", "fsync"])
def test_outbox_duplicate_id_fails_only_that_put(tmp_path: Path, durability: str) -> None:
    async def go() -> None:
        ob = Outbox(tmp_path, durability)
        await ob.put("a" * 32, "0" * 64, b"one")
        results = await asyncio.gather(
            *(ob.put(f"{i:032x}", "0" * 64, b"x") for i in range(5)),
            ob.put("a" * 32, "0" * 64, b"dup"),
            *(ob.put(f"{i:032x}", "0" * 64, b"x") for i in range(5, 10)),
            return_exceptions=True)
        assert [isinstance(r, Exception) for r in results] == [False] * 5 + [True] + [False] * 5
        assert ob.counts() == (11, 11)
        row = ob.get("a" * 32)
        assert row is not None and row.entry == b"one"
        ob.close()
    asyncio.run(go())
