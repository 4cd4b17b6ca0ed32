"""Execution runtime: TFF execution contexts and the lifetime of TFF's C++ worker.

Why this module exists. TFF 0.87's default context lazily starts the child
process `tensorflow_federated/data/worker_binary --port=P`, gives it the
parent's stdout and stderr, and stops it only from `ServiceManager.__del__`,
which does not run at interpreter exit. The worker then outlives Python and
holds the parent's pipes open, so `python train.py | tail` or a CI step hangs.
Here we start the worker ourselves (output to a log file or /dev/null, never the
parent's pipes) and guarantee that no `worker_binary` descendant of this
process survives it, on every exit path:

  * normal exit and uncaught exceptions: an `atexit` hook;
  * SIGINT / SIGTERM: the handlers record the signal and raise
    (`KeyboardInterrupt` / `Terminated`); the exit path (`stop_workers`, or a
    driver's own) stops the workers. The worker runs in its own process group,
    so a terminal's Ctrl-C does not reach it: stopping it is ours to do, once,
    and after `begin_shutdown()` no worker is restarted (see "Interrupts and
    shutdown" below);
  * SIGKILL, `os._exit`, OOM kill: on Linux the worker is started through
    `setpriv --pdeathsig TERM` (util-linux), so the kernel sends it SIGTERM
    when the thread that started it dies.

Contexts (all built from TFF's own parts; see docs/design.md, "Worker process
and execution contexts"):

  * `set_local_context()`: one loopback worker that we start; a
    `tff.framework.SyncExecutionContext` for the plain-Python round loop
    (`state = process.next(state, data)`), or with `asynchronous=True` a
    `tff.program.NativeFederatedContext` over an `AsyncExecutionContext`, which
    `tff.program` / `tff.learning.programs.train_model` require.
  * `set_remote_context(addresses)`: workers started elsewhere, e.g. with
    `python -m fedprune.worker --port=N`. One address: the same contexts as the
    local case, talking to that worker. Several: TFF's
    `MergeableCompExecutionContext`, which splits each call's CLIENTS-placed
    arguments into contiguous chunks, one per worker, and merges the partial
    aggregates.

Mergeable-context limits (TFF 0.87, checked on loopback): the context compiles
each invoked computation with `compile_to_mergeable_comp_form`, which accepts
any computation whose aggregations are independent of each other. An ordinary
`tff.templates.IterativeProcess` -- `build_weighted_fed_avg` or a process from
`tff.learning.templates.compose_learning_process` (broadcast -> client work ->
one aggregation -> server-only finalizer) -- runs unchanged, `initialize` and
`next` alike; nothing has to be converted to a `MergeableCompForm` by hand. A
computation with one aggregation *feeding* another (aggregate, broadcast the
result, aggregate again) fails with `ValueError: Detected one aggregate
dependent on another`. A computation without CLIENTS-placed arguments that
creates clients-placed values runs with CLIENTS cardinality 0 on every worker.
`MergeableCompExecutionContext` is a synchronous context, so `tff.program`
(which needs an async context) can only use a single remote worker.

Memory: every worker we start gets `MALLOC_ARENA_MAX` = the usable cores (at
least 2) unless the environment sets it (`worker_environment`;
`FEDPRUNE_WORKER_MALLOC=glibc` opts out), which keeps glibc's per-thread arenas
from inflating its RSS; see BUILD_NOTES.md.

Security: the worker speaks unauthenticated, unencrypted gRPC and `worker_binary`
has no bind-address flag: it always listens on all interfaces (`[::]:PORT`),
even when we only talk to it over loopback. Run it on a trusted host or private
network only (or firewall the port).

Importing this module is cheap (standard library only); TensorFlow, TFF, gRPC
and psutil are imported by the functions that need them.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from fedprune.errors import InvalidArgument

_log = logging.getLogger(__name__)

WORKER_BINARY_NAME = "worker_binary"

# Seconds a worker gets after SIGTERM before SIGKILL. The worker exits on
# SIGTERM in milliseconds; the grace only matters if it is wedged.
STOP_GRACE_S = 3.0

# TFF's own channel options (executor_stacks/executor_factory.py): models and
# client datasets travel as single gRPC messages, far above gRPC's 4 MB default.
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000
_GRPC_CHANNEL_OPTIONS = (
    ("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES),
)

_PYTHON_LOGGERS = ("tensorflow", "tensorflow_federated", "absl")
_NOISY_PACKAGES = (
    r"(tensorflow|tensorflow_federated|tensorflow_probability|"
    r"tensorflow_model_optimization|keras|jax|ml_dtypes|tree|dp_accounting)"
)


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# glibc malloc settings for every `worker_binary` fedprune starts (BUILD_NOTES.md,
# "Worker memory"). glibc reads them once, at the worker's start-up. glibc's
# default gives each thread that allocates concurrently its own arena, up to 8
# per core, and the worker runs ~40 threads: its RSS then climbs for a long
# while (+18 to +70 % from round 10 to 100 at 1,000 clients) although it does
# not leak. One arena per usable core (at least 2; 2 on the 2-core machine it was
# measured on) cut the worker's peak by about a quarter, its growth at 10
# clients per round from +60 to +26 %, and kept Python + worker under +5 %. A
# value already in the environment wins over these.
WORKER_MALLOC_DEFAULTS = {"MALLOC_ARENA_MAX": str(max(2, _usable_cores()))}
# `FEDPRUNE_WORKER_MALLOC=glibc` starts workers with glibc's own defaults instead.
WORKER_MALLOC_ENV = "FEDPRUNE_WORKER_MALLOC"


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a `worker_binary` is started with.

    `environ` (default: this process's environment) plus `WORKER_MALLOC_DEFAULTS`
    for every variable it does not set, unless `FEDPRUNE_WORKER_MALLOC=glibc`.

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
    return env


class WorkerUnreachableError(ConnectionError):
    """A TFF worker address does not accept a gRPC connection."""


class WorkerStartError(RuntimeError):
    """A `worker_binary` we started exited or never listened on its port."""


# ----------------------------------------------------------------------------
# Logging.


def quiet_tensorflow_logging(verbose: bool = False) -> None:
    """Sets how chatty TensorFlow, gRPC, absl and TFF's worker are.

    Call it before TensorFlow is imported: TF's C++ logger reads
    `TF_CPP_MIN_LOG_LEVEL` once, at its first message. The worker we start
    inherits the environment, so its log file follows the same level. The
    Python-side settings (the `tensorflow` and `absl` loggers, warning filters)
    work before or after the import.

    Args:
      verbose: False: C++ logs at ERROR and above are dropped
        (`TF_CPP_MIN_LOG_LEVEL=3`, `GRPC_VERBOSITY=ERROR`), Python loggers at
        ERROR, and Deprecation/Future warnings raised inside TF, TFF, Keras and
        their dependencies are ignored. True: everything at INFO
        (`TF_CPP_MIN_LOG_LEVEL=0`, `GRPC_VERBOSITY=INFO`), warnings left to the
        interpreter's defaults.
    """
    import warnings

    if "tensorflow" in sys.modules:
        _log.debug("TensorFlow already imported; TF_CPP_MIN_LOG_LEVEL may not apply")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    os.environ["GRPC_VERBOSITY"] = "INFO" if verbose else "ERROR"
    # The Python logger level is what `tf.get_logger()` returns, and
    # `get_logger` does not reset it, so this also holds if TF is imported later.
    level = logging.INFO if verbose else logging.ERROR
    for name in _PYTHON_LOGGERS:
        logging.getLogger(name).setLevel(level)
    from absl import logging as absl_logging  # cheap; TFF logs through it

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    if not verbose:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOISY_PACKAGES)


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
            _stop_popen(process, STOP_GRACE_S)
            raise WorkerStartError(
                f"worker_binary --port={port} did not listen within {ready_timeout_s:g} s; "
                f"{_log_tail(log_path)}"
            )
        time.sleep(0.02)


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


def _stop_popen(process: subprocess.Popen, grace_s: float) -> None:
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
            _stop_popen(process, grace_s)
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


# ----------------------------------------------------------------------------
# Interrupts and shutdown.
#
# The signal handlers only record the signal and raise; everything else happens
# on the exit path (`shutdown`), in ordinary code:
#
#   * The worker lives in its own process group (`start_worker_process`), so a
#     terminal's Ctrl-C, which goes to the whole foreground group, reaches only
#     us; stopping the worker is ours to do.
#   * The handler does not stop the worker. The old design did, and if the
#     `KeyboardInterrupt` it raised landed in a finalizer (`__del__`, a weakref
#     callback: the round loop drops tf.data pipelines every round) Python printed
#     "Exception ignored" and carried on with a dead worker; TFF then restarted
#     it for one cached executor only and the next call through another one
#     failed with `ValueError: Cannot invoke RPC on closed channel!`.
#   * Because the interrupt is recorded, a swallowed one is raised again at the
#     next `raise_if_interrupted()` (the round loop calls it at every phase), and
#     the unraisable hook keeps the swallowed copy off stderr.
#   * Inside `deferred_interrupts()` the handlers only record: the interrupt is
#     raised at the next `raise_if_interrupted()` or when the block ends. A
#     KeyboardInterrupt raised at an arbitrary bytecode of TensorFlow's own
#     Python code (Keras evaluation, tracing) was seen to corrupt the heap
#     ("free(): invalid next size", status -6) in 1 of 20 interrupted runs.
#     `program.run_experiment` defers everywhere except while it waits on the
#     worker (`interruptible()`), where raising is safe: TFF's sync context runs
#     the call on its own thread and the main thread only waits for a future.
#   * Once `begin_shutdown()` has run, no worker is restarted: the in-flight RPC
#     that fails when `stop_workers` kills the worker raises
#     `ShutdownInProgress` instead of starting a new one.


class Terminated(SystemExit):
    """Raised by the SIGTERM handler; uncaught, the process exits with status 143."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(128 + signum)
        self.signum = signum


