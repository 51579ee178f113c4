"""The witness: every add-checkpoint outcome of C2SP tlog-witness, and its durability."""

from __future__ import annotations

import asyncio
import os
import signal

import httpx
import pytest

from tests.tlogutil import free_port, start, start_tlog, stop
from tlog import checkpoint, merkle, note
from witness import cosignature, request

LEAVES = [merkle.leaf_hash(b"w%d" % i) for i in range(40)]


def cp_note(signer: note.Ed25519Signer, size: int, leaves=LEAVES) -> bytes:
    return checkpoint.sign(checkpoint.Checkpoint(signer.name, size, merkle.root(leaves[:size])), signer)


@pytest.fixture
def wit(tmp_path):
    log = note.generate_signer("example.com/log")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    data = tmp_path / "w"
    proc = start("witness", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
                 "--log", f"{log.name}={log.vkey}", ready=url + "/")
    w = cosignature.verifier_from_vkey((data / "witness.vkey").read_text())
    yield url, log, w, data
    stop(proc)


def post(url: str, old: int, proof: list[bytes], n: bytes) -> httpx.Response:
    return httpx.post(f"{url}/add-checkpoint", content=request.format(old, proof, n))


def test_cosigns_first_sight_then_consistent_growth(wit):
    url, log, w, data = wit
    n10 = cp_note(log, 10)
    r = post(url, 0, [], n10)
    assert r.status_code == 200, r.text
    opened = cosignature.verify_witnessed(n10 + r.content, log.verifier(), [w], quorum=1)
    assert opened.cosigners == (w.name,) and cosignature.timestamp(opened.note.sigs[1]) > 0
    n25 = cp_note(log, 25)
    r = post(url, 10, merkle.consistency_proof(10, 25, LEAVES), n25)
    assert r.status_code == 200
    assert httpx.get(url + "/").json()["logs"][0]["size"] == 25
    assert (data / "witness.key").stat().st_mode & 0o777 == 0o600


def test_refusals(wit):
    url, log, w, _ = wit
    assert post(url, 0, [], cp_note(log, 10)).status_code == 200
    # malformed, too many proof lines, rollback (old > size)
    assert httpx.post(f"{url}/add-checkpoint", content=b"old x\n\n").status_code == 400
    assert post(url, 10, [b"\0" * 32] * 64, cp_note(log, 20)).status_code == 400
    assert post(url, 30, [], cp_note(log, 20)).status_code == 400
    # signature by another key for the same origin: 403; unknown origin: 404
    impostor = note.Ed25519Signer(log.name, os.urandom(32))
    assert post(url, 10, merkle.consistency_proof(10, 20, LEAVES), cp_note(impostor, 20)).status_code == 403
    stranger = note.generate_signer("other.example/log")
    assert post(url, 0, [], cp_note(stranger, 3)).status_code == 404
    # wrong old size: 409 with the size it holds
    r = post(url, 5, merkle.consistency_proof(5, 20, LEAVES), cp_note(log, 20))
    assert r.status_code == 409 and r.text == "10\n"
    assert r.headers["content-type"] == "text/x.tlog.size"
    # bad proof: 422
    bad = merkle.consistency_proof(10, 20, LEAVES)
    bad[0] = bytes(32)
    assert post(url, 10, bad, cp_note(log, 20)).status_code == 422
    # nothing above moved the witness
    assert httpx.get(url + "/").json()["logs"][0]["size"] == 10


def test_empty_tree_rules(wit):
    url, log, _, _ = wit
    assert post(url, 0, [b"\1" * 32], cp_note(log, 3)).status_code == 422  # proof with old 0
    bad_empty = checkpoint.sign(checkpoint.Checkpoint(log.name, 0, b"\1" * 32), log)
    assert post(url, 0, [], bad_empty).status_code == 422
    assert post(url, 0, [], cp_note(log, 0)).status_code == 200


def test_fork_is_refused_and_kept_as_evidence(wit):
    url, log, _, _ = wit
    assert post(url, 0, [], cp_note(log, 10)).status_code == 200
    forked = [merkle.leaf_hash(b"evil")] + LEAVES[1:]
    fork_note = cp_note(log, 10, forked)
    assert post(url, 10, [], fork_note).status_code == 422
    # growth from a forked history fails the proof too
    assert post(url, 10, merkle.consistency_proof(10, 20, forked), cp_note(log, 20, forked)).status_code == 422
    forks = httpx.get(url + "/forks").json()
    assert len(forks) == 1 and forks[0]["conflicting"] == fork_note.decode()
    assert forks[0]["cosigned"] == cp_note(log, 10).decode()


def test_racing_double_submission(wit):
    url, log, _, _ = wit
    assert post(url, 0, [], cp_note(log, 10)).status_code == 200

    async def race() -> list[int]:
        async with httpx.AsyncClient() as c:
            bodies = [request.format(10, merkle.consistency_proof(10, n, LEAVES), cp_note(log, n))
                      for n in (20, 30) * 4]
            rs = await asyncio.gather(*[c.post(f"{url}/add-checkpoint", content=b) for b in bodies])
        return [r.status_code for r in rs]

    codes = asyncio.run(race())
    assert codes.count(200) == 1 and set(codes) <= {200, 409}


