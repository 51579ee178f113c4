"""A route must pin which workload may serve it: a policy pinning none (any genuine TEE
would pass) is refused at load unless it says `allow_any_workload = true`, and an empty
measurement set (which matches every quote) is refused outright."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from gateway.api import config, verify_routes
from tests.test_gateway_fakes import ADMIN_KEY, FakeProvider, run_gateway, write_config

ROUTE = "[[routes]]\nid='r'\nmodel='m'\nprovider='p'\nbase_url='https://p.example/v1'\n"


def load(tmp: Path, text: str) -> config.Config:
    (tmp / "g.toml").write_text(text)
    return config.load(tmp / "g.toml")


@pytest.mark.parametrize("kind", ["dstack", "phala", "nearai", "tinfoil"])
def test_a_route_pinning_no_workload_is_refused(tmp_path: Path, kind: str) -> None:
    for policy in ("", "[routes.policy]\nallow_simulated = true\nkey_provider_id = 'ab'\n"):
        with pytest.raises(config.ConfigError, match="pins no workload identity"):
            load(tmp_path, ROUTE + f"evidence='{kind}'\n" + policy)
    cfg = load(tmp_path, ROUTE + f"evidence='{kind}'\n[routes.policy]\nallow_any_workload = true\n")
    assert cfg.routes[0].policy == {"allow_any_workload": True}


@pytest.mark.parametrize("pin", [
    "app_id = 'ab'", "compose_hash = 'cd'", "signing_address = '0x00'",
    "allowed_measurements = [{mr_td = 'ef'}]", "sigstore_identity = 'https://x'"])
def test_any_one_workload_pin_is_enough(tmp_path: Path, pin: str) -> None:
    assert load(tmp_path, ROUTE + f"evidence='dstack'\n[routes.policy]\n{pin}\n").routes


@pytest.mark.parametrize("sets", ["[{}]", "[{mr_td = 'ab'}, {}]", "[{mr_td = ''}]"])
def test_an_empty_measurement_set_is_refused(tmp_path: Path, sets: str) -> None:
    with pytest.raises(config.ConfigError, match="empty measurement set"):
        load(tmp_path, ROUTE + f"evidence='dstack'\n[routes.policy]\nallowed_measurements = "
                               f"{sets}\nallow_any_workload = true\n")


def test_a_route_without_evidence_needs_no_pin(tmp_path: Path) -> None:
    cfg = load(tmp_path, ROUTE + "evidence='none'\n[routes.policy]\nallow_unverified = true\n")
    assert cfg.routes[0].evidence == "none"


def test_route_view_and_verify_routes_show_the_setting(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]
                                                       ) -> None:
    async def view() -> list[dict]:
        prov = FakeProvider()
        await prov.start()
        try:
            async with run_gateway(write_config(tmp_path, prov.base_url)) as gw:
                r = await httpx.AsyncClient().get(
                    gw.url + "/v1/routes", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
                return r.json()["routes"]
        finally:
            await prov.stop()

    routes = {r["id"]: r for r in asyncio.run(view())}
    assert (routes["r1"]["allow_any_workload"], routes["r1"]["pins"]) == (True, [])
    assert (routes["r2"]["allow_any_workload"], routes["r2"]["pins"]) == (False, ["app_id"])
    verify_routes.main(["--config", str(tmp_path / "gateway.toml")])
    rows = {ln.split()[0]: ln.split() for ln in capsys.readouterr().out.splitlines()[1:]}
    assert rows["r1"][3:5] == ["ANY", "WORKLOAD"] and rows["r2"][3] == "app_id"
