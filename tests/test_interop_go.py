"""Interop with Go's golang.org/x/mod/sumdb/note and sumdb/tlog, both ways.

Go checks our checkpoint note, every C2SP tile (its TileHashReader verifies
each tile against the signed tree hash) and our inclusion/consistency proofs
byte for byte against its own; and we check a note, tiles and proofs Go made.
Needs Debian's golang-go and golang-golang-x-mod-dev (scripts/setup.sh).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tlog import checkpoint, merkle, note, tiles

GOPATH = Path("/usr/share/gocode")
SRC = Path(__file__).parent / "interop" / "gointerop.go"


@pytest.fixture(scope="module")
def gointerop(tmp_path_factory) -> Path:
    go = shutil.which("go")
    if go is None or not (GOPATH / "src/golang.org/x/mod/sumdb/tlog").is_dir():
        pytest.skip(
            "GO INTEROP NOT RUN: needs `go` and /usr/share/gocode/src/golang.org/x/mod "
            "(apt-get install golang-go golang-golang-x-mod-dev; scripts/setup.sh does this)"
        )
    out = tmp_path_factory.mktemp("go")
    env = {**os.environ, "GOPATH": str(GOPATH), "GO111MODULE": "off",
           "GOCACHE": str(out / "cache"), "GOFLAGS": ""}
    subprocess.run([go, "build", "-o", str(out / "gointerop"), str(SRC)],
                   check=True, env=env, cwd=out, capture_output=True)
    return out / "gointerop"


def write_log(d: Path, signer: note.Ed25519Signer, entries: list[bytes], batches: list[int]) -> dict:
    """Lay out a C2SP log in `d`, built batch by batch with tiles.extend."""
    store: dict[tuple[int, int], bytes] = {}
    size = 0
    for n in batches:
        new = [merkle.leaf_hash(e) for e in entries[size : size + n]]
        store.update(tiles.extend(size, new, lambda lv, ix: store[(lv, ix)]))
        size += n
    for (level, index), data in store.items():
        p = d / tiles.path(level, index, len(data) // 32)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)

    def node(level: int, index: int) -> bytes:
        tl, ti, _, _ = tiles.locate(level, index)
        return tiles.node_from_tile(store[(tl, ti)], level, index)

    root = merkle.tree_root(size, node)
    (d / "checkpoint").write_bytes(checkpoint.sign(checkpoint.Checkpoint(signer.name, size, root), signer))
    (d / "log.vkey").write_text(signer.vkey + "\n")
    b64 = lambda hs: [base64.b64encode(h).decode() for h in hs]  # noqa: E731
    proofs = {
        "inclusion": [
            {"index": i, "entry": base64.b64encode(entries[i]).decode(),
             "proof": b64(merkle.prove_inclusion(i, size, node))}
            for i in sorted({0, 1, size // 2, 255, 256, size - 1} & set(range(size)))
        ],
        "consistency": [
            {"old": m, "old_root": base64.b64encode(merkle.tree_root(m, node)).decode(),
             "proof": b64(merkle.prove_consistency(m, size, node))}
            for m in sorted({1, 2, 3, 255, 256, 257, size - 1, size} & set(range(1, size + 1)))
        ],
    }
    (d / "proofs.json").write_text(json.dumps(proofs))
    return proofs


def run(binary: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(binary), *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("batches", [[1], [7, 1, 300], [256, 256, 1], [70000]])
def test_go_accepts_our_log(gointerop, tmp_path, batches):
    signer = note.generate_signer("example.com/pag-log")
    entries = [b"entry %d" % i for i in range(sum(batches))]
    proofs = write_log(tmp_path, signer, entries, batches)
    r = run(gointerop, "verify", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"OK size={sum(batches)} inclusion={len(proofs['inclusion'])}")


def test_go_rejects_tampered_tile_and_proof(gointerop, tmp_path):
    signer = note.generate_signer("example.com/pag-log")
    write_log(tmp_path, signer, [b"e%d" % i for i in range(300)], [300])
    tile = tmp_path / "tile/0/001.p/44"
    good = tile.read_bytes()
    tile.write_bytes(good[:5] + bytes([good[5] ^ 1]) + good[6:])
    r = run(gointerop, "verify", str(tmp_path))
    assert r.returncode != 0 and "TreeHash" in r.stderr
    tile.write_bytes(good)
    proofs = json.loads((tmp_path / "proofs.json").read_text())
    proofs["inclusion"][0]["entry"] = base64.b64encode(b"not the entry").decode()
    (tmp_path / "proofs.json").write_text(json.dumps(proofs))
    r = run(gointerop, "verify", str(tmp_path))
    assert r.returncode != 0 and "CheckRecord" in r.stderr


def test_we_accept_go_artefacts(gointerop, tmp_path):
    r = run(gointerop, "make", str(tmp_path))
    assert r.returncode == 0, r.stderr
    made = json.loads((tmp_path / "go.json").read_text())
    d = lambda s: base64.b64decode(s)  # noqa: E731
    verifier = note.verifier_from_vkey(made["vkey"])
    cp, _ = checkpoint.open(d(made["note"]), verifier)
    entries = [d(e) for e in made["entries"]]
    hashes = [merkle.leaf_hash(e) for e in entries]
    assert cp.size == made["size"] == len(entries)
    assert cp.root_hash == d(made["root"]) == merkle.root(hashes)
    for p in made["inclusion"]:
        merkle.verify_inclusion(merkle.leaf_hash(d(p["entry"])), p["index"], cp.size,
                                [d(h) for h in p["proof"]], cp.root_hash)
        assert [d(h) for h in p["proof"]] == merkle.inclusion_proof(p["index"], cp.size, hashes)
    for p in made["consistency"]:
        proof = [d(h) for h in p["proof"] or []]
        merkle.verify_consistency(p["old"], cp.size, proof, d(p["old_root"]), cp.root_hash)
        assert proof == merkle.consistency_proof(p["old"], cp.size, hashes)
    ours = tiles.extend(0, hashes, lambda lv, ix: b"")
    go_tiles = {tiles.parse_path(k): d(v) for k, v in made["tiles"].items()}
    # Go lists every partial width on the way; each is a prefix of our final tile
    for t, data in go_tiles.items():
        assert ours[(t.level, t.index)][: t.width * 32] == data, t
    assert {tiles.TilePath(lv, ix, len(v) // 32) for (lv, ix), v in ours.items()} <= set(go_tiles)
    # a signature from Go's key over other text must fail with our verifier
    forged = d(made["note"]).replace(b"\n300\n", b"\n301\n")
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.open(forged, verifier)


def test_go_accepts_a_live_log(gointerop, tmp_path):
    """Everything `python -m tlog serve` publishes, checked by Go: note, tiles, proofs."""
    import asyncio

    import httpx

    from tests.tlogutil import start_tlog, stop
    from tlog import proof

    data = tmp_path / "log"
    proc, url = start_tlog(data)
    try:
        token = (data / "append.token").read_text().strip()

        async def append_all() -> None:
            async with httpx.AsyncClient(timeout=30) as c:
                rs = await asyncio.gather(*[
                    c.post(f"{url}/add", content=b'{"request_hash": "%064x"}' % i,
                           headers={"Authorization": f"Bearer {token}"}) for i in range(300)])
            assert all(r.status_code == 200 for r in rs)

        asyncio.run(append_all())
        out = tmp_path / "mirror"
        cp_note = httpx.get(f"{url}/checkpoint").content
        (out / "tile").mkdir(parents=True)
        (out / "checkpoint").write_bytes(cp_note)
        (out / "log.vkey").write_text((data / "log.vkey").read_text())
        cp = checkpoint.parse(note.split(cp_note)[0])
        for t in tiles.tiles_for_size(cp.size):
            p = out / str(t)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(httpx.get(f"{url}/{t}").content)
        # the server's own proofs for the latest checkpoint, by request hash
        incl = [proof.parse(httpx.get(f"{url}/proof/{i:064x}").content) for i in range(0, 300, 37)]
        assert all(p.checkpoint == cp_note for p in incl)
        leaves = []
        for b in tiles.bundles_for_size(cp.size):
            leaves += tiles.decode_bundle(httpx.get(f"{url}/{b}").content)
        hashes = [merkle.leaf_hash(e) for e in leaves]
        cons = [(m, httpx.get(f"{url}/consistency", params={"old": m, "new": cp.size}).json()["proof"])
                for m in (1, 7, 256, 299)]
    finally:
        stop(proc)
    enc = lambda b: base64.b64encode(b).decode()  # noqa: E731
    (out / "proofs.json").write_text(json.dumps({
        "inclusion": [{"index": p.index, "entry": enc(p.extra), "proof": [enc(h) for h in p.hashes]}
                      for p in incl],
        "consistency": [{"old": m, "old_root": enc(merkle.root(hashes[:m])), "proof": pr}
                        for m, pr in cons],
    }))
    r = run(gointerop, "verify", str(out))
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("OK size=300")
