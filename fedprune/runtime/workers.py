"""Worker supervision: the lifetime of TFF's C++ worker process.

Why this module exists. TFF 0.87's default context lazily starts the child
process `tensorflow_federated/data/worker_binary --port=P`, gives it the
parent's stdout and stderr, and stops it only from `ServiceManager.__del__`,
which does not run at interpreter exit. The worker then outlives Python and
holds the parent's pipes open, so `python train.py | tail` or a CI step hangs.
Here we start the worker ourselves (output to a log file or /dev/null, never the
parent's pipes) and guarantee that no `worker_binary` descendant of this
process survives it, on every exit path:

  * normal exit and uncaught exceptions: an `atexit` hook
    (`interrupts.install_worker_cleanup`);
  * SIGINT / SIGTERM: the handlers record the signal and raise
    (`KeyboardInterrupt` / `Terminated`); the exit path (`stop_workers`, or a
    driver's own) stops the workers. The worker runs in its own process group,
    so a terminal's Ctrl-C does not reach it: stopping it is ours to do, once,
    and after `begin_shutdown()` no worker is restarted (see
    `fedprune.runtime.interrupts`);
  * SIGKILL, `os._exit`, OOM kill: on Linux the worker is started through
    `setpriv --pdeathsig TERM` (util-linux), so the kernel sends it SIGTERM
    when the thread that started it dies.

Memory: every worker we start gets `MALLOC_ARENA_MAX` = the usable cores (at
least 2) and `MALLOC_MMAP_THRESHOLD_` = 1 MiB, each unless the environment sets
it, and the heap-trim library of `worker_heap` preloaded (`worker_environment`;
`FEDPRUNE_WORKER_MALLOC=glibc` opts out of all three), which keep glibc's
per-thread arenas, large transient blocks and the free pages between live
blocks from inflating its RSS; see BUILD_NOTES.md.

Security: the worker speaks unauthenticated, unencrypted gRPC and `worker_binary`
has no bind-address flag: it always listens on all interfaces (`[::]:PORT`),
even when we only talk to it over loopback. Run it on a trusted host or private
network only (or firewall the port).

Importing this module is cheap (standard library only); psutil is imported by
the functions that need it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from fedprune.errors import InvalidArgument
from fedprune.runtime import worker_heap

_log = logging.getLogger(__name__)

WORKER_BINARY_NAME = "worker_binary"

# Seconds a worker gets after SIGTERM before SIGKILL. The worker exits on
# SIGTERM in milliseconds; the grace only matters if it is wedged.
STOP_GRACE_S = 3.0


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# glibc malloc settings for every `worker_binary` fedprune starts (BUILD_NOTES.md,
# "Worker memory"). glibc reads them once, at the worker's start-up; a value
# already in the environment wins over these.
# * MALLOC_ARENA_MAX: glibc's default gives each thread that allocates
#   concurrently its own arena, up to 8 per core, and the worker runs ~40
#   threads: its RSS then climbs for a long while (+18 to +70 % from round 10 to
#   100 at 1,000 clients) although it does not leak. One arena per usable core
#   (at least 2; 2 on the 2-core machine it was measured on) cut the worker's
#   peak by about a quarter and its growth at 10 clients per round from +60 to
#   +26 %.
# * MALLOC_MMAP_THRESHOLD_: blocks of 1 MiB or more (a large client's data and
#   the buffers that carry it) get their own mapping, unmapped when freed.
#   glibc's default threshold slides up to the largest block freed so far, so
#   after the first large client such blocks came from the arenas, and a round
#   with more data than usual left them larger: at 1,000 clients, 100 per
#   round, the worker's anonymous RSS stepped up ~30 MiB after such rounds and
#   kept most of it (235 -> 270 MiB at round 200 of one run). With the fixed
#   threshold it falls back to the same level after each of them (198-210 MiB
#   from round 40 to 300 of one run), and rounds are no slower.
WORKER_MALLOC_DEFAULTS = {"MALLOC_ARENA_MAX": str(max(2, _usable_cores())),
                          "MALLOC_MMAP_THRESHOLD_": str(2**20)}
# `FEDPRUNE_WORKER_MALLOC=glibc` starts workers with glibc's own defaults instead.
WORKER_MALLOC_ENV = "FEDPRUNE_WORKER_MALLOC"


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a `worker_binary` is started with.

    `environ` (default: this process's environment) plus `WORKER_MALLOC_DEFAULTS`
    for every variable it does not set and, in front of its `LD_PRELOAD`, the
    library that lets `worker_heap.release_worker_heaps` trim the worker's heap
    (`worker_heap.worker_preload_environment`), unless
    `FEDPRUNE_WORKER_MALLOC=glibc`.

    Raises:
      ValueError: `FEDPRUNE_WORKER_MALLOC` is neither unset, empty, `fedprune`
        nor `glibc`.
    """
    env = dict(os.environ if environ is None else environ)
    mode = env.get(WORKER_MALLOC_ENV, "") or "fedprune"
    if mode not in ("fedprune", "glibc"):
        raise ValueError(
            f"{WORKER_MALLOC_ENV}={mode!r}: expected fedprune (the default, or unset) or glibc"
        )
    if mode == "fedprune":
        for name, value in WORKER_MALLOC_DEFAULTS.items():
            env.setdefault(name, value)
        env.update(worker_heap.worker_preload_environment(env))
    return env


