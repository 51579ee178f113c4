"""The request-hash lookup key of an entry: a JSON object's `request_hash` member when it is
64 lower-case hex digits, else nothing (the same answer as the plain definition)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from tlog.storage import lookup_key

hexish = st.text(alphabet="0123456789abcdefABCDEF\n g\u0660", min_size=60, max_size=68)
values = st.none() | st.integers() | hexish | st.text(max_size=70) | st.lists(hexish, max_size=2)


def definition(entry: bytes) -> str | None:
    """The rule as first written: parse, then check length and every character."""
    if not entry.startswith(b"{") or b'"request_hash"' not in entry:
        return None
    try:
        value = json.loads(entry).get("request_hash")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return None


@settings(max_examples=500, deadline=None)
@given(values, st.dictionaries(st.text(max_size=5), values, max_size=3))
def test_lookup_key_equals_the_definition(value: object, other: dict) -> None:
    for entry in (json.dumps({**other, "request_hash": value}).encode(),
                  json.dumps({"request_hash": value, **other}).encode(),
                  json.dumps([{"request_hash": value}]).encode()):
        assert lookup_key(entry) == definition(entry)


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=40), st.sampled_from([b"", b"NaN", b"1e400", b'"\\ud800"', b"\xff",
                                                 b"[" * 3, b'"%s"' % (b"ab" * 32)]),
       st.binary(max_size=20))
def test_lookup_key_equals_the_definition_on_any_bytes(head: bytes, value: bytes,
                                                       tail: bytes) -> None:
    """Bytes orjson and json may judge differently (invalid UTF-8, NaN, huge numbers, lone
    surrogates, truncation) get json's answer."""
    for entry in (b'{"request_hash": ' + value + b"}", b'{"request_hash": ' + value + tail,
                  b'{"request_hash": ' + value + b', "x": ' + head + b"}",
                  b'{' + head + b'"request_hash": ' + value + b"}"):
        try:
            expected = definition(entry)
        except RecursionError:
            continue
        assert lookup_key(entry) == expected


def test_lookup_key_takes_only_lower_case_hex_of_64() -> None:
    h = "0123456789abcdef" * 4
    assert lookup_key(b'{"request_hash": "%s"}' % h.encode()) == h
    assert lookup_key(b'{"request_hash": "%s"}' % h.upper().encode()) is None
    assert lookup_key(b'{"request_hash": "%s\\n"}' % h.encode()) is None  # no $ slack
    assert lookup_key(b'{"request_hash": "%s0"}' % h.encode()) is None


def test_nesting_too_deep_to_parse_is_no_key_not_an_error() -> None:
    deep = b'{"request_hash":"' + b"a" * 64 + b'","x":' + b"[" * 30000 + b"]" * 30000 + b"}"
    assert lookup_key(deep) is None
