"""A lease binds the model it serves: replicas never share a lease between routes that
differ only in their upstream model (the NEAR AI and Phala adapters' model checks are in
tests/test_verification_nearai.py and tests/test_verification_phala.py)."""

from __future__ import annotations

import dataclasses
import secrets

from gateway.api.config import RouteSpec
from gateway.verification.base import Lease
from gateway.verification.shared import seal, settings_digest, unseal

ROUTE = RouteSpec(id="r", model="m", provider="p", base_url="https://p.example/v1",
                  upstream_model="model-a", evidence="nearai", policy={"app_id": "ab"})


def test_settings_digest_covers_the_upstream_model() -> None:
    other = dataclasses.replace(ROUTE, upstream_model="model-b")
    assert settings_digest(ROUTE) != settings_digest(other)
    assert settings_digest(ROUTE) == settings_digest(dataclasses.replace(ROUTE))


def test_a_lease_sealed_for_one_model_is_not_adopted_for_another() -> None:
    key = secrets.token_bytes(32)
    lease = Lease("r", "p", "nearai", "", "tls-spki:" + "00" * 32, 0.0, 100.0)
    value = seal(lease, settings_digest(ROUTE), key)
    assert unseal(value, "r", settings_digest(ROUTE), key) == lease
    other = dataclasses.replace(ROUTE, upstream_model="model-b")
    assert unseal(value, "r", settings_digest(other), key) is None
