"""The log's keys and its default origin (issue 13, item 6)."""

from __future__ import annotations

import secrets

import pytest

from tlog import keys, note


def test_two_new_logs_never_share_an_origin(tmp_path):
    a, b = keys.load_signer(tmp_path / "a"), keys.load_signer(tmp_path / "b")
    assert a.name != b.name
    for s in (a, b):
        assert s.name == keys.default_origin(s.public_key)
        assert s.name.startswith("pag.local/log/") and len(s.name) == len("pag.local/log/") + 16


def test_origin_flag_overrides_and_is_kept(tmp_path):
    s = keys.load_signer(tmp_path, "example.com/mylog")
    assert s.name == "example.com/mylog"
    assert keys.load_signer(tmp_path).name == "example.com/mylog"
    with pytest.raises(ValueError, match="example.com/mylog"):
        keys.load_signer(tmp_path, "example.com/other")


def test_existing_key_keeps_its_name(tmp_path):
    old = note.generate_signer("pag.local/log")  # a data dir from before unique origins
    (tmp_path / "log.key").write_text(old.skey + "\n")
    assert keys.load_signer(tmp_path).vkey == old.vkey


def test_kms_key_keeps_the_name_it_was_served_under(tmp_path):
    seed = secrets.token_bytes(32)
    legacy = note.Ed25519Signer("pag.local/log", seed)
    (tmp_path / "log.vkey").write_text(legacy.vkey + "\n")
    assert keys.load_signer(tmp_path, seed=seed).vkey == legacy.vkey
    fresh = keys.load_signer(tmp_path / "new", seed=seed)
    assert fresh.name == keys.default_origin(legacy.public_key)
    other = keys.load_signer(tmp_path, seed=secrets.token_bytes(32))  # vkey of another key
    assert other.name == keys.default_origin(other.public_key)
    assert not (tmp_path / "log.key").exists()  # a KMS key is never written
