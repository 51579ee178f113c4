"""The soak command (`bench/soak.py`, docs/reliability.md) in short runs: kill -9 of the
gateway, its shipper, the log and the witness at random moments under mixed load, and the log away for
20 s under load. Each run checks, against the log's own database, that every acknowledged
call's receipt is logged exactly once and every checkpoint served is consistent with the
final log; here we also check that the faults really happened."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def soak(*args: str, timeout: float) -> dict:
    r = subprocess.run([sys.executable, "bench/soak.py", *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    lines = [x for x in r.stdout.splitlines() if x.startswith("{")]
    assert lines, f"no summary (exit {r.returncode}): {r.stderr[-2000:]}"
    summary = json.loads(lines[-1])
    assert r.returncode == (0 if summary["ok"] else 1)
    assert summary["died_on_their_own"] == {}, r.stderr[-4000:]  # with their output
    return summary


def check(summary: dict) -> None:
    assert summary["acknowledged"] > 100
    assert summary["acknowledged_missing"] == 0  # none lost
    assert summary["logged_twice"] == 0  # none twice
    assert summary["ids_acknowledged_twice"] == 0
    assert summary["receipts_in_log"] >= summary["acknowledged"]
    assert summary["checkpoints_seen"] > 5
    assert summary["checkpoints_inconsistent"] == 0
    assert summary["sigterm_exit"] == {"gateway": 0, "log": 0, "witness": 0}
    assert summary["ok"] is True


def test_kill_9_of_gateway_shipper_log_and_witness_under_mixed_load_loses_nothing() -> None:
    s = soak("crash", "--seconds", "40", "--seed", "7", timeout=300)
    check(s)
    assert all(n >= 1 for n in s["kills"].values()), s["kills"]  # every fault happened
    assert s["failed_calls"]  # and clients saw them


def test_log_away_20_s_under_load_receipts_wait_then_all_ship_once() -> None:
    s = soak("outage", "--seconds", "30", "--outage", "20", timeout=300)
    check(s)
    assert s["gateway_peaks"]["pag_gateway_log_down"] == 1
    assert s["gateway_peaks"]["pag_gateway_outbox_unlogged"] > 100  # they waited
    assert s["failed_calls"] == {}  # serve-and-queue: every call was served
