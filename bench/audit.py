"""Benchmark: auditor throughput on a generated 1M-entry log served locally.

    .venv/bin/python bench/audit.py [--entries 1048576]

Generates a C2SP tlog-tiles log on disk (tiles, entry bundles, signed
checkpoint), serves it with a threaded static HTTP server in another
process, and times `python -m verifier audit` against it, beside the
pure-Python baseline measured in the same run: leaf hashes + RFC 6962 root
in a plain hashlib loop over the same entries. Prints figures and peak RSS.
On two CPUs the auditor checks half the leaf tiles in a second process, so
its wall-time rate is on up to two cores against the one-core loop.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tlogutil import free_port, wait_http  # noqa: E402
from tlog import checkpoint, merkle, note, tiles  # noqa: E402

STATIC_APP = """
from pathlib import Path
ROOT = Path(__file__).parent

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    p = (ROOT / scope["path"].lstrip("/")).resolve()
    if ROOT in p.parents and p.is_file():
        body, status = p.read_bytes(), 200
    else:
        body, status = b"not found", 404
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
"""


def entries(n: int) -> list[bytes]:
    return [b'{"request_hash": "%064x", "n": %d}' % (i, i) for i in range(n)]


def baseline(data: list[bytes]) -> float:
    """Entries/s of leaf hashes + root in a plain hashlib loop (stack-based)."""
    sha = hashlib.sha256
    t = time.perf_counter()
    stack: list[bytes] = []
    for i, e in enumerate(data):
        h = sha(b"\x00" + e).digest()
        n = i
        while n & 1:
            h = sha(b"\x01" + stack.pop() + h).digest()
            n >>= 1
        stack.append(h)
    r = stack[-1]
    for left in reversed(stack[:-1]):
        r = sha(b"\x01" + left + r).digest()
    return len(data) / (time.perf_counter() - t)


def generate(d: Path, data: list[bytes]) -> note.Ed25519Signer:
    signer = note.generate_signer("bench.example/log")
    hashes = [merkle.leaf_hash(e) for e in data]
    for (lv, ix), blob in tiles.extend(0, hashes, lambda a, b: b"").items():
        p = d / tiles.path(lv, ix, len(blob) // 32)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(blob)
    for b in tiles.bundles_for_size(len(data)):
        p = d / str(b)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(tiles.encode_bundle(data[b.index * 256 : b.index * 256 + b.width]))
    cp = checkpoint.Checkpoint(signer.name, len(data), merkle.root(hashes))
    (d / "checkpoint").write_bytes(checkpoint.sign(cp, signer))
    return signer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--entries", type=int, default=1_048_576)
    args = ap.parse_args()
    data = entries(args.entries)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t = time.perf_counter()
        signer = generate(d, data)
        gen = time.perf_counter() - t
        base = baseline(data)
        del data
        port = free_port()
        (d / "static_app.py").write_text(STATIC_APP)
        server = subprocess.Popen([sys.executable, "-m", "uvicorn", "static_app:app", "--port",
                                   str(port), "--log-level", "warning", "--no-access-log"],
                                  cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http(f"http://127.0.0.1:{port}/checkpoint", server)
            results = {}
            for label, src in (("HTTP", f"http://127.0.0.1:{port}"), ("directory", str(d))):
                t = time.perf_counter()
                r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable, "-m", "verifier",
                                    "audit", "--log", src, "--vkey", signer.vkey],
                                   capture_output=True, text=True)
                dt = time.perf_counter() - t
                if r.returncode != 0:
                    sys.exit(f"audit failed: {r.stderr.strip()}")
                results[label] = (args.entries / dt, int(r.stderr.strip().splitlines()[-1]) / 1024)
        finally:
            server.terminate()
            server.wait(10)
    print(f"log of {args.entries} entries generated in {gen:.1f} s")
    print(f"baseline (hashlib leaf hashes + root)  : {base:11,.0f} entries/s")
    for label, (rate, rss) in results.items():
        print(f"verifier audit over {label:10s}        : {rate:11,.0f} entries/s "
              f"({rate / base:.2f}x baseline; target >= 400,000/s), peak RSS {rss:.0f} MiB")


if __name__ == "__main__":
    main()
