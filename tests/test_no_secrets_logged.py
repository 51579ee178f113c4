"""Secrets and content never reach a log line (issue 17).

A representative stack runs: a real witness and a real log (`python -m witness
serve`, `python -m tlog serve` with that witness and quorum 1, their stderr
captured to files) and the gateway with its receipt shipper (`run_gateway`,
every Python log record captured at DEBUG through the services' own
`JsonFormatter`). Model calls carry a canary prompt: JSON, streamed,
embeddings, sealed with ACI E2EE, a call with the client's own receipt salt,
and refused calls (unknown model, bad JSON, no API key). Once every receipt
is logged, no log line holds any secret the test knows, in any usual encoding
(raw text, hex either case, base64 standard or URL-safe, padded or not, and
the first 16 characters of each): the log's and the witness's private keys,
the append token, the API and admin keys, the gateway's receipt-signing and
E2EE private keys, the E2EE client's private key, every receipt salt, the
prompt canaries and the provider's completion.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import orjson

from tests import tlogutil
from tests.test_gateway_fakes import (
    ADMIN_KEY,
    API_KEY,
    COMPLETION,
    FakeProvider,
    LogRef,
    run_gateway,
    write_config,
)
from tlog.service import JsonFormatter
from verifier import aci

CANARY = "CANARY-PROMPT-3b9e1f-must-never-be-logged"
EMBED_CANARY = "CANARY-EMBED-77aa02-must-never-be-logged"


class Capture(logging.Handler):
    """Every record of this process, formatted as the services write them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


CHATTY = ("httpx", "httpcore")
"""HTTP client libraries: their DEBUG lines hold whole response heads (a receipt salt, in
the client), so every service sets them to WARNING (`tlog.service.log_json`); so does this
capture."""


@contextlib.contextmanager
def captured() -> Iterator[Capture]:
    """Capture every record at DEBUG, as `log_json` configures a service (but at DEBUG)."""
    root = logging.getLogger()
    handler, level = Capture(), root.level
    chatty = {name: logging.getLogger(name).level for name in CHATTY}
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        for name, old in chatty.items():
            logging.getLogger(name).setLevel(old)


def encodings(secret: bytes | str) -> set[str]:
    """The forms a secret could take in a log line (and each form's first 16 characters)."""
    if isinstance(secret, str):
        forms = {secret}
    else:
        b64 = base64.b64encode(secret).decode()
        url = base64.urlsafe_b64encode(secret).decode()
        forms = {secret.hex(), secret.hex().upper(), b64, b64.rstrip("="), url,
                 url.rstrip("=")}
    return forms | {f[:16] for f in forms if len(f) >= 16}


def skey_secret(path: Path) -> list[bytes | str]:
    """A private key file's text and the raw key bytes it encodes."""
    text = path.read_text().strip()
    raw = base64.b64decode(text.split("+", 4)[4])  # PRIVATE+KEY+name+hexid+base64
    return [text, raw, raw[-32:]]


def vkey_of(module: str, data: Path) -> str:
    out = subprocess.run([sys.executable, "-m", module, "vkey", "--data", str(data)],
                         capture_output=True, check=True, timeout=60)
    return out.stdout.decode().strip()


def test_no_key_salt_token_or_prompt_in_any_log_line(tmp_path: Path) -> None:
    wdata, ldata = tmp_path / "witness", tmp_path / "log"
    log_vkey, witness_vkey = vkey_of("tlog", ldata), vkey_of("witness", wdata)
    wport = tlogutil.free_port()
    wurl = f"http://127.0.0.1:{wport}"
    witness = tlogutil.start("witness", "serve", "--data", str(wdata), "--listen",
                             f"127.0.0.1:{wport}", "--log",
                             f"{log_vkey.split('+', 1)[0]}={log_vkey}", ready=wurl + "/healthz",
                             stderr_path=tmp_path / "witness.stderr")
    procs = [witness]
    try:
        log, lurl = tlogutil.start_tlog(ldata, "--witness", wurl, "--witness-vkey",
                                        witness_vkey, "--quorum", "1")
        procs.append(log)
        token = (ldata / "append.token").read_text().strip()
        with captured() as capture:
            salts, drawn, gw_keys, receipts = asyncio.run(
                run_calls(tmp_path, LogRef(lurl, token, log_vkey)))
        # the log saw every receipt: it served them, witnessed, to the shipper
        assert len(receipts) >= 5
    finally:
        for p in procs:
            tlogutil.stop(p)
    stderr = [(tmp_path / n).read_text(errors="replace") for n in
              ("witness.stderr", "log.stderr")]
    lines = capture.lines + [line for text in stderr for line in text.splitlines()]
    calls = [line for line in capture.lines if '"logger":"gateway.calls"' in line]
    assert len(calls) == 8, "the gateway's call lines were not all captured"

    secrets: list[bytes | str] = [
        *skey_secret(ldata / "log.key"), *skey_secret(wdata / "witness.key"), token,
        API_KEY, ADMIN_KEY, *gw_keys, *drawn, *salts, CANARY, EMBED_CANARY, COMPLETION]
    leaks = [(form, line[:200]) for s in secrets for form in encodings(s)
             for line in lines if form in line]
    assert leaks == []
    probe = capture.format(logging.LogRecord("x", logging.INFO, "", 0, "%s", (token,), None))
    assert any(form in probe for form in encodings(token))  # the search does find a leak


