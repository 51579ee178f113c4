"""The services' JSON log lines (`tlog.service.JsonFormatter`, `JsonLines`, `log_json`).

The formatter writes the common line with orjson; these tests hold it to the
json.dumps line it replaced: the same JSON value, ASCII only, values that are
not JSON logged by their type name, and an exception's message never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import enum
import json
import logging
import math
import re
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.api import jsonlog
from tlog.service import JsonFormatter, JsonLines, log_json

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


class Writes:
    """A stream that records each write."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        pass

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(x) for x in "".join(self.writes).splitlines()]


@contextlib.contextmanager
def root_handler(handler: logging.Handler) -> Iterator[None]:
    """`handler` as the root logger's only handler, at INFO, for the block."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:], root.level = [handler], logging.INFO
    try:
        yield
    finally:
        root.handlers[:], root.level = saved


def test_a_loop_turns_lines_leave_in_one_write_in_order() -> None:
    out = Writes()
    h = JsonLines(out)
    log = logging.getLogger("pag.test.turn")

    async def main() -> list[int]:
        for i in range(3):
            log.info("line %d", i)
        jsonlog.call("r-1", "chat", "r1", 200, None, 1.5, "none", False)
        held = len(out.writes)
        await asyncio.sleep(0)  # the end of the turn
        await asyncio.sleep(0)
        return [held, len(out.writes)]

    with root_handler(h):
        assert asyncio.run(main()) == [0, 1]
    docs = out.lines()
    assert [d["msg"] for d in docs] == ["line 0", "line 1", "line 2", "call"]
    assert docs[3]["receipt_id"] == "r-1" and docs[3]["logger"] == "gateway.calls"


def test_without_a_loop_a_line_leaves_at_once_and_flush_or_close_empties_what_is_held() -> None:
    out = Writes()
    h = JsonLines(out)
    with root_handler(h):
        logging.getLogger("pag.test.now").info("now")
        assert [d["msg"] for d in out.lines()] == ["now"]

        async def held() -> None:
            logging.getLogger("pag.test.now").info("held")
            h.flush()  # as logging.shutdown does at exit
            assert [d["msg"] for d in out.lines()] == ["now", "held"]
            logging.getLogger("pag.test.now").info("held till close")
            h.close()
            assert [d["msg"] for d in out.lines()] == ["now", "held", "held till close"]

        asyncio.run(held())
    assert len(out.writes) == 3


def test_a_line_from_another_thread_while_lines_are_held_keeps_the_order() -> None:
    out = Writes()
    h = JsonLines(out)
    log = logging.getLogger("pag.test.thread")

    async def main() -> None:
        log.info("loop 1")
        t = threading.Thread(target=log.info, args=("thread",))
        t.start()
        t.join()
        log.info("loop 2")
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with root_handler(h):
        asyncio.run(main())
    assert [d["msg"] for d in out.lines()] == ["loop 1", "thread", "loop 2"]
    assert len(out.writes) == 2  # the thread's line left at once, with what was held


def test_the_direct_call_line_is_the_line_logging_writes() -> None:
    direct, logged = Writes(), Writes()
    args = ("0192abcd-1234-7000-8000-0123456789ab", "chat", "r\u00e9", 502, "no_route",
            12.34567, "aci-1", True)
    with root_handler(JsonLines(direct)):
        assert JsonLines.sole(jsonlog.CALLS, logging.INFO) is not None
        jsonlog.call(*args)
    sink = logging.StreamHandler(logged)
    sink.setFormatter(JsonFormatter())
    with root_handler(sink):  # not a JsonLines: logging's own path
        assert JsonLines.sole(jsonlog.CALLS, logging.INFO) is None
        jsonlog.call(*args)
    a, b = "".join(direct.writes), "".join(logged.writes)
    assert a.isascii() and "\\u00e9" in a
    assert TIME.fullmatch(json.loads(a)["time"])
    assert re.sub(TIME, "T", a) == re.sub(TIME, "T", b)


def test_the_direct_path_is_taken_only_where_logging_would_reach_that_handler_alone() -> None:
    h = JsonLines(Writes())
    calls = jsonlog.CALLS
    with root_handler(h):
        assert JsonLines.sole(calls, logging.INFO) is h
        assert JsonLines.sole(calls, logging.DEBUG) is None  # below the root's level
        extra = logging.StreamHandler(Writes())  # as pytest's caplog adds one
        logging.getLogger("gateway").addHandler(extra)
        try:
            assert JsonLines.sole(calls, logging.INFO) is None
        finally:
            logging.getLogger("gateway").removeHandler(extra)
        calls.addFilter(lambda r: False)
        try:
            assert JsonLines.sole(calls, logging.INFO) is None
        finally:
            calls.filters.clear()
        h.addFilter(lambda r: False)
        try:
            assert JsonLines.sole(calls, logging.INFO) is None
        finally:
            h.filters.clear()
        calls.propagate = False  # then no handler gets its records but lastResort
        try:
            assert JsonLines.sole(calls, logging.INFO) is None
        finally:
            calls.propagate = True
        calls.disabled = True
        try:
            assert JsonLines.sole(calls, logging.INFO) is None
        finally:
            calls.disabled = False
        assert JsonLines.sole(calls, logging.INFO) is h


def test_a_filtered_or_silenced_call_line_is_not_written() -> None:
    out = Writes()
    with root_handler(JsonLines(out)):
        jsonlog.CALLS.addFilter(lambda r: False)
        try:
            jsonlog.call("r-2", "chat", None, 200, None, 1.0, "none", False)
        finally:
            jsonlog.CALLS.filters.clear()
        jsonlog.CALLS.setLevel(logging.WARNING)
        try:
            jsonlog.call("r-3", "chat", None, 200, None, 1.0, "none", False)
        finally:
            jsonlog.CALLS.setLevel(logging.NOTSET)
        jsonlog.call("r-4", "chat", None, 200, None, 1.0, "none", False)
    assert [d["receipt_id"] for d in out.lines()] == ["r-4"]


def test_json_lines_takes_no_other_formatter() -> None:
    with pytest.raises(TypeError):
        JsonLines(Writes()).setFormatter(logging.Formatter())


def test_a_failing_stream_loses_its_lines_and_fails_no_caller() -> None:
    class Broken(Writes):
        fail = True

        def write(self, text: str) -> None:
            if self.fail:
                raise OSError(28, "No space left on device")
            super().write(text)

    out = Broken()
    h = JsonLines(out)
    log = logging.getLogger("pag.test.broken")

    async def main() -> None:
        log.info("lost in a turn")
        jsonlog.call("r-5", "chat", None, 200, None, 1.0, "none", False)
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    with root_handler(h):
        log.info("lost at once")
        asyncio.run(main())
        out.fail = False
        log.info("kept")
    assert [d["msg"] for d in out.lines()] == ["kept"]


def test_a_line_held_by_a_loop_that_stopped_leaves_with_the_next_loops_line() -> None:
    out = Writes()
    h = JsonLines(out)
    log = logging.getLogger("pag.test.stopped")
    with root_handler(h):
        first = asyncio.new_event_loop()
        try:
            first.call_soon(log.info, "one")
            first.call_soon(first.stop)  # the same turn: none follows for the flush
            first.run_forever()
        finally:
            first.close()
        assert out.writes == []  # held

        async def next_loop() -> None:
            log.info("two")
            await asyncio.sleep(0)
            await asyncio.sleep(0)

        asyncio.run(next_loop())
    assert [d["msg"] for d in out.lines()] == ["one", "two"]
