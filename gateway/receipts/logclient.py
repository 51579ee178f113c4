"""Single appends to the transparency log whose answers are checked: the keyset and evidence
entries, which must be logged *before* the receipts that name them (receipts themselves go
through the outbox and the shipper).

`LogClient.append(entry)` returns the log's proof only if it proves exactly that entry under
a checkpoint signed by the log and cosigned by the configured witness quorum (the shipper's
`ProofChecker`); `LogClient.checkpoint()` returns the log's current checkpoint note only if
the log signed it. Every failure is a `LogError` with a stable code:

| code | meaning |
|---|---|
| `log_unavailable` | unreachable, timed out, 5xx, or the append token was refused |
| `log_refused` | the log refused the entry (another 4xx) |
| `entry_too_large` | the entry exceeds the 65,535 bytes a log entry may hold |
| `log_proof_invalid` | the answer does not prove the entry under a checkpoint the log signed |
| `log_unwitnessed` | the entry is in the log, but its checkpoint lacks the witness quorum |
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from gateway.receipts.shipper import ProofChecker, ShipError
from tlog import checkpoint, note, proof, tiles

TIMEOUT = 10.0
MAX_ANSWER = 1 << 20


class LogError(Exception):
    """An entry was not appended and proved, or the checkpoint could not be read."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LogClient:
    """Appends single entries to one log and checks every answer (see module docstring)."""

    def __init__(self, url: str, token: str | None, vkey: str,
                 witnesses: Sequence[str] = (), quorum: int = 0,
                 timeout: float = TIMEOUT) -> None:
        self.url = url.rstrip("/")
        self._verifier = note.verifier_from_vkey(vkey)
        self._checker = ProofChecker(vkey, witnesses, quorum)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.AsyncClient(timeout=timeout, headers=headers)

    async def _request(self, method: str, path: str, body: bytes | None = None) -> bytes:
        try:
            r = await self._http.request(method, self.url + path, content=body)
        except httpx.HTTPError as e:
            raise LogError("log_unavailable", f"{method} {path}: {type(e).__name__}") from e
        if r.status_code != 200:
            code = "log_unavailable" if r.status_code >= 500 or r.status_code in (401, 403) \
                else "log_refused"
            raise LogError(code, f"{method} {path}: HTTP {r.status_code}")
        if len(r.content) > MAX_ANSWER:
            raise LogError("log_proof_invalid", f"{method} {path}: answer too large")
        return r.content

    async def checkpoint(self) -> bytes:
        """The log's current checkpoint note, as served, once its log signature verified."""
        body = await self._request("GET", "/checkpoint")
        try:
            checkpoint.open(body, self._verifier)
        except ValueError as e:
            raise LogError("log_proof_invalid", f"checkpoint: {e}") from e
        return body

    async def append(self, entry: bytes) -> proof.TlogProof:
        """Append one entry; the verified proof (its `index` is the entry's log index)."""
        if len(entry) > tiles.MAX_ENTRY:
            raise LogError("entry_too_large",
                           f"entry of {len(entry)} bytes exceeds {tiles.MAX_ENTRY}")
        answer = await self._request("POST", "/add", entry)
        try:
            return self._checker.check(entry, answer)
        except ShipError as e:
            raise LogError("log_unwitnessed" if e.appended else "log_proof_invalid",
                           str(e)) from e

    async def close(self) -> None:
        """Close the HTTP connections."""
        await self._http.aclose()