async def run_calls(tmp: Path, log: LogRef) -> tuple[list[bytes], list[bytes], list[bytes],
                                                     list[str]]:
    """The calls of the flow; (salts, E2EE client secrets, gateway private keys, ids of the
    receipts the log acknowledged)."""
    prov = FakeProvider()
    await prov.start()
    try:
        cfg = write_config(tmp, prov.base_url, log=log)
        async with run_gateway(cfg) as gw, httpx.AsyncClient(timeout=30) as c:
            gw_keys = [gw.receipt_key.private_bytes_raw(), gw.e2ee_key.private_bytes_raw()]
            auth = {"Authorization": f"Bearer {API_KEY}"}
            chat = {"model": "chat-model", "messages": [{"role": "user", "content": CANARY}]}
            own_salt = os.urandom(32)
            answers = [
                await c.post(gw.url + "/v1/chat/completions", json=chat, headers=auth),
                await c.post(gw.url + "/v1/chat/completions", json={**chat, "stream": True},
                             headers=auth),
                await c.post(gw.url + "/v1/embeddings", headers=auth,
                             json={"model": "embed-model", "input": EMBED_CANARY}),
                await c.post(gw.url + "/v1/chat/completions", json=chat,
                             headers={**auth, "x-receipt-salt": own_salt.hex()}),
                await c.post(gw.url + "/v1/chat/completions", headers=auth,
                             json={**chat, "model": "no-such-model"}),
                await c.post(gw.url + "/v1/chat/completions", headers=auth,
                             content=b'{"messages": "' + CANARY.encode() + b'" broken'),
                await c.post(gw.url + "/v1/chat/completions", json=chat),  # no API key
            ]
            drawn: list[bytes] = []

            def draw(n: int) -> bytes:
                drawn.append(os.urandom(n))
                return drawn[-1]

            sealed, headers, opener = aci.seal_request(
                dict(chat), "chat", gw.e2ee_key.public_key().public_bytes_raw(),
                now=time.time(), draw=draw)
            drawn[1:] = []  # the client's private key; later draws are public nonces
            e2ee = await c.post(gw.url + "/v1/chat/completions", headers={**auth, **headers},
                                content=orjson.dumps(sealed))
            answers.append(e2ee)
            assert [a.status_code for a in answers] == [200, 200, 200, 200, 404, 400, 401, 200]
            opener.start({k.lower(): v for k, v in e2ee.headers.items()})
            assert CANARY not in e2ee.text  # sealed: the answer opens only at the client
            salts = [bytes.fromhex(a.headers["x-receipt-salt"]) for a in answers
                     if "x-receipt-salt" in a.headers] + [own_salt]
            ids = [a.headers["x-receipt-id"] for a in answers if "x-receipt-id" in a.headers]
            logged = await wait_logged(c, gw.url, ids, auth)
            return salts, drawn, gw_keys, logged
    finally:
        await prov.stop()


async def wait_logged(c: httpx.AsyncClient, url: str, ids: list[str],
                      auth: dict[str, str]) -> list[str]:
    """The receipt ids once the shipper has a proof for each (at most 60 s)."""
    deadline = time.monotonic() + 60
    pending = set(ids)
    while pending and time.monotonic() < deadline:
        for rid in sorted(pending):
            r = await c.get(f"{url}/v1/receipts/{rid}", headers=auth)
            if r.status_code == 200 and r.json().get("proof"):
                pending.discard(rid)
        await asyncio.sleep(0.1)
    assert not pending, f"receipts never logged: {sorted(pending)}"
    return ids
