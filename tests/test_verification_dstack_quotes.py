"""Real TDX quotes (dcap-qvl vectors) through the dstack adapter's quote verifier.

"now" comes from the vectors' expected.json, never the wall clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.verification.base import Policy, VerificationError
from gateway.verification.dstack import quote_verifier

VEC = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "vectors" / "tdx"
if not (VEC / "expected.json").exists():
    VEC = Path("/work/shared/testdata/vectors/tdx")
pytestmark = pytest.mark.skipif(not (VEC / "expected.json").exists(), reason="TDX vectors absent")


def _expected() -> dict:
    return json.loads((VEC / "expected.json").read_text())["quotes"]


def _policy(name: str, **kw: object) -> Policy:
    return Policy(collateral_file=str(VEC / _expected()[name]["collateral"]), **kw)


def test_genuine_quote_verifies_at_its_time() -> None:
    e = _expected()["tdx_quote"]
    raw = (VEC / "tdx_quote").read_bytes()
    report = quote_verifier(_policy("tdx_quote"), e["verify_at"])(raw)
    assert report.tcb_status == "UpToDate" and not report.simulated


@pytest.mark.parametrize(("when", "code"), [("after", "evidence_expired"), ("before", "quote_invalid")])
def test_genuine_quote_refused_outside_collateral_window(when: str, code: str) -> None:
    w = _expected()["tdx_quote"]["valid_window"]
    now = w["not_after"] + 86400 if when == "after" else w["not_before"] - 86400
    with pytest.raises(VerificationError) as ei:
        quote_verifier(_policy("tdx_quote"), now)((VEC / "tdx_quote").read_bytes())
    assert ei.value.code == code


@pytest.mark.parametrize("offset", [568, 184])  # report_data byte, mr_td byte
def test_tampered_quote_refused(offset: int) -> None:
    raw = bytearray((VEC / "tdx_quote").read_bytes())
    raw[offset] ^= 1
    with pytest.raises(VerificationError) as ei:
        quote_verifier(_policy("tdx_quote"), _expected()["tdx_quote"]["verify_at"])(bytes(raw))
    assert ei.value.code == "quote_invalid"


def test_tcb_status_policy_refuses_status_not_listed() -> None:
    pol = _policy("tdx_quote", allowed_tcb_status=("SWHardeningNeeded",))
    with pytest.raises(VerificationError) as ei:
        quote_verifier(pol, _expected()["tdx_quote"]["verify_at"])((VEC / "tdx_quote").read_bytes())
    assert "UpToDate" in ei.value.reason


def test_outdated_platform_refused() -> None:
    e = _expected()["tdx_quote_outdated"]
    with pytest.raises(VerificationError) as ei:
        quote_verifier(_policy("tdx_quote_outdated"), e["verify_at"])((VEC / "tdx_quote_outdated").read_bytes())
    assert ei.value.code == "quote_invalid"


def test_real_quote_without_collateral_fails_closed() -> None:
    with pytest.raises(VerificationError) as ei:
        quote_verifier(Policy(), 1752919234)((VEC / "tdx_quote").read_bytes())
    assert ei.value.code == "quote_invalid"
