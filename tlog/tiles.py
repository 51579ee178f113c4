"""C2SP tlog-tiles: tile paths, hash tiles and entry bundles.

A hash tile at level L, index N holds up to 256 consecutive hashes of tree
level 8*L, starting at node 256*N; a full tile is 256 * 32 bytes and never
changes. A partial tile of width W (1..255) holds the first W hashes and is
addressed `tile/<L>/<N>.p/<W>`. N is written in groups of three digits, all
but the last prefixed with `x` (1234067 -> x001/x234/067). Entry bundles
hold the entries of leaf tile N, each prefixed by its 2-byte big-endian
length, at `tile/entries/<N>[.p/<W>]`.

`parse_path` accepts only the canonical form and raises TileError (never
anything else) for every other string: no leading zero group, no width 0 or
256+, no level above 63 and no index beyond the last tile of the largest
tree a checkpoint can name (2^63 - 1 leaves), checked before any number is
converted, so a path of any length costs at most one regex match.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from tlog.merkle import HASH_SIZE

WIDTH = 256
HEIGHT = 8
TILE_BYTES = WIDTH * HASH_SIZE
MAX_LEVEL = 63
MAX_ENTRY = 0xFFFF
MAX_TREE_SIZE = (1 << 63) - 1
MAX_INDEX = MAX_TREE_SIZE >> HEIGHT
"""The largest tile index of any level: that of the last leaf tile of the largest tree."""
INNER_LEVEL = 4
"""The tree level whose nodes `inner_row` keeps of a full leaf tile."""
INNER_BYTES = (WIDTH >> INNER_LEVEL) * HASH_SIZE
"""The length of an inner row: 16 hashes, 512 bytes."""


class TileError(ValueError):
    """A malformed tile path, tile or entry bundle."""


@dataclass(frozen=True)
class TilePath:
    """A parsed tile path; level is None for an entry bundle."""

    level: int | None
    index: int
    width: int = WIDTH

    @property
    def partial(self) -> bool:
        return self.width < WIDTH

    def __str__(self) -> str:
        if self.level is None:
            return entries_path(self.index, self.width)
        return path(self.level, self.index, self.width)


def encode_index(n: int) -> str:
    """N as `x`-prefixed groups of three digits."""
    if n < 0:
        raise TileError("negative tile index")
    s = str(n)
    s = "0" * (-len(s) % 3) + s
    groups = [s[i : i + 3] for i in range(0, len(s), 3)]
    return "/".join([f"x{g}" for g in groups[:-1]] + [groups[-1]])


def _suffix(width: int) -> str:
    if not 1 <= width <= WIDTH:
        raise TileError(f"tile width {width} out of range")
    return "" if width == WIDTH else f".p/{width}"


def path(level: int, index: int, width: int = WIDTH) -> str:
    """`tile/<L>/<N>[.p/<W>]`."""
    if not 0 <= level <= MAX_LEVEL:
        raise TileError(f"tile level {level} out of range")
    return f"tile/{level}/{encode_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int = WIDTH) -> str:
    """`tile/entries/<N>[.p/<W>]`."""
    return f"tile/entries/{encode_index(index)}{_suffix(width)}"


_PATH = re.compile(
    r"tile/(?P<level>entries|0|[1-9][0-9]?)/"
    r"(?P<index>(?:x[0-9]{3}/){0,5}[0-9]{3})"
    r"(?:\.p/(?P<width>[1-9][0-9]{0,2}))?",
    re.ASCII,
)
_SHOWN = 64
"""How much of a refused path an error message repeats."""


def parse_path(p: str) -> TilePath:
    """Parse a tile or entry-bundle path; the canonical form only (see the module doc)."""
    m = _PATH.fullmatch(p)
    if m is None:
        shown = p[:_SHOWN] + ("…" if len(p) > _SHOWN else "")
        raise TileError(f"malformed tile path {shown!r}")
    level_s, index_s, width_s = m["level"], m["index"], m["width"]
    groups = index_s.replace("x", "").split("/")
    if len(groups) > 1 and groups[0] == "000":
        raise TileError("tile index has a leading zero group")
    index = int("".join(groups))
    if index > MAX_INDEX:
        raise TileError("tile index beyond the largest possible tree")
    width = int(width_s) if width_s else WIDTH
    if width_s and width >= WIDTH:
        raise TileError("partial tile width must be below 256")
    level = None if level_s == "entries" else int(level_s)
    if level is not None and level > MAX_LEVEL:
        raise TileError("tile level out of range")
    return TilePath(level, index, width)


def split_hashes(data: bytes) -> list[bytes]:
    """The hashes of a hash tile."""
    if len(data) % HASH_SIZE or len(data) > TILE_BYTES:
        raise TileError("tile length is not a multiple of 32 up to 8192")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def encode_bundle(entries: Iterable[bytes]) -> bytes:
    """Entries, each prefixed with its 2-byte big-endian length."""
    out = bytearray()
    for e in entries:
        if len(e) > MAX_ENTRY:
            raise TileError("entry longer than 65535 bytes")
        out += len(e).to_bytes(2, "big") + e
    return bytes(out)


def decode_bundle(data: bytes) -> list[bytes]:
    """Split an entry bundle; refuses truncation and more than 256 entries."""
    out: list[bytes] = []
    i = 0
    while i < len(data):
        if i + 2 > len(data):
            raise TileError("truncated entry length")
        n = int.from_bytes(data[i : i + 2], "big")
        i += 2
        if i + n > len(data):
            raise TileError("truncated entry")
        out.append(data[i : i + n])
        i += n
        if len(out) > WIDTH:
            raise TileError("entry bundle holds more than 256 entries")
    return out


def tiles_for_size(size: int) -> list[TilePath]:
    """Every hash tile of a tree of `size` leaves, level by level."""
    out: list[TilePath] = []
    level, count = 0, size
    while count > 0 and level <= MAX_LEVEL:
        full, rest = divmod(count, WIDTH)
        out += [TilePath(level, n) for n in range(full)]
        if rest:
            out.append(TilePath(level, full, rest))
        level, count = level + 1, count >> HEIGHT
    return out


def bundles_for_size(size: int) -> list[TilePath]:
    """Every entry bundle of a tree of `size` leaves."""
    full, rest = divmod(size, WIDTH)
    out = [TilePath(None, n) for n in range(full)]
    if rest:
        out.append(TilePath(None, full, rest))
    return out


def hashes_root(hashes: Sequence[bytes]) -> bytes:
    """Root of a power-of-two run of same-level hashes."""
    return run_root(b"".join(hashes))


def run_root(data: bytes) -> bytes:
    """Root of a power-of-two run of same-level hashes given concatenated (as in a tile)."""
    n = len(data) // HASH_SIZE
    if not n or n & (n - 1) or len(data) % HASH_SIZE:
        raise TileError("need a power-of-two number of hashes")
    sha = hashlib.sha256
    while len(data) > HASH_SIZE:  # each pair is one 64-byte slice of the layer below
        data = b"".join([sha(b"\x01" + data[i : i + 64]).digest() for i in range(0, len(data), 64)])
    return data


def run_layers(data: bytes) -> list[bytes]:
    """Every layer above a power-of-two run of same-level hashes, lowest first: layer k
    holds the run's nodes k levels up, concatenated; the last is `run_root(data)`."""
    n = len(data) // HASH_SIZE
    if not n or n & (n - 1) or len(data) % HASH_SIZE:
        raise TileError("need a power-of-two number of hashes")
    sha = hashlib.sha256
    layers = []
    while len(data) > HASH_SIZE:
        data = b"".join([sha(b"\x01" + data[i : i + 64]).digest() for i in range(0, len(data), 64)])
        layers.append(data)
    return layers


