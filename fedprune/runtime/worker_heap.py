"""Handing the TFF worker's free heap pages back to the OS after a round (glibc).

The worker (`worker_binary`, C++, glibc's malloc) frees most of what a round
allocates when the round ends, but glibc returns free memory to the OS only
from the top of each heap: the free space left between live blocks stays
resident. At 1,000 Synthetic clients and 100 per round that was about two
thirds of the worker's anonymous RSS (216 MiB, of which `malloc_trim(0)` handed
back 142 at round 200), and how it was laid out moved the RSS by tens of MiB
from round to round and, in some runs, stepped its floor up after rounds with
much data (issue 18; BUILD_NOTES.md, "Worker memory").

No Python runs in the worker, so fedprune preloads a small library into it
(`worker_heap.c`, compiled here with the system's C compiler on first use and
cached): a thread that calls glibc's `malloc_trim(0)` each time the worker gets
SIGUSR2. `release_worker_heaps` sends it, after a round (at most once a second,
`memory.ROUND_TRIM_INTERVAL_S`), to the local workers that have that thread;
the Python process does the same for itself with `memory.release_free_heap`.

`worker_preload_environment` is what `workers.worker_environment` adds for it:
`LD_PRELOAD`. There is no library (and the workers run as before) when
`FEDPRUNE_WORKER_MALLOC=glibc`, `FEDPRUNE_MALLOC_TRIM=0`, off Linux, or without
a C compiler (`cc`); the last is logged once.

Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedprune.runtime import memory

_log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("worker_heap.c")
# The trim thread's name is THREAD_PREFIX + the number of trims so far.
THREAD_PREFIX = "fptrim "
TRIM_SIGNAL = signal.SIGUSR2
CACHE_ENV = "FEDPRUNE_CACHE_DIR"


def _cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get(CACHE_ENV):
        dirs.append(Path(os.environ[CACHE_ENV]))
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    dirs.append(Path(xdg) / "fedprune")
    dirs.append(Path(tempfile.gettempdir()) / f"fedprune-{os.getuid()}")
    return dirs


def _private(path: Path) -> bool:
    """True if `path` is ours and no one else can write it (it will be loaded into the worker)."""
    st = path.stat()
    return st.st_uid == os.getuid() and not st.st_mode & 0o022


@functools.cache
def trim_library() -> str | None:
    """The path of the compiled `worker_heap.c`, or None (not Linux, or no compiler).

    Compiled once per source text into the first writable cache directory
    (`$FEDPRUNE_CACHE_DIR`, `$XDG_CACHE_HOME/fedprune` or `~/.cache/fedprune`,
    then the temporary directory), named by the source's hash, so an edited
    source is rebuilt and concurrent builders do not clash (each renames its
    own output into place). A directory or library that another user owns or
    can write is skipped: its code would run in the worker.
    """
    if not sys.platform.startswith("linux"):
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    source = SOURCE.read_bytes()
    name = f"worker_heap-{hashlib.sha256(source).hexdigest()[:16]}.so"
    for directory in _cache_dirs():
        target = directory / name
        try:
            if target.is_file():
                if _private(directory) and _private(target):
                    return str(target)
                continue
            if compiler is None:
                continue
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if not _private(directory):
                continue
            partial = directory / f".{name}.{os.getpid()}"
            build = subprocess.run(
                [compiler, "-O2", "-shared", "-fPIC", "-o", str(partial), str(SOURCE),
                 "-lpthread"],
                capture_output=True, text=True, timeout=120)
            if build.returncode != 0:
                _log.warning("could not compile %s (%s): %s; TFF workers keep their free heap "
                             "pages", SOURCE, compiler, build.stderr.strip()[-300:])
                return None
            os.chmod(partial, 0o755)  # whatever the umask: `_private` checks it
            os.replace(partial, target)
            return str(target)
        except (OSError, subprocess.TimeoutExpired):
            continue
    if compiler is None:
        _log.warning("no C compiler (cc) to build %s; TFF workers keep their free heap pages "
                     "between rounds (BUILD_NOTES.md, \"Worker memory\")", SOURCE.name)
    return None


def worker_preload_environment(env: Mapping[str, str]) -> dict[str, str]:
    """`LD_PRELOAD` for a worker started with `env`: `trim_library()` first, then env's own.

    Empty when `env` sets `FEDPRUNE_MALLOC_TRIM=0` or there is no library (see
    `trim_library`).
    """
    if env.get(memory.TRIM_ENV, "1") == "0":
        return {}
    library = trim_library()
    if library is None:
        return {}
    preload = [p for p in env.get("LD_PRELOAD", "").split() if p and p != library]
    return {"LD_PRELOAD": " ".join([library, *preload])}


_trim_threads: dict[int, str] = {}  # pid -> the tid of its trim thread, once found


def _read_trims(pid: int, tid: str) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{tid}/comm") as f:
            comm = f.read().strip()
    except OSError:
        return None
    if not comm.startswith(THREAD_PREFIX):
        return None
    try:
        return int(comm[len(THREAD_PREFIX):])
    except ValueError:
        return None


def trim_count(pid: int) -> int | None:
    """How many trims `pid`'s trim thread has done; None if it has no such thread."""
    if pid in _trim_threads:
        trims = _read_trims(pid, _trim_threads[pid])
        if trims is not None:
            return trims
        del _trim_threads[pid]  # gone, or the pid was reused
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    for tid in tasks:
        trims = _read_trims(pid, tid)
        if trims is not None:
            _trim_threads[pid] = tid
            return trims
    return None


_asked = memory.Pacer()  # when each worker pid was last asked to trim


def release_worker_heaps(pids: Iterable[int], *, wait_s: float = 0.0,
                         min_interval_s: float = 0.0) -> int:
    """Asks each worker in `pids` that has the trim thread to hand back its free heap pages.

    Workers without the thread (glibc's defaults, another C library, not
    started by fedprune) are left alone: SIGUSR2 would end them. The trim runs
    in the worker, beside whatever it is doing; with `wait_s` > 0 this waits
    up to that many seconds for every trim asked for to finish. With
    `min_interval_s` > 0, a worker asked less than that many seconds ago is
    skipped (`memory.ROUND_TRIM_INTERVAL_S` for `loop.py`'s call after each
    round: the pages handed back are faulted in again by the next round).

    Returns:
      The number of workers asked. A wait that runs out is logged, not raised.
    """
    asked = {}
    for pid in pids:
        before = trim_count(pid)
        if before is None or not _asked.go(pid, min_interval_s):
            continue
        try:
            os.kill(pid, TRIM_SIGNAL)
        except OSError:
            continue
        asked[pid] = before
    pending, deadline = dict(asked), time.monotonic() + wait_s
    while pending and wait_s > 0:
        # A count that moved, or a worker that is gone, is done.
        pending = {pid: n for pid, n in pending.items() if trim_count(pid) == n}
        if pending and time.monotonic() >= deadline:
            _log.warning("workers %s did not finish trimming their heaps in %.1f s",
                         sorted(pending), wait_s)
            break
        if pending:
            time.sleep(0.001)
    return len(asked)
