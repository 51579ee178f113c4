"""The auditor's HTTP fetcher: keep-alive reuse, both body framings, and every hostile or
broken answer refused as an AuditError (never another exception, never a partial body)."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from verifier import audit

Reply = Callable[[bytes], bytes | None]
"""Request head -> the raw answer (None: close the connection at once)."""


@pytest.fixture
def server() -> Iterator[Callable[[Reply], tuple[str, list[int]]]]:
    """A raw loopback HTTP server answering each request with `reply`; counts connections."""
    socks: list[socket.socket] = []

    def start(reply: Reply, close_after: bool = False) -> tuple[str, list[int]]:
        ls = socket.create_server(("127.0.0.1", 0))
        socks.append(ls)
        accepted = [0]

        def handle(c: socket.socket) -> None:
            buf = b""
            with c:
                while True:
                    while b"\r\n\r\n" not in buf:
                        data = c.recv(65536)
                        if not data:
                            return
                        buf += data
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    out = reply(head)
                    if out is None:
                        return
                    c.sendall(out)
                    if close_after:
                        return

        def accept() -> None:
            while True:
                try:
                    c, _ = ls.accept()
                except OSError:
                    return
                accepted[0] += 1
                threading.Thread(target=handle, args=(c,), daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{ls.getsockname()[1]}", accepted

    yield start
    for s in socks:
        s.close()


def fetch_all(base: str, paths: list[str], *, many: bool = False,
              concurrency: int = 2) -> list[bytes]:
    """`paths` fetched one `get` at a time, or with one `get_many` (`many`)."""
    async def go() -> list[bytes]:
        f = audit.Fetcher(base, concurrency=concurrency)
        try:
            return await f.get_many(paths) if many else [await f.get(p) for p in paths]
        finally:
            await f.close()
    return asyncio.run(go())


def test_keep_alive_connections_serve_many_requests(server) -> None:
    def reply(head: bytes) -> bytes:
        path = head.split(b" ")[1]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)

    base, accepted = server(reply)
    paths = [f"tile/0/{i:03d}" for i in range(40)]
    assert fetch_all(base, paths) == [b"/" + p.encode() for p in paths]
    assert accepted[0] <= 2  # one warm connection per worker thread, not one per request


def test_chunked_bodies_are_read_whole(server) -> None:
    base, _ = server(lambda head: b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                  b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert fetch_all(base, ["checkpoint", "checkpoint"]) == [b"abcde", b"abcde"]


def test_a_base_path_is_kept(server) -> None:
    base, _ = server(lambda head: b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
        len(head.split(b" ")[1]), head.split(b" ")[1]))
    assert fetch_all(base + "/logs/a/", ["checkpoint"]) == [b"/logs/a/checkpoint"]


@pytest.mark.parametrize("answer", [
    None,                                                        # connection closed at once
    b"garbage\r\n\r\n",                                          # no status line
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",      # body cut short
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",  # bad chunk size
    b"HTTP/1.1 200 OK\r\n" + b"X: y\r\n" * 200 + b"\r\n",       # too many headers
    b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70000 + b"\r\n\r\n",     # header line too long
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    b"HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:1/\r\nContent-Length: 0\r\n\r\n",
])
def test_broken_or_hostile_answers_are_audit_errors(server, answer) -> None:
    base, _ = server(lambda head: answer, close_after=True)
    with pytest.raises(audit.AuditError):
        fetch_all(base, ["checkpoint"])


@pytest.mark.parametrize("answer", [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"3e8\r\n" + b"x" * 1000
    + b"\r\n1\r\nx\r\n0\r\n\r\n",
    b"HTTP/1.0 200 OK\r\n\r\n" + b"x" * 2000,
])
def test_a_body_larger_than_any_bundle_is_refused(server, monkeypatch, answer) -> None:
    monkeypatch.setattr(audit, "MAX_BODY", 1000)
    base, _ = server(lambda head: answer, close_after=True)
    with pytest.raises(audit.AuditError, match="larger"):
        fetch_all(base, ["tile/entries/000"])


def test_an_unreachable_log_is_an_audit_error() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(audit.AuditError):
        fetch_all(f"http://127.0.0.1:{port}", ["checkpoint"])


def fetch_many(base: str, paths: list[str]) -> list[bytes]:
    return fetch_all(base, paths, many=True, concurrency=3)


def test_get_many_answers_in_the_order_asked_on_warm_connections(server) -> None:
    def reply(head: bytes) -> bytes:
        path = head.split(b" ")[1]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(path), path)

    base, accepted = server(reply)
    for n in (1, 2, 7, 40):
        paths = [f"tile/0/{i:03d}" for i in range(n)]
        assert fetch_many(base, paths) == [b"/" + p.encode() for p in paths]
    assert accepted[0] <= 3 * 4  # at most one connection per worker and call


def test_get_many_refuses_when_any_answer_is_bad(server) -> None:
    def reply(head: bytes) -> bytes:
        if b"/tile/0/005" in head:
            return b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    base, _ = server(reply)
    with pytest.raises(audit.AuditError, match=r"^tile/0/005: HTTP 404$"):
        fetch_many(base, [f"tile/0/{i:03d}" for i in range(12)])


def test_get_many_from_a_directory_reads_in_order_and_refuses_oversized_files(
        tmp_path, monkeypatch) -> None:
    for i in range(5):
        (tmp_path / f"f{i}").write_bytes(b"x" * i)
    assert fetch_many(str(tmp_path), [f"f{i}" for i in (3, 0, 4)]) == [b"xxx", b"", b"xxxx"]
    monkeypatch.setattr(audit, "MAX_BODY", 3)
    with pytest.raises(audit.AuditError, match=r"^f4: larger than an entry bundle can be$"):
        fetch_many(str(tmp_path), ["f1", "f4"])
    with pytest.raises(audit.AuditError, match=r"^f9: cannot read \(No such file"):
        fetch_many(str(tmp_path), ["f9"])


def test_a_file_that_grows_while_read_is_read_whole(tmp_path, monkeypatch) -> None:
    (tmp_path / "f").write_bytes(b"abc")
    real_fstat = audit.os.fstat

    def stale_fstat(fd: int):  # the size seen before the file grew
        st = real_fstat(fd)
        return type("Stat", (), {"st_size": st.st_size - 2})()

    monkeypatch.setattr(audit.os, "fstat", stale_fstat)
    assert fetch_many(str(tmp_path), ["f"]) == [b"abc"]
    monkeypatch.setattr(audit, "MAX_BODY", 2)
    with pytest.raises(audit.AuditError, match="larger than an entry bundle"):
        fetch_many(str(tmp_path), ["f"])
