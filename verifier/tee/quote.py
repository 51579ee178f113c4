"""Intel TDX quote parsing (v4 and v5) and the project's *simulated* quote.

Pure: no I/O, no globals beyond constants. Parsing never verifies a
signature; it only splits the bytes into fields (signature verification of
real quotes is `dcap-qvl`'s job).

Layout (Intel TDX DCAP Quote Generation Library and Quote Verification
Library spec, little-endian integers):

* header, 48 bytes: version u16, attestation key type u16, TEE type u32,
  QE SVN u16 (reserved in v4), PCE SVN u16, QE vendor id 16 B, user data 20 B;
* v4: a TD 1.0 report body (584 B) follows the header;
  v5: a body descriptor (type u16: 2 = TD 1.0, 3 = TD 1.5; size u32) and then
  the body (584 B, or 648 B for TD 1.5 which adds TEE_TCB_SVN2 and MRSERVICETD);
* signature data length u32, then the signature data.

A simulated quote has the v4 layout with QE vendor id `SIMULATED_QE_VENDOR_ID`,
user data `SIMULATED_USER_DATA` and a signature section whose signatures,
keys and QE report are all zero bytes (`SIMULATED_SIGNATURE_DATA`).
`is_simulated` requires all three, so it is never true of a quote a real
Quoting Enclave produced, and no real verifier accepts a simulated quote.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

HEADER_LEN = 48
TD10_BODY_LEN = 584
TD15_BODY_LEN = 648
TEE_TYPE_TDX = 0x81
ATT_KEY_TYPE_ECDSA_P256 = 2
BODY_TYPE_TD10 = 2
BODY_TYPE_TD15 = 3
INTEL_QE_VENDOR_ID = bytes.fromhex("939a7233f79c4ca9940a0db3957f0607")

SIMULATED_QE_VENDOR_ID = b"PAG-SIMULATED-QE"  # 16 bytes
SIMULATED_USER_DATA = b"PAG-SIMULATED-QUOTE\x00"  # 20 bytes
# The simulated signature section: a zero ECDSA signature (64) and zero
# attestation key (64), then certification data of type 6 (QE report
# certification data) holding a zero QE report (384), a zero QE report
# signature (64), empty QE authentication data and an empty type-5 (PCK chain)
# certification data. Only the type/size fields are non-zero, so the section
# keeps the shape that DCAP parsers expect (dcap-qvl parses it) while nothing
# in it can verify.
SIMULATED_SIGNATURE_DATA = (
    bytes(64) + bytes(64)
    + struct.pack("<HI", 6, 384 + 64 + 2 + 2 + 4)
    + bytes(384) + bytes(64) + struct.pack("<H", 0) + struct.pack("<HI", 5, 0)
)

assert len(SIMULATED_QE_VENDOR_ID) == 16 and len(SIMULATED_USER_DATA) == 20  # noqa: S101 - checks constants at import, not input


class QuoteError(ValueError):
    """The bytes are not a well-formed TDX quote of a supported version."""


@dataclass(frozen=True)
class QuoteHeader:
    """The 48-byte quote header."""

    version: int
    att_key_type: int
    tee_type: int
    qe_svn: int
    pce_svn: int
    qe_vendor_id: bytes
    user_data: bytes


@dataclass(frozen=True)
class TdReport:
    """A TD report body (TD 1.0; TD 1.5 adds `tee_tcb_svn2` and `mr_servicetd`)."""

    tee_tcb_svn: bytes
    mr_seam: bytes
    mr_signer_seam: bytes
    seam_attributes: bytes
    td_attributes: bytes
    xfam: bytes
    mr_td: bytes
    mr_config_id: bytes
    mr_owner: bytes
    mr_owner_config: bytes
    rtmr0: bytes
    rtmr1: bytes
    rtmr2: bytes
    rtmr3: bytes
    report_data: bytes
    tee_tcb_svn2: bytes | None = None
    mr_servicetd: bytes | None = None

    @property
    def rtmrs(self) -> tuple[bytes, bytes, bytes, bytes]:
        """(RTMR0, RTMR1, RTMR2, RTMR3)."""
        return (self.rtmr0, self.rtmr1, self.rtmr2, self.rtmr3)

    def to_hex_dict(self) -> dict[str, str]:
        """Every present field as lower-case hex (names as in this dataclass)."""
        out: dict[str, str] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            if value is not None:
                out[name] = value.hex()
        return out


@dataclass(frozen=True)
class TdxQuote:
    """A parsed quote. `signed_len` bytes at the start are what the QE signed."""

    header: QuoteHeader
    body_type: int
    report: TdReport
    signature_data: bytes
    signed_len: int
    trailing: int = 0

    @property
    def version(self) -> int:
        """Quote format version (4 or 5)."""
        return self.header.version


# (name, length) of the TD 1.0 body, in order.
_TD10_FIELDS: tuple[tuple[str, int], ...] = (
    ("tee_tcb_svn", 16),
    ("mr_seam", 48),
    ("mr_signer_seam", 48),
    ("seam_attributes", 8),
    ("td_attributes", 8),
    ("xfam", 8),
    ("mr_td", 48),
    ("mr_config_id", 48),
    ("mr_owner", 48),
    ("mr_owner_config", 48),
    ("rtmr0", 48),
    ("rtmr1", 48),
    ("rtmr2", 48),
    ("rtmr3", 48),
    ("report_data", 64),
)
_TD15_EXTRA: tuple[tuple[str, int], ...] = (("tee_tcb_svn2", 16), ("mr_servicetd", 48))

REPORT_DATA_OFFSET_V4 = HEADER_LEN + sum(n for _, n in _TD10_FIELDS) - 64  # 568


def _parse_header(data: bytes) -> QuoteHeader:
    version, att_key_type, tee_type, qe_svn, pce_svn = struct.unpack_from("<HHIHH", data, 0)
    return QuoteHeader(version=version, att_key_type=att_key_type, tee_type=tee_type,
                       qe_svn=qe_svn, pce_svn=pce_svn, qe_vendor_id=bytes(data[12:28]),
                       user_data=bytes(data[28:48]))


def _parse_body(body: bytes, td15: bool) -> TdReport:
    fields = _TD10_FIELDS + (_TD15_EXTRA if td15 else ())
    values: dict[str, bytes] = {}
    pos = 0
    for name, size in fields:
        values[name] = bytes(body[pos:pos + size])
        pos += size
    return TdReport(**values)


def parse_quote(data: bytes) -> TdxQuote:
    """Parse a TDX quote v4 or v5 (TD 1.0 or TD 1.5 body). Raises `QuoteError`.

    A signature length running past the end is an error. Bytes after the
    signature data (real quote buffers are often zero-padded) are counted in
    `trailing`, never interpreted.
    """
    data = bytes(data)
    if len(data) < HEADER_LEN:
        raise QuoteError(f"quote too short: {len(data)} bytes")
    header = _parse_header(data)
    if header.tee_type != TEE_TYPE_TDX:
        raise QuoteError(f"not a TDX quote: tee_type 0x{header.tee_type:x}")
    pos = HEADER_LEN
    if header.version == 4:
        body_type, body_len = BODY_TYPE_TD10, TD10_BODY_LEN
    elif header.version == 5:
        if len(data) < pos + 6:
            raise QuoteError("quote v5 truncated in body descriptor")
        body_type, body_len = struct.unpack_from("<HI", data, pos)
        pos += 6
        expected = {BODY_TYPE_TD10: TD10_BODY_LEN, BODY_TYPE_TD15: TD15_BODY_LEN}.get(body_type)
        if expected is None:
            raise QuoteError(f"unsupported v5 body type {body_type} (not a TD report)")
        if body_len != expected:
            raise QuoteError(f"v5 body type {body_type} has size {body_len}, want {expected}")
    else:
        raise QuoteError(f"unsupported quote version {header.version}")
    if len(data) < pos + body_len + 4:
        raise QuoteError("quote truncated in report body")
    report = _parse_body(data[pos:pos + body_len], body_type == BODY_TYPE_TD15)
    pos += body_len
    signed_len = pos
    (sig_len,) = struct.unpack_from("<I", data, pos)
    pos += 4
    if len(data) < pos + sig_len:
        raise QuoteError(
            f"signature data length {sig_len} runs past the {len(data) - pos} bytes left")
    return TdxQuote(header=header, body_type=body_type, report=report,
                    signature_data=data[pos:pos + sig_len], signed_len=signed_len,
                    trailing=len(data) - pos - sig_len)


def _check_len(name: str, value: bytes, size: int) -> bytes:
    value = bytes(value)
    if len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    return value


def build_simulated_quote(report_data: bytes, *, mr_td: bytes, rtmrs: Sequence[bytes],
                          mr_config_id: bytes = bytes(48), mr_owner: bytes = bytes(48),
                          mr_owner_config: bytes = bytes(48), mr_seam: bytes = bytes(48),
                          tee_tcb_svn: bytes = bytes(16), td_attributes: bytes = bytes(8),
                          xfam: bytes = bytes(8)) -> bytes:
    """A v4 quote with the given fields, marked simulated and carrying no signature.

    `report_data` is right-padded with zeros to 64 bytes (as dstack does);
    more than 64 bytes is an error. `rtmrs` is (RTMR0, RTMR1, RTMR2, RTMR3).
    """
    if len(report_data) > 64:
        raise ValueError("report_data longer than 64 bytes")
    if len(rtmrs) != 4:
        raise ValueError("need exactly four RTMRs")
    header = struct.pack("<HHIHH", 4, ATT_KEY_TYPE_ECDSA_P256, TEE_TYPE_TDX, 0, 0)
    header += SIMULATED_QE_VENDOR_ID + SIMULATED_USER_DATA
    body = b"".join([
        _check_len("tee_tcb_svn", tee_tcb_svn, 16),
        _check_len("mr_seam", mr_seam, 48),
        bytes(48),  # mr_signer_seam
        bytes(8),  # seam_attributes
        _check_len("td_attributes", td_attributes, 8),
        _check_len("xfam", xfam, 8),
        _check_len("mr_td", mr_td, 48),
        _check_len("mr_config_id", mr_config_id, 48),
        _check_len("mr_owner", mr_owner, 48),
        _check_len("mr_owner_config", mr_owner_config, 48),
        *(_check_len(f"rtmr{i}", r, 48) for i, r in enumerate(rtmrs)),
        bytes(report_data).ljust(64, b"\x00"),
    ])
    assert len(header) == HEADER_LEN and len(body) == TD10_BODY_LEN  # noqa: S101 - checks our own builder's output, not input
    return (header + body + struct.pack("<I", len(SIMULATED_SIGNATURE_DATA))
            + SIMULATED_SIGNATURE_DATA)


def is_simulated(data: bytes) -> bool:
    """True iff `data` parses and carries every simulated-quote marker.

    Markers: QE vendor id, user data, and a signature section equal to
    `SIMULATED_SIGNATURE_DATA` (zero signatures and keys), with no trailing
    bytes. Malformed input is not simulated
    (callers must still reject it as malformed).
    """
    try:
        q = parse_quote(data)
    except QuoteError:
        return False
    return (q.header.qe_vendor_id == SIMULATED_QE_VENDOR_ID
            and q.header.user_data == SIMULATED_USER_DATA
            and q.signature_data == SIMULATED_SIGNATURE_DATA
            and q.trailing == 0)


def looks_simulated(data: bytes) -> bool:
    """True if any single simulated marker is present (for refusing half-forged quotes)."""
    try:
        q = parse_quote(data)
    except QuoteError:
        return False
    return (q.header.qe_vendor_id == SIMULATED_QE_VENDOR_ID
            or q.header.user_data == SIMULATED_USER_DATA)
