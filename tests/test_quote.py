"""TDX quote parsing against real quotes, and the simulated quote's markers."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from verifier.tee import quote

FIELD_NAMES = {"rt_mr0": "rtmr0", "rt_mr1": "rtmr1", "rt_mr2": "rtmr2", "rt_mr3": "rtmr3"}


def _vectors(testdata: Path) -> tuple[Path, dict]:
    d = testdata / "vectors" / "tdx"
    if not (d / "expected.json").is_file():
        pytest.skip("TDX quote vectors absent")
    return d, json.loads((d / "expected.json").read_text())["quotes"]


def _read(path: Path) -> bytes:
    raw = path.read_bytes()
    if path.suffix == ".hex":
        text = raw.decode().strip()
        return bytes.fromhex(text.removeprefix("0x"))
    return raw


def test_real_quotes_parse_to_expected_fields(testdata: Path) -> None:
    d, quotes = _vectors(testdata)
    assert quotes
    for name, exp in quotes.items():
        raw = _read(d / exp["file"])
        q = quote.parse_quote(raw)
        assert q.version == exp["quote_version"], name
        assert q.header.tee_type == quote.TEE_TYPE_TDX
        assert q.header.qe_vendor_id == quote.INTEL_QE_VENDOR_ID
        for field, value in exp["parsed"].items():
            assert getattr(q.report, FIELD_NAMES.get(field, field)).hex() == value, (name, field)
        assert not quote.is_simulated(raw), name
        assert not quote.looks_simulated(raw), name
        if q.version == 4:
            off = quote.REPORT_DATA_OFFSET_V4
            assert raw[off:off + 64] == q.report.report_data


def test_v5_td15_body_has_extra_fields(testdata: Path) -> None:
    d, quotes = _vectors(testdata)
    exp = quotes["tdx_quote_outdated"]
    q = quote.parse_quote(_read(d / exp["file"]))
    assert q.version == 5 and q.body_type == quote.BODY_TYPE_TD15
    assert q.report.tee_tcb_svn2 is not None and len(q.report.tee_tcb_svn2) == 16
    assert q.report.mr_servicetd is not None and len(q.report.mr_servicetd) == 48
    v4 = quote.parse_quote(_read(d / quotes["tdx_quote"]["file"]))
    assert v4.report.mr_servicetd is None and v4.body_type == quote.BODY_TYPE_TD10


def test_truncated_and_foreign_quotes_are_refused(testdata: Path) -> None:
    d, quotes = _vectors(testdata)
    raw = _read(d / quotes["tdx_quote"]["file"])
    q = quote.parse_quote(raw)
    end = q.signed_len + 4 + len(q.signature_data)
    with pytest.raises(quote.QuoteError, match="runs past"):
        quote.parse_quote(raw[:end - 1])
    with pytest.raises(quote.QuoteError, match="truncated"):
        quote.parse_quote(raw[:300])
    with pytest.raises(quote.QuoteError, match="too short"):
        quote.parse_quote(raw[:20])
    sgx = raw[:4] + struct.pack("<I", 0) + raw[8:]
    with pytest.raises(quote.QuoteError, match="not a TDX"):
        quote.parse_quote(sgx)
    v3 = struct.pack("<H", 3) + raw[2:]
    with pytest.raises(quote.QuoteError, match="unsupported quote version"):
        quote.parse_quote(v3)


def _sim(report_data: bytes = b"rd") -> bytes:
    rtmrs = [bytes([i]) * 48 for i in range(4)]
    return quote.build_simulated_quote(report_data, mr_td=b"\x07" * 48, rtmrs=rtmrs,
                                       mr_config_id=b"\x09" * 48)


def test_simulated_quote_round_trip() -> None:
    raw = _sim(b"\xaa" * 40)
    q = quote.parse_quote(raw)
    assert q.version == 4 and q.trailing == 0
    assert q.report.report_data == b"\xaa" * 40 + bytes(24)
    assert q.report.mr_td == b"\x07" * 48 and q.report.mr_config_id == b"\x09" * 48
    assert q.report.rtmrs == tuple(bytes([i]) * 48 for i in range(4))
    assert q.header.qe_vendor_id == quote.SIMULATED_QE_VENDOR_ID
    assert quote.is_simulated(raw)
    assert raw[quote.REPORT_DATA_OFFSET_V4:quote.REPORT_DATA_OFFSET_V4 + 2] == b"\xaa\xaa"


def test_simulated_quote_parses_with_dcap_qvl() -> None:
    dcap_qvl = pytest.importorskip("dcap_qvl")
    parsed = dcap_qvl.parse_quote(_sim(b"x" * 64))
    assert bytes(parsed.report.report_data) == b"x" * 64


def test_simulated_marker_needs_every_part() -> None:
    raw = bytearray(_sim())
    assert quote.is_simulated(bytes(raw))
    vendor = bytearray(raw)
    vendor[12] ^= 1  # qe_vendor_id
    assert not quote.is_simulated(bytes(vendor))
    assert quote.looks_simulated(bytes(vendor))  # user data marker still there
    signed = bytearray(raw)
    signed[-1] ^= 1  # a non-zero byte in the signature section
    assert not quote.is_simulated(bytes(signed))
    assert not quote.is_simulated(bytes(raw) + b"\x00")  # trailing bytes
    assert not quote.is_simulated(b"garbage")


def test_simulated_builder_validates_sizes() -> None:
    with pytest.raises(ValueError, match="longer than 64"):
        quote.build_simulated_quote(bytes(65), mr_td=bytes(48), rtmrs=[bytes(48)] * 4)
    with pytest.raises(ValueError, match="mr_td"):
        quote.build_simulated_quote(b"", mr_td=bytes(47), rtmrs=[bytes(48)] * 4)
    with pytest.raises(ValueError, match="four"):
        quote.build_simulated_quote(b"", mr_td=bytes(48), rtmrs=[bytes(48)] * 3)
