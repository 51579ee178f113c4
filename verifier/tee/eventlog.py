"""dstack event log: parse it, recompute RTMR3 from event payloads, read identity.

Pure: no I/O. The event log is the JSON array dstack's guest agent returns
from `GetQuote` (`event_log`), one object per event:
`{"imr": 0..3, "event_type": u32, "digest": HEX, "event": NAME,
"event_payload": HEX[, "version": 2][, "preimage": HEX]}`.

Invariants:

* RTMR3 is replayed only from what the events *say*: for each dstack runtime
  event (`event_type == 0x08000001`) the digest is recomputed from its name and
  payload; the event's own `digest` (and `preimage`) field is never used. A
  non-runtime event on IMR 3 cannot be recomputed and makes the log invalid.
* Digest of a runtime event, as in dstack (cc-eventlog):
  v1 (default): `SHA-384(le32(0x08000001) || ":" || name || ":" || payload)`;
  v2: `SHA-384(RFC 8785 JSON {"name": name, "payload": hex(payload),
  "type": 134217729})`.
* Extending: `mr = SHA-384(mr || digest)` starting from 48 zero bytes.
* RTMR0..2 are returned as replayed from the `digest` fields of boot-time
  events (they cannot be recomputed from this log format); callers must not
  rely on them for identity.
* Identity facts come from the events `app-id`, `compose-hash`,
  `instance-id`, `key-provider` and `os-image-hash`; each may appear at most
  once (a second one would let a later event contradict the first).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import rfc8785

DSTACK_RUNTIME_EVENT_TYPE = 0x08000001
MR_LEN = 48
INIT_MR = bytes(MR_LEN)
IDENTITY_EVENTS = ("app-id", "compose-hash", "instance-id", "key-provider", "os-image-hash")


class EventLogError(ValueError):
    """The event log is malformed or cannot be replayed."""


@dataclass(frozen=True)
class Event:
    """One event. `digest` is the claimed digest (kept for display, never trusted)."""

    imr: int
    event_type: int
    event: str
    payload: bytes
    digest: bytes = b""
    version: int = 1

    @property
    def is_runtime(self) -> bool:
        """True for dstack runtime events (the ones whose digest can be recomputed)."""
        return self.event_type == DSTACK_RUNTIME_EVENT_TYPE


@dataclass(frozen=True)
class Replay:
    """Result of replaying an event log."""

    rtmrs: tuple[bytes, bytes, bytes, bytes]
    app_id: str | None = None
    compose_hash: str | None = None
    instance_id: str | None = None
    os_image_hash: str | None = None
    key_provider: dict[str, Any] | None = None
    runtime_events: tuple[str, ...] = field(default_factory=tuple)

    @property
    def rtmr3(self) -> bytes:
        """RTMR3, recomputed from event payloads."""
        return self.rtmrs[3]


def runtime_event_digest(name: str, payload: bytes, version: int = 1) -> bytes:
    """SHA-384 digest dstack extends into RTMR3 for a runtime event."""
    if version == 1:
        pre = struct.pack("<I", DSTACK_RUNTIME_EVENT_TYPE) + b":" + name.encode() + b":" + payload
    elif version == 2:
        pre = rfc8785.dumps({"name": name, "payload": payload.hex(),
                             "type": DSTACK_RUNTIME_EVENT_TYPE})
    else:
        raise EventLogError(f"unknown event log version {version}")
    return hashlib.sha384(pre).digest()


def extend(mr: bytes, digest: bytes) -> bytes:
    """`SHA-384(mr || digest)`; digests shorter than 48 bytes are zero-padded (as TDX does)."""
    if len(mr) != MR_LEN or len(digest) > MR_LEN:
        raise EventLogError("bad measurement register or digest length")
    return hashlib.sha384(mr + digest.ljust(MR_LEN, b"\x00")).digest()


def _hex(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise EventLogError(f"{what} must be a hex string")
    try:
        return bytes.fromhex(value)
    except ValueError as e:
        raise EventLogError(f"{what} is not hex") from e


def parse_event(obj: Any) -> Event:
    """One event object (as dstack serialises it) to an `Event`."""
    if not isinstance(obj, dict):
        raise EventLogError("event must be a JSON object")
    imr, event_type = obj.get("imr"), obj.get("event_type")
    if not isinstance(imr, int) or isinstance(imr, bool) or not 0 <= imr <= 3:
        raise EventLogError(f"bad imr {imr!r}")
    if not isinstance(event_type, int) or isinstance(event_type, bool) \
            or not 0 <= event_type < 2 ** 32:
        raise EventLogError(f"bad event_type {event_type!r}")
    name = obj.get("event", "")
    if not isinstance(name, str):
        raise EventLogError("event name must be a string")
    version = obj.get("version", 1)
    if version not in (1, 2) or isinstance(version, bool):
        raise EventLogError(f"unknown event log version {version!r}")
    return Event(imr=imr, event_type=event_type, event=name,
                 payload=_hex(obj.get("event_payload", ""), "event_payload"),
                 digest=_hex(obj.get("digest", ""), "digest"), version=version)


def parse_event_log(data: str | bytes | Sequence[Any]) -> list[Event]:
    """Parse the event log: a JSON string/bytes, or the already-decoded list."""
    if isinstance(data, str | bytes):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise EventLogError("event log is not JSON") from e
    if not isinstance(data, list):
        raise EventLogError("event log must be a JSON array")
    return [parse_event(e) for e in data]


def event_to_json(ev: Event) -> dict[str, Any]:
    """The dstack JSON form of an event, with its digest recomputed for runtime events."""
    digest = runtime_event_digest(ev.event, ev.payload, ev.version) if ev.is_runtime \
        else ev.digest
    out: dict[str, Any] = {"imr": ev.imr, "event_type": ev.event_type, "digest": digest.hex(),
                           "event": ev.event, "event_payload": ev.payload.hex()}
    if ev.version != 1:
        out["version"] = ev.version
        if ev.is_runtime:
            out["preimage"] = rfc8785.dumps({"name": ev.event, "payload": ev.payload.hex(),
                                             "type": DSTACK_RUNTIME_EVENT_TYPE}).hex()
    return out


def runtime_event(name: str, payload: bytes, version: int = 1) -> Event:
    """A dstack runtime event on IMR 3 (digest filled in)."""
    return Event(imr=3, event_type=DSTACK_RUNTIME_EVENT_TYPE, event=name, payload=payload,
                 digest=runtime_event_digest(name, payload, version), version=version)


def dumps_event_log(events: Iterable[Event]) -> str:
    """Serialise events as dstack does (compact JSON array)."""
    return json.dumps([event_to_json(e) for e in events], separators=(",", ":"))


def replay_rtmr3(events: Iterable[Event]) -> bytes:
    """RTMR3 recomputed from the payloads of the IMR-3 events."""
    mr = INIT_MR
    for ev in events:
        if ev.imr != 3:
            continue
        if not ev.is_runtime:
            raise EventLogError(
                f"non-runtime event {ev.event!r} (type 0x{ev.event_type:x}) on IMR 3 "
                "cannot be recomputed")
        mr = extend(mr, runtime_event_digest(ev.event, ev.payload, ev.version))
    return mr


def _identity_value(name: str, payload: bytes) -> Any:
    if name == "key-provider":
        try:
            value = json.loads(payload)
        except (ValueError, RecursionError) as e:
            raise EventLogError("key-provider payload is not JSON") from e
        if not isinstance(value, dict):
            raise EventLogError("key-provider payload is not a JSON object")
        return value
    return payload.hex()


def replay(data: str | bytes | Sequence[Any] | Sequence[Event]) -> Replay:
    """Replay all RTMRs (RTMR3 from payloads) and extract the identity facts."""
    evs: list[Event]
    if isinstance(data, list | tuple) and data and all(isinstance(e, Event) for e in data):
        evs = [e for e in data if isinstance(e, Event)]
    else:
        evs = parse_event_log(data)  # type: ignore[arg-type]
    boot = [INIT_MR, INIT_MR, INIT_MR]
    for ev in evs:
        if ev.imr < 3:
            boot[ev.imr] = extend(boot[ev.imr], ev.digest)
    rtmr3 = replay_rtmr3(evs)
    facts: dict[str, Any] = {}
    names: list[str] = []
    for ev in evs:
        if ev.imr != 3:
            continue
        names.append(ev.event)
        if ev.event in IDENTITY_EVENTS:
            key = ev.event.replace("-", "_")
            if key in facts:
                raise EventLogError(f"event {ev.event!r} appears more than once")
            facts[key] = _identity_value(ev.event, ev.payload)
    return Replay(rtmrs=(boot[0], boot[1], boot[2], rtmr3), runtime_events=tuple(names),
                  **facts)