class WorkerStartError(RuntimeError):
    """A `worker_binary` we started exited or never listened on its port."""


# ----------------------------------------------------------------------------
# Starting workers.


def find_worker_binary() -> Path:
    """Returns the path of TFF's `worker_binary`, without importing TFF.

    Raises:
      RuntimeError: TFF is not installed or its package has no executable
        `data/worker_binary`.
    """
    spec = importlib.util.find_spec("tensorflow_federated")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("tensorflow_federated is not installed in this environment")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    path = package_dir / "data" / WORKER_BINARY_NAME
    if not path.is_file() or not os.access(path, os.X_OK):
        raise RuntimeError(f"TFF worker binary not found or not executable at {path}")
    return path


def pick_unused_port() -> int:
    """Returns a TCP port that is free on all interfaces right now.

    The worker listens on `[::]:PORT`, so we probe the same wildcard (dual-stack
    where IPv6 exists). gRPC sets SO_REUSEPORT, so a second worker on a taken
    port does *not* fail to start; probing without SO_REUSEPORT is what makes a
    port held by anyone else look taken. A small race remains between this probe
    and the worker's bind.
    """
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((address, 0))
                return sock.getsockname()[1]
        except OSError:
            continue
    raise OSError("could not bind any TCP port to probe for a free one")


def port_in_use(port: int) -> bool:
    """True if some socket already listens on TCP `port` on any interface.

    Probes with SO_REUSEADDR (so a recently closed worker's TIME_WAIT
    connections do not count) but not SO_REUSEPORT, which gRPC sets: two gRPC
    servers would share the port silently and split the calls between them.
    """
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address, port))
            except OSError:
                return True
            return False
    return False


_pdeathsig_prefix_cache: list[str] | None = None


def _pdeathsig_prefix() -> list[str]:
    """`setpriv --pdeathsig TERM --` if it works here, else [] (checked once).

    PR_SET_PDEATHSIG survives exec, so the kernel sends the worker SIGTERM when
    the thread that started it dies -- the only cleanup that also covers SIGKILL
    of this process. Setting it with `preexec_fn` instead would run Python in the
    forked child of a multi-threaded process (TF starts many threads), which
    `subprocess` warns can deadlock.
    """
    global _pdeathsig_prefix_cache
    if _pdeathsig_prefix_cache is None:
        prefix: list[str] = []
        setpriv = shutil.which("setpriv")
        if sys.platform.startswith("linux") and setpriv:
            probe = [setpriv, "--pdeathsig", "TERM", "--", "true"]
            try:
                ok = subprocess.run(probe, capture_output=True, timeout=10).returncode == 0
            except (OSError, subprocess.SubprocessError):
                ok = False
            if ok:
                prefix = probe[:-1]
        _pdeathsig_prefix_cache = prefix
    return list(_pdeathsig_prefix_cache)


# Popen objects of the workers this process started, so `stop_workers` can
# reap them through `Popen` (keeping their return codes right) rather than psutil.
_started_workers: list[subprocess.Popen] = []
_started_lock = threading.Lock()


def _listen_addresses(pid: int, port: int) -> list[str]:
    """Addresses process `pid` listens on at TCP `port` (empty if none)."""
    import psutil

    try:
        connections = psutil.Process(pid).net_connections(kind="inet")
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return []
    return [
        c.laddr.ip
        for c in connections
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
    ]


def _log_tail(log_path: Path | None, num_chars: int = 600) -> str:
    if log_path is None:
        return "(worker output went to /dev/null; pass log_path to keep it)"
    try:
        text = Path(log_path).read_text(errors="replace")
    except OSError:
        return f"(could not read {log_path})"
    return f"last output in {log_path}: {' '.join(text[-num_chars:].split())}"