def test_kill_between_persist_and_answer(tmp_path):
    log = note.generate_signer("example.com/log")
    data = tmp_path / "w"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    args = ("witness", "serve", "--data", str(data), "--listen", f"127.0.0.1:{port}",
            "--log", f"{log.name}={log.vkey}")
    proc = start(*args, ready=url + "/")
    assert post(url, 0, [], cp_note(log, 10)).status_code == 200
    stop(proc)
    os.environ["PAG_WITNESS_CRASH_AFTER_PERSIST"] = "1"
    try:
        proc = start(*args, ready=url + "/")
        with pytest.raises(httpx.HTTPError):  # the process dies before answering
            post(url, 10, merkle.consistency_proof(10, 20, LEAVES), cp_note(log, 20))
        proc.wait(10)
    finally:
        del os.environ["PAG_WITNESS_CRASH_AFTER_PERSIST"]
    proc = start(*args, ready=url + "/")
    try:
        assert httpx.get(url + "/").json()["logs"][0]["size"] == 20  # it was persisted
        # a rollback to 10 and a fork at 20 are refused after the restart
        assert post(url, 10, merkle.consistency_proof(10, 15, LEAVES), cp_note(log, 15)).status_code == 409
        forked = LEAVES[:15] + [merkle.leaf_hash(b"x")] + LEAVES[16:]
        assert post(url, 20, [], cp_note(log, 20, forked)).status_code == 422
        assert post(url, 20, merkle.consistency_proof(20, 30, LEAVES), cp_note(log, 30)).status_code == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_tessera_fork_vector(testdata, tmp_path):
    """A real log and a re-signed fork with the same key: the witness cosigns only one."""
    real = testdata / "tessera-log"
    fork = testdata / "vectors" / "tessera-fork" / "log"
    if not fork.is_dir():
        pytest.skip("tessera-fork vector absent")
    vkey = (real / "log.vkey").read_text().strip()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start("witness", "serve", "--data", str(tmp_path / "w"), "--listen",
                 f"127.0.0.1:{port}", "--log", vkey, ready=url + "/")
    try:
        assert post(url, 0, [], (real / "log" / "checkpoint").read_bytes()).status_code == 200
        # the fork at 17 is not consistent with the real 15: no proof can make it so
        fork_note = (fork / "checkpoint").read_bytes()
        assert post(url, 15, [b"\0" * 32] * 3, fork_note).status_code == 422
    finally:
        stop(proc)


def test_full_loop_two_witnesses_quorum_two(tmp_path):
    """tlog + 2 witnesses, quorum 2, 1,000 appends: every served checkpoint is cosigned twice."""
    data = tmp_path / "log"
    from tlog import keys
    log_signer = keys.load_signer(data)
    procs, urls, vkeys = [], [], []
    try:
        for i in range(2):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            wd = tmp_path / f"w{i}"
            procs.append(start("witness", "serve", "--data", str(wd), "--listen",
                               f"127.0.0.1:{port}", "--name", f"w{i}.example",
                               "--log", f"{log_signer.name}={log_signer.vkey}", ready=url + "/"))
            urls.append(url)
            vkeys.append((wd / "witness.vkey").read_text())
        flags = sum([["--witness", u, "--witness-vkey", v]
                     for u, v in zip(urls, vkeys, strict=True)], [])
        tproc, turl = start_tlog(data, *flags, "--quorum", "2")
        procs.append(tproc)
        witnesses = cosignature.parse_vkeys(vkeys)
        token = (data / "append.token").read_text().strip()

        async def load() -> list[dict]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as c:
                sem = asyncio.Semaphore(64)

                async def one(i: int) -> dict:
                    async with sem:
                        r = await c.post(f"{turl}/add", content=b"loop %d" % i,
                                         headers={"Authorization": f"Bearer {token}"})
                        assert r.status_code == 200, r.text
                        return r.json()

                return await asyncio.gather(*[one(i) for i in range(1000)])

        answers = asyncio.run(load())
        notes = {a["checkpoint"] for a in answers} | {httpx.get(f"{turl}/checkpoint").text}
        for n in notes:
            w = cosignature.verify_witnessed(n.encode(), log_signer.verifier(), witnesses, quorum=2)
            assert len(w.cosigners) == 2
        assert cosignature.verify_witnessed(
            httpx.get(f"{turl}/checkpoint").content, log_signer.verifier(), witnesses, 2
        ).checkpoint.size == 1000
    finally:
        for p in procs:
            stop(p)


def test_serve_errors_are_one_line(tmp_path):
    """Port in use (exit 1) and a data dir that is a file (exit 2): one line, no traceback."""
    import socket
    import subprocess
    import sys

    log = note.generate_signer("example.com/log")
    (tmp_path / "file").write_text("x")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        cases = [(tmp_path / "w", busy, 1, "address already in use"),
                 (tmp_path / "file", free_port(), 2, "is not a directory")]
        for data, port, status, says in cases:
            r = subprocess.run([sys.executable, "-m", "witness", "serve", "--data", str(data),
                                "--listen", f"127.0.0.1:{port}", "--log", log.vkey],
                               capture_output=True, text=True, timeout=60)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == status and len(lines) == 1 and says in lines[0], r.stderr
