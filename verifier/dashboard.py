"""The monitor's web dashboard: one static page, no build step, plus JSON and metrics.

Served from a thread with the standard library so a verifier install needs
no web framework: `/` (the page), `/api/state` (JSON), `/metrics` (Prometheus) and
`/healthz` (alive: what a container health check asks).
The handler threads read only `monitor.published` (the JSON and metrics text the
poll built when it last ended, one reference swapped whole), never the monitor's
live counters.
"""

from __future__ import annotations

import http.server
import threading
from importlib import resources
from typing import Any


def serve_dashboard(monitor: Any, host: str, port: int) -> http.server.ThreadingHTTPServer:
    """Start serving the dashboard of `monitor` in a daemon thread."""
    page = resources.files("verifier").joinpath("dashboard.html").read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            if self.path == "/":
                self._send(200, page, "text/html; charset=utf-8")
            elif self.path == "/api/state":
                self._send(200, monitor.published[0], "application/json")
            elif self.path == "/metrics":
                self._send(200, monitor.published[1].encode(), "text/plain; version=0.0.4")
            elif self.path == "/healthz":
                self._send(200, b'{"ok":true}', "application/json")
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd
