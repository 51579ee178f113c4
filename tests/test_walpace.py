"""The checkpoint threads fold a WAL back only once enough was committed (tlog/walpace.py):
a writer committing now and then does not restart its WAL, and fsync its new header, at
every commit. A restart shows in the WAL file's header: its checkpoint sequence number."""

from __future__ import annotations

import asyncio
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


def test_pace_is_due_once_the_commits_weigh_enough() -> None:
    pace = walpace.Pace()
    pace.weight = 3
    assert not pace.due()
    pace.committed()
    pace.committed()
    assert not pace.due()
    pace.committed()
    assert pace.due()
    assert not pace.due()  # counted as run: the next needs a weight of three more
    pace.committed(0)  # a commit weighs at least one
    pace.committed(5)
    assert pace.due()


def test_a_batch_of_many_bytes_makes_the_log_checkpoint_due_sooner(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "log.db")
    log = Log(store, keys.load_signer(tmp_path))
    pace = store._pace  # noqa: SLF001 - the store's own pace
    pace.weight = 10
    _run(log, [b"one"])
    assert not pace.due()
    big = [b"%02d" % n + b"x" * 59_998 for n in range(10)]  # one batch of 600 kB
    assert 1 + sum(map(len, big)) // sqlite_store.BYTES_PER_WEIGHT >= pace.weight
    _run(log, big)
    assert pace.due()
    store.close()


@pytest.mark.parametrize("weight", [1, 1000])
def test_an_outbox_written_now_and_then_restarts_its_wal_only_at_its_pace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight: int) -> None:
    monkeypatch.setattr(outbox, "CHECKPOINT_EVERY", 0.005)
    monkeypatch.setattr(walpace, "WEIGHT", weight)

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
    if weight == 1:
        assert last >= first + 6  # folded back at nearly every tick, so restarted
    else:
        assert last == first


@pytest.mark.parametrize("weight", [1, 1000])
def test_a_log_appended_to_now_and_then_restarts_its_wal_only_at_its_pace(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, weight: int) -> None:
    monkeypatch.setattr(sqlite_store, "CHECKPOINT_EVERY", 0.005)
    monkeypatch.setattr(walpace, "WEIGHT", weight)
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
    if weight == 1:
        assert last >= first + 6
    else:
        assert last == first
