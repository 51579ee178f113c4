"""The WHATWG event-stream parser (verifier/sse.py): every line ending, field and split."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier import sse


def parse_all(data: bytes, cuts: list[int] | None = None) -> tuple[list[sse.Event], bytes]:
    p = sse.SseParser()
    events: list[sse.Event] = []
    pos = 0
    for c in sorted(cuts or []):
        events += p.feed(data[pos:c])
        pos = c
    events += p.feed(data[pos:])
    return events, p.rest()


def test_line_endings_crlf_cr_lf_are_equal() -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        text = eol.join([b"data: a", b"data:b", b"", b"data: c", b"", b""])
        events, rest = parse_all(text)
        assert [e.data for e in events] == [b"a\nb", b"c"], eol
        assert b"".join(e.raw for e in events) + rest == text


def test_cr_at_chunk_end_and_lf_at_next_start_are_one_line_end() -> None:
    text = b"data: x\r\n\r\ndata: y\r\n\r\n"
    for cut in range(len(text) + 1):
        events, rest = parse_all(text, [cut])
        assert [e.data for e in events] == [b"x", b"y"], cut
        assert b"".join(e.raw for e in events) + rest == text


def test_fields_event_id_retry_comments() -> None:
    text = (b": keep-alive\n\n"
            b"event: error\ndata: {\"a\":1}\nid: 7\nretry: 1500\n\n"
            b"data\n\n"
            b"id: bad\x00id\ndata:  two spaces\nunknown: x\n\n")
    p = sse.SseParser()
    events = p.feed(text)
    assert [(e.type, e.data, e.id) for e in events] == [
        ("error", b'{"a":1}', "7"), ("message", b"", "7"), ("message", b" two spaces", "7")]
    assert p.retry == 1500
    # the comment-only block yields no event: its bytes open the next event's raw bytes
    assert events[0].raw.startswith(b": keep-alive\n\n")


def test_bom_is_skipped_and_kept_in_raw() -> None:
    text = b"\xef\xbb\xbfdata: a\n\n"
    for cut in range(len(text) + 1):
        events, rest = parse_all(text, [cut])
        assert [e.data for e in events] == [b"a"] and events[0].raw == text and rest == b""


def test_unterminated_event_is_not_dispatched() -> None:
    events, rest = parse_all(b"data: a\n\ndata: b\n")
    assert [e.data for e in events] == [b"a"] and rest == b"data: b\n"


def test_an_event_past_the_limit_is_refused() -> None:
    p = sse.SseParser(max_event=64)
    p.feed(b"data: " + b"x" * 40 + b"\n")
    with pytest.raises(sse.SseError):
        p.feed(b"data: " + b"y" * 40)


def test_a_long_event_fed_byte_by_byte_keeps_its_bytes() -> None:
    body = b"data: " + b"z" * 20000 + b"\n\n"
    p = sse.SseParser()
    events = [e for i in range(len(body)) for e in p.feed(body[i:i + 1])]
    assert len(events) == 1 and events[0].data == b"z" * 20000 and events[0].raw == body


def test_encode_round_trips() -> None:
    for data, typ in ((b"{}", None), (b"a\nb", None), (b"x", "error"), (b"", "message")):
        (ev,), rest = parse_all(sse.encode(data, typ))
        assert (ev.data, ev.type) == (data, typ or "message") and rest == b""
    with pytest.raises(ValueError):
        sse.encode(b"a\rb")
    with pytest.raises(ValueError):
        sse.encode(b"a", "x\ny")


LINES = st.lists(st.sampled_from([b"data: a", b"data:b", b"data", b"event: e", b": c",
                                  b"id: 1", b"retry: 9", b"", b"x: y", b"data: {\"k\":\"v\"}"]),
                 max_size=20)


@settings(max_examples=300, deadline=None)
@given(LINES, st.sampled_from([b"\n", b"\r\n", b"\r"]), st.lists(st.integers(0, 400),
                                                                    max_size=6))
def test_any_split_gives_the_same_events_and_bytes(lines: list[bytes], eol: bytes,
                                                   cuts: list[int]) -> None:
    text = b"".join(line + eol for line in lines)
    whole, whole_rest = parse_all(text)
    split, split_rest = parse_all(text, [min(c, len(text)) for c in cuts])
    assert [(e.type, e.data, e.id) for e in split] == [(e.type, e.data, e.id) for e in whole]
    assert b"".join(e.raw for e in split) + split_rest == text
    # where a chunk ends in the CR of a CRLF, the LF goes with what follows
    assert whole_rest.lstrip(b"\n") == split_rest.lstrip(b"\n")