class ShutdownInProgress(RuntimeError):
    """A worker was needed after `begin_shutdown()`; none is started any more."""


_cleanup_installed = False
_previous_handlers: dict[int, object] = {}
_interrupt_signal: int | None = None
_shutting_down = False
_defer_depth = 0  # > 0: inside `deferred_interrupts()` (and not inside `interruptible()`)


def interrupt_signal() -> int | None:
    """The first SIGINT/SIGTERM received since the handlers were installed, or None."""
    return _interrupt_signal


def _interrupt_exception(signum: int) -> BaseException:
    return KeyboardInterrupt() if signum == signal.SIGINT else Terminated(signum)


def raise_if_interrupted() -> None:
    """Raises the recorded interrupt again (KeyboardInterrupt or `Terminated`).

    For loops that must stop even when the first raise was swallowed (inside a
    finalizer, or by code that catches `BaseException`). A no-op while no
    signal was recorded, and during shutdown (the exit path is already running).
    """
    if _interrupt_signal is not None and not _shutting_down:
        raise _interrupt_exception(_interrupt_signal)


@contextlib.contextmanager
def deferred_interrupts():
    """A block in which SIGINT/SIGTERM are only recorded, raised when it ends.

    For main-thread code that runs TensorFlow (tracing, Keras, tf.data), which
    must not be unwound at an arbitrary bytecode. The block can call
    `raise_if_interrupted()` at safe points, and open `interruptible()` blocks.
    Nests; the interrupt is raised when the outermost block ends normally.
    """
    global _defer_depth
    _defer_depth += 1
    try:
        yield
    finally:
        _defer_depth -= 1
    if _defer_depth == 0:
        raise_if_interrupted()


