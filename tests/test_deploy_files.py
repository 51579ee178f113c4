"""compose.yaml, Dockerfile and .dockerignore, checked without Docker (there is no engine
here): structure, health checks, the dstack socket, no secret inlined, and every command a
real command line of this project."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra: pip install -e '.[dev]'")

ROOT = Path(__file__).resolve().parents[1]
SOCKET = "/var/run/dstack.sock"
MODULES = {"pag-gateway": "gateway", "pag-tlog": "tlog", "pag-witness": "witness",
           "pag-verify": "verifier"}
LONG_RUNNING = {"gateway", "tlog", "witness", "monitor"}
ONE_SHOT = {"log-key", "witness-key"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def option(command: list[str], flag: str) -> str | None:
    """The value after `flag` in an argv (None if absent)."""
    return command[command.index(flag) + 1] if flag in command else None


def mounts(service: dict[str, Any]) -> dict[str, tuple[str, bool]]:
    """{container path: (source, read-only)} of a service's volumes."""
    out = {}
    for spec in service.get("volumes", []):
        source, target, *mode = spec.split(":")
        out[target] = (source, mode == ["ro"])
    return out


def covered(service: dict[str, Any], path: str) -> tuple[str, bool] | None:
    """The named volume (and read-only flag) a container path of `service` lives in."""
    best = None
    for target, (source, ro) in mounts(service).items():
        if (path == target or path.startswith(target.rstrip("/") + "/")) and (
                best is None or len(target) > len(best[0])):
            best = (target, (source, ro))
    return best[1] if best else None


def test_the_four_services_and_their_key_publishers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == LONG_RUNNING | ONE_SHOT
    for name, svc in services.items():
        assert svc["build"] == "." and svc["image"], name  # the Dockerfile beside compose.yaml
        assert svc["read_only"] is True, name
        assert svc["restart"] == ("no" if name in ONE_SHOT else "unless-stopped"), name
        assert svc["command"][0] in MODULES, name


def test_state_is_in_named_volumes_and_the_socket_is_the_only_bind(
        compose: dict[str, Any]) -> None:
    named = set(compose["volumes"])
    used = set()
    for name, svc in compose["services"].items():
        for target, (source, _) in mounts(svc).items():
            if source.startswith("/"):
                assert (source, target) == (SOCKET, SOCKET), f"{name} binds {source}"
            else:
                assert source in named, f"{name}: {source} is not a named volume"
                used.add(source)
    assert used == named
    for svc in LONG_RUNNING:  # each service keeps its own state writable in its own volume
        data = option(compose["services"][svc]["command"], "--data") \
            or option(compose["services"][svc]["command"], "--state")
        if svc == "gateway":
            data = str(gateway_config(compose)["gateway"]["data_dir"])
        assert data is not None, svc
        volume = covered(compose["services"][svc], data)
        assert volume == (f"{svc}-data", False), (svc, data, volume)


