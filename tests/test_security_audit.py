"""`make audit` (scripts/audit.py): a known vulnerability fails, an audit that could not be
made is told apart (exit 3, a warning in CI), and only a complete clean audit passes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("audit_script", ROOT / "scripts" / "audit.py")
assert _spec is not None and _spec.loader is not None
audit = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = audit  # dataclasses look their module up there
_spec.loader.exec_module(audit)

CLEAN = {"name": "httpx", "version": "0.28.1", "vulns": []}


def test_a_known_vulnerability_fails() -> None:
    bad = {"name": "h11", "version": "0.14.0", "vulns": [
        {"id": "GHSA-vqfr-h8mv-ghfj", "fix_versions": ["0.16.0"]}]}
    v = audit.verdict({"dependencies": [CLEAN, bad]})
    assert v.status == audit.VULNERABLE == 1
    assert "h11 0.14.0: GHSA-vqfr-h8mv-ghfj (fixed in 0.16.0)" in v.lines


def test_a_vulnerability_wins_over_packages_not_checked() -> None:
    bad = {"name": "h11", "version": "0.14.0", "vulns": [{"id": "X-1", "fix_versions": []}]}
    skipped = {"name": "aiohttp", "skip_reason": "Dependency not found on PyPI"}
    v = audit.verdict({"dependencies": [skipped, bad]})
    assert v.status == 1 and "h11 0.14.0: X-1 (fixed in no release yet)" in v.lines


def test_an_audit_that_could_not_look_is_incomplete_not_clean() -> None:
    assert audit.verdict(None, "ConnectionError: cannot resolve").status == audit.INCOMPLETE
    assert audit.verdict({"oops": 1}).status == audit.INCOMPLETE
    skipped = {"name": "aiohttp", "skip_reason": "Dependency not found on PyPI"}
    v = audit.verdict({"dependencies": [CLEAN, skipped]})
    assert v.status == audit.INCOMPLETE == 3 and "1 of 2" in v.lines[0]


def test_only_a_complete_clean_audit_passes() -> None:
    v = audit.verdict({"dependencies": [CLEAN, dict(CLEAN, name="rfc8785")]})
    assert (v.status, v.lines) == (0, ("no known vulnerabilities in 2 locked packages",))


def test_the_lock_pins_every_installed_dependency_exactly() -> None:
    lines = [ln for ln in (ROOT / "requirements.lock").read_text().splitlines()
             if ln and not ln.startswith("#")]
    assert lines and all("==" in ln for ln in lines)
    names = {ln.split("==")[0].lower().replace("_", "-") for ln in lines}
    assert {"cryptography", "rfc8785", "httpx", "pyhpke", "uvicorn", "schemathesis",
            "pip-audit"} <= names
    assert "private-ai-gateway" not in names  # the project itself is not locked
