"""The log's side of C2SP tlog-witness: submit checkpoints, gather cosignatures.

Each witness is tracked by the size it last cosigned (0 until known). A 409
answer carries the witness's size; the pool retries once from it. A slow or
down witness never holds the log beyond `timeout`, and the checkpoint itself
is never changed: cosignatures are only ever appended to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import httpx

from tlog import note
from witness import request

log = logging.getLogger("tlog.witnessing")


class QuorumNotReached(Exception):
    """Fewer cosignatures than the quorum arrived in time."""


class WitnessPool:
    """Witnesses a log submits its checkpoints to."""

    def __init__(self, urls: Sequence[str], *, quorum: int = 0, timeout: float = 5.0) -> None:
        if quorum > len(urls):
            raise ValueError(f"quorum {quorum} exceeds the {len(urls)} witnesses")
        self.urls = [u.rstrip("/") for u in urls]
        self.quorum = quorum
        self.timeout = timeout
        self._sizes = dict.fromkeys(self.urls, 0)
        self._client: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._client = httpx.AsyncClient(timeout=self.timeout)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    async def _submit(self, url: str, note_bytes: bytes, size: int,
                      prove: Callable[[int, int], list[bytes]]) -> list[note.Signature]:
        assert self._client is not None
        for _ in range(2):
            old = self._sizes[url]
            if old > size:
                raise ValueError(f"witness {url} is at size {old}, beyond {size}")
            proof = prove(old, size) if 0 < old < size else []
            r = await self._client.post(f"{url}/add-checkpoint",
                                        content=request.format(old, proof, note_bytes))
            if r.status_code == 409 and r.headers.get("content-type", "").startswith(
                    request.SIZE_CONTENT_TYPE):
                self._sizes[url] = int(r.text.strip())
                continue
            if r.status_code != 200:
                raise ValueError(f"witness {url} answered {r.status_code}: {r.text.strip()[:200]}")
            _, sigs = note.split(b"x\n\n" + r.content)
            self._sizes[url] = size
            return sigs
        raise ValueError(f"witness {url} kept answering 409")

    async def cosign(self, note_bytes: bytes, size: int,
                     prove: Callable[[int, int], list[bytes]]) -> list[note.Signature]:
        """Cosignatures from the witnesses for this signed checkpoint.

        With a quorum K, waits until K witnesses answered (QuorumNotReached
        after `timeout`); without, returns what arrived within `timeout`.
        """
        tasks = [asyncio.create_task(self._submit(u, note_bytes, size, prove)) for u in self.urls]
        got: list[note.Signature] = []
        answered = 0
        try:
            for fut in asyncio.as_completed(tasks, timeout=self.timeout):
                try:
                    sigs = await fut
                except TimeoutError:
                    raise
                except Exception as e:  # one witness failing is not the log failing
                    log.warning("witness: %s", e)
                    continue
                got += sigs
                answered += 1
                if self.quorum and answered >= self.quorum:
                    break
        except TimeoutError:
            pass
        finally:
            for t in tasks:
                if not t.done():
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
        if answered < self.quorum:
            raise QuorumNotReached(f"{answered} of {self.quorum} witnesses cosigned")
        return got
