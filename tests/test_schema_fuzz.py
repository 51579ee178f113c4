"""Schema fuzzing (issue 17): schemathesis drives the gateway, the log and the witness.

Each service runs for real on loopback (the log and the witness as `python -m
... serve` processes, the gateway through `gateway_stack`), serves its own
OpenAPI document at GET /openapi.json, and schemathesis sends every operation
of that document cases that fit the schema and cases that break it. Every
answer must: not be a 5xx, come within the client timeout (no hang), have a
status and content type the document declares and a JSON body matching its
schema, and, if it is a 4xx, be JSON with a non-empty stable `code` (the
witness's 409 alone has the body C2SP fixes). Example counts are bounded so
the three services together take about a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests import tlogutil
from tests.test_gateway_fakes import ADMIN_KEY, API_KEY, Stack, gateway_stack

ROOT = Path(__file__).resolve().parents[1]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
TIMEOUT = 10.0  # seconds: an answer slower than this is a hang
EXAMPLES = 25  # per operation and generation mode


def refusal_code(status: int, ctype: str, body: bytes) -> str | None:
    """The stable code of a 4xx answer: `code` of a JSON refusal, either shape (the log's
    and witness's `{"error", "code"}`, the gateway's OpenAI `{"error": {"code"}}`)."""
    assert ctype.startswith("application/json"), (status, ctype, body[:200])
    doc = json.loads(body)
    err = doc.get("error")
    code = err.get("code") if isinstance(err, dict) else doc.get("code")
    return code if isinstance(code, str) and code else None


def fuzz(doc: Path, base_url: str, headers: Callable[[str], dict[str, str]],
         adjust: Callable[[Any, Any], None] = lambda case, data: None,
         exempt: Callable[[int, str], bool] = lambda status, ctype: False,
         paths: set[str] | None = None) -> int:
    """Run every operation (or those of `paths`) of the OpenAPI document `doc` against
    `base_url`, in positive and negative mode; `headers(path)` gives each call's headers,
    `adjust(case, data)` may steer a case (with hypothesis's `data`). Returns the number of
    calls made."""
    schema = schemathesis.openapi.from_path(str(doc))
    calls = 0
    for result in schema.get_all_operations():
        op = result.ok()
        if paths is not None and op.path not in paths:
            continue
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None,
                      phases=[Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode), data=st.data())
            def run(case: Any, data: Any) -> None:
                nonlocal calls
                adjust(case, data)
                response = case.call(base_url=base_url, headers=headers(case.path),
                                     timeout=TIMEOUT)
                calls += 1
                case.validate_response(response, checks=CHECKS)
                status = response.status_code
                ctype = (response.headers.get("content-type") or [""])[0]
                if 400 <= status < 500 and not exempt(status, ctype):
                    assert refusal_code(status, ctype, response.content), \
                        f"{case.method} {case.formatted_path}: {status} without a code"

            try:
                run()
            except Unsatisfiable:  # nothing to break in an operation without inputs
                if mode is GenerationMode.POSITIVE:
                    raise
    return calls


def served_is_the_file(base_url: str, doc: Path) -> None:
    """GET /openapi.json is the document in the repository, a valid OpenAPI 3 document."""
    r = httpx.get(base_url + "/openapi.json")
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    assert r.json() == json.loads(doc.read_text())
    assert r.json()["openapi"].startswith("3.")
    for path in ("/metrics", "/healthz", "/readyz", "/openapi.json"):
        assert path in r.json()["paths"], path


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A real log process with a few entries: (url, append token, vkey)."""
    data = tmp_path_factory.mktemp("log") / "data"
    proc, url = tlogutil.start_tlog(data)
    token = (data / "append.token").read_text().strip()
    for i in range(3):
        assert httpx.post(url + "/add", content=b'{"request_hash": "%064x"}' % i,
                          headers={"Authorization": f"Bearer {token}"}).status_code == 200
    try:
        yield url, token, (data / "log.vkey").read_text().strip()
    finally:
        tlogutil.stop(proc)


def test_the_log_answers_every_schema_case(log: tuple[str, str, str]) -> None:
    url, token, _ = log
    doc = ROOT / "tlog" / "openapi.json"
    served_is_the_file(url, doc)
    calls = fuzz(doc, url, lambda path: {"Authorization": f"Bearer {token}"})
    assert calls >= 2 * EXAMPLES
    assert httpx.get(url + "/readyz").status_code == 200  # still up and well


def test_the_witness_answers_every_schema_case(log: tuple[str, str, str],
                                               tmp_path: Path) -> None:
    _, _, vkey = log
    origin = vkey.split("+", 1)[0]
    port = tlogutil.free_port()
    url = f"http://127.0.0.1:{port}"
    proc = tlogutil.start("witness", "serve", "--data", str(tmp_path / "w"), "--listen",
                          f"127.0.0.1:{port}", "--log", f"{origin}={vkey}",
                          ready=url + "/healthz", stderr_path=tmp_path / "w.stderr")
    try:
        doc = ROOT / "witness" / "openapi.json"
        served_is_the_file(url, doc)
        calls = fuzz(doc, url, lambda path: {},
                     exempt=lambda status, ctype: status == 409
                     and ctype.startswith("text/x.tlog.size"))
        assert calls >= 2 * EXAMPLES
        assert httpx.get(url + "/readyz").status_code == 200
    finally:
        tlogutil.stop(proc)


@contextlib.contextmanager
def stack_in_thread(tmp: Path) -> Iterator[Stack]:
    """`gateway_stack` served from its own event loop in a thread, so that schemathesis's
    blocking client can call it."""
    ready: list[Stack] = []
    started, stop = threading.Event(), None
    errors: list[BaseException] = []

    async def serve() -> None:
        nonlocal stop
        stop = asyncio.Event()
        try:
            async with gateway_stack(tmp) as s:
                ready.append(s)
                started.set()
                await stop.wait()
        except BaseException as e:  # reported by the caller
            errors.append(e)
            started.set()

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    started.wait(60)
    if errors or not ready:
        raise RuntimeError(f"gateway did not start: {errors}")
    try:
        yield ready[0]
    finally:
        loop.call_soon_threadsafe(stop.set)  # type: ignore[union-attr]
        thread.join(30)
        loop.close()


def steer_gateway(case: Any, data: Any) -> None:
    """Half of the valid model calls name a model the gateway routes, so they reach the
    provider and the receipt path, not only the 404 of an unknown model."""
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str) \
            and data.draw(st.booleans()):
        case.body["model"] = "embed-model" if "input" in case.body else "chat-model"


def test_the_gateway_answers_every_schema_case(tmp_path: Path) -> None:
    doc = ROOT / "gateway" / "api" / "openapi.json"
    with stack_in_thread(tmp_path) as s:
        served_is_the_file(s.url, doc)
        key = lambda path: {"Authorization": "Bearer " + (  # noqa: E731
            ADMIN_KEY if path == "/v1/routes" else API_KEY)}
        calls = fuzz(doc, s.url, key, adjust=steer_gateway)
        assert calls >= 2 * EXAMPLES
        assert s.prov.received, "no fuzzed call reached the provider"
        s.prov.fail_status = 422  # a provider refusing everything: its 4xx, as the gateway's
        before = len(s.prov.received)
        fuzz(doc, s.url, key, adjust=steer_gateway,
             paths={"/v1/chat/completions", "/v1/embeddings"})
        assert len(s.prov.received) > before
        assert httpx.get(s.url + "/readyz").status_code == 200
