"""`limit_malloc_arenas`: threads share at most that many glibc malloc arenas.

Each case runs in a fresh interpreter: six threads allocate and stay alive together (so
glibc would give each an arena of its own), then glibc's own `malloc_info` report says how
many arenas (`<heap nr=...>`) the process has.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = """
import ctypes, os, sys, tempfile, threading
from tlog.service import limit_malloc_arenas
if sys.argv[1] == "limit" and not limit_malloc_arenas():
    print("unsupported")
    raise SystemExit
together = threading.Barrier(6)
def work():
    keep = [bytearray(200) for _ in range(2000)]
    together.wait()
    del keep
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
fd, path = tempfile.mkstemp()
os.close(fd)
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print(open(path).read().count("<heap nr="))
os.unlink(path)
"""


def arenas(mode: str) -> str:
    return subprocess.run([sys.executable, "-c", SCRIPT, mode], cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=60).stdout.strip()


def test_threads_share_at_most_two_arenas() -> None:
    limited = arenas("limit")
    if limited == "unsupported":
        pytest.skip("the C library is not glibc: no mallopt(M_ARENA_MAX)")
    assert int(limited) <= 2
    assert int(arenas("default")) > 2  # the same threads without the limit
