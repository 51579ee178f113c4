"""Shared test helpers: the public conformance data in ../shared/testdata."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


@pytest.fixture
def testdata() -> Path:
    """The shared conformance data; the test skips when it is absent."""
    if not TESTDATA.is_dir():
        pytest.skip(f"shared conformance data not found at {TESTDATA}")
    return TESTDATA


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A fresh directory under /tmp, short enough for unix socket paths."""
    d = Path(tempfile.mkdtemp(prefix="pagatt-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)
