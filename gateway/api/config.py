"""The gateway's TOML configuration (docs/config.md): gateway, dstack, log, api keys, routes.

`load(path)` returns a fully validated `Config`; any unknown key, wrong type or
missing required value raises `ConfigError` naming the offending key. Relative
paths resolve against the directory of the config file.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gateway.verification.base import PATH_KEYS, WORKLOAD_PINS, Policy
from tlog import note
from tlog.service import LIMIT_FLAGS, ServerLimits
from witness import cosignature

HEX64 = re.compile(r"[0-9a-f]{64}")
KINDS = ("chat", "embeddings")
EVIDENCE = ("dstack", "phala", "nearai", "tinfoil", "none")
LOG_UNAVAILABLE = ("serve-and-queue", "refuse")
DURABILITY = ("process", "fsync")
MAX_WAIT = 3600.0  # seconds: the longest log_wait_timeout or shutdown_grace


class ConfigError(ValueError):
    """The configuration file is unreadable or invalid; the message names the key."""


@dataclass(frozen=True)
class GatewaySettings:
    """The `[gateway]` table."""

    name: str = "pag"
    max_body_bytes: int = 1 << 20
    max_messages: int = 2048
    max_json_depth: int = 64
    require_log_inclusion: bool = False
    log_unavailable: str = "serve-and-queue"
    log_wait_timeout: float = 30.0
    shutdown_grace: float = 5.0  # seconds calls in flight may take to finish once stopping
    outbox_durability: str = "process"
    outbox_max_bytes: int = 1 << 30  # the outbox and ledger files together; 503 outbox_full at it
    receipt_retention_seconds: float = 7 * 86400.0  # a logged receipt stays readable this long
    data_dir: Path = Path(".")
    admin_key_sha256: str | None = None
    attestation_cache_seconds: float = 60.0  # the nonce-less attestation is shared this long
    attestation_nonce_per_client_per_minute: int = 60  # quotes with a nonce, per address
    attestation_nonce_per_second: int = 20  # quotes with a nonce, all addresses together
    traces: bool = False


@dataclass(frozen=True)
class LogSettings:
    """The `[log]` table: where receipts and the keyset and evidence entries are appended, and
    whose proofs count as logged (signed by `vkey`, cosigned by `quorum` of `witness_vkeys`;
    `quorum` defaults to the number of witness keys)."""

    url: str | None = None
    token_file: Path | None = None
    vkey: str | None = None
    witness_vkeys: tuple[str, ...] = ()
    quorum: int = 0
    concurrency: int = 128


@dataclass(frozen=True)
class LeaseSettings:
    """The `[leases]` table: where replicas share verified leases (none: per process)."""

    redis_url: str | None = None
    prefix: str = "pag:lease:"


@dataclass(frozen=True)
class SharedSettings:
    """The `[shared]` table: the Redis every replica of this gateway shares rate limits,
    budgets, E2EE nonces, leases and receipt lookups through (gateway/api/shared.py).

    No `redis_url`: all of it stays in this process (one replica). `hold_seconds` bounds
    how long a budget reservation outlives a replica that died mid-call (it is then charged
    in full); `receipt_ttl_seconds` how long any replica can find a receipt by id (each
    takes about 2 KB of Redis memory meanwhile; after it, the replica that signed the
    receipt still answers for it)."""

    redis_url: str | None = None
    prefix: str = "pag:"
    timeout: float = 2.0
    hold_seconds: int = 900
    receipt_ttl_seconds: int = 3600


@dataclass(frozen=True)
class E2eeSettings:
    """The `[e2ee]` table: where accepted E2EE nonces are remembered (gateway/api/replay.py).

    No `redis_url` here or in `[leases]`: in this process only (one replica)."""

    redis_url: str | None = None
    prefix: str = "pag:e2ee:"
    max_entries: int = 1_000_000


@dataclass(frozen=True)
class TlsSettings:
    """The `[tls]` table: serve HTTPS with the attested TLS key (on unless disabled)."""

    enabled: bool = True
    hostnames: tuple[str, ...] = ("localhost",)
    ip_addresses: tuple[str, ...] = ("127.0.0.1", "::1")


@dataclass(frozen=True)
class ApiKey:
    """One `[[api_keys]]` entry; the key itself is stored only as its SHA-256."""

    name: str
    sha256: str
    requests_per_minute: int = 0
    token_budget: int = 0
    max_reserve_tokens: int = 4096  # completion reserved when a call sets no max_tokens


@dataclass(frozen=True)
class RouteSpec:
    """One `[[routes]]` entry: a way to serve a public model through one provider."""

    id: str
    model: str
    provider: str
    base_url: str
    upstream_model: str
    aliases: tuple[str, ...] = ()
    attestation_url: str = ""
    kind: str = "chat"
    priority: int = 0
    timeout: float = 30.0
    event_timeout: float | None = None  # None: the route `timeout`
    stream_timeout: float = 600.0
    max_response_bytes: int = 64 << 20
    max_sse_line_bytes: int = 1 << 20
    retries: int = 0
    evidence: str = "none"
    required: bool = True
    policy: dict[str, Any] = field(default_factory=dict)
    api_key: str = field(default="", repr=False)  # the provider's credential (never logged)
    e2ee: bool = False  # seal to the provider's attested E2EE key (aci-1), not plaintext


@dataclass(frozen=True)
class Config:
    """The whole validated configuration."""

    path: Path
    gateway: GatewaySettings
    dstack_endpoint: str | None
    log: LogSettings
    api_keys: tuple[ApiKey, ...]
    routes: tuple[RouteSpec, ...]
    leases: LeaseSettings = LeaseSettings()
    e2ee: E2eeSettings = E2eeSettings()
    server: ServerLimits = ServerLimits()
    tls: TlsSettings = TlsSettings()
    shared: SharedSettings = SharedSettings()

    @property
    def replay_redis(self) -> tuple[str, str] | None:
        """Where E2EE nonces are shared, (url, key prefix): `[e2ee] redis_url`, else
        `[shared] redis_url`, else `[leases] redis_url`; None: in this process."""
        if self.e2ee.redis_url:
            return self.e2ee.redis_url, self.e2ee.prefix
        if self.shared.redis_url:
            return self.shared.redis_url, self.shared.prefix + "e2ee:"
        if self.leases.redis_url:
            return self.leases.redis_url, self.e2ee.prefix
        return None

    @property
    def lease_redis(self) -> tuple[str, str] | None:
        """Where verified leases are shared, (url, key prefix): `[leases] redis_url`, else
        `[shared] redis_url`; None: in this process."""
        if self.leases.redis_url:
            return self.leases.redis_url, self.leases.prefix
        if self.shared.redis_url:
            return self.shared.redis_url, self.shared.prefix + "lease:"
        return None


def _take(table: dict[str, Any], where: str, spec: dict[str, tuple[type | tuple[type, ...], bool]]
          ) -> dict[str, Any]:
    """Check `table` against {key: (types, required)}; reject unknown keys, and floats that
    are not finite (no setting means anything by nan or inf)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - set(spec))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r}")
    out: dict[str, Any] = {}
    for key, (types, required) in spec.items():
        if key not in table:
            if required:
                raise ConfigError(f"{where}: missing required key {key!r}")
            continue
        value = table[key]
        allowed = types if isinstance(types, tuple) else (types,)
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"{where}.{key}: wrong type {type(value).__name__}")
        if isinstance(value, float) and not math.isfinite(value):  # TOML has nan and inf
            raise ConfigError(f"{where}.{key}: must be a finite number")
        out[key] = value
    return out


