"""The `python -m gateway` command line: dispatch, argument and config errors."""

from __future__ import annotations

import argparse
import asyncio
import gc
import subprocess
import sys
from pathlib import Path

import pytest

from gateway import __main__ as cli
from gateway.api import server
from gateway.receipts.outbox import Outbox
from gateway.receipts.shipper import LogStatus
from tlog import note
from tlog.service import listen_address

LOG_VKEY = note.generate_signer("log.test").vkey

ROOT = Path(__file__).resolve().parents[1]


def test_listen_address() -> None:
    assert listen_address("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert listen_address("[::1]:9") == ("::1", 9)
    for bad in ("8080", "host:", ":80", "host:http", "host:65536"):
        with pytest.raises(argparse.ArgumentTypeError):
            listen_address(bad)


def test_dispatch_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_serve_rejects_a_bad_config_cleanly(tmp_path: Path) -> None:
    cfg = tmp_path / "g.toml"

    def serve(listen: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                               "--listen", listen], cwd=ROOT, capture_output=True, text=True,
                              timeout=60)

    cfg.write_text("[gateway]\nbogus = 1\n")
    r = serve("127.0.0.1:0")
    assert r.returncode == 2
    assert "unknown key 'bogus'" in r.stderr
    assert "Traceback" not in r.stderr
    cfg.write_text("[gateway]\nname = 'ok'\n")
    r = serve("nope")
    assert r.returncode == 2
    assert "expected HOST:PORT" in r.stderr


def test_bootstrap_against_the_dstack_simulator(tmp_path: Path) -> None:
    sim = pytest.importorskip("gateway.identity.dstack_sim")
    import asyncio
    import base64

    from gateway.api import config
    from verifier.tee import attestation

    async def go() -> None:
        sock = tmp_path / "d.sock"
        async with sim.SimulatorServer(sock, tmp_path / "sim"):
            (tmp_path / "g.toml").write_text(
                f'[dstack]\nendpoint = "{sock}"\n[log]\nvkey = "{LOG_VKEY}"\n'
                '[leases]\nredis_url = "redis://127.0.0.1:6379/0"\n')
            cfg = config.load(tmp_path / "g.toml")
            ident = await server.bootstrap(cfg)
            again = await server.bootstrap(cfg)
            doc = await ident.attest("00ff")
        pub = ident.receipt_key.public_key().public_bytes_raw()
        assert again.receipt_key.public_key().public_bytes_raw() == pub  # deterministic
        assert len(ident.lease_mac_key) == 32 and ident.lease_mac_key == again.lease_mac_key
        assert ident.lease_mac_key not in (ident.e2ee_private, ident.receipt_key.private_bytes_raw())
        assert doc["keyset"]["receipt_signing_key"] == base64.b64encode(pub).decode()
        assert doc["keyset"]["log_vkey"] == LOG_VKEY
        assert ident.gateway == {"app_id": doc["app_id"], "compose_hash": doc["compose_hash"],
                                 "keyset_hash": doc["keyset_hash"]}
        attestation.check(doc, nonce="00ff", allow_simulated=True)
    asyncio.run(go())


@pytest.mark.parametrize("require", [False, True])
def test_the_shipper_batches_unless_answers_wait_for_the_log(tmp_path: Path, monkeypatch,
                                                            require: bool) -> None:
    from gateway.api import config as gconfig
    from tests.test_gateway_fakes import LogRef, write_config

    ref = LogRef(url="http://127.0.0.1:9", vkey=note.generate_signer("log.test").vkey,
                 token="append-token")  # noqa: S106 - a test token
    extra = "require_log_inclusion = true\n" if require else ""
    cfg = gconfig.load(write_config(tmp_path, "http://127.0.0.1:9/v1", log=ref,
                                    extra_gateway=extra))
    started: list[list[str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, *a, **k: started.append(cmd))
    outbox = Outbox(tmp_path / "outbox")
    status = LogStatus(outbox, True)
    try:
        server.start_shipper(cfg, outbox, status)
    finally:
        outbox.close()
        asyncio.run(status.close())
    (cmd,) = started
    assert cmd[cmd.index("-m") + 1] == "gateway.receipts.shipper"
    assert ("--batch-interval" in cmd) == require
    if require:
        assert cmd[cmd.index("--batch-interval") + 1] == "0"


def test_the_startup_heap_is_frozen_out_of_full_collections() -> None:
    """What is alive when the gateway starts listening is moved out of the collector's
    generations (so full collections under load walk only what was made since)."""
    startup = [[i] for i in range(50_000)]  # lists: objects the collector tracks
    try:
        assert server.freeze_startup_heap() >= 50_000
        tracked = gc.get_objects(generation=2)
        assert not any(o is startup for o in tracked)
        assert not any(o is startup[7] for o in tracked)
        made_later = [[1]]
        gc.collect()
        assert any(o is made_later for o in gc.get_objects(generation=2))  # new ones are seen
    finally:
        gc.unfreeze()
