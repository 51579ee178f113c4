"""GET /v1/receipts/{id} answers only the API key that made the call; lookups by the salted
request hash need no key (the hash is a capability only the caller can compute)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import httpx

from gateway.api.apikeys import hash_key
from gateway.receipts.outbox import OUTBOX_FILE, Outbox
from tests.test_gateway_fakes import API_KEY, FakeProvider, run_gateway, write_config

OTHER_KEY = "sk-someone-else"
CHAT = b'{"model":"chat-model","messages":[{"role":"user","content":"hi"}]}'


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def two_key_config(tmp: Path, provider_url: str) -> Path:
    cfg = write_config(tmp, provider_url)
    with cfg.open("a") as f:
        f.write(f'\n[[api_keys]]\nname = "other"\nsha256 = "{hash_key(OTHER_KEY)}"\n')
    return cfg


def test_receipt_by_id_answers_only_its_owner(tmp_path: Path) -> None:
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(two_key_config(tmp_path, prov.base_url)) as gw, \
                    httpx.AsyncClient() as c:
                r = await c.post(gw.url + "/v1/chat/completions", content=CHAT,
                                 headers=bearer(API_KEY))
                assert r.status_code == 200
                rid, h = r.headers["x-receipt-id"], r.headers["x-request-hash"]
                url = f"{gw.url}/v1/receipts/{rid}"
                mine = await c.get(url, headers=bearer(API_KEY))
                assert mine.status_code == 200 and mine.json()["receipt"]["id"] == rid
                anon = await c.get(url)
                assert anon.status_code == 401
                assert anon.json()["error"]["code"] == "invalid_api_key"
                # another customer's key cannot tell a foreign receipt from a missing one
                theirs = await c.get(url, headers=bearer(OTHER_KEY))
                missing = await c.get(f"{gw.url}/v1/receipts/{'0' * 32}",
                                      headers=bearer(OTHER_KEY))
                assert theirs.status_code == missing.status_code == 404
                assert theirs.content == missing.content
                # the salted request hash is the caller's capability: no key needed
                by = await c.get(f"{gw.url}/v1/receipts/by-request-hash/{h}")
                assert by.status_code == 200 and by.json()["receipt"]["id"] == rid
        finally:
            await prov.stop()
    asyncio.run(go())


def test_old_outbox_is_migrated_and_its_receipts_have_no_owner(tmp_path: Path) -> None:
    old = sqlite3.connect(tmp_path / OUTBOX_FILE)
    old.executescript("CREATE TABLE receipts (seq INTEGER PRIMARY KEY, id TEXT NOT NULL UNIQUE,"
                      " request_hash TEXT NOT NULL, entry BLOB NOT NULL);"
                      "INSERT INTO receipts(id, request_hash, entry) VALUES"
                      " ('a' || hex(randomblob(15)), 'ab', x'7b7d');")
    old.close()

    async def go() -> None:
        box = Outbox(tmp_path)
        try:
            await box.put("b" * 32, "cd", b"{}", hash_key(API_KEY))
            rows = sqlite3.connect(tmp_path / OUTBOX_FILE).execute(
                "SELECT request_hash, key_sha256 FROM receipts ORDER BY seq").fetchall()
            assert rows == [("ab", None), ("cd", hash_key(API_KEY))]
            got = box.get("b" * 32)
            assert got is not None and got.key_sha256 == hash_key(API_KEY)
            legacy = box.by_request_hash("ab")
            assert legacy is not None and legacy.key_sha256 is None
        finally:
            box.close()
        Outbox(tmp_path).close()  # a second open finds the column and changes nothing
    asyncio.run(go())