def _path(base: Path, value: str) -> Path:
    p = Path(value)
    return p if p.is_absolute() else (base / p).resolve()


def _http_url(where: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{where}: not an http(s) URL: {value!r}")
    return value.rstrip("/")


def _hex(where: str, value: str) -> str:
    if not HEX64.fullmatch(value):
        raise ConfigError(f"{where}: expected lower-case hex SHA-256")
    return value


def _gateway(t: dict[str, Any], base: Path) -> GatewaySettings:
    v = _take(t, "[gateway]", {
        "name": (str, False), "max_body_bytes": (int, False), "max_messages": (int, False),
        "max_json_depth": (int, False),
        "require_log_inclusion": (bool, False), "log_unavailable": (str, False),
        "log_wait_timeout": ((int, float), False), "shutdown_grace": ((int, float), False),
        "outbox_durability": (str, False),
        "outbox_max_bytes": (int, False), "receipt_retention_seconds": ((int, float), False),
        "data_dir": (str, False),
        "admin_key_sha256": (str, False), "attestation_cache_seconds": ((int, float), False),
        "attestation_nonce_per_client_per_minute": (int, False),
        "attestation_nonce_per_second": (int, False), "traces": (bool, False)})
    if v.get("log_unavailable", "serve-and-queue") not in LOG_UNAVAILABLE:
        raise ConfigError(f"[gateway].log_unavailable: one of {', '.join(LOG_UNAVAILABLE)}")
    if v.get("outbox_durability", "process") not in DURABILITY:
        raise ConfigError(f"[gateway].outbox_durability: one of {', '.join(DURABILITY)}")
    if v.get("outbox_max_bytes", 1 << 30) < 1 << 20:
        raise ConfigError("[gateway].outbox_max_bytes must be at least 1048576 (1 MiB)")
    if v.get("receipt_retention_seconds", 1) < 0:
        raise ConfigError("[gateway].receipt_retention_seconds must not be negative")
    if "receipt_retention_seconds" in v:
        v["receipt_retention_seconds"] = float(v["receipt_retention_seconds"])
    for key in ("max_body_bytes", "max_messages", "max_json_depth"):
        if v.get(key, 1) <= 0:
            raise ConfigError(f"[gateway].{key} must be positive")
    if "admin_key_sha256" in v:
        _hex("[gateway].admin_key_sha256", v["admin_key_sha256"])
    if "data_dir" in v:
        v["data_dir"] = _path(base, v["data_dir"])
    else:
        v["data_dir"] = base
    for k in ("log_wait_timeout", "shutdown_grace"):
        if k in v:
            if not 0 < v[k] <= MAX_WAIT:
                raise ConfigError(f"[gateway].{k} must be positive, at most {MAX_WAIT:g} s")
            v[k] = float(v[k])
    for k in ("attestation_cache_seconds", "attestation_nonce_per_client_per_minute",
              "attestation_nonce_per_second"):
        if v.get(k, 1) <= 0:
            raise ConfigError(f"[gateway].{k} must be positive")
    if "attestation_cache_seconds" in v:
        v["attestation_cache_seconds"] = float(v["attestation_cache_seconds"])
    return GatewaySettings(**v)


def _key_file(where: str, path: Path) -> str:
    """The one-line public key kept in `path` (a `log.vkey` or `witness.vkey` file)."""
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: cannot read {path}: {getattr(e, 'strerror', e)}") from e
    if not text or "\n" in text:
        raise ConfigError(f"{where}: {path} does not hold one key on one line")
    return text


def _log(t: dict[str, Any], base: Path) -> LogSettings:
    v = _take(t, "[log]", {
        "url": (str, False), "token_file": (str, False), "vkey": (str, False),
        "vkey_file": (str, False), "witness_vkeys": (list, False),
        "witness_vkey_files": (list, False), "quorum": (int, False),
        "concurrency": (int, False)})
    if "vkey_file" in v:  # keys published by the services that derive them (compose.yaml)
        if "vkey" in v:
            raise ConfigError("[log]: give vkey or vkey_file, not both")
        v["vkey"] = _key_file("[log].vkey_file", _path(base, v.pop("vkey_file")))
    files = v.pop("witness_vkey_files", [])
    if not all(isinstance(f, str) for f in files):
        raise ConfigError("[log].witness_vkey_files must be a list of strings")
    v["witness_vkeys"] = list(v.get("witness_vkeys", [])) + [
        _key_file("[log].witness_vkey_files", _path(base, f)) for f in files]
    if "url" in v:
        v["url"] = _http_url("[log].url", v["url"])
    if "token_file" in v:
        v["token_file"] = _path(base, v["token_file"])
    wv = v.get("witness_vkeys", [])
    if not all(isinstance(x, str) for x in wv):
        raise ConfigError("[log].witness_vkeys must be a list of strings")
    v["witness_vkeys"] = tuple(wv)
    try:
        if "vkey" in v:
            note.verifier_from_vkey(v["vkey"])
        witnesses = cosignature.parse_vkeys(wv)
    except note.NoteError as e:
        raise ConfigError(f"[log]: bad verifier key: {e}") from e
    if len({(w.name, w.key_id) for w in witnesses}) != len(witnesses):
        raise ConfigError("[log].witness_vkeys: the same witness key twice")
    v.setdefault("quorum", len(wv))
    if not 0 <= v["quorum"] <= len(wv):
        raise ConfigError(f"[log].quorum must be between 0 and the {len(wv)} witness keys")
    if "url" in v and "vkey" not in v:
        raise ConfigError("[log].vkey is required with [log].url: every proof the log returns "
                          "is checked against it")
    if v.get("concurrency", 1) < 1:
        raise ConfigError("[log].concurrency must be at least 1")
    return LogSettings(**v)


def _leases(t: dict[str, Any]) -> LeaseSettings:
    v = _take(t, "[leases]", {"redis_url": (str, False), "prefix": (str, False)})
    _redis_url("[leases].redis_url", v.get("redis_url"))
    return LeaseSettings(**v)


def _redis_url(where: str, url: str | None) -> None:
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{where}: not a redis:// URL: {url!r}")


def _shared(t: dict[str, Any], routes: tuple[RouteSpec, ...]) -> SharedSettings:
    v = _take(t, "[shared]", {"redis_url": (str, False), "prefix": (str, False),
                              "timeout": ((int, float), False), "hold_seconds": (int, False),
                              "receipt_ttl_seconds": (int, False)})
    _redis_url("[shared].redis_url", v.get("redis_url"))
    if not v.get("prefix", "pag:"):
        raise ConfigError("[shared].prefix must not be empty")
    for k in ("timeout", "hold_seconds", "receipt_ttl_seconds"):
        if v.get(k, 1) <= 0:
            raise ConfigError(f"[shared].{k} must be positive")
    if "timeout" in v:
        v["timeout"] = float(v["timeout"])
    longest = max((max(r.timeout * (r.retries + 1), r.stream_timeout) for r in routes),
                  default=0.0)
    if v.get("redis_url") and v.get("hold_seconds", 900) <= longest:
        raise ConfigError(f"[shared].hold_seconds must exceed the longest call a route allows "
                          f"({longest:g} s): a reservation must outlive its call")
    return SharedSettings(**v)


def _e2ee(t: dict[str, Any]) -> E2eeSettings:
    v = _take(t, "[e2ee]", {"redis_url": (str, False), "prefix": (str, False),
                            "max_entries": (int, False)})
    _redis_url("[e2ee].redis_url", v.get("redis_url"))
    if v.get("max_entries", 1) < 1:
        raise ConfigError("[e2ee].max_entries must be at least 1")
    return E2eeSettings(**v)


def _tls(t: dict[str, Any]) -> TlsSettings:
    v = _take(t, "[tls]", {"enabled": (bool, False), "hostnames": (list, False),
                           "ip_addresses": (list, False)})
    for key in ("hostnames", "ip_addresses"):
        if key in v:
            if not all(isinstance(x, str) and x for x in v[key]):
                raise ConfigError(f"[tls].{key} must be a list of non-empty strings")
            v[key] = tuple(v[key])
    for a in v.get("ip_addresses", ()):
        try:
            ipaddress.ip_address(a)
        except ValueError:
            raise ConfigError(f"[tls].ip_addresses: not an IP address: {a!r}") from None
    return TlsSettings(**v)


def _server(t: dict[str, Any]) -> ServerLimits:
    v = _take(t, "[server]", {name: ((int, float) if kind is float else int, False)
                              for name, kind in LIMIT_FLAGS.items()})
    try:
        return ServerLimits(**v)
    except ValueError as e:
        raise ConfigError(f"[server].{e}") from None


def _api_key(t: dict[str, Any], i: int) -> ApiKey:
    where = f"[[api_keys]][{i}]"
    v = _take(t, where, {"name": (str, True), "sha256": (str, True),
                         "requests_per_minute": (int, False), "token_budget": (int, False),
                         "max_reserve_tokens": (int, False)})
    _hex(f"{where}.sha256", v["sha256"])
    for k in ("requests_per_minute", "token_budget"):
        if v.get(k, 0) < 0:
            raise ConfigError(f"{where}.{k} must not be negative")
    if v.get("max_reserve_tokens", 1) < 1:
        raise ConfigError(f"{where}.max_reserve_tokens must be positive")
    return ApiKey(**v)


def default_attestation_url(evidence: str, base_url: str) -> str:
    """Where each evidence kind's provider serves its attestation, by default."""
    parts = urlsplit(base_url)
    origin = f"{parts.scheme}://{parts.netloc}"
    return {"dstack": origin + "/.well-known/attestation",
            "phala": base_url + "/attestation/report",
            "nearai": origin + "/v1/attestation/report",
            "tinfoil": origin + "/.well-known/tinfoil-attestation"}.get(evidence, "")


def _route(t: dict[str, Any], i: int, base: Path) -> RouteSpec:
    where = f"[[routes]][{i}]"
    v = _take(t, where, {
        "id": (str, True), "model": (str, True), "aliases": (list, False),
        "provider": (str, True), "base_url": (str, True), "attestation_url": (str, False),
        "upstream_model": (str, False), "kind": (str, False), "priority": (int, False),
        "timeout": ((int, float), False), "event_timeout": ((int, float), False),
        "stream_timeout": ((int, float), False), "max_response_bytes": (int, False),
        "max_sse_line_bytes": (int, False), "retries": (int, False), "evidence": (str, False),
        "required": (bool, False), "policy": (dict, False), "api_key_file": (str, False),
        "e2ee": (bool, False)})
    v["base_url"] = _http_url(f"{where}.base_url", v["base_url"])
    if "attestation_url" in v:
        v["attestation_url"] = _http_url(f"{where}.attestation_url", v["attestation_url"])
    else:
        v["attestation_url"] = default_attestation_url(v.get("evidence", "none"), v["base_url"])
    if "api_key_file" in v:
        key_path = _path(base, v.pop("api_key_file"))
        try:
            v["api_key"] = key_path.read_text(encoding="utf-8").strip()
        except OSError as e:
            raise ConfigError(f"{where}.api_key_file: cannot read {key_path}: {e.strerror}") from e
        if not v["api_key"] or any(c in v["api_key"] for c in "\r\n\0"):
            raise ConfigError(f"{where}.api_key_file: empty, or not a single-line key")
        if any(urlsplit(u).scheme != "https" for u in (v["base_url"], v["attestation_url"]) if u):
            raise ConfigError(f"{where}.api_key_file: credentials are only sent over https "
                              "(base_url and attestation_url)")
    v.setdefault("upstream_model", v["model"])
    aliases = v.get("aliases", [])
    if not all(isinstance(a, str) and a for a in aliases):
        raise ConfigError(f"{where}.aliases must be a list of non-empty strings")
    v["aliases"] = tuple(aliases)
    if v.get("kind", "chat") not in KINDS:
        raise ConfigError(f"{where}.kind: one of {', '.join(KINDS)}")
    if v.get("evidence", "none") not in EVIDENCE:
        raise ConfigError(f"{where}.evidence: one of {', '.join(EVIDENCE)}")
    for key in ("timeout", "event_timeout", "stream_timeout", "max_response_bytes",
                "max_sse_line_bytes"):
        if key in v and v[key] <= 0:
            raise ConfigError(f"{where}.{key} must be positive")
    for key in ("timeout", "event_timeout", "stream_timeout"):
        if key in v:
            v[key] = float(v[key])
    if v.get("retries", 0) < 0:
        raise ConfigError(f"{where}.retries must not be negative")
    try:
        policy = Policy.from_dict(v.get("policy", {}))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}.policy: {e}") from e
    if v.get("evidence", "none") != "none" and not policy.pinned_workload() \
            and not policy.allow_any_workload:
        raise ConfigError(f"{where}.policy pins no workload identity (one of "
                          f"{', '.join(WORKLOAD_PINS)}), so any genuine TEE workload would be "
                          "accepted: pin one, or set allow_any_workload = true")
    if "policy" in v:
        v["policy"] = {k: str(_path(base, x)) if k in PATH_KEYS else x
                       for k, x in v["policy"].items()}
    return RouteSpec(**v)