def test_every_key_comes_from_the_dstack_kms(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("log-key", "witness-key", "witness", "tlog"):
        command = services[name]["command"]
        assert option(command, "--dstack") == SOCKET, name
        assert mounts(services[name])[SOCKET] == (SOCKET, False), name
    assert gateway_config(compose)["dstack"]["endpoint"] == SOCKET
    assert mounts(services["gateway"])[SOCKET] == (SOCKET, False)
    assert SOCKET not in mounts(services["monitor"])  # the monitor holds no key
    # The public keys the others read are published before any of them starts.
    log_vkey = "/run/pag/keys/log/log.vkey"
    witness_vkey = "/run/pag/keys/witness/witness.vkey"
    assert option(services["log-key"]["command"], "--data") + "/log.vkey" == log_vkey
    assert option(services["witness-key"]["command"], "--data") + "/witness.vkey" == \
        witness_vkey
    wants = {"witness": [log_vkey], "monitor": [log_vkey, witness_vkey],
             "gateway": [log_vkey, witness_vkey], "tlog": [witness_vkey]}
    for name, paths in wants.items():
        for path in paths:
            assert covered(services[name], path) == ("pubkeys", True), (name, path)
    assert option(services["witness"]["command"], "--config") == log_vkey
    assert option(services["tlog"]["command"], "--witness-vkey") == witness_vkey
    assert option(services["monitor"]["command"], "--vkey") == log_vkey
    assert option(services["monitor"]["command"], "--witness") == witness_vkey
    cfg = gateway_config(compose)["log"]
    assert cfg["vkey_file"] == log_vkey and cfg["witness_vkey_files"] == [witness_vkey]
    assert covered(services["gateway"], cfg["token_file"]) == ("tlog-data", True)


def test_start_order(compose: dict[str, Any]) -> None:
    deps = {name: svc.get("depends_on", {}) for name, svc in compose["services"].items()}
    assert deps["witness"] == {"log-key": {"condition": "service_completed_successfully"}}
    assert deps["tlog"] == {"witness-key": {"condition": "service_completed_successfully"},
                            "witness": {"condition": "service_healthy"}}
    assert deps["gateway"] == {"tlog": {"condition": "service_healthy"}}
    assert deps["monitor"] == {"tlog": {"condition": "service_healthy"}}


def test_health_checks_ask_the_service_itself(compose: dict[str, Any]) -> None:
    for name in LONG_RUNNING:
        svc = compose["services"][name]
        check = svc["healthcheck"]
        url = check["test"][-1]
        scheme, host_port, path = re.fullmatch(r"(https?)://([^/]+)(/\w+)", url).groups()
        # the gateway serves attested TLS unless told --no-tls; the others plain HTTP
        tls = name == "gateway" and "--no-tls" not in svc["command"]
        assert scheme == ("https" if tls else "http"), name
        assert path in ("/healthz", "/readyz"), name
        listen = option(svc["command"], "--listen")
        assert host_port.split(":")[1] == listen.split(":")[1], name
        assert svc["ports"] == [f"{listen.split(':')[1]}:{listen.split(':')[1]}"], name
        assert check["test"][:3] == ["CMD", "python", "-c"], name
        assert all(k in check for k in ("interval", "timeout", "retries", "start_period"))
    for name in ONE_SHOT:
        assert "healthcheck" not in compose["services"][name]


def test_no_secret_is_inlined(compose: dict[str, Any]) -> None:
    text = (ROOT / "compose.yaml").read_text()
    assert "PRIVATE KEY" not in text and "sk-" not in text
    allowed_hex = re.compile(r"(sha256[:=]\s*\"?|app_id = \"|compose_hash = \")$")
    for m in re.finditer(r"[0-9a-f]{32,}", text):
        assert allowed_hex.search(text[:m.start()]), f"unexplained hex {m.group()[:12]}…"
    for m in re.finditer(r"[A-Za-z0-9+/]{40,}={0,2}", text):
        assert re.fullmatch(r"[0-9a-f]+", m.group()), f"base64-looking {m.group()[:12]}…"
    for name, svc in compose["services"].items():
        for key in svc.get("environment", {}):
            assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD", key), (name, key)
    for name, secret in compose["secrets"].items():
        assert set(secret) == {"environment"}, name  # from dstack's encrypted environment


def test_inline_configs_load(compose: dict[str, Any], tmp_path: Path) -> None:
    from gateway.api import config
    from tlog import note
    from verifier.monitor import Policy
    from witness import cosignature

    log_vkey = note.generate_signer("pag.local/log").vkey
    witness_vkey = cosignature.CosignatureSigner("pag.local/witness", b"w" * 32).vkey
    text = compose["configs"]["gateway"]["content"]
    for path in re.findall(r'"(/run/[^"]+)"', text):  # stand-ins for the mounted files
        local = tmp_path / path.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text({"log.vkey": log_vkey, "witness.vkey": witness_vkey}.get(
                              local.name, "test-only-credential") + "\n")
        text = text.replace(f'"{path}"', json.dumps(str(local)))
    cfg = config.parse(tomllib.loads(text), tmp_path / "gateway.toml")
    assert cfg.log.vkey == log_vkey and cfg.log.quorum == 1
    assert cfg.log.witness_vkeys == (witness_vkey,)
    assert cfg.routes and all(not r.policy.get("allow_simulated") for r in cfg.routes)
    assert all(r.policy.get("app_id") or r.policy.get("compose_hash") for r in cfg.routes)
    policy_path = tmp_path / "policy.json"
    policy_path.write_text(compose["configs"]["monitor-policy"]["content"])
    policy = Policy.load(policy_path)
    assert policy.require_verified is True
    assert policy.allowed_routes == [r.id for r in cfg.routes]
    targets = {c["source"]: c["target"] for svc in compose["services"].values()
               for c in svc.get("configs", [])}
    assert targets == {"gateway": option(compose["services"]["gateway"]["command"], "--config"),
                       "monitor-policy": option(compose["services"]["monitor"]["command"],
                                                "--policy")}


def gateway_config(compose: dict[str, Any]) -> dict[str, Any]:
    return tomllib.loads(compose["configs"]["gateway"]["content"])


def help_text(command: list[str]) -> str:
    """`--help` of the command's subcommand, run as `python -m MODULE SUB --help`."""
    r = subprocess.run([sys.executable, "-m", MODULES[command[0]], command[1], "--help"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("name", sorted(LONG_RUNNING | ONE_SHOT))
def test_every_command_is_a_real_command_line(compose: dict[str, Any], name: str) -> None:
    command = compose["services"][name]["command"]
    text = help_text(command)
    known = set(re.findall(r"(--[a-z][a-z-]*)", text))
    usage = " ".join(text.split("\n\n")[0].split())
    required = {m for m in re.findall(r"(?<!\[)(--[a-z][a-z-]*) [A-Z]", usage)}
    given = [a for a in command[2:] if a.startswith("--")]
    assert set(given) <= known, f"{shlex.join(command)}: unknown {set(given) - known}"
    assert required <= set(given), f"{shlex.join(command)}: missing {required - set(given)}"
    for flag in given:  # every flag here takes a value
        value = option(command, flag)
        assert value is not None and not value.startswith("--"), (name, flag)


def test_dockerfile_is_multi_stage_pinned_non_root_and_from_the_checkout() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    froms = [ln for ln in lines if ln.upper().startswith("FROM ")]
    assert len(froms) >= 2
    for ln in froms:
        assert re.fullmatch(r"FROM \S+:\S+@sha256:[0-9a-f]{64} AS \w+", ln), ln
    last = lines.index(froms[-1])
    runtime = lines[last:]
    users = [ln.split()[1] for ln in runtime if ln.upper().startswith("USER ")]
    assert users and users[-1].split(":")[0] not in ("0", "root")
    assert any(ln.startswith("COPY --from=") for ln in runtime)
    build = lines[lines.index(froms[0]):last]
    assert any(re.match(r"COPY pyproject\.toml", ln) for ln in build)
    assert any("pip install -c /src/requirements.lock" in ln and "/src[server]" in ln
               for ln in " ".join(build).split("&&"))
    for package in ("gateway", "tlog", "witness", "verifier"):
        assert any(re.fullmatch(rf"COPY {package} \./{package}", ln) for ln in build), package


def test_dockerignore_lets_only_the_sources_in() -> None:
    lines = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"  # everything out (.venv, .git, .demo-data keys), then the sources
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "requirements.lock", "gateway", "tlog",
                       "witness", "verifier"}  # the lock: the image installs the audited set


def test_the_logs_witness_flags_hold_together(compose: dict[str, Any], tmp_path: Path) -> None:
    """The log's --witness/--witness-vkey/--quorum pass the checks `tlog serve` makes at
    start-up, with the key file the witness-key service publishes."""
    from tlog.__main__ import parser, witness_pool
    from witness import cosignature

    signer = cosignature.CosignatureSigner("pag.local/witness", bytes(32))
    command = list(compose["services"]["tlog"]["command"])
    path = option(command, "--witness-vkey")
    local = tmp_path / path.lstrip("/")
    local.parent.mkdir(parents=True)
    local.write_text(signer.vkey + "\n")
    command[command.index(path)] = str(local)
    pool = witness_pool(parser().parse_args(command[1:]))
    assert pool is not None and pool.quorum == 1 and pool.urls == ["http://witness:8082"]
    assert [v.key_id for v in pool.verifiers] == [
        cosignature.verifier_from_vkey(signer.vkey).key_id]