def start_worker_process(
    port: int,
    *,
    log_path: str | os.PathLike | None = None,
    max_concurrent_computation_calls: int = -1,
    ready_timeout_s: float = 60.0,
) -> subprocess.Popen:
    """Starts TFF's `worker_binary --port=PORT` and waits until it listens.

    The worker's stdout and stderr go to `log_path` (appended) or /dev/null and
    its stdin is /dev/null, so it never holds this process's pipes. It is
    registered for `stop_workers`; call `install_worker_cleanup` to make that
    happen at exit. On Linux with `setpriv` it also dies when the calling thread
    dies, so start workers from a thread that lives as long as they should (the
    main thread, normally).

    `worker_binary` has no bind-address flag: it listens on all interfaces
    (`[::]:PORT`) whatever the caller intends. It serves unauthenticated,
    insecure gRPC; use it on a trusted host or private network only.

    Its environment is `worker_environment()`: this process's, with glibc's
    malloc arenas capped (`WORKER_MALLOC_DEFAULTS`) unless set otherwise.

    Args:
      port: TCP port, 1..65535.
      log_path: file for the worker's output, or None for /dev/null.
      max_concurrent_computation_calls: passed to the binary; non-positive means
        no limit (TFF's default).
      ready_timeout_s: how long to wait for the worker to listen on `port`.

    Returns:
      The running worker's `subprocess.Popen`.

    Raises:
      InvalidArgument: `port` is out of range.
      ValueError: `FEDPRUNE_WORKER_MALLOC` is invalid (see `worker_environment`).
      WorkerStartError: the port is taken, the worker exited, or it did not
        listen within `ready_timeout_s` (it is killed then); the message quotes
        its log.
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise InvalidArgument("port", port, "an integer TCP port in 1..65535")
    env = worker_environment()
    binary = find_worker_binary()
    if port_in_use(port):
        raise WorkerStartError(f"port {port} is already in use; pick another --port")
    args = [
        *_pdeathsig_prefix(),
        str(binary),
        f"--port={port}",
        f"--max_concurrent_computation_calls={max_concurrent_computation_calls}",
    ]
    if log_path is not None:
        log_path = Path(log_path)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        output = open(log_path, "ab")  # closed below; the child keeps its own fd
    else:
        output = subprocess.DEVNULL
    try:
        # process_group=0: the worker leads its own group, so signals a terminal
        # sends to our foreground group (Ctrl-C) do not reach it.
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            process_group=0,
        )
    finally:
        if log_path is not None:
            output.close()
    with _started_lock:
        _started_workers[:] = [p for p in _started_workers if p.poll() is None]
        _started_workers.append(process)

    # Ready means *this* pid listens on the port: a TCP probe could be answered
    # by another process sharing the port through SO_REUSEPORT.
    deadline = time.monotonic() + ready_timeout_s
    while True:
        returncode = process.poll()
        if returncode is not None:
            raise WorkerStartError(
                f"worker_binary --port={port} exited with status {returncode} before "
                f"listening; {_log_tail(log_path)}"
            )
        addresses = _listen_addresses(process.pid, port)
        if addresses:
            _log.info("TFF worker pid %d listening on %s port %d", process.pid, addresses, port)
            return process
        if time.monotonic() > deadline:
            stop_popen(process, STOP_GRACE_S)
            raise WorkerStartError(
                f"worker_binary --port={port} did not listen within {ready_timeout_s:g} s; "
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.02)


def started_worker_pids() -> list[int]:
    """The pids of the workers `start_worker_process` started that are still running."""
    with _started_lock:
        return [p.pid for p in _started_workers if p.poll() is None]


# ----------------------------------------------------------------------------
# Stopping workers.


def _is_worker(proc) -> bool:
    import psutil

    try:
        if proc.name() == WORKER_BINARY_NAME:
            return True
        cmdline = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return bool(cmdline) and os.path.basename(cmdline[0]) == WORKER_BINARY_NAME


def worker_descendants(pid: int | None = None) -> list:
    """Live `worker_binary` processes among the descendants of `pid` (default: us).

    Returns:
      A list of `psutil.Process`; zombies (dead, not yet reaped) are left out.
    """
    import psutil

    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    workers = []
    for child in children:
        try:
            if child.status() != psutil.STATUS_ZOMBIE and _is_worker(child):
                workers.append(child)
        except psutil.NoSuchProcess:
            pass
    return workers


def stop_popen(process: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM, wait up to `grace_s`, SIGKILL; always with timeouts.

    Never a blocking `wait()`: when a signal handler runs this, the main thread
    may already hold the Popen's waitpid lock.
    """
    if process.poll() is not None:
        return
    try:
        process.terminate()
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
    except ProcessLookupError:
        pass


_stopping = False


def stop_workers(grace_s: float = STOP_GRACE_S) -> list[int]:
    """Stops every `worker_binary` descendant of this process; never others.

    Covers the workers we started and any the stock TFF context started.
    SIGTERM first, SIGKILL after `grace_s`. Safe to call repeatedly, from atexit
    and from signal handlers; a reentrant call (a signal arriving while it runs)
    returns at once.

    Args:
      grace_s: seconds between SIGTERM and SIGKILL.

    Returns:
      The pids that were signalled.
    """
    global _stopping
    if _stopping:
        return []
    _stopping = True
    try:
        import psutil

        with _started_lock:
            own = [p for p in _started_workers if p.poll() is None]
        own_pids = {p.pid for p in own}
        others = [p for p in worker_descendants() if p.pid not in own_pids]
        for process in own:
            try:
                process.terminate()
            except ProcessLookupError:
                pass
        for proc in others:
            try:
                proc.terminate()
            except psutil.NoSuchProcess:
                pass
        for process in own:
            stop_popen(process, grace_s)
        _, alive = psutil.wait_procs(others, timeout=grace_s)
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=grace_s)
        return sorted(own_pids | {p.pid for p in others})
    finally:
        _stopping = False
