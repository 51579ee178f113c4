"""Driving a URL with `wrk` (C, keep-alive, closed loop; Debian package `wrk`): one `Run`.

Every script handed to `run` gets `DONE` appended, which prints the one line `run`
parses; failures (connect, read, write, timeouts, non-2xx/3xx answers) are counted
in `Run.errors`, never raised.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d\\n", summary.requests, summary.duration,
    latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, e.status))
end
"""
PROOF_LUA = """
math.randomseed(7)
request = function()
  return wrk.format("GET", string.format("/proof/%064x", math.random(0, {entries} - 1)))
end
"""
"""`GET /proof/{hash}` of random lookup keys below {entries} (the bulk loader's and the
replica bench's entries have these keys)."""


@dataclass
class Run:
    """One wrk run: requests, seconds, latency percentiles (ms), failures."""

    requests: int
    seconds: float
    p50: float
    p99: float
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def run(url: str, lua: str, seconds: float, conns: int, threads: int = 2) -> Run:
    """Drive `url` for `seconds` with `conns` connections and the given Lua script."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(lua + DONE)
    try:
        out = subprocess.run(["wrk", f"-t{min(threads, conns)}", f"-c{conns}",
                              f"-d{seconds:g}s", "--timeout", "10s", "-s", f.name, url],
                             capture_output=True, text=True, timeout=seconds + 60)
    finally:
        os.unlink(f.name)
    m = re.search(r"^RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$", out.stdout, re.M)
    if m is None:
        raise RuntimeError(f"wrk failed: {out.stdout[-400:]} {out.stderr[-400:]}")
    n, dur, p50, p99, errs, status = map(int, m.groups())
    return Run(n, dur / 1e6, p50 / 1000, p99 / 1000, errs + status)
