"""SQLite's WAL is checkpointed by the store's own thread, not by the appending one: the
WAL is reused from its start while appends go on (it grows without end with no
checkpoint at all), the thread ends with the store (closed, or collected unclosed), and
a failed open starts none."""

from __future__ import annotations

import gc
import threading
import time

import pytest

from tests.test_tlog_crash import _run
from tlog import keys, sqlite_store, storage, walpace
from tlog.sequencer import Log
from tlog.sqlite_store import SQLiteStore


def checkpoint_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "tlog-checkpoint"}


def largest_wal(tmp_path, monkeypatch, every: float) -> int:
    """The largest size the WAL file reached over 40 appends, with checkpoints by the thread
    every `every` seconds (after any commit) and none by the appending thread."""
    monkeypatch.setattr(sqlite_store, "WAL_PAGES", 10**9)
    monkeypatch.setattr(walpace, "WEIGHT", 1)
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", every)
    tmp_path.mkdir()
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, keys.load_signer(tmp_path))
    largest = 0
    for n in range(40):
        _run(log, [b"entry %d %d" % (n, i) + b"x" * 2000 for i in range(8)])
        time.sleep(0.03)
        largest = max(largest, (tmp_path / "log.db-wal").stat().st_size)
    store.close()
    return largest


def test_the_thread_keeps_the_wal_from_growing(tmp_path, monkeypatch):
    never = largest_wal(tmp_path / "a", monkeypatch, every=3600)
    often = largest_wal(tmp_path / "b", monkeypatch, every=0.005)
    assert often * 4 < never


def test_the_thread_ends_with_the_store(tmp_path):
    before = checkpoint_threads()
    store = SQLiteStore(tmp_path / "log.db")
    mine = checkpoint_threads() - before
    assert len(mine) == 1
    store.close()
    assert not any(t.is_alive() for t in mine)


def test_a_failed_open_starts_no_thread(tmp_path, monkeypatch):
    def fail(self) -> None:
        raise storage.StorageError("catch-up failed")

    monkeypatch.setattr(SQLiteStore, "_catch_up", fail)
    before = checkpoint_threads()
    with pytest.raises(storage.StorageError):
        SQLiteStore(tmp_path / "log.db")
    assert checkpoint_threads() == before


def test_a_store_never_closed_ends_its_thread_when_collected(tmp_path):
    before = checkpoint_threads()
    store = SQLiteStore(tmp_path / "log.db")
    mine = checkpoint_threads() - before
    del store
    gc.collect()
    for t in mine:
        t.join(timeout=10)
    assert not any(t.is_alive() for t in mine)
