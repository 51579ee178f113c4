"""The checkpoint threads fold a WAL back only once enough waits in it (tlog/walpace.py): a
writer committing now and then does not restart its WAL, and fsync its new header, at
every commit. A restart shows in the WAL file's header: its checkpoint sequence number."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from gateway.receipts import outbox
from tests.test_tlog_crash import _run
from tlog import keys, sqlite_store, walpace
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore


def restarts_so_far(wal: Path) -> int:
    """The WAL header's checkpoint sequence number: one more at each restart."""
    return int.from_bytes(wal.read_bytes()[12:16], "big")


def test_pace_counts_the_bytes_waiting_in_the_wal(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA wal_autocheckpoint=0")
    db.execute("CREATE TABLE t (x BLOB)")
    pace = walpace.Pace(tmp_path / "t.db", limit=16 * 4096)  # due at 4 pages waiting
    before = pace.waiting()
    assert before % 4096 == 0 and before > 0  # the CREATE TABLE's pages
    db.execute("INSERT INTO t VALUES (?)", (b"x" * 3000,))
    assert before < pace.waiting() < 4 * 4096
    assert not pace.due()
    for _ in range(4):
        db.execute("INSERT INTO t VALUES (?)", (b"x" * 3000,))
    assert pace.due()
    other = sqlite3.connect(tmp_path / "t.db", isolation_level=None)
    other.execute("PRAGMA wal_checkpoint(PASSIVE)")  # copied back: nothing waits
    assert pace.waiting() == 0 and not pace.due()
    other.close()
    db.close()


def test_pace_reads_no_wal_index_as_nothing_waiting(tmp_path: Path) -> None:
    assert walpace.Pace(tmp_path / "absent.db").waiting() == 0
    (tmp_path / "short.db-shm").write_bytes(b"\xff" * 40)  # torn or foreign: not trusted
    assert walpace.Pace(tmp_path / "short.db").waiting() == 0


@pytest.mark.parametrize("threshold", [1, 1 << 30])
def test_an_outbox_written_now_and_then_restarts_its_wal_only_at_its_pace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int) -> None:
    monkeypatch.setattr(outbox, "CHECKPOINT_EVERY", 0.005)
    monkeypatch.setattr(walpace, "BYTES", threshold)

    async def go() -> tuple[int, int]:
        ob = outbox.Outbox(tmp_path)
        wal = tmp_path / f"{outbox.OUTBOX_FILE}-wal"
        await ob.put("r" * 32, "0" * 64, b"entry")
        first = restarts_so_far(wal)
        for n in range(12):
            await asyncio.sleep(0.03)  # several ticks of the checkpoint thread
            await ob.put(f"{n:032x}", f"{n + 1:064x}", b"entry")
        last = restarts_so_far(wal)
        ob.close()
        return first, last

    first, last = asyncio.run(go())
    if threshold == 1:
        assert last >= first + 6  # folded back at nearly every tick, so restarted
    else:
        assert last == first


@pytest.mark.parametrize("threshold", [1, 1 << 30])
def test_a_log_appended_to_now_and_then_restarts_its_wal_only_at_its_pace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threshold: int) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.005)
    monkeypatch.setattr(walpace, "BYTES", threshold)
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, keys.load_signer(tmp_path))
    wal = tmp_path / "log.db-wal"
    _run(log, [b"first"])
    first = restarts_so_far(wal)
    for n in range(12):
        time.sleep(0.03)
        _run(log, [b"entry %d" % n])
    last = restarts_so_far(wal)
    store.close()
    if threshold == 1:
        assert last >= first + 6
    else:
        assert last == first