def locate(level: int, index: int) -> tuple[int, int, int, int]:
    """Where node (level, index) lives: (tile level, tile index, first hash, count).

    The node is the root of `count` consecutive hashes of tile
    (tile level, tile index) starting at position `first`.
    """
    tl, r = divmod(level, HEIGHT)
    start = index << r
    return tl, start // WIDTH, start % WIDTH, 1 << r


def node_from_tile(tile: bytes, level: int, index: int) -> bytes:
    """Hash of node (level, index) from the tile that holds it."""
    _, _, first, count = locate(level, index)
    end = (first + count) * HASH_SIZE
    if len(tile) < end:
        raise TileError("tile too short for the requested node")
    return run_root(tile[first * HASH_SIZE : end])


def inner_row(tile: bytes) -> bytes:
    """The inner row of a full leaf tile: its 16 level-4 nodes, concatenated (512 bytes).

    Node k of the row is the root of the tile's hashes 16k .. 16k+15, i.e. tree node
    (4, 16N + k) of leaf tile N. It is not part of tlog-tiles and never served: a
    store keeps it beside the tile so that the in-tile inclusion path of a leaf costs
    ~30 SHA-256 (its 16-leaf group hashed up, the 16 inner nodes hashed up) instead of
    the 255 of hashing up the whole tile.
    """
    if len(tile) != TILE_BYTES:
        raise TileError("an inner row is made of a full leaf tile only")
    group = HASH_SIZE << INNER_LEVEL
    return b"".join(run_root(tile[i : i + group]) for i in range(0, TILE_BYTES, group))


TileReader = Callable[[int, int], bytes]
"""read(level, index) -> the current (possibly partial) bytes of a hash tile."""


def extend(old_size: int, leaf_hashes: Sequence[bytes], read: TileReader) -> dict[tuple[int, int], bytes]:
    """New contents of every hash tile that changes when leaves are appended.

    `read` returns the stored tile for a (level, index) that was partial at
    `old_size`; it is called at most once per level. Keys are (level, index),
    values the whole new tile (full or partial).
    """
    out: dict[tuple[int, int], bytes] = {}
    level, start, new = 0, old_size, list(leaf_hashes)
    while new:
        first_tile, offset = divmod(start, WIDTH)
        existing = read(level, first_tile) if offset else b""
        if len(existing) != offset * HASH_SIZE:
            raise TileError(f"stored tile {level}/{first_tile} has the wrong width")
        buf = existing + b"".join(new)
        completed: list[bytes] = []
        for i, off in enumerate(range(0, len(buf), TILE_BYTES)):
            tile = buf[off : off + TILE_BYTES]
            out[(level, first_tile + i)] = tile
            if len(tile) == TILE_BYTES:
                completed.append(hashes_root(split_hashes(tile)))
        level, start, new = level + 1, start >> HEIGHT, completed
    return out
