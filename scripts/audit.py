"""`make audit`: pip-audit over the locked dependency set (requirements.lock).

Exit status, so that CI can tell "vulnerable" from "could not look":

- 0: every locked package was checked and none has a known vulnerability;
- 1: at least one has (each is printed with its advisory ids and fixed versions);
- 3: the check is incomplete: pip-audit could not reach its vulnerability database,
  or the database does not know some packages (a package index mirror serving
  versions the database has never seen). Nothing vulnerable was found, but
  nothing is claimed clean either: a one-line warning says what was not checked.

`verdict` decides from pip-audit's JSON report alone (pure); `main` runs pip-audit
(`--no-deps --disable-pip`: the lock is complete and pinned, so nothing is resolved
or installed) and prints the verdict.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

VULNERABLE = 1
INCOMPLETE = 3


@dataclass(frozen=True)
class Verdict:
    """What an audit found: an exit status and the lines to print."""

    status: int
    lines: tuple[str, ...]


def verdict(report: dict[str, Any] | None, error: str = "") -> Verdict:
    """The verdict of a pip-audit JSON report (None: pip-audit produced none; `error` is
    the last line it printed)."""
    if report is None or not isinstance(report.get("dependencies"), list):
        return Verdict(INCOMPLETE, (f"WARNING: pip-audit could not check the locked "
                                    f"dependencies: {error or 'no report'}",))
    deps = report["dependencies"]
    vulnerable = [d for d in deps if d.get("vulns")]
    skipped = [d for d in deps if "skip_reason" in d]
    if vulnerable:
        lines = [f"{d['name']} {d['version']}: {v['id']} (fixed in "
                 f"{', '.join(v.get('fix_versions') or ['no release yet'])})"
                 for d in vulnerable for v in d["vulns"]]
        return Verdict(VULNERABLE, (f"{len(vulnerable)} locked package(s) with known "
                                    "vulnerabilities:", *lines))
    if skipped:
        names = ", ".join(sorted(d["name"] for d in skipped)[:5])
        return Verdict(INCOMPLETE, (f"WARNING: pip-audit's database does not know "
                                    f"{len(skipped)} of {len(deps)} locked packages "
                                    f"(e.g. {names}); they were not checked",))
    return Verdict(0, (f"no known vulnerabilities in {len(deps)} locked packages",))


def run_pip_audit(lock: Path, service: str) -> tuple[dict[str, Any] | None, str]:
    """pip-audit's JSON report of `lock` (or None) and the last line it printed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "report.json"
        proc = subprocess.run(  # noqa: S603 - our own interpreter running pip-audit, no shell
            [sys.executable, "-m", "pip_audit", "--no-deps", "--disable-pip", "--progress-spinner",
             "off", "-r", str(lock), "-s", service, "-f", "json", "-o", str(out)],
            capture_output=True, text=True, timeout=600, check=False)
        last = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        try:
            return json.loads(out.read_text()), last
        except (OSError, ValueError):
            return None, last


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lock", type=Path, default=Path("requirements.lock"))
    parser.add_argument("--service", default="pypi", choices=["pypi", "osv"],
                        help="vulnerability database pip-audit asks (default pypi)")
    args = parser.parse_args(argv)
    report, last = run_pip_audit(args.lock, args.service)
    v = verdict(report, last)
    for line in v.lines:
        print(line, file=sys.stderr if v.status else sys.stdout)
    return v.status


if __name__ == "__main__":
    sys.exit(main())
