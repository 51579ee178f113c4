"""Real TDX quotes: their signature chain checked by dcap-qvl against Intel collateral.

Collateral (TCB info, QE identity, CRLs and their issuer chains) is a
QuoteCollateralV3 JSON document, from a file or fetched from a PCCS (or Intel
PCS). `verify(raw, collateral, now)` checks at time `now` (epoch seconds,
never the wall clock inside this module) and returns the TCB status and
advisories; whether a status is acceptable is the caller's policy.

`dcap-qvl` is imported only when a real quote is checked, so a client that
checks only simulated quotes runs without it. Every failure is a `DcapError`
with a stable code: `quote_invalid`, `evidence_expired`, `evidence_missing`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DcapError(ValueError):
    """A real quote could not be verified. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DcapResult:
    """What dcap-qvl established about a quote."""

    tcb_status: str | None
    advisory_ids: tuple[str, ...] = ()


def _dcap() -> Any:
    try:
        import dcap_qvl
    except ImportError as e:
        raise DcapError("quote_unverified", "checking a real TDX quote needs the dcap-qvl "
                        "package (pip install dcap-qvl)") from e
    return dcap_qvl


def load_collateral(text: str) -> Any:
    """Parse QuoteCollateralV3 JSON, or `quote_invalid`."""
    try:
        return _dcap().QuoteCollateralV3.from_json(text)
    except (ValueError, RuntimeError) as e:
        raise DcapError("quote_invalid", f"collateral is not QuoteCollateralV3: {e}") from e


async def fetch_collateral(pccs_url: str, raw: bytes) -> str:
    """Collateral JSON for a quote's platform from a PCCS (or Intel PCS), or `evidence_missing`."""
    try:
        col = await _dcap().get_collateral(pccs_url, raw)
    except DcapError:
        raise
    except Exception as e:  # noqa: BLE001 - any fetch failure is the same refusal
        raise DcapError("evidence_missing", f"collateral fetch from PCCS failed: {e}") from e
    return col.to_json()


def verify(raw: bytes, collateral: Any, now: float) -> DcapResult:
    """Verify a real quote's signature chain against `collateral` at time `now`."""
    try:
        report = _dcap().verify(raw, collateral, int(now))
    except (ValueError, RuntimeError) as e:
        text = str(e)
        code = "evidence_expired" if "expired" in text.lower() else "quote_invalid"
        raise DcapError(code, f"dcap-qvl: {text}") from e
    return DcapResult(getattr(report, "status", None),
                      tuple(getattr(report, "advisory_ids", ()) or ()))
