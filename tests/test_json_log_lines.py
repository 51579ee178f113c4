"""The services' JSON log lines (`tlog.service.JsonFormatter`, `log_json`).

The formatter writes the common line with orjson; these tests hold it to the
json.dumps line it replaced: the same JSON value, ASCII only, values that are
not JSON logged by their type name, and an exception's message never logged.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import logging
import math
import re
import sys
import uuid
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.service import JsonFormatter, log_json

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(fields: Any = None, msg: str = "call", created: float | None = None,
           exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("-".join(("secret", "from", "input")))
        except ValueError:
            exc_info = sys.exc_info()
    rec = logging.LogRecord("gateway.calls", logging.INFO, __file__, 1, msg, None, exc_info)
    if fields is not None:
        rec.fields = fields
    if created is not None:
        rec.created = created
    return rec


def reference(rec: logging.LogRecord) -> Any:
    """The JSON value the json.dumps formatter wrote for `rec` (its fields, not its time)."""
    doc: dict[str, Any] = {"level": rec.levelname.lower(), "logger": rec.name,
                           "msg": rec.getMessage()}
    if isinstance(getattr(rec, "fields", None), dict):
        doc.update(rec.fields)
    return json.loads(json.dumps(doc, separators=(",", ":"), default=lambda o: type(o).__name__))


def line(rec: logging.LogRecord) -> tuple[str, dict[str, Any]]:
    text = JsonFormatter().format(rec)
    doc = json.loads(text)
    assert text.isascii(), text
    assert "\n" not in text
    assert TIME.fullmatch(doc.pop("time"))
    return text, doc


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    containers, max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text().filter(lambda k: k != "time"), json_values, max_size=6),
       st.text())
def test_a_line_is_the_json_value_the_json_dumps_line_was(fields: dict[str, Any],
                                                          msg: str) -> None:
    _, doc = line(record(fields, msg=msg))
    assert doc == reference(record(fields, msg=msg))


def test_the_common_call_line_is_byte_for_byte_the_json_dumps_line() -> None:
    fields = {"receipt_id": "r_0123", "kind": "chat", "route": "demo", "status": 200,
              "code": None, "latency_ms": 1.234, "e2ee": "none", "stream": False}
    rec = record(fields, created=1765000000.5)
    doc = {"time": "2025-12-06T05:46:40.500Z", "level": "info", "logger": "gateway.calls",
           "msg": "call", **fields}
    assert JsonFormatter().format(rec) == json.dumps(doc, separators=(",", ":"))


def test_the_time_is_utc_to_the_millisecond_across_seconds() -> None:
    fmt = JsonFormatter()
    for created, want in ((0.0, "1970-01-01T00:00:00.000Z"),
                          (1765000000.875, "2025-12-06T05:46:40.875Z"),
                          (1765000001.25, "2025-12-06T05:46:41.250Z"),
                          (1765000000.0, "2025-12-06T05:46:40.000Z")):
        assert json.loads(fmt.format(record(created=created)))["time"] == want


@dataclasses.dataclass
class Secretive:
    prompt: str


class Sub(str):
    pass


@pytest.mark.parametrize("value, logged", [
    (Secretive("canary prompt"), "Secretive"),
    (datetime.datetime(2026, 1, 1), "datetime"),
    (uuid.UUID(int=7), "00000000-0000-0000-0000-000000000007"),
    ({1, 2}, "set"),
    (b"bytes", "bytes"),
    (object(), "object"),
])
def test_values_that_are_not_json_are_logged_by_type_name(value: Any, logged: str) -> None:
    _, doc = line(record({"v": value}))
    assert doc["v"] == logged


class Code(enum.IntEnum):
    TEAPOT = 418


def test_str_and_int_subclasses_are_logged_by_value_as_json_dumps_does() -> None:
    rec = record({"code": Sub("outbox_full"), "status": Code.TEAPOT})
    text, doc = line(rec)
    assert doc["code"] == "outbox_full" and doc["status"] == 418
    assert doc == reference(rec)


def test_str_subclasses_big_ints_odd_keys_and_non_ascii_still_make_a_line() -> None:
    _, doc = line(record({"s": Sub("x"), "big": 2**80, "nested": {1: "one"},
                          "text": "caf\u00e9 \u202e \U0001f600"}))
    assert doc == {"level": "info", "logger": "gateway.calls", "msg": "call",
                   "s": "x", "big": 2**80, "nested": {"1": "one"},
                   "text": "caf\u00e9 \u202e \U0001f600"}


def test_nan_and_infinity_are_logged_as_null() -> None:
    for value in (math.nan, math.inf, -math.inf):
        _, doc = line(record({"x": value}))
        assert doc["x"] is None


def test_an_exception_is_logged_as_type_and_frames_never_its_message() -> None:
    text, doc = line(record({"route": "r"}, exc=True))
    assert doc["exc_type"] == "ValueError"
    assert "test_json_log_lines.py" in doc["stack"]
    assert "secret-from-input" not in text


def test_log_json_sends_lines_to_stderr_without_caller_or_thread_lookups(
        capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging._srcfile,  # type: ignore[attr-defined]
             logging.logThreads, logging.logProcesses, logging.logMultiprocessing)
    try:
        log_json()
        logging.getLogger("gateway.calls").info("call", extra={"fields": {"status": 200}})
        rec = logging.getLogger("x").makeRecord("x", logging.INFO, "(unknown file)", 0,
                                                "m", None, None)
        assert rec.threadName is None and rec.processName is None and rec.process is None
        err = capsys.readouterr().err.splitlines()
        doc = json.loads(err[-1])
        assert (doc["logger"], doc["msg"], doc["status"]) == ("gateway.calls", "call", 200)
        assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    finally:
        root.handlers[:], root.level = saved[0], saved[1]
        (logging._srcfile, logging.logThreads,  # type: ignore[attr-defined]
         logging.logProcesses, logging.logMultiprocessing) = saved[2:]
