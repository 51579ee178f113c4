"""The auditor's fast hashing equals the definitions: a bundle's leaf hashes are
`merkle.leaf_hash` of `tiles.decode_bundle`'s entries, and any bundle that is not
exactly `width` well-formed entries is refused (never hashed into a verdict)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tlog import merkle, tiles
from verifier import audit

entry_lists = st.lists(st.binary(max_size=300), max_size=260)


def defined(bundle: bytes, width: int) -> bytes | None:
    """The old definition: decode, count, hash each entry."""
    try:
        entries = tiles.decode_bundle(bundle)
    except tiles.TileError:
        return None
    if len(entries) != width:
        return None
    return b"".join(merkle.leaf_hash(e) for e in entries)


@settings(max_examples=300, deadline=None)
@given(entry_lists, st.integers(1, 256))
def test_bundle_leaf_hashes_equal_the_definition(entries: list[bytes], width: int) -> None:
    bundle = tiles.encode_bundle(entries)
    got = audit.bundle_leaf_hashes(bundle, width)
    assert got == defined(bundle, width)
    if len(entries) == width:
        assert got == b"".join(merkle.leaf_hash(e) for e in entries)


@settings(max_examples=300, deadline=None)
@given(entry_lists, st.integers(1, 256), st.data())
def test_cut_or_padded_bundles_are_refused_like_the_definition(
        entries: list[bytes], width: int, data: st.DataObject) -> None:
    bundle = tiles.encode_bundle(entries)
    cut = data.draw(st.integers(0, len(bundle)))
    tail = data.draw(st.binary(max_size=4))
    for bad in (bundle[:cut], bundle + tail, bundle[:cut] + tail):
        assert audit.bundle_leaf_hashes(bad, width) == defined(bad, width)


@given(st.binary(max_size=600), st.integers(1, 256))
def test_garbage_bundles_are_hashed_only_when_the_definition_decodes_them(
        garbage: bytes, width: int) -> None:
    assert audit.bundle_leaf_hashes(garbage, width) == defined(garbage, width)


def test_a_full_bundle_of_the_largest_entries_hashes() -> None:
    entries = [bytes([i]) * tiles.MAX_ENTRY for i in range(3)]
    assert audit.bundle_leaf_hashes(tiles.encode_bundle(entries), 3) == b"".join(
        merkle.leaf_hash(e) for e in entries)
