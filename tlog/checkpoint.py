"""C2SP tlog-checkpoint: the signed note body naming a log's tree head.

Body: `<origin>\\n<decimal size>\\n<base64 root hash>\\n` followed by zero or
more non-empty extension lines. Size has no leading zeros; the root is 32 bytes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass

from tlog import note
from tlog.merkle import HASH_SIZE

MAX_SIZE = (1 << 63) - 1


class CheckpointError(ValueError):
    """A malformed or unverifiable checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """A tree head: origin, size, root hash and extension lines."""

    origin: str
    size: int
    root_hash: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> bytes:
        """The note text of this checkpoint."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root_hash).decode()]
        return ("\n".join(lines + list(self.extensions)) + "\n").encode()


def parse(text: bytes) -> Checkpoint:
    """Parse checkpoint note text (without signatures)."""
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError("checkpoint is not UTF-8") from e
    if not s.endswith("\n"):
        raise CheckpointError("checkpoint must end in a newline")
    lines = s[:-1].split("\n")
    if len(lines) < 3:
        raise CheckpointError("checkpoint needs origin, size and root lines")
    origin, size_s, root_s, *ext = lines
    if not origin:
        raise CheckpointError("empty origin")
    if not size_s.isdigit() or not size_s.isascii() or (size_s != "0" and size_s[0] == "0"):
        raise CheckpointError("malformed tree size")
    size = int(size_s)
    if size > MAX_SIZE:
        raise CheckpointError("tree size too large")
    try:
        root_hash = base64.b64decode(root_s, validate=True)
    except ValueError as e:  # binascii.Error, or a str with non-ASCII characters
        raise CheckpointError("malformed root hash") from e
    if len(root_hash) != HASH_SIZE:
        raise CheckpointError("root hash is not 32 bytes")
    if any(not line for line in ext):
        raise CheckpointError("empty extension line")
    return Checkpoint(origin, size, root_hash, tuple(ext))


def sign(cp: Checkpoint, signer: note.Signer) -> bytes:
    """The signed note for `cp`."""
    return note.sign(cp.body(), [signer])


def open(  # noqa: A001 - mirrors note.open
    msg: bytes,
    log_verifier: note.Verifier,
    other_verifiers: Iterable[note.Verifier] = (),
    origin: str | None = None,
) -> tuple[Checkpoint, note.Note]:
    """Verify a signed checkpoint; the log's own signature is mandatory.

    `origin`, when given, must equal the checkpoint's origin line (the key name
    only SHOULD equal it, so it is not assumed).
    """
    try:
        n = note.open(msg, [log_verifier, *other_verifiers])
    except note.NoteError as e:
        raise CheckpointError(f"checkpoint signature: {e}") from e
    if not any(s.name == log_verifier.name and s.key_id == log_verifier.key_id for s in n.sigs):
        raise CheckpointError("checkpoint is not signed by the log key")
    cp = parse(n.text)
    if origin is not None and cp.origin != origin:
        raise CheckpointError(f"checkpoint origin {cp.origin!r} is not {origin!r}")
    return cp, n