@contextlib.contextmanager
def interruptible():
    """Inside `deferred_interrupts()`: a block where the handlers raise at once again.

    For waiting on the TFF worker. An interrupt recorded before the block is
    raised on entry.
    """
    global _defer_depth
    saved, _defer_depth = _defer_depth, 0
    try:
        raise_if_interrupted()
        yield
    finally:
        _defer_depth = saved


def clear_interrupt() -> None:
    """Forgets the recorded interrupt once it has been delivered (see `raise_if_interrupted`)."""
    global _interrupt_signal
    _interrupt_signal = None


def begin_shutdown() -> None:
    """From now on no worker is (re)started; further SIGINT/SIGTERM are ignored."""
    global _shutting_down
    _shutting_down = True


def shutting_down() -> bool:
    return _shutting_down


def _on_signal(signum, frame):
    global _interrupt_signal
    if _shutting_down:
        return  # a second Ctrl-C must not interrupt the exit path itself
    if _interrupt_signal is None:
        _interrupt_signal = signum
    if _defer_depth:
        return  # raised at the next safe point (`raise_if_interrupted`)
    previous = _previous_handlers.get(signum)
    if callable(previous) and previous is not signal.default_int_handler:
        return previous(signum, frame)
    raise _interrupt_exception(signum)


def _unraisable_hook(unraisable) -> None:
    """Drops a recorded interrupt swallowed by a finalizer; defers everything else.

    Python cannot propagate an exception out of `__del__` or a weakref callback;
    it reports it as "Exception ignored in ..." and goes on. For our own
    interrupt that report is noise: the interrupt is recorded and
    `raise_if_interrupted` raises it again where it can propagate.
    """
    if _interrupt_signal is not None and isinstance(
            unraisable.exc_value, (KeyboardInterrupt, Terminated)):
        return
    _default_unraisable_hook(unraisable)


