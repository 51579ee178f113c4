"""Every request the log's HTTP layer can be sent gets an answer below 500 (issue 13, item 6).

The app runs in-process (httpx's ASGI transport) over a SQLite log of 300
entries, so hypothesis can try many paths and queries quickly.
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_tlog_crash import _run
from tlog import keys
from tlog.sequencer import Log
from tlog.server import TlogApp
from tlog.sqlite_store import SQLiteStore

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)
NUM = st.one_of(st.integers(-10, 10**30).map(str), st.from_regex(r"-?0*[0-9]{0,25}",
                                                                  fullmatch=True), TEXT)
PATHS = st.one_of(
    TEXT.map(lambda t: "/" + t),
    st.from_regex(r"/tile/(entries|[0-9]{1,3}|-[0-9])/(x?-?[0-9]{1,4}/){0,9}-?[0-9]{0,6}"
                  r"(\.p/-?[0-9]{0,4})?/?", fullmatch=True),
    st.builds(lambda a, b: f"/consistency?old={quote(a)}&new={quote(b)}", NUM, NUM),
    st.builds(lambda t: "/proof/" + t, TEXT),
)


@pytest.fixture(scope="module")
def client_get(tmp_path_factory):
    data = tmp_path_factory.mktemp("fuzz")
    signer = keys.load_signer(data)
    store = SQLiteStore(data / "log.db")
    _run(Log(store, signer), [b'{"request_hash": "%064x"}' % i for i in range(300)])
    app = TlogApp(Log(store, signer), "token")

    async def request(method: str, path: str) -> int:
        # an absolute URL: a path starting "//" joined to a base URL would be read as a
        # host (and port), never reaching the app as a path
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as c:
            url = "http://log" + quote(path, safe="/?=&%.:")
            return (await c.request(method, url)).status_code

    yield lambda method, path: asyncio.run(request(method, path))
    store.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(PATHS, st.sampled_from(["GET", "HEAD"]))
def test_no_read_is_a_server_error(client_get, path, method):
    assert client_get(method, path) < 500


def test_paths_starting_with_two_slashes_reach_the_app(client_get):
    """Such paths once made the client fail (`Invalid port`) or sent "/" instead."""
    assert client_get("GET", "//a:b/c") == 404
    assert client_get("GET", "//tile/0/000") == 404


def test_reads_inside_the_tree_answer(client_get):
    assert client_get("GET", "/tile/0/000") == 200
    assert client_get("GET", "/tile/0/001.p/44") == 200
    assert client_get("GET", "/tile/entries/001.p/44") == 200
    assert client_get("GET", "/consistency?old=1&new=300") == 200
    assert client_get("GET", "/proof/" + f"{7:064x}") == 200