def parse(doc: dict[str, Any], path: Path) -> Config:
    """Validate a parsed TOML document; `path` anchors relative paths."""
    base = path.resolve().parent
    top = _take(doc, "config", {"gateway": (dict, False), "dstack": (dict, False),
                                "log": (dict, False), "api_keys": (list, False),
                                "routes": (list, False), "leases": (dict, False),
                                "e2ee": (dict, False), "tls": (dict, False),
                                "server": (dict, False), "shared": (dict, False)})
    dstack = _take(top.get("dstack", {}), "[dstack]", {"endpoint": (str, False)})
    endpoint = dstack.get("endpoint")
    if endpoint and "://" not in endpoint:
        endpoint = str(_path(base, endpoint))
    keys = tuple(_api_key(t, i) for i, t in enumerate(top.get("api_keys", [])))
    routes = tuple(_route(t, i, base) for i, t in enumerate(top.get("routes", [])))
    seen: set[str] = set()
    for r in routes:
        if r.id in seen:
            raise ConfigError(f"[[routes]]: duplicate route id {r.id!r}")
        seen.add(r.id)
    kinds: dict[str, str] = {}
    for r in routes:
        for name in (r.model, *r.aliases):
            if kinds.setdefault(name, r.kind) != r.kind:
                raise ConfigError(f"[[routes]]: model {name!r} is both chat and embeddings")
    return Config(path=path.resolve(), gateway=_gateway(top.get("gateway", {}), base),
                  dstack_endpoint=endpoint, log=_log(top.get("log", {}), base),
                  api_keys=keys, routes=routes, leases=_leases(top.get("leases", {})),
                  e2ee=_e2ee(top.get("e2ee", {})), tls=_tls(top.get("tls", {})),
                  server=_server(top.get("server", {})),
                  shared=_shared(top.get("shared", {}), routes))


def load(path: str | Path) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read {p}: {e.strerror}") from e
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from e
    return parse(doc, p)