_default_unraisable_hook = sys.unraisablehook


def install_worker_cleanup() -> None:
    """Makes sure no `worker_binary` descendant outlives this process.

    Registers `stop_workers` with atexit (normal exit, uncaught exception,
    `sys.exit`) and, from the main thread, installs the interrupt handlers:
    SIGINT raises `KeyboardInterrupt`, SIGTERM raises `Terminated`
    (a `SystemExit` with status 143); both record the signal first
    (`interrupt_signal`, `raise_if_interrupted`). Uncaught, either unwinds to
    the interpreter's exit, where the atexit hook stops the workers. A handler
    that was installed before is called instead of raising; a signal that is
    ignored (SIG_IGN, e.g. under `nohup`) stays ignored. Idempotent.

    Drivers should catch both exceptions and call `shutdown()`, which stops the
    workers without the interpreter's teardown (see `experiments/common.py`).
    """
    global _cleanup_installed
    if _cleanup_installed:
        return
    # Imported now so that nothing on the exit path imports anything.
    import psutil  # noqa: F401

    atexit.register(stop_workers)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            previous = signal.getsignal(signum)
            if previous == signal.SIG_IGN:
                continue
            _previous_handlers[signum] = previous
            signal.signal(signum, _on_signal)
        sys.unraisablehook = _unraisable_hook
    else:
        _log.warning(
            "install_worker_cleanup called off the main thread: only the atexit "
            "hook is installed, not the SIGINT/SIGTERM handlers"
        )
    _cleanup_installed = True


# ----------------------------------------------------------------------------
# Execution contexts.


def _channel(address: str):
    import grpc

    return grpc.insecure_channel(address, options=list(_GRPC_CHANNEL_OPTIONS))


def _wait_ready(channels: dict, timeout_s: float) -> list[str]:
    """Waits for all channels at once; returns the addresses not ready in time."""
    import grpc

    futures = {address: grpc.channel_ready_future(ch) for address, ch in channels.items()}
    deadline = time.monotonic() + timeout_s
    unreachable = []
    for address, future in futures.items():
        try:
            future.result(timeout=max(0.0, deadline - time.monotonic()))
        except grpc.FutureTimeoutError:
            future.cancel()
            unreachable.append(address)
    return unreachable


def _unreachable_error(addresses: Sequence[str], timeout_s: float) -> WorkerUnreachableError:
    if len(addresses) == 1:
        what = f"TFF worker at {addresses[0]} is unreachable"
    else:
        what = f"TFF workers at {', '.join(addresses)} are unreachable"
    return WorkerUnreachableError(
        f"{what}: no gRPC connection within {timeout_s:g} s "
        "(start one there with `python -m fedprune.worker --port=PORT`)"
    )


