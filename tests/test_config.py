"""The gateway's TOML configuration: the documented shape, and clear errors."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from gateway.api import config
from tlog import note
from witness import cosignature

WITNESS_VKEY = cosignature.generate_signer("w").vkey
EXAMPLE = """
[gateway]
name = "pag-demo"
max_body_bytes = 1048576
require_log_inclusion = false
log_unavailable = "serve-and-queue"
data_dir = "state"
admin_key_sha256 = "{admin}"

[dstack]
endpoint = "sim/dstack.sock"

[log]
url = "http://127.0.0.1:9000/"
token_file = "append.token"
vkey = "{log_vkey}"
witness_vkeys = ["{witness_vkey}"]
quorum = 1

[[api_keys]]
name = "demo"
sha256 = "{key}"
requests_per_minute = 6000
token_budget = 100000000

[[routes]]
id = "demo-dstack"
model = "demo-chat"
aliases = ["gpt-4o-mini"]
provider = "demo"
base_url = "http://127.0.0.1:8001/v1"
upstream_model = "demo-chat-1"
kind = "chat"
priority = 0
timeout = 30
evidence = "dstack"
required = true
[routes.policy]
allow_simulated = true
allow_unverified = false
max_lease_age = 300
app_id = "{app}"
""".format(admin="a" * 64, key="b" * 64, app="c" * 40, log_vkey=note.generate_signer("log").vkey,
           witness_vkey=WITNESS_VKEY)


def write(tmp: Path, text: str) -> Path:
    p = tmp / "gateway.toml"
    p.write_text(text)
    return p


def test_documented_example_loads(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, EXAMPLE))
    assert cfg.gateway.name == "pag-demo"
    assert cfg.gateway.data_dir == tmp_path.resolve() / "state"
    assert cfg.dstack_endpoint == str(tmp_path.resolve() / "sim" / "dstack.sock")
    assert cfg.log.url == "http://127.0.0.1:9000"
    assert cfg.log.token_file == tmp_path.resolve() / "append.token"
    assert cfg.log.witness_vkeys == (WITNESS_VKEY,) and cfg.log.quorum == 1
    assert cfg.api_keys[0].requests_per_minute == 6000
    r = cfg.routes[0]
    assert (r.id, r.aliases, r.upstream_model, r.timeout) == (
        "demo-dstack", ("gpt-4o-mini",), "demo-chat-1", 30.0)
    assert r.attestation_url == "http://127.0.0.1:8001/.well-known/attestation"
    assert r.policy == {"allow_simulated": True, "allow_unverified": False, "max_lease_age": 300,
                        "app_id": "c" * 40}


def test_defaults(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, '[[routes]]\nid="r"\nmodel="m"\nprovider="p"\n'
                                      'base_url="https://x.example/v1"\n'))
    assert cfg.gateway.data_dir == tmp_path.resolve()
    assert cfg.log.url is None and cfg.dstack_endpoint is None
    assert cfg.routes[0].upstream_model == "m" and cfg.routes[0].kind == "chat"


@pytest.mark.parametrize("text, message", [
    ("[gateway]\nnmae = 'x'\n", "unknown key 'nmae'"),
    ("[extra]\n", "unknown key 'extra'"),
    ("[gateway]\nmax_body_bytes = '1'\n", "max_body_bytes: wrong type"),
    ("[gateway]\nrequire_log_inclusion = 1\n", "require_log_inclusion: wrong type"),
    ("[gateway]\nmax_body_bytes = true\n", "max_body_bytes: wrong type"),
    ("[gateway]\nlog_unavailable = 'maybe'\n", "log_unavailable"),
    ("[gateway]\nadmin_key_sha256 = 'ABC'\n", "admin_key_sha256"),
    ("[log]\nurl = 'ftp://x'\n", "not an http(s) URL"),
    ("[[api_keys]]\nname = 'k'\n", "missing required key 'sha256'"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\nkind='image'\n",
     "kind"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\nevidence='magic'\n",
     "evidence"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\ntimeout=0\n",
     "timeout"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n", "duplicate"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[[routes]]\nid='s'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\nkind='embeddings'\n",
     "both chat and embeddings"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[routes.policy]\nallow_simulatd = true\n", "unknown policy keys: allow_simulatd"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[routes.policy]\nallow_simulated = 'false'\n", "'allow_simulated': wrong type str"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[routes.policy]\nmax_lease_age = 0\n", "max_lease_age must be positive"),
    ("[leases]\nredis_url = 'http://127.0.0.1:6379'\n", "not a redis:// URL"),
    ("[leases]\nredis = 'redis://127.0.0.1'\n", "unknown key 'redis'"),
    ("[shared]\nredis_url = 'http://127.0.0.1:6379'\n", "redis_url: not a redis://"),
    ("[shared]\nprefix = ''\n", "prefix must not be empty"),
    ("[shared]\ntimeout = 0\n", "timeout must be positive"),
    ("[shared]\nredis_url = 'redis://r'\nhold_seconds = 600\n[[routes]]\nid='r'\nmodel='m'\n"
     "provider='p'\nbase_url='http://x/v1'\n",
     "must exceed the longest call a route allows (600 s)"),
    ("[shared]\nredis_url = 'redis://r'\nhold_seconds = 3000\n[[routes]]\nid='r'\nmodel='m'\n"
     "provider='p'\nbase_url='http://x/v1'\ntimeout = 1000\nretries = 2\n", "(3000 s)"),
    ("not toml = = =", "not valid TOML"),
    ("[gateway]\nlog_wait_timeout = nan\n", r"\[gateway\]\.log_wait_timeout: must be a finite"),
    ("[gateway]\nlog_wait_timeout = 0\n", "log_wait_timeout must be positive"),
    ("[gateway]\nlog_wait_timeout = -1.5\n", "log_wait_timeout must be positive"),
    ("[gateway]\nshutdown_grace = 0\n", "shutdown_grace must be positive, at most 3600 s"),
    ("[gateway]\nshutdown_grace = 7200\n", "shutdown_grace must be positive, at most 3600 s"),
    ("[gateway]\nshutdown_grace = nan\n", "shutdown_grace: must be a finite number"),
    ("[gateway]\nreceipt_retention_seconds = inf\n", "receipt_retention_seconds: must be a finite"),
    ("[gateway]\nattestation_cache_seconds = nan\n", "attestation_cache_seconds: must be a finite"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\ntimeout=nan\n",
     "timeout: must be a finite number"),
    ("[shared]\ntimeout = -inf\n", "timeout: must be a finite number"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[routes.policy]\nmax_lease_age = inf\n", "'max_lease_age': must be a finite number"),
    ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='http://x/v1'\n"
     "[routes.policy]\nrefresh_before = nan\n", "'refresh_before': must be a finite number"),
])
def test_errors_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(write(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(tmp_path / "absent.toml")


def test_policy_paths_resolve_against_the_config_directory(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[[routes]]\nid='r'\nmodel='m'\nprovider='p'\n"
                            "base_url='https://x/v1'\nevidence='dstack'\n[routes.policy]\n"
                            "collateral_file = 'pcs/col.json'\nallow_simulated = false\n"
                            "allow_any_workload = true\n"))
    assert cfg.routes[0].policy == {"collateral_file": str(tmp_path / "pcs" / "col.json"),
                                    "allow_simulated": False, "allow_any_workload": True}


@pytest.mark.parametrize(("evidence", "url"), [
    ("dstack", "https://p.example:8443/.well-known/attestation"),
    ("phala", "https://p.example:8443/v1/attestation/report"),
    ("nearai", "https://p.example:8443/v1/attestation/report"),
    ("tinfoil", "https://p.example:8443/.well-known/tinfoil-attestation"),
    ("none", ""),
])
def test_attestation_url_defaults_per_evidence_kind(tmp_path: Path, evidence: str, url: str) -> None:
    cfg = config.load(write(tmp_path, "[[routes]]\nid='r'\nmodel='m'\nprovider='p'\n"
                            f"base_url='https://p.example:8443/v1'\nevidence='{evidence}'\n"
                            "policy = { allow_any_workload = true }\n"))
    assert cfg.routes[0].attestation_url == url


def test_provider_key_is_read_from_its_file_and_never_shown(tmp_path: Path) -> None:
    (tmp_path / "near.key").write_text("sk-secret-123\n")
    route = ("[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nevidence='nearai'\n"
             "policy = { app_id = 'ab' }\n")
    cfg = config.load(write(tmp_path, route + "base_url='https://x/v1'\napi_key_file='near.key'\n"))
    assert cfg.routes[0].api_key == "sk-secret-123"
    assert "sk-secret" not in repr(cfg)
    with pytest.raises(config.ConfigError, match="only sent over https"):
        config.load(write(tmp_path, route + "base_url='http://x/v1'\napi_key_file='near.key'\n"))
    with pytest.raises(config.ConfigError, match="cannot read"):
        config.load(write(tmp_path, route + "base_url='https://x/v1'\napi_key_file='nope.key'\n"))
    (tmp_path / "near.key").write_text("\n")
    with pytest.raises(config.ConfigError, match="empty"):
        config.load(write(tmp_path, route + "base_url='https://x/v1'\napi_key_file='near.key'\n"))


def test_log_keys_are_read_from_the_files_the_services_publish(tmp_path: Path) -> None:
    from tlog import note
    from witness import cosignature

    log_vkey = note.generate_signer("log").vkey
    w1, w2 = (cosignature.CosignatureSigner(n, secrets.token_bytes(32)).vkey
              for n in ("w1", "w2"))
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "log.vkey").write_text(log_vkey + "\n")
    (keys / "witness.vkey").write_text(w2 + "\n")
    cfg = config.load(write(tmp_path, '[log]\nvkey_file = "keys/log.vkey"\n'
                                      f'witness_vkeys = ["{w1}"]\n'
                                      'witness_vkey_files = ["keys/witness.vkey"]\n'))
    assert cfg.log.vkey == log_vkey
    assert cfg.log.witness_vkeys == (w1, w2)
    for text, message in (
            (f'[log]\nvkey = "{log_vkey}"\nvkey_file = "keys/log.vkey"\n', "not both"),
            ('[log]\nvkey_file = "keys/absent.vkey"\n', "cannot read .*absent.vkey"),
            ('[log]\nwitness_vkey_files = [1]\n', "list of strings")):
        with pytest.raises(config.ConfigError, match=message):
            config.load(write(tmp_path, text))
    (keys / "two.vkey").write_text("a+01234567+AAAA\nb+01234567+AAAA\n")
    with pytest.raises(config.ConfigError, match="one key on one line"):
        config.load(write(tmp_path, '[log]\nvkey_file = "keys/two.vkey"\n'))


def test_shared_redis_is_the_default_for_nonces_and_leases(tmp_path: Path) -> None:
    plain = config.load(write(tmp_path, ""))
    assert plain.shared.redis_url is None and plain.replay_redis is None \
        and plain.lease_redis is None  # everything in this process
    cfg = config.load(write(tmp_path, "[shared]\nredis_url = 'redis://r:6379/1'\n"
                            "prefix = 'gw1:'\nhold_seconds = 700\n"))
    assert (cfg.shared.prefix, cfg.shared.hold_seconds, cfg.shared.timeout) == ("gw1:", 700, 2.0)
    assert cfg.replay_redis == ("redis://r:6379/1", "gw1:e2ee:")
    assert cfg.lease_redis == ("redis://r:6379/1", "gw1:lease:")
    own = config.load(write(tmp_path, "[shared]\nredis_url = 'redis://r/1'\n"
                            "[e2ee]\nredis_url = 'redis://e/2'\nprefix = 'n:'\n"
                            "[leases]\nredis_url = 'redis://l/3'\n"))
    assert own.replay_redis == ("redis://e/2", "n:")  # a table of its own wins
    assert own.lease_redis == ("redis://l/3", "pag:lease:")


def test_long_streams_need_no_shared_table(tmp_path: Path) -> None:
    cfg = config.load(write(tmp_path, "[[routes]]\nid='r'\nmodel='m'\nprovider='p'\n"
                            "base_url='http://x/v1'\nstream_timeout = 3600\n"))
    assert cfg.routes[0].stream_timeout == 3600.0 and cfg.shared.redis_url is None
