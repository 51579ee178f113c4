"""dstack event-log replay: digests recomputed from payloads, identity facts."""

from __future__ import annotations

import hashlib
import json

import pytest

from verifier.tee import eventlog


def _sha384(b: bytes) -> bytes:
    return hashlib.sha384(b).digest()


def test_v1_digest_known_answer() -> None:
    # 0x08000001 little-endian, ':' name ':' payload
    expected = _sha384(b"\x01\x00\x00\x08:app-id:\xde\xad\xbe\xef")
    assert eventlog.runtime_event_digest("app-id", b"\xde\xad\xbe\xef") == expected


def test_v2_digest_is_canonical_json() -> None:
    canonical = b'{"name":"compose-hash","payload":"abcd","type":134217729}'
    assert eventlog.runtime_event_digest("compose-hash", b"\xab\xcd", 2) == _sha384(canonical)
    assert eventlog.runtime_event_digest("compose-hash", b"\xab\xcd", 1) != _sha384(canonical)
    with pytest.raises(eventlog.EventLogError):
        eventlog.runtime_event_digest("x", b"", 3)


def _log() -> list[eventlog.Event]:
    return [
        eventlog.runtime_event("system-preparing", b""),
        eventlog.runtime_event("app-id", bytes(range(20))),
        eventlog.runtime_event("compose-hash", bytes(range(32))),
        eventlog.runtime_event("instance-id", b"\x05" * 20),
        eventlog.runtime_event("boot-mr-done", b""),
        eventlog.runtime_event("key-provider", b'{"name":"kms","id":"ab"}'),
        eventlog.runtime_event("custom-v2", b"\x01\x02", version=2),
    ]


def test_replay_matches_manual_extension_and_facts() -> None:
    events = _log()
    mr = bytes(48)
    for ev in events:
        mr = _sha384(mr + eventlog.runtime_event_digest(ev.event, ev.payload, ev.version))
    rep = eventlog.replay(eventlog.dumps_event_log(events))
    assert rep.rtmr3 == mr
    assert rep.app_id == bytes(range(20)).hex()
    assert rep.compose_hash == bytes(range(32)).hex()
    assert rep.instance_id == "05" * 20
    assert rep.key_provider == {"name": "kms", "id": "ab"}
    assert rep.runtime_events[-1] == "custom-v2"
    assert rep.rtmrs[:3] == (bytes(48),) * 3


def test_replay_agrees_with_dstack_sdk() -> None:
    sdk = pytest.importorskip("dstack_sdk.dstack_client")
    text = eventlog.dumps_event_log(_log())
    history = [e["digest"] for e in json.loads(text) if e["imr"] == 3]
    assert sdk.replay_rtmr(history) == eventlog.replay(text).rtmr3.hex()


def test_claimed_digest_is_never_trusted() -> None:
    log = json.loads(eventlog.dumps_event_log(_log()))
    honest = eventlog.replay(log).rtmr3
    for e in log:
        e["digest"] = "00" * 48  # lying digests change nothing
    assert eventlog.replay(log).rtmr3 == honest
    log[2]["event_payload"] = "ff" * 32  # a changed payload changes RTMR3
    assert eventlog.replay(log).rtmr3 != honest
    assert eventlog.replay(log).compose_hash == "ff" * 32


def test_boot_events_replay_from_digest_fields() -> None:
    d = "11" * 48
    log = [{"imr": 0, "event_type": 1, "digest": d, "event": "", "event_payload": ""}]
    rep = eventlog.replay(log)
    assert rep.rtmrs[0] == _sha384(bytes(48) + bytes.fromhex(d))
    assert rep.rtmr3 == bytes(48) and rep.app_id is None


@pytest.mark.parametrize("mutate, msg", [
    (lambda log: log.append(dict(log[1])), "more than once"),
    (lambda log: log.append({"imr": 3, "event_type": 1, "digest": "00" * 48, "event": "x",
                             "event_payload": ""}), "cannot be recomputed"),
    (lambda log: log[1].update(event_payload="zz"), "not hex"),
    (lambda log: log[1].update(imr=4), "bad imr"),
    (lambda log: log[1].update(version=7), "version"),
    (lambda log: log[5].update(event_payload=b"not json".hex()), "not JSON"),
])
def test_malformed_logs_are_refused(mutate, msg: str) -> None:
    log = json.loads(eventlog.dumps_event_log(_log()))
    mutate(log)
    with pytest.raises(eventlog.EventLogError, match=msg):
        eventlog.replay(log)


def test_non_array_and_non_json_refused() -> None:
    with pytest.raises(eventlog.EventLogError):
        eventlog.parse_event_log("{}")
    with pytest.raises(eventlog.EventLogError):
        eventlog.parse_event_log("not json")


def test_v2_events_serialise_version_and_preimage() -> None:
    ev = eventlog.runtime_event("n", b"\x01", version=2)
    obj = eventlog.event_to_json(ev)
    assert obj["version"] == 2
    assert _sha384(bytes.fromhex(obj["preimage"])).hex() == obj["digest"]
    assert "version" not in eventlog.event_to_json(eventlog.runtime_event("n", b"\x01"))