def _stack_fn(get_stub, *, default_num_clients: int, stream_structs: bool):
    """The executor-stack function TFF's `local_cpp_executor_factory` uses, over `get_stub`."""
    import tensorflow_federated as tff

    def stack_fn(cardinalities):
        cardinalities = dict(cardinalities)
        # Without an explicit CLIENTS cardinality the C++ worker rejects even
        # computations that place nothing at clients.
        if cardinalities.get(tff.CLIENTS) is None:
            cardinalities[tff.CLIENTS] = default_num_clients
        executor = tff.framework.RemoteExecutor(get_stub(), stream_structs=stream_structs)
        executor.set_cardinalities(cardinalities)
        return executor

    return stack_fn


def _execution_context_kwargs() -> dict:
    import tensorflow_federated as tff

    # What `create_sync_local_cpp_execution_context` passes.
    return dict(
        compiler_fn=tff.backends.native.desugar_and_transform_to_native,
        transform_args=tff.tensorflow.transform_args,
        transform_result=tff.tensorflow.transform_result,
    )


def _context_over(factory, *, asynchronous: bool):
    import tensorflow_federated as tff

    if asynchronous:
        return tff.program.NativeFederatedContext(
            tff.framework.AsyncExecutionContext(factory, **_execution_context_kwargs())
        )
    return tff.framework.SyncExecutionContext(factory, **_execution_context_kwargs())


class _LocalWorker:
    """One loopback worker we own, restarted if it dies (as TFF's ServiceManager does).

    A restart happens when TFF rebuilds an executor after a failed call, e.g.
    when the worker crashed or was killed by someone else. It first drops every
    executor cached by `executor_factory` (they hold executor ids and a channel
    of the dead worker), so that each later call, whatever its cardinalities,
    builds a fresh one on the new worker: TFF itself rebuilds only the executor
    whose call failed, and the next call through another one used to fail with
    `ValueError: Cannot invoke RPC on closed channel!`. After `begin_shutdown()`
    nothing is restarted: `get_stub` raises `ShutdownInProgress`.
    """

    _START_ATTEMPTS = 3

    def __init__(self, *, log_path, max_concurrent_computation_calls: int):
        self._log_path = log_path
        self._max_calls = max_concurrent_computation_calls
        self._lock = threading.Lock()
        self.process: subprocess.Popen | None = None
        self.restarts = 0
        self.executor_factory = None  # set by `set_local_context`
        self._channel = None
        self._stub = None
        self._start()

    def _start(self) -> None:
        import tensorflow_federated as tff

        error = None
        for _ in range(self._START_ATTEMPTS):  # a port can be taken between probe and bind
            port = pick_unused_port()
            try:
                self.process = start_worker_process(
                    port,
                    log_path=self._log_path,
                    max_concurrent_computation_calls=self._max_calls,
                )
                break
            except WorkerStartError as e:
                error = e
        else:
            raise error
        self.address = f"localhost:{port}"
        self._channel = _channel(self.address)
        if _wait_ready({self.address: self._channel}, 30.0):
            self.close()
            raise WorkerStartError(f"local TFF worker on port {port} refused gRPC connections")
        self._stub = tff.framework.RemoteExecutorGrpcStub(self._channel)

    def get_stub(self):
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                if _shutting_down:
                    raise ShutdownInProgress(
                        "the local TFF worker was stopped because this process is exiting"
                    )
                _log.warning(
                    "local TFF worker %s is gone (status %s); starting a new one",
                    self.process and self.process.pid,
                    self.process and self.process.returncode,
                )
                if self.executor_factory is not None:
                    # Before the old channel closes: closing an executor disposes
                    # of its state over that channel (an RPC error is ignored).
                    self.executor_factory.clean_up_all()
                self.close()
                self._start()
                self.restarts += 1
            return self._stub

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        if self.process is not None:
            _stop_popen(self.process, STOP_GRACE_S)


