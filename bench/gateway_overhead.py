"""What the gateway adds per call: the demo provider directly, through the gateway
(receipts signed, committed and logged), and through LiteLLM's proxy.

    .venv/bin/python bench/gateway_overhead.py [--duration 5] [--rounds 2]
        [--concurrency 1,16,64] [--litellm-venv .bench-venv] [--profile 8]
        [--profile-concurrency 16]

Starts `python -m gateway demo` in a temporary DIR (and, when its venv has it,
`litellm --num_workers 1` in front of the same provider), then drives each
target with `wrk` (C, one thread, keep-alive, closed loop), taking turns per
round so machine noise hits all alike. Prints p50/p99 latency, req/s and
errors per target and concurrency, the p50 the gateway adds over the direct
call, its throughput against LiteLLM's, CPU per request of each serving
process (from /proc), and where the gateway's CPU goes (py-spy, when present).

LiteLLM lives in its own venv, never in .venv:
    python3 -m venv .bench-venv && .bench-venv/bin/pip install 'litellm[proxy]' py-spy
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CLK = os.sysconf("SC_CLK_TCK")
REFERENCE_LITELLM_RPS = 145  # issue 6: LiteLLM 1.108.7, one worker, this machine
PROMPT = "Benchmark request: reply with the canned demo answer."
LUA = """wrk.method = "POST"
wrk.body = [==[{body}]==]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer {key}"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %d %d %d %d\\n", summary.requests,
    summary.duration, latency:percentile(50), latency:percentile(99), e.connect, e.read,
    e.write, e.status, e.timeout))
end
"""


@dataclass
class Target:
    """One way to reach the provider."""

    name: str
    url: str
    model: str
    key: str
    pids: list[int]


@dataclass
class Result:
    """One wrk run."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of the processes so far (0 for vanished ones)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            f = Path(f"/proc/{pid}/stat").read_text()
            fields = f[f.rindex(")") + 2:].split()
            total += int(fields[11]) + int(fields[12])
    return total / CLK


def children_of(pid: int) -> list[int]:
    """Direct children of `pid` (from /proc)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                f = Path(f"/proc/{entry}/stat").read_text()
                if int(f[f.rindex(")") + 2:].split()[1]) == pid:
                    out.append(int(entry))
    return out


def cmdline(pid: int) -> str:
    """The command line of a process."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def wrk(target: Target, concurrency: int, duration: int, script_dir: Path) -> Result:
    """Drive `target` with wrk at `concurrency` for `duration` seconds."""
    body = json.dumps({"model": target.model,
                       "messages": [{"role": "user", "content": PROMPT}]})
    script = script_dir / f"{target.name}.lua"
    script.write_text(LUA.format(body=body, key=target.key))
    before = cpu_seconds(target.pids)
    r = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{duration}s", "--timeout", "10s",
                        "-s", str(script), target.url + "/chat/completions"],
                       capture_output=True, text=True, timeout=duration + 60)
    cpu = cpu_seconds(target.pids) - before
    m = re.search(r"^RESULT (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+) (\d+)$",
                  r.stdout, re.M)
    if m is None:
        raise RuntimeError(f"wrk failed: {r.stdout[-500:]} {r.stderr[-500:]}")
    n, dur, p50, p99, *errs = map(int, m.groups())
    return Result(n, dur / 1e6, p50 / 1000, p99 / 1000, sum(errs),
                  1000 * cpu / n if n else 0.0)


