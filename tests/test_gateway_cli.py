"""`gateway serve` fails in one clear line, never a traceback; `--version` everywhere."""

from __future__ import annotations

import importlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tlog import note
from verifier import version

ROOT = Path(__file__).resolve().parents[1]
HINT = ("python -m gateway demo", "python -m gateway.identity.dstack_sim")


def serve(cfg: Path, listen: str = "127.0.0.1:0") -> subprocess.CompletedProcess[str]:
    """`python -m gateway serve` run to its exit."""
    base = {k: v for k, v in os.environ.items() if k != "DSTACK_SIMULATOR_ENDPOINT"}
    return subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                           "--listen", listen], cwd=ROOT, capture_output=True, text=True,
                          timeout=60, env=base)


def one_line_error(r: subprocess.CompletedProcess[str], status: int = 1) -> str:
    """The single `gateway: ...` line of a failed start."""
    assert r.returncode == status, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("gateway: ")
    assert r.stdout == ""  # no false "listening" line
    return lines[0]


@pytest.fixture
def world_dir() -> Iterator[Path]:
    """A directory every user can read (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="pag-cli-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


LOG_VKEY = note.generate_signer("pag.local/log").vkey


def config(d: Path, data_dir: str = "data", dstack: str | None = None) -> Path:
    """A config whose log is never reached: every failure tested comes first."""
    cfg = d / "gateway.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "{data_dir}"\n'
                   + (f'[dstack]\nendpoint = "{dstack}"\n' if dstack else "")
                   + f'[log]\nurl = "http://127.0.0.1:9"\nvkey = "{LOG_VKEY}"\n')
    cfg.chmod(0o644)
    return cfg


def test_port_in_use_is_one_line_before_anything_starts(world_dir: Path) -> None:
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        port = held.getsockname()[1]
        line = one_line_error(serve(config(world_dir, dstack=str(world_dir / "none.sock")),
                                    f"127.0.0.1:{port}"))
    finally:
        held.close()
    assert line == f"gateway: cannot listen on 127.0.0.1:{port}: address already in use"


def test_unknown_listen_host_is_one_line(world_dir: Path) -> None:
    line = one_line_error(serve(config(world_dir), "no-such-host.invalid:8080"))
    assert line.startswith("gateway: cannot listen on no-such-host.invalid:8080")


def test_data_dir_that_is_a_file_is_one_line(world_dir: Path) -> None:
    (world_dir / "afile").write_text("x")
    line = one_line_error(serve(config(world_dir, data_dir="afile")))
    assert line == f"gateway: data directory {world_dir / 'afile'} is not a directory"
    line = one_line_error(serve(config(world_dir, data_dir="afile/sub")))
    assert "cannot create data directory" in line and "not a directory" in line


def unwritable_dir(world_dir: Path) -> Path:
    """A directory this process cannot write to (root writes anywhere except sysfs)."""
    if os.geteuid() != 0:
        locked = world_dir / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        return locked
    try:
        os.close(tempfile.mkstemp(dir="/sys/fs")[0])
    except OSError:
        return Path("/sys/fs")
    pytest.skip("running as root with a writable /sys/fs: no directory root cannot write")


def test_data_dir_not_writable_is_one_line(world_dir: Path) -> None:
    locked = unwritable_dir(world_dir)
    line = one_line_error(serve(config(world_dir, data_dir=str(locked))))
    assert line.startswith(f"gateway: data directory {locked} is not writable: ")
    line = one_line_error(serve(config(world_dir, data_dir=str(locked / "pag-sub"))))
    assert line.startswith(f"gateway: cannot create data directory {locked / 'pag-sub'}: ")


def test_missing_dstack_socket_says_so_and_hints_at_demo_and_simulator(world_dir: Path) -> None:
    sock = world_dir / "dstack.sock"
    line = one_line_error(serve(config(world_dir, dstack=str(sock))))
    assert f"no dstack guest agent socket at {sock}" in line
    assert all(h in line for h in HINT)
    assert (world_dir / "data").is_dir()  # the data directory was checked first


def test_default_dstack_socket_outside_a_tee(world_dir: Path) -> None:
    from dstack_sdk.dstack_client import get_endpoint

    default = get_endpoint(None) if "DSTACK_SIMULATOR_ENDPOINT" not in os.environ else None
    if default is None or os.path.exists(default):
        pytest.skip("this machine has a dstack guest agent socket")
    line = one_line_error(serve(config(world_dir)))
    assert f"no dstack guest agent socket at {default}" in line
    assert all(h in line for h in HINT)


def test_a_socket_nobody_answers_is_one_line(world_dir: Path) -> None:
    sock = world_dir / "dead.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock))  # bound, never listening: connections are refused
    try:
        line = one_line_error(serve(config(world_dir, dstack=str(sock))))
    finally:
        s.close()
    assert f"the dstack guest agent at {sock} did not give the gateway its keys" in line
    assert all(h in line for h in HINT)


def test_version_on_gateway_and_verifier() -> None:
    for module, name in (("gateway", "pag-gateway"), ("verifier", "pag-verify")):
        r = subprocess.run([sys.executable, "-m", module, "--version"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout) == (0, f"{name} {version()}\n")
    assert version() != "unknown"


def test_console_scripts_name_real_entry_points() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"pag-gateway", "pag-tlog", "pag-witness", "pag-verify"}
    for target in scripts.values():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func))
    bindir = Path(sys.executable).parent
    installed = [bindir / s for s in ("pag-gateway", "pag-verify")]
    if not all(p.exists() for p in installed):
        pytest.skip("console scripts not installed: run `pip install -e '.[dev]'` again")
    for script in installed:
        r = subprocess.run([str(script), "--version"], capture_output=True, text=True,
                           timeout=60)
        assert (r.returncode, r.stdout) == (0, f"{script.name} {version()}\n")
    r = subprocess.run([str(bindir / "pag-tlog"), "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "serve" in r.stdout
