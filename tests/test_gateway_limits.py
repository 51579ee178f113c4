"""Request limits of the gateway's parse step: number of messages and JSON nesting depth.

Each refusal is a 400 with a stable code, gets a receipt (the caller was
authenticated), and sends no byte upstream.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from gateway.api import pipeline
from gateway.api.errors import GatewayError
from tests.test_gateway_fakes import API_KEY, gateway_stack

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}


def nested(depth: int) -> Any:
    """A JSON value `depth` containers deep (a list in a list ...)."""
    value: Any = "x"
    for _ in range(depth):
        value = [value]
    return value


def chat(messages: list[Any]) -> bytes:
    return json.dumps({"model": "chat-model", "messages": messages}).encode()


@pytest.mark.parametrize(("body", "code"), [
    (chat([{"role": "user", "content": "hi"}] * 4), "too_many_messages"),
    (chat([{"role": "user", "content": nested(7)}]), "json_too_deep"),  # 3 + 7 > 8
    (chat([{"role": "user", "content": nested(300)}]), "json_too_deep"),
])
def test_over_the_limits_is_a_400_with_a_receipt_and_nothing_forwarded(
        tmp_path: Path, body: bytes, code: str) -> None:
    async def go() -> None:
        async with gateway_stack(tmp_path, extra_gateway="max_messages = 3\n"
                                                         "max_json_depth = 8") as s:
            r = await s.client.post(s.url + "/v1/chat/completions", content=body,
                                    headers=AUTH)
            assert (r.status_code, r.json()["error"]["code"]) == (400, code)
            doc = (await s.client.get(f"{s.url}/v1/receipts/{r.headers['x-receipt-id']}",
                                      headers=AUTH)).json()
            assert doc["receipt"]["refusal"] == {"code": code, "status": 400}
            assert s.prov.received == []
            ok = chat([{"role": "user", "content": nested(5)}] * 3)  # at both limits
            assert (await s.client.post(s.url + "/v1/chat/completions", content=ok,
                                        headers=AUTH)).status_code == 200
    asyncio.run(go())


def test_default_depth_refuses_what_could_not_be_forwarded(tmp_path: Path) -> None:
    """orjson reads 1,024 levels but writes only 254: without the depth limit a body
    260 levels deep parsed, then failed to re-encode for the provider (a 500)."""
    async def go() -> None:
        async with gateway_stack(tmp_path) as s:
            r = await s.client.post(s.url + "/v1/chat/completions", headers=AUTH,
                                    content=chat([{"role": "user", "content": nested(260)}]))
            assert (r.status_code, r.json()["error"]["code"]) == (400, "json_too_deep")
    asyncio.run(go())


def test_parse_limits_alone() -> None:
    body = json.dumps({"model": "e", "input": nested(10)}).encode()
    with pytest.raises(GatewayError) as e:
        pipeline.parse(body, "embeddings", max_depth=10)
    assert e.value.code == "json_too_deep"
    assert pipeline.parse(body, "embeddings", max_depth=11).model == "e"
    many = chat([{"role": "user"}] * 5)
    assert len(pipeline.parse(many, "chat", max_messages=5).obj["messages"]) == 5
    with pytest.raises(GatewayError) as e:
        pipeline.parse(many, "chat", max_messages=4)
    assert (e.value.status, e.value.code, e.value.param) == (400, "too_many_messages",
                                                            "messages")
