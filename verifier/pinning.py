"""Attested TLS: an `ssl.SSLContext` that accepts a server only if its key is the attested one.

The gateway's certificate is self-signed; what vouches for it is the attested
keyset, whose `tls_spki_sha256` is the SHA-256 of the DER SubjectPublicKeyInfo
of its TLS key. `pinned_context(expected)` returns a client context that skips
CA and hostname checks and instead compares, at the end of every handshake and
before a single application byte is written, the SPKI hash of the peer's
certificate with `expected()` (read at each handshake, so a refreshed lease
applies to the next connection). A mismatch raises `PinMismatch` from the
handshake, so the connection is closed and nothing was sent on it.

It works for both httpx transports through the `ssl` module's own extension
points, `SSLContext.sslsocket_class` (blocking sockets: `wrap_socket` runs the
handshake) and `sslobject_class` (memory BIOs, as anyio uses for
`httpx.AsyncClient`): their `do_handshake` checks the pin once the handshake
completes.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Callable

from cryptography import x509

from verifier.tee.keyset import spki_sha256


class PinMismatch(ssl.SSLError):
    """The server's TLS key is not the attested one; `observed` is its SPKI SHA-256 (hex)."""

    def __init__(self, observed: str) -> None:
        super().__init__(f"the server's TLS key (SPKI sha256 {observed}) is not the attested one")
        self.observed = observed


def peer_spki_sha256(der_cert: bytes | None) -> str:
    """Lower-case hex SHA-256 of the SPKI of a DER certificate ("" when there is none)."""
    if not der_cert:
        return ""
    try:
        return spki_sha256(x509.load_der_x509_certificate(der_cert).public_key())
    except ValueError:
        return ""


def pinned_context(expected: Callable[[], str]) -> ssl.SSLContext:
    """A client context accepting only a peer whose SPKI SHA-256 (hex) is `expected()`."""

    def check(der: bytes | None) -> None:
        observed = peer_spki_sha256(der)
        if not observed or not hmac.compare_digest(observed, expected()):
            raise PinMismatch(observed or "none")

    class PinnedSocket(ssl.SSLSocket):
        def do_handshake(self, block: bool = False) -> None:
            super().do_handshake(block)
            check(self.getpeercert(binary_form=True))

    class PinnedObject(ssl.SSLObject):
        def do_handshake(self) -> None:
            super().do_handshake()
            check(self.getpeercert(binary_form=True))

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.sslsocket_class = PinnedSocket
    ctx.sslobject_class = PinnedObject
    return ctx


def verify_for(base_url: str, expected: Callable[[], str], pin: bool = True
               ) -> ssl.SSLContext | bool:
    """httpx's `verify` for connections to `base_url`: the pinned context on https (CA
    checks instead when `pin` is off), the default for plain http."""
    if not base_url.startswith("https://"):
        return True
    return pinned_context(expected) if pin else True


def find_mismatch(exc: BaseException | None) -> PinMismatch | None:
    """The PinMismatch behind a transport error (httpx wraps it twice), if any."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, PinMismatch):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None
