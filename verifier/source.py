"""Read a command's input: a file path, `-` for stdin, or an http(s) URL."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx

MAX_SOURCE = 16 << 20


class SourceError(Exception):
    """The input could not be read; the message says why in one line."""


def read_source(src: str) -> bytes:
    """The bytes at `src` (at most 16 MiB)."""
    if src == "-":
        data = sys.stdin.buffer.read(MAX_SOURCE + 1)
    elif src.startswith(("http://", "https://")):
        data = _read_url(src)
    else:
        try:
            with Path(src).open("rb") as f:  # bounded: a device or FIFO may never end
                data = f.read(MAX_SOURCE + 1)
        except OSError as e:
            raise SourceError(f"{src}: {e.strerror}") from e
    if len(data) > MAX_SOURCE:
        raise SourceError(f"{src}: larger than 16 MiB")
    return data


def _read_url(src: str) -> bytes:
    """The body at `src`, read only up to one byte past the limit (a hostile server may
    send without end)."""
    data = bytearray()
    try:
        with httpx.stream("GET", src, timeout=30, follow_redirects=True) as r:
            if r.status_code != 200:
                raise SourceError(f"{src}: HTTP {r.status_code}")
            for chunk in r.iter_bytes():
                data += chunk
                if len(data) > MAX_SOURCE:
                    break
    except httpx.HTTPError as e:
        raise SourceError(f"{src}: {type(e).__name__}") from e
    return bytes(data)