def _executor_factory(stack_fn):
    """TFF's `ResourceManagingExecutorFactory` plus `clean_up_all()`.

    One executor per cardinalities, built by `stack_fn(cardinalities)` on first
    use and kept until `clean_up_executor` (TFF calls it after a failed call) or
    `clean_up_all` (a restarted worker). Unlike TFF's factory the cache is not
    LRU-bounded at 10 keys; it is bounded by the distinct client counts a run
    uses.
    """
    import tensorflow_federated as tff

    class ExecutorFactory(tff.framework.ExecutorFactory):
        def __init__(self):
            self._executors = {}

        @staticmethod
        def _key(cardinalities):
            return tuple(sorted((str(k), v) for k, v in cardinalities.items()))

        def create_executor(self, cardinalities):
            key = self._key(cardinalities)
            executor = self._executors.get(key)
            if executor is None:
                executor = stack_fn(cardinalities)
                self._executors[key] = executor
            return executor

        def clean_up_executor(self, cardinalities):
            executor = self._executors.pop(self._key(cardinalities), None)
            if executor is not None:
                executor.close()

        def clean_up_all(self):
            executors, self._executors = list(self._executors.values()), {}
            for executor in executors:
                executor.close()

    return ExecutorFactory()


_local_worker: _LocalWorker | None = None


def set_local_context(
    *,
    asynchronous: bool = False,
    default_num_clients: int = 0,
    max_concurrent_computation_calls: int = -1,
    stream_structs: bool = False,
    log_path: str | os.PathLike | None = None,
):
    """Installs a TFF C++ execution context on a loopback worker we start now.

    Same executor stack as `tff.backends.native.create_sync_local_cpp_execution_context`,
    but the worker is started here (eagerly, so a broken install fails at once),
    writes to `log_path` or /dev/null instead of our stdout, and is stopped on
    every exit path (`install_worker_cleanup` is called). Calling this again
    replaces the context and stops the previous local worker.

    Args:
      asynchronous: False: a `tff.framework.SyncExecutionContext`, for loops that
        call `process.next(...)` and get values back. True: a
        `tff.program.NativeFederatedContext` over a
        `tff.framework.AsyncExecutionContext`, as `tff.program` and
        `tff.learning.programs.train_model` need.
      default_num_clients: CLIENTS cardinality for computations whose arguments
        do not determine it.
      max_concurrent_computation_calls: limit on parallel calls of one
        computation inside the worker (non-positive: none).
      stream_structs: TFF's option to stream struct values one element at a time.
      log_path: file for the worker's output (appended), or None for /dev/null.

    Returns:
      The installed context.
    """
    global _local_worker
    install_worker_cleanup()
    import tensorflow_federated as tff

    worker = _LocalWorker(
        log_path=log_path, max_concurrent_computation_calls=max_concurrent_computation_calls
    )
    factory = _executor_factory(
        _stack_fn(
            worker.get_stub,
            default_num_clients=default_num_clients,
            stream_structs=stream_structs,
        )
    )
    worker.executor_factory = factory
    context = _context_over(factory, asynchronous=asynchronous)
    tff.framework.set_default_context(context)
    previous, _local_worker = _local_worker, worker
    if previous is not None:
        previous.close()
    return context


def parse_worker_address(address: str) -> tuple[str, int]:
    """Splits `host:port` (or `[v6]:port`) into (host, port).

    Raises:
      InvalidArgument: not of that form, or the port is not in 1..65535.
    """
    accepted = "host:port addresses, e.g. 10.0.0.5:8000 or [::1]:8000"
    host, sep, port_text = str(address).strip().rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise InvalidArgument("tff_workers", address, accepted)
    if ":" in host and not (host.startswith("[") and host.endswith("]")):
        raise InvalidArgument("tff_workers", address, accepted)
    return host, int(port_text)


def check_workers_reachable(addresses: Sequence[str], *, timeout_s: float = 10.0) -> None:
    """Raises a one-line `WorkerUnreachableError` naming every address not serving gRPC.

    All addresses are probed concurrently, so the check takes at most
    `timeout_s` however many there are.
    """
    for address in addresses:
        parse_worker_address(address)
    channels = {address: _channel(address) for address in addresses}
    try:
        unreachable = _wait_ready(channels, timeout_s)
    finally:
        for ch in channels.values():
            ch.close()
    if unreachable:
        raise _unreachable_error(unreachable, timeout_s)