class Demo:
    """`python -m gateway demo [ARGS]` in a temporary DIR."""

    def __init__(self, data: Path, *args: str) -> None:
        self.err = (data.parent / f"{data.name}.stderr").open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--data", str(data),
             "--listen", "127.0.0.1:0", *args], cwd=ROOT, stdout=subprocess.PIPE,
            stderr=self.err, stdin=subprocess.DEVNULL)
        q: queue.Queue[bytes] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=lambda: q.put(self.proc.stdout.readline()), daemon=True).start()
        try:
            line = q.get(timeout=180)
        except queue.Empty:
            line = b""
        if not line:
            self.stop()
            raise RuntimeError("the demo did not start; see " + str(data.parent / "demo.stderr"))
        self.ready = json.loads(line)
        self.admin_key = (data / "admin_key").read_text().strip()
        kids = {cmdline(p): p for p in children_of(self.proc.pid)}
        # module names of this tree and of older ones (bench runs against both)
        self.pids = {name: next(p for c, p in kids.items() if re.search(pat, c))
                     for name, pat in (("gateway", r"gateway serve"),
                                       ("provider", r"gateway\.demo[._]provider"),
                                       ("tlog", r"tlog serve"), ("witness", r"witness serve"))}
        self.pids["shipper"] = next(
            (p for p in children_of(self.pids["gateway"])
             if re.search(r"gateway\.(receipts\.)?shipper", cmdline(p))), 0)

    def status(self) -> dict:
        """The gateway's GET /v1/routes (receipt counts, log state)."""
        return httpx.get(self.ready["gateway"] + "/v1/routes", timeout=30,
                         headers={"Authorization": f"Bearer {self.admin_key}"}).json()

    def stop(self) -> None:
        """SIGTERM the demo (it stops its parts) and wait."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.err.close()


class LiteLLM:
    """LiteLLM's proxy, one worker, in front of the demo provider."""

    def __init__(self, venv: Path, provider: str, port: int, work: Path) -> None:
        self.key = "sk-bench-" + secrets.token_hex(16)
        cfg = work / "litellm.yaml"
        cfg.write_text(
            "model_list:\n"
            "  - model_name: demo-chat\n"
            "    litellm_params:\n"
            "      model: openai/demo-chat-1\n"
            f"      api_base: {provider}\n"
            "      api_key: unused\n"
            "general_settings:\n"
            f"  master_key: {self.key}\n"
            "litellm_settings:\n"
            "  telemetry: false\n"
            "  drop_params: true\n")
        env = dict(os.environ, LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_LOG="ERROR",
                   DISABLE_SCHEMA_UPDATE="true", LITELLM_TELEMETRY="False")
        env.pop("DATABASE_URL", None)
        self.log = (work / "litellm.log").open("wb")
        self.proc = subprocess.Popen(
            [str(venv / "bin" / "litellm"), "--config", str(cfg), "--host", "127.0.0.1",
             "--port", str(port), "--num_workers", "1"], stdout=self.log, stderr=self.log,
            stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = (work / "litellm.log").read_text(errors="replace").strip()[-600:]
                raise RuntimeError(f"litellm exited: {tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health/liveliness", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError("litellm did not become ready")

    def pids(self) -> list[int]:
        """The proxy process and any workers."""
        return [self.proc.pid, *children_of(self.proc.pid)]

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after 10 s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def profile(py_spy: str, pid: int, seconds: float, out: Path) -> list[tuple[float, float, str]]:
    """Sample `pid` with py-spy; (self %, inclusive %, function) of the hottest functions."""
    r = subprocess.run([py_spy, "record", "-p", str(pid), "-d", str(int(seconds)), "-r", "500",
                        "-f", "raw", "-o", str(out), "--nonblocking"],
                       capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(r.stderr.strip()[-300:] or "py-spy failed")
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [re.sub(r" \((.*?)/([^/]+):\d+\)$", r" (\2)", f) for f in stack.split(";")]
        if frames:
            selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return []
    return [(100 * c / total, 100 * incl[f] / total, f) for f, c in selfc.most_common(25)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=int, default=5, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=2, help="turns per concurrency")
    ap.add_argument("--concurrency", default="1,16,64")
    ap.add_argument("--litellm-venv", type=Path, default=ROOT / ".bench-venv")
    ap.add_argument("--profile", type=int, default=8,
                    help="seconds of py-spy sampling per process (0: none)")
    ap.add_argument("--profile-concurrency", type=int, default=16,
                    help="wrk clients while profiling")
    ap.add_argument("--top", type=int, default=15, help="profile entries to print")
    a = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("bench: wrk not found (apt-get install -y wrk)", file=sys.stderr)
        return 2
    levels = [int(c) for c in a.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="pag-bench-"))
    demo = Demo(work / "demo")
    litellm: LiteLLM | None = None
    try:
        ready = demo.ready
        targets = [Target("direct", ready["provider"], "demo-chat-1", "unused",
                          [demo.pids["provider"]]),
                   Target("gateway", ready["gateway"] + "/v1", "demo-chat", ready["api_key"],
                          [demo.pids["gateway"]])]
        if (a.litellm_venv / "bin" / "litellm").exists():
            try:
                litellm = LiteLLM(a.litellm_venv, ready["provider"], free_port(), work)
                targets.append(Target("litellm", litellm.url + "/v1", "demo-chat", litellm.key,
                                      litellm.pids()))
            except RuntimeError as e:
                print(f"bench: LiteLLM unavailable ({e}); gateway figures only")
        else:
            print(f"bench: no LiteLLM in {a.litellm_venv}; gateway figures only "
                  "(python3 -m venv .bench-venv && .bench-venv/bin/pip install "
                  "'litellm[proxy]' py-spy)")
        side = {n: demo.pids[n] for n in ("shipper", "tlog", "witness")}
        for t in targets:  # warm up connections, leases and caches
            wrk(t, 4, 1, work)
        print(f"bench: {os.cpu_count()} CPUs, wrk -t1, {a.duration:g} s x {a.rounds} rounds, "
              f"targets {', '.join(t.name for t in targets)}")
        results: dict[tuple[str, int], list[Result]] = collections.defaultdict(list)
        side_cpu: dict[tuple[int, str], float] = collections.defaultdict(float)
        gateway_requests: dict[int, int] = collections.defaultdict(int)
        for c in levels:
            for _ in range(a.rounds):
                for t in targets:
                    before = {n: cpu_seconds([p]) for n, p in side.items()}
                    res = wrk(t, c, a.duration, work)
                    if t.name == "gateway":
                        for n, p in side.items():
                            side_cpu[(c, n)] += cpu_seconds([p]) - before[n]
                        gateway_requests[c] += res.requests
                    results[(t.name, c)].append(res)
        print()
        print(f"{'target':8} {'conc':>4} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>9} "
              f"{'errors':>7} {'CPU ms/req':>10}")
        summary: dict[int, dict[str, Result]] = {}
        for c in levels:
            summary[c] = {}
            for t in targets:
                rs = results[(t.name, c)]
                n = sum(r.requests for r in rs)
                secs = sum(r.seconds for r in rs)
                agg = Result(n, secs, sorted(r.p50_ms for r in rs)[len(rs) // 2],
                             max(r.p99_ms for r in rs), sum(r.errors for r in rs),
                             sum(r.cpu_ms * r.requests for r in rs) / n if n else 0.0)
                summary[c][t.name] = agg
                print(f"{t.name:8} {c:>4} {agg.p50_ms:>8.3f} {agg.p99_ms:>8.3f} "
                      f"{agg.rps:>9.0f} {agg.errors:>7} {agg.cpu_ms:>10.3f}")
        print()
        for c in levels:
            s = summary[c]
            line = (f"c={c}: gateway adds {s['gateway'].p50_ms - s['direct'].p50_ms:+.3f} ms "
                    f"at p50 over direct; runs at {s['gateway'].rps / s['direct'].rps:.2f}x "
                    f"direct throughput")
            if "litellm" in s:
                line += (f"; LiteLLM adds {s['litellm'].p50_ms - s['direct'].p50_ms:+.3f} ms; "
                         f"gateway/LiteLLM throughput {s['gateway'].rps / s['litellm'].rps:.1f}x")
            print(line)
            if gateway_requests[c]:
                per = {n: 1000 * side_cpu[(c, n)] / gateway_requests[c] for n in side}
                print("      receipt logging CPU per gateway request: "
                      + ", ".join(f"{n} {v:.3f} ms" for n, v in per.items())
                      + f" (gateway itself {s['gateway'].cpu_ms:.3f} ms)")
        deadline = time.monotonic() + 60
        st = demo.status()
        while st.get("unlogged") and time.monotonic() < deadline:
            time.sleep(1)
            st = demo.status()
        print(f"receipts: {st.get('receipts')} committed, {st.get('unlogged')} not yet logged "
              f"(log_down={st.get('log_down')})")
        targets_line = []
        if 1 in summary:
            added = summary[1]["gateway"].p50_ms - summary[1]["direct"].p50_ms
            targets_line.append(f"added p50 at c=1 {added:.3f} ms "
                                f"({'met' if added <= 1.0 else 'MISSED'}: <= 1 ms)")
        if 16 in summary and "litellm" in summary[16]:
            ratio = summary[16]["gateway"].rps / summary[16]["litellm"].rps
            targets_line.append(f"c=16 throughput {ratio:.1f}x LiteLLM as measured here "
                                f"({'met' if ratio >= 10 else 'MISSED'}: >= 10x)")
        if 16 in summary:
            ref = summary[16]["gateway"].rps / REFERENCE_LITELLM_RPS
            targets_line.append(f"{ref:.1f}x the issue's {REFERENCE_LITELLM_RPS} req/s "
                                f"LiteLLM figure ({'met' if ref >= 10 else 'MISSED'})")
        if 64 in summary:
            errs = summary[64]["gateway"].errors
            targets_line.append(f"errors at c=64: {errs} ({'met' if errs == 0 else 'MISSED'})")
        print("targets: " + "; ".join(targets_line))
        spy = a.litellm_venv / "bin" / "py-spy"
        if a.profile > 0 and spy.exists():
            for name in ("gateway", "shipper", "tlog"):
                load = threading.Thread(target=wrk, args=(targets[1], a.profile_concurrency,
                                                          a.profile + 2, work))
                load.start()
                time.sleep(1)
                try:
                    top = profile(str(spy), demo.pids[name], a.profile, work / f"{name}.prof")
                    print(f"\n{name} CPU profile under gateway load at "
                          f"c={a.profile_concurrency} (py-spy, "
                          f"{a.profile} s; self % / inclusive % of samples; top {a.top}):")
                    for s_pct, i_pct, fn in top[:a.top]:
                        print(f"  {s_pct:5.1f} {i_pct:5.1f}  {fn}")
                except (RuntimeError, subprocess.TimeoutExpired) as e:
                    print(f"\nprofile: py-spy failed on {name}: {e}")
                load.join()
        elif a.profile > 0:
            print(f"\nprofile: no py-spy in {a.litellm_venv}")
    finally:
        if litellm is not None:
            litellm.stop()
        demo.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
