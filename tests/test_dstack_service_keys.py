"""The log's and the witness's keys derived from the dstack KMS (`--dstack SOCKET`):
deterministic per app, distinct per service, never written to disk; what compose.yaml uses
to publish the public keys before the services start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DSTACK_SIMULATOR_ENDPOINT"}
    return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=60, env=env)


def test_vkeys_from_the_kms_are_stable_distinct_and_keep_no_secret(short_dir: Path) -> None:
    from gateway.identity.dstack_sim import SimulatorServer

    sock = short_dir / "agent.sock"
    server = SimulatorServer(sock, short_dir / "sim")
    server.start_in_thread()
    try:
        out: dict[str, list[str]] = {"tlog": [], "witness": []}
        for attempt in ("a", "b"):
            for service in out:
                d = short_dir / f"{service}-{attempt}"
                r = run(service, "vkey", "--data", str(d), "--dstack", str(sock))
                assert r.returncode == 0, r.stderr
                vkey = r.stdout.strip()
                out[service].append(vkey)
                published = (d / f"{'log' if service == 'tlog' else 'witness'}.vkey")
                assert published.read_text().strip() == vkey
                assert sorted(p.name for p in d.iterdir()) == [published.name]  # no secret
        assert out["tlog"][0] == out["tlog"][1]  # same app, same key, any directory
        assert out["witness"][0] == out["witness"][1]
        assert out["tlog"][0].split("+")[2] != out["witness"][0].split("+")[2]
        plain = run("witness", "vkey", "--data", str(short_dir / "plain"))
        assert plain.returncode == 0 and plain.stdout.strip() != out["witness"][0]
        assert (short_dir / "plain" / "witness.key").exists()
    finally:
        server.stop_in_thread()


@pytest.mark.parametrize("service", ["tlog", "witness"])
def test_an_absent_agent_is_one_line(short_dir: Path, service: str) -> None:
    r = run(service, "vkey", "--data", str(short_dir / "d"), "--dstack",
            str(short_dir / "absent.sock"))
    assert r.returncode == 1  # the environment refused (the services' exit codes)
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith(f"{service}: cannot derive the ") and "absent.sock" in r.stderr


def test_witness_vkey_may_name_the_file_a_witness_published(tmp_path: Path) -> None:
    """compose.yaml passes the witness key as the file `witness vkey` wrote."""
    from tlog.__main__ import parser, witness_pool

    r = run("witness", "vkey", "--data", str(tmp_path / "w"))
    vkey = r.stdout.strip()
    published = tmp_path / "w" / "witness.vkey"
    args = ["serve", "--data", str(tmp_path / "log"), "--listen", "127.0.0.1:0",
            "--witness", "http://127.0.0.1:1", "--quorum", "1"]
    by_file = witness_pool(parser().parse_args([*args, "--witness-vkey", str(published)]))
    inline = witness_pool(parser().parse_args([*args, "--witness-vkey", vkey]))
    assert by_file is not None and inline is not None
    assert [(v.name, v.key_id) for v in by_file.verifiers] == \
        [(v.name, v.key_id) for v in inline.verifiers]
    with pytest.raises(ValueError, match="bad --witness-vkey .*not a readable file"):
        witness_pool(parser().parse_args([*args, "--witness-vkey", str(tmp_path / "absent")]))
