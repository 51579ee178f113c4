"""The gateway's /metrics (Prometheus text) and its structured JSON logs."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.api import metrics, pipeline
from tests.test_gateway_fakes import (
    API_KEY,
    COMPLETION,
    MARKER,
    FakeLeaseStore,
    FakeLog,
    FakeProvider,
    FakeVerificationError,
    run_gateway,
    write_config,
)
from tlog.service import JsonFormatter
from verifier import version

AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
CHAT = json.dumps({"model": "chat-model", "messages": [{"role": "user", "content": MARKER}]})
SAMPLE = re.compile(r'^([a-z_]+)(?:\{(.*)\})? (\S+)$')
LABEL = re.compile(r'([a-z_]+)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text exposition; asserts each family is typed first."""
    typed: set[str] = set()
    out: Samples = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, labels, value = m.groups()
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in typed or family in typed, f"{name} has no # TYPE line"
        key = (name, frozenset(LABEL.findall(labels or "")))
        assert key not in out, f"duplicate series {key}"
        out[key] = float(value)
    return out


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """Everything logged while the test runs, formatted by the gateway's JSON formatter."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield buf
    finally:
        root.removeHandler(handler)
        root.setLevel(old)


def test_histogram_buckets_are_cumulative_and_labels_escaped() -> None:
    m = metrics.Metrics()
    for seconds in (0.001, 0.005, 0.02, 7.0, 1e9):
        m.request("chat", 200, seconds)
    m.call("chat", 'we"ird\\route\n', 502, "upstream_unverified")
    s = parse(m.render().decode())
    name = "pag_gateway_request_duration_seconds"
    assert get(s, name + "_bucket", endpoint="chat", le="0.005") == 2  # le is inclusive
    assert get(s, name + "_bucket", endpoint="chat", le="0.025") == 3
    assert get(s, name + "_bucket", endpoint="chat", le="10.0") == 4
    assert get(s, name + "_bucket", endpoint="chat", le="+Inf") == 5
    assert get(s, name + "_count", endpoint="chat") == 5
    assert get(s, name + "_sum", endpoint="chat") == pytest.approx(1e9 + 7.026)
    text = m.render().decode()
    assert 'route="we\\"ird\\\\route\\n"' in text
    assert get(s, "pag_gateway_refusals_total", code="upstream_unverified",
               route='we\\"ird\\\\route\\n') == 1


def test_metrics_count_calls_refusals_latency_and_state(tmp_path: Path) -> None:
    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            store = FakeLeaseStore()
            cfg = write_config(tmp_path, prov.base_url, log=log)
            async with run_gateway(cfg, store) as gw, httpx.AsyncClient() as c:
                url = gw.url + "/v1/chat/completions"
                assert (await c.post(url, content=CHAT, headers=AUTH)).status_code == 200
                assert (await c.post(url, content=b"{", headers=AUTH)).status_code == 400
                assert (await c.post(url, content=CHAT)).status_code == 401
                store.outcomes["r1"] = FakeVerificationError("upstream_unverified", "x")
                store.outcomes["r2"] = FakeVerificationError("binding_mismatch", "y")
                assert (await c.post(url, content=CHAT, headers=AUTH)).status_code == 502
                assert (await c.get(url)).status_code == 405
                assert (await c.get(gw.url + "/v1/models")).status_code == 200
                for _ in range(200):  # the shipper logs the three receipts
                    if gw.app.svc.outbox.counts()[1] == 0:
                        break
                    await asyncio.sleep(0.02)
                await asyncio.sleep(1.1)  # the outbox counts on /metrics are cached 1 s
                r = await c.get(gw.url + "/metrics")
        finally:
            await prov.stop()
            await log.stop()
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
        s = parse(r.text)
        calls = "pag_gateway_model_calls_total"
        assert get(s, calls, kind="chat", route="r1", status="200") == 1
        assert get(s, calls, kind="chat", route="", status="400") == 1
        assert get(s, calls, kind="chat", route="", status="401") == 1
        assert get(s, calls, kind="chat", route="r1", status="502") == 1
        ref = "pag_gateway_refusals_total"
        assert get(s, ref, code="invalid_json", route="") == 1
        assert get(s, ref, code="invalid_api_key", route="") == 1
        assert get(s, ref, code="upstream_unverified", route="r1") == 1
        assert sum(v for (n, _), v in s.items() if n == ref) == 3  # a served call is no refusal
        req = "pag_gateway_requests_total"
        assert get(s, req, endpoint="chat", status="405") == 1
        assert get(s, req, endpoint="models", status="200") == 1
        assert get(s, "pag_gateway_request_duration_seconds_count", endpoint="chat") == 5
        lease = "pag_gateway_route_lease_state"
        assert get(s, lease, route="r1", state="refused") == 1
        assert get(s, lease, route="r1", state="verified") == 0
        assert get(s, lease, route="r2", state="refused") == 1
        assert get(s, lease, route="e1", state="unknown") == 1
        assert get(s, "pag_gateway_outbox_receipts") == 3  # the 401 has no receipt
        assert get(s, "pag_gateway_outbox_unlogged") == 0
        assert get(s, "pag_gateway_log_down") == 0
        assert get(s, "pag_gateway_inflight_requests") == 1  # the scrape itself
        assert get(s, "pag_gateway_build_info", version=version()) == 1
    asyncio.run(go())


def test_metrics_show_unlogged_receipts_and_log_down(tmp_path: Path) -> None:
    async def go() -> None:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        try:
            cfg = write_config(tmp_path, prov.base_url, log=log)
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                log.fail = True  # after start-up: the keyset entry is logged first
                for _ in range(2):
                    r = await c.post(gw.url + "/v1/chat/completions", content=CHAT,
                                     headers=AUTH)
                    assert r.status_code == 200
                for _ in range(200):
                    if gw.app.svc.status.log_down:
                        break
                    await asyncio.sleep(0.02)
                s = parse((await c.get(gw.url + "/metrics")).text)
        finally:
            await prov.stop()
            await log.stop()
        assert get(s, "pag_gateway_outbox_receipts") == 2
        assert get(s, "pag_gateway_outbox_unlogged") == 2
        assert get(s, "pag_gateway_log_down") == 1
    asyncio.run(go())


def test_callers_cannot_grow_the_series_count(tmp_path: Path) -> None:
    """Model names, paths and headers a caller chooses never become label values."""
    async def go() -> None:
        prov = FakeProvider()
        await prov.start()
        try:
            cfg = write_config(tmp_path, prov.base_url)
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                async def burst() -> None:
                    for _ in range(20):
                        name = secrets.token_hex(8)
                        body = json.dumps({"model": name, "messages": [
                            {"role": "user", "content": "x"}]})
                        await c.post(gw.url + "/v1/chat/completions", content=body,
                                     headers={**AUTH, "x-" + name: name})
                        await c.get(f"{gw.url}/{name}")
                        await c.get(f"{gw.url}/v1/receipts/{name}", headers=AUTH)
                await c.get(gw.url + "/metrics")  # the scrape's own series exist from now on
                await burst()
                first = (await c.get(gw.url + "/metrics")).text
                await burst()
                second = (await c.get(gw.url + "/metrics")).text
        finally:
            await prov.stop()
        series = [ln for ln in first.splitlines() if not ln.startswith("#")]
        assert len(series) == len([ln for ln in second.splitlines() if not ln.startswith("#")])
        s = parse(second)
        assert get(s, "pag_gateway_refusals_total", code="model_not_found", route="") == 40
        assert get(s, "pag_gateway_requests_total", endpoint="other", status="404") == 40
        assert get(s, "pag_gateway_requests_total", endpoint="receipts", status="404") == 40
    asyncio.run(go())


def test_one_json_line_per_call_and_never_content(tmp_path: Path,
                                                   json_lines: io.StringIO) -> None:
    async def go() -> list[tuple[int, dict[str, str]]]:
        prov, log = FakeProvider(), FakeLog()
        await prov.start()
        await log.start()
        seen: list[tuple[int, dict[str, str]]] = []
        try:
            store = FakeLeaseStore()
            cfg = write_config(tmp_path, prov.base_url, log=log)
            async with run_gateway(cfg, store) as gw, httpx.AsyncClient() as c:
                url = gw.url + "/v1/chat/completions"
                for body in (CHAT, CHAT[:-2], json.dumps({**json.loads(CHAT), "stream": True})):
                    r = await c.post(url, content=body, headers=AUTH)
                    seen.append((r.status_code, dict(r.headers)))
                store.outcomes["r1"] = FakeVerificationError("upstream_unverified", MARKER)
                store.outcomes["r2"] = FakeVerificationError("binding_mismatch", MARKER)
                r = await c.post(url, content=CHAT, headers=AUTH)
                seen.append((r.status_code, dict(r.headers)))
                r = await c.post(url, content=CHAT, headers={"Authorization": "Bearer nope"})
                seen.append((r.status_code, dict(r.headers)))
                r = await c.post(gw.url + "/v1/embeddings", headers=AUTH,
                                 json={"model": "embed-model", "input": MARKER})
                seen.append((r.status_code, dict(r.headers)))
        finally:
            await prov.stop()
            await log.stop()
        return seen

    seen = asyncio.run(go())
    lines = [json.loads(ln) for ln in json_lines.getvalue().splitlines()]
    assert all({"time", "level", "logger", "msg"} <= set(doc) for doc in lines)
    calls = [doc for doc in lines if doc["logger"] == "gateway.calls"]
    assert len(calls) == 6  # one per model call: 4 chats, the 401 and the embeddings call
    for (status, headers), doc in zip(seen, calls, strict=True):
        assert doc["msg"] == "call" and doc["status"] == status
        assert doc["receipt_id"] == headers.get("x-receipt-id")
        assert isinstance(doc["latency_ms"], float) and doc["latency_ms"] >= 0
    assert [(d["route"], d["code"], d["stream"]) for d in calls[:5]] == [
        ("r1", None, False), (None, "invalid_json", False), ("r1", None, True),
        ("r1", "upstream_unverified", False), (None, "invalid_api_key", False)]
    assert (calls[5]["kind"], calls[5]["route"], calls[5]["status"]) == ("embeddings", "e1", 200)
    text = json_lines.getvalue()
    for secret in (MARKER, COMPLETION, API_KEY):
        assert secret not in text


def test_an_escaped_exception_is_500_json_and_logged_without_its_message(
        tmp_path: Path, json_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken_parse(body: bytes, kind: str, *limits: int) -> Any:
        raise RuntimeError("parser quoted the input: " + body.decode())

    monkeypatch.setattr(pipeline, "parse", broken_parse)

    async def go() -> httpx.Response:
        prov = FakeProvider()
        await prov.start()
        try:
            cfg = write_config(tmp_path, prov.base_url)
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                r = await c.post(gw.url + "/v1/chat/completions", content=CHAT, headers=AUTH)
                s = parse((await c.get(gw.url + "/metrics")).text)
                assert get(s, "pag_gateway_refusals_total", code="internal_error", route="") == 1
                assert get(s, "pag_gateway_requests_total", endpoint="chat", status="500") == 1
                return r
        finally:
            await prov.stop()

    r = asyncio.run(go())
    assert r.status_code == 500
    assert r.json()["error"]["code"] == "internal_error"
    assert "Traceback" not in r.text and MARKER not in r.text
    lines = [json.loads(ln) for ln in json_lines.getvalue().splitlines()]
    err = next(d for d in lines if d["msg"] == "internal error")
    assert err["level"] == "error" and err["exc_type"] == "RuntimeError"
    assert "broken_parse" in err["stack"]
    assert MARKER not in json_lines.getvalue()


class RecordedSpan:
    def __init__(self, name: str, kind: Any, attributes: dict[str, Any], start_time: int) -> None:
        self.name, self.kind, self.attributes, self.start = name, kind, attributes, start_time
        self.status: Any = None
        self.end_time: int | None = None

    def set_status(self, status: Any) -> None:
        self.status = status

    def end(self, end_time: int) -> None:
        self.end_time = end_time


class RecordingTracer:
    """The part of an OpenTelemetry Tracer the gateway uses, recording what it gets."""

    def __init__(self) -> None:
        self.spans: list[RecordedSpan] = []

    def start_span(self, name: str, kind: Any, attributes: dict[str, Any],
                   start_time: int) -> RecordedSpan:
        self.spans.append(RecordedSpan(name, kind, attributes, start_time))
        return self.spans[-1]


def test_traces_one_span_per_call_with_the_log_lines_facts(tmp_path: Path) -> None:
    from opentelemetry import trace

    from gateway.api import config, server

    async def go() -> tuple[RecordingTracer, list[httpx.Response]]:
        prov = FakeProvider()
        await prov.start()
        recorder = RecordingTracer()
        try:
            cfg = write_config(tmp_path, prov.base_url)
            async with run_gateway(cfg) as gw, httpx.AsyncClient() as c:
                url = gw.url + "/v1/chat/completions"
                gw.app.tracer = recorder
                replies = [await c.post(url, content=CHAT, headers=AUTH),
                           await c.post(url, content=b"[", headers=AUTH)]
                gw.app.tracer = trace.get_tracer("test")  # the API alone: spans dropped
                replies.append(await c.post(url, content=CHAT, headers=AUTH))
        finally:
            await prov.stop()
        return recorder, replies

    recorder, replies = asyncio.run(go())
    assert [r.status_code for r in replies] == [200, 400, 200]
    assert [s.name for s in recorder.spans] == ["pag.chat", "pag.chat"]
    ok, bad = recorder.spans
    assert ok.kind == trace.SpanKind.SERVER and ok.end_time >= ok.start
    assert ok.attributes == {"pag.kind": "chat", "pag.route": "r1",
                             "pag.receipt_id": replies[0].headers["x-receipt-id"],
                             "pag.code": "", "http.response.status_code": 200}
    assert bad.attributes["pag.code"] == "invalid_json" and bad.status is None
    assert MARKER not in repr([s.attributes for s in recorder.spans])
    off = config.load(write_config(tmp_path, "http://127.0.0.1:1/v1"))
    assert server.tracer(off) is None
    on = tmp_path / "on.toml"
    on.write_text(off.path.read_text().replace("[gateway]\n", "[gateway]\ntraces = true\n", 1))
    assert server.tracer(config.load(on)) is not None
