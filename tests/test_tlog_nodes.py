"""The log's node readers (one node at a time; for a batch, tile segments hashed up once
with every inner node kept) and its batch proofs give exactly the RFC 6962 definitions,
whatever order nodes are asked in."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tlog import merkle, note, proof, tiles
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore


@pytest.mark.parametrize("batches", [[1, 2, 300], [700, 5, 1], [256, 256, 100]])
def test_every_complete_node_equals_the_definition(tmp_path: Path, batches: list[int]) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, note.generate_signer("test.example/nodes"))
    entries: list[bytes] = []
    for n in batches:
        chunk = [b"entry %d" % (len(entries) + i) for i in range(n)]
        log._commit(chunk)
        entries += chunk
    leaves = [merkle.leaf_hash(e) for e in entries]
    wanted = [(level, index) for level in range(11)
              for index in range(len(leaves) >> level)]
    random.Random(len(leaves)).shuffle(wanted)  # upper nodes first, lower first, mixed
    batch_node = log._batch_node({})
    for level, index in wanted:
        lo = index << level
        want = merkle.root(leaves[lo:lo + (1 << level)])
        assert batch_node(level, index) == want
        assert log.node(level, index) == want
    assert log.head.root == merkle.root(leaves)
    store.close()


def test_batch_answers_carry_proofs_that_verify(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, note.generate_signer("test.example/nodes"))
    batch = [b"entry %d" % i for i in range(600)]
    head, indices = log._commit(batch)
    log.served = head
    answers = log._answers(batch, indices)
    for e, a in zip(batch, answers, strict=True):
        p = proof.parse(a.proof)
        assert p.extra == e and p.checkpoint == head.note
        merkle.verify_inclusion(merkle.leaf_hash(e), a.index, head.size, list(p.hashes),
                                head.root)
        assert a.proof == log.prove(a.index, e, head)  # the one-by-one path, byte for byte
    store.close()


def test_run_layers_end_in_the_run_root() -> None:
    data = b"".join(merkle.leaf_hash(b"%d" % i) for i in range(64))
    layers = tiles.run_layers(data)
    assert [len(x) // 32 for x in layers] == [32, 16, 8, 4, 2, 1]
    assert layers[-1] == tiles.run_root(data)
    assert layers[0][:32] == merkle.node_hash(data[:32], data[32:64])
    with pytest.raises(tiles.TileError):
        tiles.run_layers(data[:96])


def test_add_many_answers_each_entry_in_order_like_add(tmp_path: Path) -> None:
    import asyncio

    from tlog.sequencer import SHUTTING_DOWN, Added, AppendError

    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, note.generate_signer("test.example/nodes"))

    async def go() -> None:
        refused = await log.add_many([b"a", b"b"])  # not started: each entry refused, no raise
        assert [type(r) for r in refused] == [AppendError, AppendError]
        assert all(r.code == SHUTTING_DOWN for r in refused)  # type: ignore[union-attr]
        await log.start()
        try:
            first = await log.add(b"x")
            got = await log.add_many([b"y", b"x", b"z", b"y"])
        finally:
            await log.close()
        assert all(isinstance(r, Added) for r in got)
        assert [r.index for r in got] == [1, first.index, 2, 1]  # duplicates keep their index
        for e, r in zip([b"y", b"x", b"z", b"y"], got, strict=True):
            p = proof.parse(r.proof)
            assert p.extra == e and p.index == r.index

    asyncio.run(go())
    store.close()


def _receipt(i: int) -> bytes:
    return b'{"request_hash": "%064x"}' % i


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 700), min_size=1, max_size=3), st.randoms(use_true_random=False),
       st.sampled_from(["all", "none", "some"]), st.booleans())
def test_paths_and_served_proofs_equal_the_definition(batches: list[int], rnd: random.Random,
                                                      inner: str, restart: bool) -> None:
    """Log.inclusion (a full leaf tile's path from the node cache, or from the tile and its
    inner row, or from the whole tile where the row is absent) and proof_for (the served
    head's right edge memoized) give RFC 9162's PATH and the old tlog-proof text byte for
    byte, under every head, warm cache or cold (`restart`: a new Log on the store), with
    every, no or some leaf tiles' inner rows stored, as the served head moves (and the memo
    must be thrown away)."""
    with tempfile.TemporaryDirectory() as d:
        store = SQLiteStore(Path(d) / "log.db")
        signer = note.generate_signer("test.example/paths")
        log = Log(store, signer)
        entries: list[bytes] = []
        heads = []
        for n in batches:
            chunk = [_receipt(len(entries) + i) for i in range(n)]
            heads.append(log._commit(chunk)[0])
            entries += chunk
        full = len(entries) >> tiles.HEIGHT
        assert store.inner_held() == full
        if restart:
            log = Log(store, signer)  # cold caches
        kept = {"all": range(full), "none": [], "some": rnd.sample(range(full), full // 2)}[inner]
        store._db.executemany("DELETE FROM tile_inner WHERE idx = ?",
                              [(n,) for n in range(full) if n not in kept])
        leaves = [merkle.leaf_hash(e) for e in entries]
        for head in rnd.sample(heads, len(heads)) + heads:  # any order: the memo follows
            log.served = head
            size = head.size
            wanted = [0, size - 1, min(size - 1, 255), min(size - 1, 256),
                      (size - 1) & -256] + [rnd.randrange(size) for _ in range(12)]
            for i in wanted:
                want = tuple(merkle.inclusion_proof(i, size, leaves))
                assert log.inclusion(i, head) == want
                text = log.proof_for(f"{i:064x}")
                assert text == proof.TlogProof(i, want, head.note, entries[i]).format()
            assert log.proof_for(f"{size:064x}") is None  # held by a later head only
        store.close()
