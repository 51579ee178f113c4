"""C2SP tlog-tiles paths, bundles, and tiles computed incrementally."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog import merkle, tiles


@pytest.mark.parametrize(
    ("level", "index", "width", "want"),
    [
        (0, 0, 256, "tile/0/000"),
        (0, 1234067, 256, "tile/0/x001/x234/067"),
        (1, 5, 17, "tile/1/005.p/17"),
        (3, 1000, 256, "tile/3/x001/000"),
    ],
)
def test_paths_roundtrip(level, index, width, want):
    assert tiles.path(level, index, width) == want
    assert tiles.parse_path(want) == tiles.TilePath(level, index, width)


def test_entries_path():
    assert tiles.entries_path(1234067, 3) == "tile/entries/x001/x234/067.p/3"
    assert tiles.parse_path("tile/entries/000.p/15") == tiles.TilePath(None, 0, 15)


@pytest.mark.parametrize(
    "bad",
    ["tile/0/0", "tile/0/0000", "tile/0/x000/001", "tile/0/001.p/0", "tile/0/001.p/256",
     "tile/0/001.p/007", "tile/00/001", "tile/64/000", "tile/-1/000", "tile/0/x1/000",
     "tile/entries/", "tile/0/001/", "tile/a/001", "tile/0/001.p/"],
)
def test_noncanonical_paths_refused(bad):
    with pytest.raises(tiles.TileError):
        tiles.parse_path(bad)


def test_bundle_roundtrip_and_limits():
    entries = [b"", b"a", b"x" * 65535]
    assert tiles.decode_bundle(tiles.encode_bundle(entries)) == entries
    with pytest.raises(tiles.TileError):
        tiles.encode_bundle([b"x" * 65536])
    with pytest.raises(tiles.TileError):
        tiles.decode_bundle(b"\x00\x05abc")
    with pytest.raises(tiles.TileError):
        tiles.decode_bundle(b"\x00")


def test_tessera_bundles_and_tiles(testdata):
    """Our tile maths reproduces a real tessera log's tiles from its entries."""
    log = testdata / "tessera-log" / "log"
    entries = tiles.decode_bundle((log / "tile/entries/000.p/15").read_bytes())
    assert entries[0] == b"one" and len(entries) == 15
    hashes = [merkle.leaf_hash(e) for e in entries]
    for w in range(1, 16):
        assert (log / f"tile/0/000.p/{w}").read_bytes() == b"".join(hashes[:w])


def _store_after(sizes: list[int]) -> tuple[dict[tuple[int, int], bytes], list[bytes]]:
    store: dict[tuple[int, int], bytes] = {}
    leaves: list[bytes] = []
    for n in sizes:
        new = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(len(leaves), len(leaves) + n)]
        store.update(tiles.extend(len(leaves), new, lambda lv, ix: store[(lv, ix)]))
        leaves += new
    return store, leaves


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=6))
def test_extend_gives_tiles_that_prove(batches):
    store, leaves = _store_after(batches)
    size = len(leaves)
    want = {(t.level, t.index): t.width for t in tiles.tiles_for_size(size)}
    assert {k: len(v) // 32 for k, v in store.items()} == want

    def node(level: int, index: int) -> bytes:
        tl, ti, _, _ = tiles.locate(level, index)
        return tiles.node_from_tile(store[(tl, ti)], level, index)

    r = merkle.root(leaves)
    assert merkle.tree_root(size, node) == r
    i = size // 3
    merkle.verify_inclusion(leaves[i], i, size, merkle.prove_inclusion(i, size, node), r)


def test_level1_tile_holds_roots_of_level0_tiles():
    store, leaves = _store_after([256 * 3 + 5])
    level1 = tiles.split_hashes(store[(1, 0)])
    assert len(level1) == 3
    assert level1[1] == merkle.root(leaves[256:512])


NEAR_PATHS = st.from_regex(
    r"tile/(entries|[0-9]{1,3}|-[0-9])/(x?-?[0-9]{1,4}/){0,8}-?[0-9]{0,5}(\.p/-?[0-9]{0,4})?/?",
    fullmatch=True)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), NEAR_PATHS))
def test_parse_path_raises_only_tile_error(p):
    """Any string: a canonical TilePath that formats back to itself, or TileError."""
    try:
        t = tiles.parse_path(p)
    except tiles.TileError:
        return
    assert str(t) == p
    assert 0 <= t.index <= tiles.MAX_INDEX and 1 <= t.width <= tiles.WIDTH


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 63), st.integers(0, tiles.MAX_INDEX), st.integers(1, 256))
def test_every_valid_tile_path_parses_back(level, index, width):
    p = tiles.path(level, index, width)
    assert tiles.parse_path(p) == tiles.TilePath(level, index, width)


def test_path_of_any_length_is_refused_cheaply():
    for n in (7000, 1 << 20):
        with pytest.raises(tiles.TileError) as e:
            tiles.parse_path("tile/0/" + "x123/" * (n // 5) + "456")
        assert len(str(e.value)) < 200  # the refusal does not echo the whole path