def set_remote_context(
    addresses: Sequence[str],
    *,
    connect_timeout_s: float = 10.0,
    asynchronous: bool = False,
    default_num_clients: int = 0,
    stream_structs: bool = False,
    num_subrounds: int | None = None,
):
    """Installs a TFF context that runs computations on running worker services.

    Start the workers first, e.g. `python -m fedprune.worker --port=8000` on
    each host. Every address must accept a gRPC connection within
    `connect_timeout_s`, or nothing is installed.

    One address: a `tff.framework.SyncExecutionContext` (or, with
    `asynchronous`, a `tff.program.NativeFederatedContext`) whose executor is a
    `tff.framework.RemoteExecutor` on that worker. Several: a
    `tff.framework.MergeableCompExecutionContext` over one
    `tff.framework.AsyncExecutionContext` per worker
    (`tff.backends.native.create_mergeable_comp_execution_context`): each call's
    clients are split into contiguous chunks, one per worker, and the partial
    aggregates are merged. FedAvg-style processes (one aggregation per `next`)
    run unchanged; see the module docstring for the limits.

    If a worker goes away later, TFF retries the call forever by itself; here
    the executor is rebuilt only after a `connect_timeout_s` check, and a dead
    worker surfaces as `WorkerUnreachableError` instead of a silent hang.

    Args:
      addresses: `host:port` strings, at least one.
      connect_timeout_s: seconds to wait for each worker (concurrently).
      asynchronous: see `set_local_context`; needs exactly one address, because
        the mergeable context is synchronous.
      default_num_clients: CLIENTS cardinality per worker for computations whose
        arguments do not determine it.
      stream_structs: TFF's option to stream struct values one element at a time.
      num_subrounds: how many chunks to split the clients into (default: one
        per worker); more chunks than workers run in turn.

    Returns:
      The installed context.

    Raises:
      InvalidArgument: no addresses, a malformed address, or `asynchronous`
        with several addresses.
      WorkerUnreachableError: some address did not accept a connection; the
        one-line message names all of them.
    """
    if isinstance(addresses, str):
        addresses = [addresses]
    addresses = [str(a).strip() for a in addresses]
    if not addresses:
        raise InvalidArgument("tff_workers", addresses, "at least one host:port address")
    for address in addresses:
        parse_worker_address(address)
    if len(set(addresses)) != len(addresses):
        raise InvalidArgument("tff_workers", addresses, "distinct host:port addresses")
    if asynchronous and len(addresses) > 1:
        raise InvalidArgument(
            "tff_workers",
            addresses,
            "a single address with asynchronous=True (the mergeable context is synchronous)",
        )
    channels = {address: _channel(address) for address in addresses}
    unreachable = _wait_ready(channels, connect_timeout_s)
    if unreachable:
        for ch in channels.values():
            ch.close()
        raise _unreachable_error(unreachable, connect_timeout_s)

    import tensorflow_federated as tff

    def factory_for(address):
        channel = channels[address]
        stub = tff.framework.RemoteExecutorGrpcStub(channel)

        def get_stub():
            # Called when TFF (re)builds the executor, i.e. first use and after
            # a failed call: turn a dead worker into an error, not endless retries.
            if _wait_ready({address: channel}, connect_timeout_s):
                raise _unreachable_error([address], connect_timeout_s)
            return stub

        return tff.framework.ResourceManagingExecutorFactory(
            _stack_fn(
                get_stub, default_num_clients=default_num_clients, stream_structs=stream_structs
            )
        )

    factories = [factory_for(address) for address in addresses]
    if len(factories) == 1:
        context = _context_over(factories[0], asynchronous=asynchronous)
    else:
        async_contexts = [
            tff.framework.AsyncExecutionContext(f, **_execution_context_kwargs()) for f in factories
        ]
        context = tff.backends.native.create_mergeable_comp_execution_context(
            async_contexts, num_subrounds=num_subrounds
        )
    tff.framework.set_default_context(context)
    return context
