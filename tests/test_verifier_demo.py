"""The docs' walk-through against `python -m gateway demo`: a receipt verified with its salt
against the logged, attested keyset; the docs' monitor policy passes on a healthy demo,
refusals included."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.test_demo import ROOT, Demo, auth

BODY = b'{"model":"demo-chat","messages":[{"role":"user","content":"Hello"}]}'


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    d = Demo(tmp_path_factory.mktemp("vdemo") / "demo")
    try:
        yield d
    finally:
        d.terminate()


def verifier(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "verifier", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


def call(demo: Demo, body: bytes, tmp: Path) -> tuple[httpx.Response, Path, Path]:
    """One call with exact body bytes, as the walk-through's curl makes it."""
    r = httpx.post(demo.ready["gateway"] + "/v1/chat/completions", content=body, timeout=30,
                   headers={**auth(demo.ready), "Content-Type": "application/json"})
    (tmp / "body.json").write_bytes(body)
    (tmp / "response.json").write_bytes(r.content)
    return r, tmp / "body.json", tmp / "response.json"


def receipt_logged(demo: Demo, rh: str) -> None:
    for _ in range(100):
        doc = httpx.get(f"{demo.ready['gateway']}/v1/receipts/by-request-hash/{rh}",
                        timeout=10).json()
        if doc.get("proof"):
            return
        time.sleep(0.1)
    pytest.fail("the receipt was not logged in time")


def test_walkthrough_verifies_a_receipt_with_its_salt(demo: Demo, tmp_path: Path) -> None:
    r, body, response = call(demo, BODY, tmp_path)
    assert r.status_code == 200
    rh, salt = r.headers["x-request-hash"], r.headers["x-receipt-salt"]
    receipt_logged(demo, rh)
    ok = verifier("receipt", "--gateway", demo.ready["gateway"], "--request-hash", rh,
                  "--salt", salt, "--request", str(body), "--response", str(response),
                  "--witness", demo.ready["witness_vkey"], "--allow-simulated")
    assert ok.returncode == 0, ok.stderr
    out = ok.stdout
    assert re.search(r"^OK entry \d+ in \S+ size \d+, cosigned by 1 of 1 witness keys$", out,
                     re.M), out
    assert "signed by the key of keyset entry 0" in out
    assert "digests checked against content: request_hash, response_hash" in out
    assert "the receipt's keyset is the current one" in out
    assert "SIMULATED evidence accepted" in out and "UNWITNESSED" not in out
    # the response bytes matter, the salt matters, and simulated evidence needs consent
    (tmp_path / "other.json").write_bytes(response.read_bytes() + b" ")
    bad = verifier("receipt", "--gateway", demo.ready["gateway"], "--request-hash", rh,
                   "--salt", salt, "--response", str(tmp_path / "other.json"),
                   "--allow-simulated")
    assert bad.returncode == 1 and "digest_mismatch" in bad.stderr
    strict = verifier("receipt", "--gateway", demo.ready["gateway"], "--request-hash", rh)
    assert strict.returncode == 1 and "simulated_not_allowed" in strict.stderr
    # the proof the caller holds, checked offline against the log's tiles
    doc = httpx.get(f"{demo.ready['gateway']}/v1/receipts/{r.headers['x-receipt-id']}",
                    headers=auth(demo.ready), timeout=10).json()
    (tmp_path / "r.proof").write_text(doc["proof"])
    p = verifier("proof", "--vkey", demo.ready["log_vkey"], "--log", demo.ready["tlog"],
                 "--allow-simulated", str(tmp_path / "r.proof"))
    assert p.returncode == 0, p.stderr
    assert "UNWITNESSED (0 witness cosignatures checked)" in p.stdout
    assert "SIMULATED evidence accepted" in p.stdout


def docs_policy() -> dict:
    text = (ROOT / "docs" / "verifier.md").read_text()
    block = text.split("Monitor policy file")[1].split("```json\n")[1].split("```")[0]
    return json.loads(block)


def test_docs_monitor_policy_passes_on_a_healthy_demo(demo: Demo, tmp_path: Path) -> None:
    r, _, _ = call(demo, BODY, tmp_path)
    typo, _, _ = call(demo, BODY.replace(b"demo-chat", b"demo-chta"), tmp_path)
    assert r.status_code == 200 and typo.status_code == 404
    embed = httpx.post(demo.ready["gateway"] + "/v1/embeddings", headers=auth(demo.ready),
                       json={"model": "demo-embed", "input": ["x"]}, timeout=30)
    assert embed.status_code == 200
    for resp in (r, typo, embed):
        receipt_logged(demo, resp.headers["x-request-hash"])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps(docs_policy()))
    m = verifier("monitor", "--once", "--log", demo.ready["tlog"], "--vkey",
                 demo.ready["log_vkey"], "--witness", demo.ready["witness_vkey"],
                 "--policy", str(policy), "--state", str(tmp_path / "state.json"))
    assert m.returncode == 0 and m.stdout == "", m.stdout + m.stderr
    # the same log under a policy that refuses simulated quotes: every receipt alerts
    strict = tmp_path / "strict.json"
    strict.write_text(json.dumps({**docs_policy(), "allow_simulated": False}))
    m = verifier("monitor", "--once", "--log", demo.ready["tlog"], "--vkey",
                 demo.ready["log_vkey"], "--policy", str(strict))
    kinds = {json.loads(line)["alert"] for line in m.stdout.splitlines()}
    assert m.returncode == 1 and kinds == {"keyset_out_of_policy", "unattested_receipt"}
