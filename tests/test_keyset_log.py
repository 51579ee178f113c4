"""The gateway's keyset entry: appended (with a quote bound to the log's checkpoint) before
the first receipt, reused across restarts, awaited while the log is down, and named by
every receipt's `keyset_index`."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dstack_sdk
import httpx
import pytest

from gateway.api.apikeys import hash_key
from gateway.api.routes import now_rfc3339
from gateway.identity import attestation as identity_attestation
from gateway.identity import keys
from gateway.identity.dstack_sim import SimulatorServer
from gateway.receipts import keysets
from gateway.receipts.logclient import LogClient, LogError
from tests.test_gateway_fakes import API_KEY, FakeLog, FakeProvider, run_gateway, write_config
from tests.tlogutil import free_port, start, stop
from tlog import note, tiles
from verifier import keyset_entry, receipt
from witness import cosignature

ROOT = Path(__file__).resolve().parents[1]
WITNESS = cosignature.generate_signer("witness.test/k")


def _sim_run(short_dir: Path, fn: Any, compose_hash: str | None = None) -> Any:
    """`fn(attest, keyset_hash)` against a fresh dstack simulator (real simulated quotes)."""
    sock = short_dir / "s.sock"

    async def run() -> Any:
        async with SimulatorServer(sock, short_dir / "sim", app_name="pag-keyset-test",
                                   compose_hash=compose_hash):
            client = dstack_sdk.AsyncDstackClient(str(sock))
            gk = await keys.load(client, log_vkey="")

            async def attest(nonce: str | None) -> dict[str, Any]:
                return await identity_attestation.build(client, gk, nonce)

            return await fn(attest, gk.keyset_hash())

    return asyncio.run(run())


def test_keyset_entry_is_attested_over_the_logs_checkpoint_and_reused(short_dir: Path) -> None:
    data = short_dir / "gw"

    async def fn(attest: Any, kh: str) -> None:
        log = FakeLog(witness=WITNESS)
        await log.start()
        client = LogClient(log.url, log.token, log.vkey, [WITNESS.vkey], 1)
        try:
            rec = await keysets.ensure_logged(client, attest, kh, log.vkey, data, now_rfc3339)
            assert len(log.entries) == 1 and rec.index == 0
            obj = json.loads(log.entries[0])
            facts = keyset_entry.check(obj, log_verifier=note.verifier_from_vkey(log.vkey),
                                       allow_simulated=True)
            assert facts.keyset_hash == kh
            # a restart with the same keyset and log appends nothing
            again = await keysets.ensure_logged(client, attest, kh, log.vkey, data, now_rfc3339)
            assert again == rec and len(log.entries) == 1
            # another keyset (or another log) is appended anew
            other = await keysets.ensure_logged(client, attest, kh, log.vkey, short_dir / "o",
                                                now_rfc3339)
            assert other.index == 1 and len(log.entries) == 2
            assert keysets.load_record(data, "00" * 32, log.vkey) is None
            assert keysets.load_record(data, kh, note.generate_signer("x").vkey) is None
            # a record whose proof does not verify under the log key is not trusted
            doc = json.loads((data / keysets.RECORD_FILE).read_text())
            doc["proof"] = doc["proof"].replace("index 0", "index 1")
            (data / keysets.RECORD_FILE).write_text(json.dumps(doc))
            assert keysets.load_record(data, kh, log.vkey) is None
        finally:
            await client.close()
            await log.stop()

    _sim_run(short_dir, fn)


def test_an_unwitnessed_or_forged_append_is_not_taken_as_logged(short_dir: Path) -> None:
    async def fn(attest: Any, kh: str) -> None:
        log = FakeLog(witness=WITNESS)
        log.cosign = False
        await log.start()
        client = LogClient(log.url, log.token, log.vkey, [WITNESS.vkey], 1)
        liar = LogClient(log.url, log.token, note.generate_signer("fake.log/test").vkey)
        try:
            with pytest.raises(LogError) as e:
                await keysets.append_keyset(client, attest, kh, now_rfc3339)
            assert e.value.code == "log_unwitnessed"
            with pytest.raises(LogError) as e:  # a checkpoint the configured key did not sign
                await keysets.append_keyset(liar, attest, kh, now_rfc3339)
            assert e.value.code == "log_proof_invalid"
            with pytest.raises(LogError) as e:  # not the gateway's own keyset
                await keysets.append_keyset(client, attest, "11" * 32, now_rfc3339)
            assert e.value.code == "keyset_mismatch"
        finally:
            await client.close()
            await liar.close()
            await log.stop()

    _sim_run(short_dir, fn)


RELEASE = json.dumps({"docker_compose_file": (
    "services:\n  gateway:\n    image: ghcr.io/pag/gateway@sha256:" + "ab" * 32 + "\n"
    "  tlog:\n    image: 'ghcr.io/pag/tlog@sha256:" + "cd" * 32 + "'\n"
    "  cache:\n    image: redis:7\n"), "name": "pag"})


def test_keyset_entry_lists_the_attested_release(short_dir: Path) -> None:
    """Release transparency: the app-compose document whose hash the quote attests, and the
    images it pins by digest, are in the entry; a document or listing that is not the
    attested one is refused."""
    compose_hash = hashlib.sha256(RELEASE.encode()).hexdigest()
    log = FakeLog()
    cp = log.signed_checkpoint()

    async def fn(attest: Any, kh: str) -> dict[str, Any]:
        return keyset_entry.build(await attest(keyset_entry.nonce_for(cp)), cp,
                                  "2026-12-04T00:00:00Z", RELEASE)

    obj = _sim_run(short_dir, fn, compose_hash)
    log_key = note.verifier_from_vkey(log.vkey)
    facts = keyset_entry.check(obj, log_verifier=log_key, allow_simulated=True)
    assert facts.compose_hash == compose_hash
    assert obj["image_digests"] == {"ghcr.io/pag/gateway": "sha256:" + "ab" * 32,
                                    "ghcr.io/pag/tlog": "sha256:" + "cd" * 32}
    for mutate in (lambda o: o.__setitem__("app_compose", RELEASE.replace("ab", "ef")),
                   lambda o: o["image_digests"].__setitem__("ghcr.io/pag/gateway", "sha256:0"),
                   lambda o: o.pop("app_compose")):
        bad = json.loads(json.dumps(obj))
        mutate(bad)
        with pytest.raises(keyset_entry.KeysetEntryError) as e:
            keyset_entry.check(bad, log_verifier=log_key, allow_simulated=True)
        assert e.value.code == "release_mismatch"


def test_start_up_waits_for_the_log(short_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keysets, "BACKOFF_START", 0.02)
    monkeypatch.setattr(keysets, "BACKOFF_MAX", 0.05)

    async def fn(attest: Any, kh: str) -> None:
        log = FakeLog()
        client = LogClient(log.url, log.token, log.vkey)
        task = asyncio.create_task(keysets.ensure_logged(client, attest, kh, log.vkey,
                                                         short_dir / "gw", now_rfc3339))
        try:
            await asyncio.sleep(0.3)
            assert not task.done()  # the log is down: no index, so nothing may be signed
            await log.start()
            rec = await asyncio.wait_for(task, 20)
            assert rec.index == 0 and json.loads(log.entries[0])["keyset_hash"] == kh
        finally:
            task.cancel()
            await client.close()
            await log.stop()

    _sim_run(short_dir, fn)


def test_every_receipt_names_the_logged_keyset_entry_of_its_key(tmp_path: Path) -> None:
    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, log=log)
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                for body in (b'{"model":"chat-model","messages":[{"role":"user","content":"a"}]}',
                             b'{"model":"nope","messages":[{"role":"user","content":"a"}]}'):
                    r = await c.post(gw.url + "/v1/chat/completions", content=body,
                                     headers={"Authorization": f"Bearer {API_KEY}"})
                    doc = (await c.get(f"{gw.url}/v1/receipts/{r.headers['x-receipt-id']}",
                                       headers={"Authorization": f"Bearer {API_KEY}"})).json()
                    rc = doc["receipt"]
                    receipt.check_shape(rc)
                    entry = json.loads(log.entries[rc["keyset_index"]])
                    assert entry["v"] == keyset_entry.VERSION
                    assert entry["keyset"]["receipt_signing_key"] == rc["signature"]["key"]
                    assert entry["keyset_hash"] == rc["gateway"]["keyset_hash"]
                att = (await c.get(gw.url + "/.well-known/attestation")).json()
                assert att["keyset_index"] == gw.keyset_index
        finally:
            await prov.stop()
            await log.stop()
    asyncio.run(go())


def test_gateway_serve_listens_only_once_its_keyset_is_logged(short_dir: Path) -> None:
    """A real `gateway serve` on the dstack simulator: while the log is down it does not
    listen; once the log answers, the keyset entry is logged first and its index is in the
    ready line, the attestation and every receipt; a restart reuses the entry."""
    sock = short_dir / "d.sock"
    sim = subprocess.Popen([sys.executable, "-m", "gateway.identity.dstack_sim", "--socket",
                            str(sock), "--data", str(short_dir / "sim")], cwd=ROOT,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           start_new_session=True)
    tdata = short_dir / "tlog"
    vkey = subprocess.run([sys.executable, "-m", "tlog", "vkey", "--data", str(tdata)],
                          cwd=ROOT, check=True, capture_output=True, text=True).stdout.strip()
    (tdata / "append.token").write_text("test-append-token\n")  # the log keeps it
    log_port, gw_port = free_port(), free_port()
    cfg = short_dir / "g.toml"
    cfg.write_text(f'[gateway]\ndata_dir = "gw"\n[dstack]\nendpoint = "{sock}"\n'
                   f'[log]\nurl = "http://127.0.0.1:{log_port}"\n'
                   f'token_file = "{tdata / "append.token"}"\nvkey = "{vkey}"\n'
                   f'[[api_keys]]\nname = "k"\nsha256 = "{hash_key(API_KEY)}"\n')
    gw_url = f"http://127.0.0.1:{gw_port}"
    procs: list[subprocess.Popen[bytes]] = [sim]
    try:
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        gw = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config", str(cfg),
                               "--listen", f"127.0.0.1:{gw_port}", "--no-tls"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=(short_dir / "gw.err").open("wb"),
                              start_new_session=True)
        procs.append(gw)
        time.sleep(1.5)
        assert gw.poll() is None, (short_dir / "gw.err").read_text()
        with pytest.raises(httpx.HTTPError):
            httpx.get(gw_url + "/healthz", timeout=1)
        procs.append(_start_tlog_on(tdata, log_port))
        assert gw.stdout is not None
        ready = json.loads(gw.stdout.readline())
        index = ready["keyset_index"]
        entry = _log_entry(f"http://127.0.0.1:{log_port}", index)
        assert entry["v"] == keyset_entry.VERSION
        assert entry["keyset"]["receipt_signing_key"] == ready["receipt_signing_key"]
        assert hashlib.sha256(entry["app_compose"].encode()).hexdigest() == entry["compose_hash"]
        assert entry["image_digests"] == {}  # the simulator's compose pins no image
        assert httpx.get(gw_url + "/.well-known/attestation",
                         timeout=10).json()["keyset_index"] == index
        r = httpx.post(gw_url + "/v1/chat/completions", timeout=10,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": "absent", "messages": [{"role": "user", "content": "x"}]})
        assert r.status_code == 404
        rc = httpx.get(f"{gw_url}/v1/receipts/{r.headers['x-receipt-id']}", timeout=10,
                       headers={"Authorization": f"Bearer {API_KEY}"}).json()["receipt"]
        assert rc["keyset_index"] == index
        assert base64.b64decode(rc["signature"]["key"]) == base64.b64decode(
            ready["receipt_signing_key"])
        gw.send_signal(signal.SIGTERM)
        gw.wait(15)
        again = subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--config",
                                  str(cfg), "--listen", f"127.0.0.1:{gw_port}", "--no-tls"],
                                 cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        procs.append(again)
        assert again.stdout is not None
        assert json.loads(again.stdout.readline())["keyset_index"] == index  # reused
    finally:
        for p in reversed(procs):
            stop(p)


def _start_tlog_on(data: Path, port: int) -> subprocess.Popen[bytes]:
    url = f"http://127.0.0.1:{port}"
    return start("tlog", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                 ready=f"{url}/checkpoint")


def _log_entry(url: str, index: int) -> dict[str, Any]:
    """Entry `index` of a tlog, read from its entry bundle."""
    size = int(httpx.get(url + "/checkpoint", timeout=5).text.splitlines()[1])
    n = index // 256
    width = min(256, size - n * 256)
    bundle = httpx.get(f"{url}/{tiles.entries_path(n, width)}", timeout=5).content
    return json.loads(tiles.decode_bundle(bundle)[index % 256])

