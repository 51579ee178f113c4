"""Audit any C2SP tlog-tiles log: recompute the tree from its tiles and entries.

`audit` fetches the checkpoint, then every entry bundle and hash tile, and
checks: each entry's leaf hash equals the level-0 tile hash; each upper tile
hash equals the root of the 256 hashes below it; the root recomputed from the
entries equals the signed root; and the tree extends the state saved by the
previous run (consistency, checked from the saved compact range). Memory is
O(log n) for the tree plus two rows of tiles in flight (one checked while the next
is fetched), never the whole log.

Hashing is most of the work and holds the GIL, so a long audit on two CPUs hands
the later part of the full leaf tiles to a second process (`_SecondProcess`),
which answers their roots; the parent checks its own part first and then takes
the helper's roots, so the verdict, and the reason of the first bad tile, are
those of one process. Bundles are hashed in one pass of slices
(`bundle_leaf_hashes`), never split into a list of entries unless `on_entry`
wants them.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import signal
import ssl
import sys
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from tlog import checkpoint, merkle, note, tiles
from witness import cosignature

TIMEOUT = 30.0
"""Seconds a fetch may wait on its connection."""
MAX_BODY = tiles.WIDTH * (tiles.MAX_ENTRY + 2)
"""The largest resource a log can serve: a full bundle of the largest entries."""
ROW = 64
"""Leaf tiles fetched together; two rows are in memory at a time."""
SECOND_PROCESS_FROM = 1024
"""Full leaf tiles (262,144 entries) from which a second process pays for its start."""


class AuditError(Exception):
    """The log does not verify; the message is the one-line reason."""


@dataclass
class State:
    """What a run leaves for the next: the verified tree as a compact range."""

    origin: str
    size: int
    root: bytes
    stack: list[bytes] = field(default_factory=list)
    cosigners: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {"origin": self.origin, "size": self.size,
                "root": base64.b64encode(self.root).decode(),
                "stack": [base64.b64encode(h).decode() for h in self.stack]}

    @classmethod
    def from_json(cls, obj: dict) -> State:
        return cls(obj["origin"], int(obj["size"]), base64.b64decode(obj["root"]),
                   [base64.b64decode(h) for h in obj.get("stack", [])])


def load_state(path: Path | None) -> State | None:
    if path is None or not path.exists():
        return None
    try:
        return State.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"state file {path} is unreadable: {e}") from e


def save_state(path: Path, state: State) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state.to_json()))
    tmp.replace(path)


class Fetcher:
    """Reads log resources from an http(s) base URL or a local directory.

    Over HTTP, `concurrency` worker threads each keep one keep-alive connection
    (`http.client`: the standard library's strict response parser, one request at a
    time per connection, redirects not followed), so each tile and bundle costs one
    request on a warm socket. A failure closes that connection; the next request
    opens a new one. A body larger than a full entry bundle is refused.
    """

    def __init__(self, base: str, concurrency: int = 16) -> None:
        self.base = base.rstrip("/")
        self.local = None if base.startswith(("http://", "https://")) else \
            Path(base.removeprefix("file://"))
        self._url = urlsplit(self.base)
        self._concurrency = concurrency
        self._pool = None if self.local else ThreadPoolExecutor(
            concurrency, thread_name_prefix="audit-fetch")
        self._conns: list[http.client.HTTPConnection] = []
        self._local = threading.local()

    async def get(self, path: str) -> bytes:
        if self.local is not None:
            return await asyncio.to_thread(_read_file, self.local, path)
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._fetch, path)

    async def get_many(self, paths: list[str]) -> list[bytes]:
        """Every resource of `paths`, in order. A directory's files are read right here:
        a row is ~3 MiB from the page cache, and a reading thread would only wait for
        the GIL the hashing holds."""
        local = self.local
        if local is not None:
            return [_read_file(local, p) for p in paths]
        # one worker call per connection, each fetching its share in turn: a hop
        # between the loop and a thread per request cost as much as the request
        k = min(self._concurrency, len(paths))
        loop = asyncio.get_running_loop()
        shares = await asyncio.gather(*[
            loop.run_in_executor(self._pool, self._fetch_all, paths[i::k]) for i in range(k)])
        out: list[bytes] = [b""] * len(paths)
        for i, share in enumerate(shares):
            out[i::k] = share
        return out

    def _fetch_all(self, paths: list[str]) -> list[bytes]:
        """GET each of `paths` in turn on this thread's connection."""
        return [self._fetch(p) for p in paths]

    def _connection(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            u = self._url
            if u.scheme == "https":
                conn = http.client.HTTPSConnection(u.hostname or "", u.port, timeout=TIMEOUT,
                                                   context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(u.hostname or "", u.port, timeout=TIMEOUT)
            self._local.conn = conn
            self._conns.append(conn)
        return conn

    def _fetch(self, path: str) -> bytes:
        """GET base/path on this thread's connection (runs in a worker thread)."""
        conn = self._connection()
        try:
            conn.request("GET", f"{self._url.path}/{path}", headers={"Accept-Encoding": "identity"})
            r = conn.getresponse()
            if (r.length or 0) > MAX_BODY:
                raise AuditError(f"{path}: larger than an entry bundle can be")
            # a declared length is read whole (IncompleteRead if cut short); otherwise
            # (chunked, or until the close) at most one byte past the limit
            body = r.read() if r.length is not None else r.read(MAX_BODY + 1)
            if len(body) > MAX_BODY:
                raise AuditError(f"{path}: larger than an entry bundle can be")
            if r.will_close or not r.isclosed():
                conn.close()
        except (OSError, http.client.HTTPException, ValueError) as e:
            conn.close()
            raise AuditError(f"{path}: {type(e).__name__}") from e
        except AuditError:
            conn.close()
            raise
        if r.status != 200:
            raise AuditError(f"{path}: HTTP {r.status}")
        return body

    async def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            for conn in self._conns:
                conn.close()


def _read_file(root: Path, path: str) -> bytes:
    """The file root/path, refused past the largest resource."""
    try:
        with (root / path).open("rb") as f:
            # a buffer of the file's size plus one byte, not of the limit: a read of
            # MAX_BODY + 1 maps (and faults in) 16 MiB per file
            size = os.fstat(f.fileno()).st_size
            body = f.read(min(size, MAX_BODY) + 1)
            if len(body) > size:  # it grew meanwhile: the rest, up to the limit
                body += f.read(MAX_BODY + 1 - len(body))
    except OSError as e:
        raise AuditError(f"{path}: cannot read ({e.strerror})") from e
    if len(body) > MAX_BODY:
        raise AuditError(f"{path}: larger than an entry bundle can be")
    return body


def _builder_from(state: State) -> merkle.Builder:
    b = merkle.Builder()
    b._stack = list(state.stack)  # noqa: SLF001 - the compact range is the builder's state
    b.size = state.size
    if b.root() != state.root:
        raise AuditError("saved state is corrupt: its compact range does not give its root")
    return b


async def audit(
    fetcher: Fetcher,
    log_verifier: note.Verifier,
    *,
    witnesses: Iterable[cosignature.CosignatureVerifier] = (),
    quorum: int = 0,
    state: State | None = None,
    progress: Callable[[int, int], None] | None = None,
    on_entry: Callable[[int, bytes], None] | None = None,
    on_checkpoint: Callable[[checkpoint.Checkpoint], None] | None = None,
    second_process_from: int = SECOND_PROCESS_FROM,
) -> State:
    """Verify the log; returns the new state. Raises AuditError with the reason.

    `on_checkpoint` gets the verified checkpoint being audited before any `on_entry`
    (the entries are then proven against it only when the audit returns). With at
    least `second_process_from` full leaf tiles to check, no `on_entry` and two
    CPUs, a second process fetches and checks the later part of them (see
    `_SecondProcess`); the verdict and its reason are those of one process."""
    cp_note = await fetcher.get("checkpoint")
    try:
        w = cosignature.verify_witnessed(cp_note, log_verifier, list(witnesses), quorum)
    except (ValueError, cosignature.QuorumError) as e:
        raise AuditError(f"checkpoint: {e}") from e
    cp = w.checkpoint
    if on_checkpoint is not None:
        on_checkpoint(cp)
    if state is not None:
        if state.origin != cp.origin:
            raise AuditError(f"checkpoint origin {cp.origin!r} is not the saved {state.origin!r}")
        if cp.size < state.size:
            raise AuditError(f"log shrank: checkpoint size {cp.size} < saved size {state.size}")
        if cp.size == state.size and cp.root_hash != state.root:
            raise AuditError(f"split view: size {cp.size} has a root other than the saved one")
        if 0 < state.size < cp.size:
            await _check_extends(fetcher, state, cp.size)
    builder = _builder_from(state) if state is not None and state.size else merkle.Builder()
    # level 0 first: entries against leaf tiles, streamed a row of bundles at a time
    roots: dict[int, bytes] = {}  # roots of full level-0 tiles checked in this run
    first_tile = builder.size // tiles.WIDTH
    last_tile = (cp.size + tiles.WIDTH - 1) // tiles.WIDTH
    full_end = cp.size // tiles.WIDTH  # the tiles from the first whole one up to here are full

    def check(n: int, width: int, bundle: bytes, tile: bytes) -> None:
        root = _check_leaf_tile(n, width, bundle, tile, builder, on_entry)
        if root is not None:
            roots[n] = root

    whole = first_tile + (1 if builder.size % tiles.WIDTH else 0)
    helper = None
    if on_entry is None and full_end - whole >= second_process_from and _cpus() >= 2:
        mid = whole + (full_end - whole) * 11 // 20  # the helper starts ~0.2 s later
        helper = await _SecondProcess.start(fetcher.base, mid, full_end)
    if helper is None:
        await _leaf_rows(fetcher, cp.size, first_tile, last_tile, check, progress)
    else:
        try:
            await _leaf_rows(fetcher, cp.size, first_tile, mid, check, progress)
            theirs = await helper.roots()
        finally:
            await helper.stop()
        if theirs is None:  # the helper could not finish (killed, out of memory): do it here
            await _leaf_rows(fetcher, cp.size, mid, full_end, check, progress)
        else:
            for n, root in zip(range(mid, full_end), theirs, strict=True):
                builder.append_subtree(root, tiles.HEIGHT)
                roots[n] = root
            if progress is not None:
                progress(full_end * tiles.WIDTH, cp.size)
        await _leaf_rows(fetcher, cp.size, full_end, last_tile, check, progress)
    if builder.size != cp.size:
        raise AuditError(f"entries stop at {builder.size}, checkpoint says {cp.size}")
    if builder.root() != cp.root_hash:
        raise AuditError("root mismatch: the entries do not hash to the signed root")
    await _check_upper_tiles(fetcher, cp.size, roots)
    return State(cp.origin, cp.size, cp.root_hash, list(builder._stack),  # noqa: SLF001
                 w.cosigners)


async def _leaf_rows(fetcher: Fetcher, size: int, lo: int, hi: int,
                     each: Callable[[int, int, bytes, bytes], None],
                     progress: Callable[[int, int], None] | None) -> None:
    """Fetch leaf tiles [lo, hi) of a tree of `size` leaves with their entry bundles, a
    row at a time (the next row while one is checked); each(n, width, bundle, tile)
    in tile order. Memory: two rows."""
    rows = [[(n, min(tiles.WIDTH, size - n * tiles.WIDTH)) for n in range(base, min(base + ROW, hi))]
            for base in range(lo, hi, ROW)]

    def fetch(paths: list[tuple[int, int]]) -> asyncio.Future[list[bytes]]:
        """The row's bundles and leaf tiles, interleaved: bundle, tile, bundle, ..."""
        return asyncio.ensure_future(fetcher.get_many(
            [p for n, w in paths for p in (tiles.entries_path(n, w), tiles.path(0, n, w))]))

    ahead = fetch(rows[0]) if rows else None
    try:
        for k, paths in enumerate(rows):
            if ahead is None:  # fetch(rows[k]) was started for every row
                break
            datas = await ahead
            ahead = fetch(rows[k + 1]) if k + 1 < len(rows) else None
            for i, (n, width) in enumerate(paths):
                each(n, width, datas[2 * i], datas[2 * i + 1])
            if progress is not None:
                progress(min(size, (paths[-1][0] + 1) * tiles.WIDTH), size)
    finally:
        if ahead is not None:
            ahead.cancel()
            with contextlib.suppress(asyncio.CancelledError, AuditError):
                await ahead


def _cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class _SecondProcess:
    """A second Python process that fetches and checks full leaf tiles [first, stop) of
    the log at `base` (its own connections or file reads) and answers their roots.

    Hashing holds the GIL, so a second process is the only way to use a second CPU.
    It is a plain `python -c` of `_second_process_main` (not multiprocessing, which
    would re-run the caller's main script in it) and answers on stdout: b"roots\n"
    and the roots concatenated, or b"error\n" and the AuditError's reason. Any other
    answer (it died, or hit anything but an AuditError) makes `roots()` None and the
    caller checks those tiles itself, so the verdict never depends on the helper
    running. The parent checks the tiles below `first` before it asks, so the first
    bad tile is the one reported, as in one process.
    """

    def __init__(self, proc: asyncio.subprocess.Process, count: int) -> None:
        self._proc, self._count = proc, count

    @classmethod
    async def start(cls, base: str, first: int, stop: int) -> _SecondProcess | None:
        """The running helper, or None when no process can be started."""
        if not sys.executable:
            return None
        code = ("import sys; sys.path.insert(0, sys.argv[1]); "
                "from verifier.audit import _second_process_main as m; m(*sys.argv[2:])")
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, str(Path(__file__).resolve().parents[1]), base,
                str(first), str(stop), stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
        except OSError:
            return None
        return cls(proc, stop - first)

    async def roots(self) -> list[bytes] | None:
        """The roots of its tiles in order; AuditError with its reason; None otherwise."""
        out, _ = await self._proc.communicate()
        kind, _, value = out.partition(b"\n")
        if self._proc.returncode != 0:
            return None
        if kind == b"error":
            raise AuditError(value.decode(errors="replace"))
        if kind != b"roots" or len(value) != self._count * merkle.HASH_SIZE:
            return None
        return [value[i : i + merkle.HASH_SIZE] for i in range(0, len(value), merkle.HASH_SIZE)]

    async def stop(self) -> None:
        """End the helper (at once if it is still working) and reap it."""
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.kill()
            await self._proc.wait()


def _second_process_main(base: str, first: str, stop: str) -> None:
    """The helper's body: roots of full leaf tiles [first, stop) of `base` on stdout, or
    the AuditError's reason. Any other failure exits 1 with nothing on stdout (the
    parent then checks these tiles and meets it itself); Ctrl-C is the parent's to
    handle, which ends the helper."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out: list[bytes] = []

    def check(n: int, width: int, bundle: bytes, tile: bytes) -> None:
        _check_leaf_hashes(n, width, bundle, tile, want_entries=False)
        out.append(tiles.run_root(tile))

    async def run() -> None:
        fetcher = Fetcher(base)
        try:
            await _leaf_rows(fetcher, int(stop) * tiles.WIDTH, int(first), int(stop), check, None)
        finally:
            await fetcher.close()

    try:
        asyncio.run(run())
    except AuditError as e:
        answer = b"error\n" + str(e).encode()
    except Exception:  # nothing on stdout is the signal: the parent checks these tiles
        sys.exit(1)
    else:
        answer = b"roots\n" + b"".join(out)
    sys.stdout.buffer.write(answer)
    sys.stdout.buffer.flush()


async def _check_extends(fetcher: Fetcher, state: State, size: int) -> None:
    """The new tree's first `state.size` leaves must hash to the saved root.

    Reads the few tile hashes that make up the old tree from the new tiles
    (the full audit then checks those tiles against the entries).
    """
    wanted: dict[tuple[int, int], int] = {}

    def collect(level: int, index: int) -> bytes:
        tl, ti, _, _ = tiles.locate(level, index)
        wanted[(tl, ti)] = min(tiles.WIDTH, (size >> (tiles.HEIGHT * tl)) - ti * tiles.WIDTH)
        return bytes(32)

    merkle.tree_root(state.size, collect)
    got = dict(zip(wanted, await asyncio.gather(*[
        fetcher.get(tiles.path(tl, ti, w)) for (tl, ti), w in wanted.items()]), strict=True))

    def node(level: int, index: int) -> bytes:
        tl, ti, _, _ = tiles.locate(level, index)
        try:
            return tiles.node_from_tile(got[(tl, ti)], level, index)
        except tiles.TileError as e:
            raise AuditError(f"{tiles.path(tl, ti, wanted[(tl, ti)])}: {e}") from e

    if merkle.tree_root(state.size, node) != state.root:
        raise AuditError(f"split view: the log's tree at size {state.size} is not the one "
                         f"saved earlier (inconsistent history)")


def bundle_leaf_hashes(bundle: bytes, width: int) -> bytes | None:
    """The leaf hashes SHA-256(0x00 || entry) of a bundle of exactly `width` entries,
    concatenated; None for any other bundle (malformed, truncated, more or fewer).

    Equal to hashing `tiles.decode_bundle(bundle)` when that holds `width` entries
    (the property test checks it), without a list of entries: one pass of slices.
    """
    sha = hashlib.sha256
    out: list[bytes] = []
    put = out.append
    i = 0
    try:
        for _ in range(width):  # a slice past the end is caught by the next read or the end check
            j = i + 2 + (bundle[i] << 8 | bundle[i + 1])
            put(sha(b"\x00" + bundle[i + 2 : j]).digest())
            i = j
    except IndexError:
        return None
    return b"".join(out) if i == len(bundle) else None


def _check_leaf_hashes(n: int, width: int, bundle: bytes, tile: bytes, *,
                       want_entries: bool) -> list[bytes]:
    """AuditError unless entry bundle n holds `width` entries whose leaf hashes are
    level-0 tile n; returns the entries if wanted (else [])."""
    bpath, tpath = tiles.entries_path(n, width), tiles.path(0, n, width)
    hashes = None if want_entries else bundle_leaf_hashes(bundle, width)
    entries: list[bytes] = []
    if hashes is None:  # the entries are wanted, or the bundle is bad: say how
        try:
            entries = tiles.decode_bundle(bundle)
        except tiles.TileError as e:
            raise AuditError(f"{bpath}: {e}") from e
        if len(entries) != width:
            raise AuditError(f"{bpath}: {len(entries)} entries, expected {width}")
        sha = hashlib.sha256
        hashes = b"".join([sha(b"\x00" + e).digest() for e in entries])
    if len(tile) != width * merkle.HASH_SIZE:
        raise AuditError(f"{tpath}: {len(tile)} bytes, expected {width * 32}")
    if hashes != tile:
        bad = next(i for i in range(width) if hashes[i * 32 : i * 32 + 32] != tile[i * 32 : i * 32 + 32])
        raise AuditError(f"{bpath}: entry {n * tiles.WIDTH + bad} does not match its hash in {tpath}")
    return entries


def _check_leaf_tile(n: int, width: int, bundle: bytes, tile: bytes, builder: merkle.Builder,
                     on_entry: Callable[[int, bytes], None] | None) -> bytes | None:
    """Check one entry bundle against its level-0 tile and feed the builder.

    Returns the tile's root when the tile is full (for the level above).
    """
    entries = _check_leaf_hashes(n, width, bundle, tile, want_entries=on_entry is not None)
    first = n * tiles.WIDTH
    if on_entry is not None:
        for i, e in enumerate(entries):
            if first + i >= builder.size:
                on_entry(first + i, e)
    if width == tiles.WIDTH and builder.size == first:
        root = tiles.run_root(tile)
        builder.append_subtree(root, tiles.HEIGHT)
        return root
    for i in range(max(0, builder.size - first), width):  # entries before: an earlier run's
        builder.append(tile[i * 32 : i * 32 + 32])
    return tiles.run_root(tile) if width == tiles.WIDTH else None


async def _check_upper_tiles(fetcher: Fetcher, size: int, roots: dict[int, bytes]) -> None:
    """Each hash tile above level 0 must hold the roots of the full tiles below it.

    `roots` maps tile index -> root for the full tiles of the level below that
    this run checked; positions verified by an earlier run are skipped.
    """
    level, count = 1, size >> tiles.HEIGHT
    while count > 0 and roots:
        above: dict[int, bytes] = {}
        for n in sorted({i // tiles.WIDTH for i in roots}):
            width = min(tiles.WIDTH, count - n * tiles.WIDTH)
            p = tiles.path(level, n, width)
            data = await fetcher.get(p)
            if len(data) != width * merkle.HASH_SIZE:
                raise AuditError(f"{p}: {len(data)} bytes, expected {width * 32}")
            for i in range(width):
                want = roots.get(n * tiles.WIDTH + i)
                if want is not None and want != data[i * 32 : i * 32 + 32]:
                    raise AuditError(f"{p}: hash {i} is not the root of "
                                     f"{tiles.path(level - 1, n * tiles.WIDTH + i)}")
            if width == tiles.WIDTH:
                above[n] = tiles.run_root(data)
        level, count, roots = level + 1, count >> tiles.HEIGHT, above


def progress_bar(done: int, total: int) -> None:
    """A one-line progress bar on stderr."""
    width = 40
    filled = width * done // max(total, 1)
    sys.stderr.write(f"\raudit [{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done >= total:
        sys.stderr.write("\n")
    sys.stderr.flush()
