"""The auditor's second process changes nothing but speed: the same state for a good
log, the same one-line reason for the first bad tile whichever process read it, and a
helper that dies leaves the parent to check its tiles (never a verdict without them)."""

from __future__ import annotations

import asyncio
import functools
import http.server
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.attested_log import write_log
from tlog import note, tiles
from verifier import audit

FULL = 20  # full leaf tiles; the helper takes the later 9 when it runs
SIZE = FULL * tiles.WIDTH + 37
ONE_PROCESS = 1 << 40


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, note.Ed25519Signer]:
    signer = note.generate_signer("example.com/split")
    write_log(tmp_path, signer, [b"entry %d" % i for i in range(SIZE)])
    return tmp_path, signer


@pytest.fixture
def http_base(log: tuple[Path, note.Ed25519Signer]) -> Iterator[str]:
    handler = functools.partial(_Quiet, directory=str(log[0]))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def run(base: str, signer: note.Ed25519Signer, split_from: int,
        state: audit.State | None = None) -> audit.State:
    async def go() -> audit.State:
        fetcher = audit.Fetcher(base)
        try:
            return await audit.audit(fetcher, note.verifier_from_vkey(signer.vkey), state=state,
                                     second_process_from=split_from)
        finally:
            await fetcher.close()
    return asyncio.run(go())


def reason(base: str, signer: note.Ed25519Signer, split_from: int) -> str:
    with pytest.raises(audit.AuditError) as e:
        run(base, signer, split_from)
    return str(e.value)


def flip(p: Path, at: int) -> None:
    data = bytearray(p.read_bytes())
    data[at] ^= 1
    p.write_bytes(bytes(data))


@pytest.fixture(autouse=True)
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split needs two CPUs; these tests check it on any machine."""
    monkeypatch.setattr(audit, "_cpus", lambda: 2)


def test_split_audit_gives_the_state_of_one_process(log, http_base) -> None:
    d, signer = log
    one = run(str(d), signer, ONE_PROCESS)
    assert one.size == SIZE
    for base in (str(d), http_base):
        assert run(base, signer, 2).to_json() == one.to_json()


def test_split_audit_resumes_from_a_state_inside_a_tile(log) -> None:
    d, signer = log
    part = d.parent / "part"
    part.mkdir()
    write_log(part, signer, [b"entry %d" % i for i in range(300)])
    old = run(str(part), signer, ONE_PROCESS)
    assert run(str(d), signer, 2, state=old).to_json() == run(str(d), signer, ONE_PROCESS).to_json()


@pytest.mark.parametrize("tile", [3, 15, FULL - 1])  # the parent's part, the helper's, its last
@pytest.mark.parametrize("kind", ["entries", "0"])
def test_a_bad_tile_gives_the_reason_of_one_process(log, http_base, tile: int, kind: str) -> None:
    d, signer = log
    flip(d / f"tile/{kind}/{tiles.encode_index(tile)}", 40)
    want = reason(str(d), signer, ONE_PROCESS)
    assert "does not match its hash" in want
    assert reason(str(d), signer, 2) == want
    assert reason(http_base, signer, 2) == want


def test_the_first_bad_tile_is_reported_when_both_parts_lie(log) -> None:
    d, signer = log
    flip(d / "tile/0/004", 40)  # the hash of entry 4 * 256 + 1
    flip(d / "tile/entries/016", 40)
    assert reason(str(d), signer, 2) == reason(str(d), signer, ONE_PROCESS)
    assert "entry 1025 " in reason(str(d), signer, 2)


def test_a_missing_tile_in_the_helpers_part_is_refused(log) -> None:
    d, signer = log
    (d / "tile/entries/017").unlink()
    assert reason(str(d), signer, 2) == "tile/entries/017: cannot read (No such file or directory)"


def test_a_helper_that_dies_leaves_its_tiles_to_the_parent(log, monkeypatch) -> None:
    d, signer = log
    started = audit._SecondProcess.start  # noqa: SLF001
    killed: list[int] = []

    async def start_and_kill(base: str, first: int, stop: int) -> audit._SecondProcess | None:  # noqa: SLF001
        helper = await started(base, first, stop)
        assert helper is not None
        pid = helper._proc.pid  # noqa: SLF001
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        return helper

    monkeypatch.setattr(audit._SecondProcess, "start", staticmethod(start_and_kill))  # noqa: SLF001
    assert run(str(d), signer, 2).to_json() == run(str(d), signer, ONE_PROCESS).to_json()
    flip(d / "tile/0/017", 40)
    assert "entry 4353 " in reason(str(d), signer, 2)
    assert len(killed) == 2


def test_a_helper_that_cannot_start_leaves_its_tiles_to_the_parent(log, monkeypatch) -> None:
    d, signer = log
    monkeypatch.setattr(audit.sys, "executable", "/nonexistent/python")
    assert run(str(d), signer, 2).to_json() == run(str(d), signer, ONE_PROCESS).to_json()


def test_the_helper_answers_roots_or_the_reason_on_stdout(log) -> None:
    d, signer = log
    one = subprocess.run([sys.executable, "-c", "from verifier.audit import _second_process_main "
                          "as m; m(*__import__('sys').argv[1:])", str(d), "3", "5"],
                         capture_output=True, check=True)
    full = [tiles.run_root((d / tiles.path(0, n)).read_bytes()) for n in (3, 4)]
    assert one.stdout == b"roots\n" + b"".join(full)
    flip(d / "tile/entries/004", 40)
    bad = subprocess.run([sys.executable, "-c", "from verifier.audit import _second_process_main "
                          "as m; m(*__import__('sys').argv[1:])", str(d), "3", "5"],
                         capture_output=True, check=True)
    assert bad.stdout.startswith(b"error\ntile/entries/004: ")
