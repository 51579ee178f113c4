"""One TDX quote check shared by every evidence kind that carries a TDX quote.

`verify_quote(raw, policy, now)` returns the parsed quote only if it is
vouched for: a simulated quote (verifier/tee/quote.py) only under
`allow_simulated`; a real quote only if dcap-qvl verifies its signature chain
against Intel collateral at `now` (never the wall clock inside this function)
and the TCB status is in `allowed_tcb_status`. Collateral comes from
`collateral_file`, or from `pccs_url` through the cache in
`gateway/verification/collateral.py`. Every failure is a VerificationError.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from gateway.verification import collateral
from gateway.verification.base import Policy, VerificationError
from verifier.tee import dcap
from verifier.tee import quote as tdxquote


@dataclass(frozen=True)
class VerifiedQuote:
    """A quote that passed `verify_quote`."""

    quote: tdxquote.TdxQuote
    simulated: bool
    tcb_status: str | None
    advisory_ids: tuple[str, ...] = ()

    @property
    def report_data(self) -> bytes:
        """The 64 bytes the quoted workload chose."""
        return self.quote.report.report_data

    def measurements(self) -> dict[str, str]:
        """mr_td and RTMR0-3 as lower-case hex (names as in `allowed_measurements`)."""
        r = self.quote.report
        return {"mr_td": r.mr_td.hex(), "rtmr0": r.rtmr0.hex(), "rtmr1": r.rtmr1.hex(),
                "rtmr2": r.rtmr2.hex(), "rtmr3": r.rtmr3.hex()}


def parse(raw: bytes) -> tdxquote.TdxQuote:
    """The quote's fields, or `quote_invalid`."""
    try:
        return tdxquote.parse_quote(raw)
    except ValueError as e:
        raise VerificationError("quote_invalid", f"cannot parse TDX quote: {e}") from e


async def verify_quote(raw: bytes, policy: Policy, now: float) -> VerifiedQuote:
    """Verify a TDX quote under the policy at time `now` (epoch seconds)."""
    parsed = parse(raw)
    if tdxquote.is_simulated(raw):
        if not policy.allow_simulated:
            raise VerificationError("simulated_not_allowed",
                                    "quote is simulated and policy does not allow simulated quotes")
        return VerifiedQuote(parsed, True, None)
    if tdxquote.looks_simulated(raw):
        raise VerificationError("quote_invalid", "quote carries a partial simulated marker")
    col = await collateral.for_quote(raw, policy)
    return check_real(raw, parsed, col, policy, now)


def check_real(raw: bytes, parsed: tdxquote.TdxQuote, col: Any, policy: Policy,
               now: float) -> VerifiedQuote:
    """dcap-qvl verification of a real quote against collateral (synchronous)."""
    try:
        result = dcap.verify(raw, col, now)
    except dcap.DcapError as e:
        raise VerificationError(e.code, e.message) from e
    if result.tcb_status not in policy.allowed_tcb_status:
        raise VerificationError("quote_invalid",
                                f"TCB status {result.tcb_status} not allowed by policy")
    return VerifiedQuote(parsed, False, result.tcb_status, result.advisory_ids)


def measurements_ok(have: dict[str, Any], policy: Policy) -> bool:
    """True if no sets are configured or every member of some allowed set matches."""
    if not policy.allowed_measurements:
        return True
    return any(all(str(have.get(k, "")).lower() == str(v).lower() for k, v in m.items())
               for m in policy.allowed_measurements)


def same(a: bytes, b: bytes) -> bool:
    """Constant-time equality for report-data comparisons."""
    return hmac.compare_digest(a, b)
