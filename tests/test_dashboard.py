"""The monitor's dashboard, loaded in headless Chromium, shows what the log holds."""

from __future__ import annotations

import base64
import html.parser
import json
import shutil
import subprocess
import sys
import time

import httpx
import pytest

from tests.attested_log import attested_log, make_receipt, write_log
from tests.tlogutil import free_port, wait_http
from verifier import receipt

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class _Cells(html.parser.HTMLParser):
    """Collects text by element id, and table rows as (key, count)."""

    def __init__(self) -> None:
        super().__init__()
        self.by_id: dict[str, str] = {}
        self.counts: dict[str, str] = {}
        self._id: str | None = None
        self._key: str | None = None

    def handle_starttag(self, tag, attrs) -> None:
        a = dict(attrs)
        self._id = a.get("id")
        self._key = a.get("data-key")

    def handle_data(self, data) -> None:
        if self._id and data.strip():
            self.by_id[self._id] = data.strip()
        if self._key is not None and data.strip():
            self.counts[self._key] = data.strip()

    def handle_endtag(self, tag) -> None:
        self._id = self._key = None


@pytest.mark.skipif(CHROMIUM is None, reason="CHROMIUM NOT INSTALLED: apt-get install chromium "
                                             "(scripts/setup.sh does this); dashboard not tested")
def test_dashboard_numbers_match_the_log(tmp_path):
    a = attested_log("example.com/dash")
    key = a.receipt_key

    def rec(**kw) -> bytes:
        return receipt.entry(make_receipt(key, a.gateway, **kw))

    entries = [*a.entries, *(rec(route="demo", request=b"%d" % i) for i in range(5))]
    entries += [rec(route="backup", provider="p2", verified=False, request=b"u")]
    signer = a.signer
    write_log(tmp_path / "log", signer, entries + [b"plain entry"])
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({
        "allow_simulated": True,
        "gateway_keys": [base64.b64encode(key.public_key().public_bytes_raw()).decode()]}))
    port = free_port()
    mon = subprocess.Popen([sys.executable, "-m", "verifier", "monitor", "--log",
                            str(tmp_path / "log"), "--vkey", signer.vkey, "--policy", str(policy),
                            "--interval", "0.5", "--listen", f"127.0.0.1:{port}"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http(f"http://127.0.0.1:{port}/api/state", mon)
        for _ in range(100):
            if httpx.get(f"http://127.0.0.1:{port}/api/state").json()["size"]:
                break
            time.sleep(0.1)
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome'}", "--virtual-time-budget=5000",
             "--dump-dom", f"http://127.0.0.1:{port}/"],
            capture_output=True, text=True, timeout=90).stdout
        assert 'data-loaded="yes"' in dom, dom[:500]
        cells = _Cells()
        cells.feed(dom)
        assert cells.by_id["size"] == "9"  # genesis, keyset entry, 6 receipts, 1 plain entry
        assert cells.by_id["receipts"] == "6"
        assert cells.by_id["alerts"] == "1"  # the unverified upstream
        assert cells.by_id["origin"] == "example.com/dash"
        assert cells.counts["demo"] == "5" and cells.counts["backup"] == "1"
        assert cells.counts["p2"] == "1" and cells.counts["false"] == "1"
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'pag_monitor_alerts_total{kind="unverified_upstream"} 1' in metrics
    finally:
        mon.terminate()
        mon.wait(10)
