"""Execution runtime: worker cleanup on every exit path, local vs remote contexts.

The exit-path tests run real child processes and send real signals. Each child
pays ~10 s for `import tensorflow_federated`, hence `slow`. Every wait has a
timeout: a hanging `communicate()` is exactly the `python x.py | tail` bug
these tests guard against.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from fedprune.errors import InvalidArgument
from fedprune.runtime import contexts, interrupts, tf_logging, worker_heap, workers

REPO_ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT_S = 120  # TFF import (~10 s, more on a loaded 2-core box) + one computation


def _child_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _read_until(stream, marker: bytes, timeout_s: float) -> bytes:
    """Reads `stream` until `marker` appears, EOF, or the timeout; returns what was read."""
    data = b""
    deadline = time.monotonic() + timeout_s
    with selectors.DefaultSelector() as selector:
        selector.register(stream, selectors.EVENT_READ)
        while marker not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                break
            chunk = os.read(stream.fileno(), 4096)
            if not chunk:
                break
            data += chunk
    return data


def _identities(processes) -> list[tuple[int, float]]:
    """(pid, create_time) pairs, so a recycled pid is not mistaken for a survivor."""
    return [(p.pid, p.create_time()) for p in processes]


def _survivors(identities, wait_s: float = 5.0) -> list[int]:
    """Pids among `identities` that are still alive (not zombie) after up to `wait_s`."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for pid, created in identities:
            try:
                proc = psutil.Process(pid)
                if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def _kill(identities) -> None:
    """Last resort so a failing test does not itself leave workers behind."""
    for pid in _survivors(identities, wait_s=0):
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


# ----------------------------------------------------------------------------
# Cheap checks (no TensorFlow).


def test_importing_runtime_and_worker_is_cheap():
    code = (
        "import sys, fedprune.runtime.contexts, fedprune.runtime.interrupts, "
        "fedprune.runtime.tf_logging, fedprune.runtime.workers, fedprune.runtime.memory, "
        "fedprune.worker; "
        "heavy = [m for m in ('tensorflow', 'tensorflow_federated', 'grpc', 'psutil') "
        "if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=_child_env(), timeout=60)


def test_find_worker_binary_is_executable():
    path = workers.find_worker_binary()
    assert path.name == "worker_binary"
    assert os.access(path, os.X_OK)


@pytest.mark.parametrize(
    "address", ["localhost", "localhost:", ":8000", "host:0", "host:65536", "host:80a", "::1:80"]
)
def test_malformed_address_is_rejected(address):
    with pytest.raises(InvalidArgument, match="--tff_workers="):
        contexts.parse_worker_address(address)


@pytest.mark.parametrize(
    "address, expected",
    [("10.0.0.5:8000", ("10.0.0.5", 8000)), ("[::1]:80", ("[::1]", 80)), (" h:1 ", ("h", 1))],
)
def test_address_is_parsed(address, expected):
    assert contexts.parse_worker_address(address) == expected


@pytest.mark.parametrize("verbose, level", [(False, "3"), (True, "0")])
def test_quiet_tensorflow_logging_sets_env_and_loggers(monkeypatch, verbose, level):
    import logging
    import warnings

    for name in ("TF_CPP_MIN_LOG_LEVEL", "GRPC_VERBOSITY"):
        # setenv first: `delenv` of an unset variable records nothing to undo, and
        # the value set below would leak into later tests' workers.
        monkeypatch.setenv(name, "placeholder")
        monkeypatch.delenv(name)
    from absl import logging as absl_logging

    saved_levels = {n: logging.getLogger(n).level for n in ("tensorflow", "absl")}
    saved_absl_verbosity = absl_logging.get_verbosity()
    with warnings.catch_warnings():  # restores the filters this call adds
        try:
            tf_logging.quiet_tensorflow_logging(verbose=verbose)
            assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == level
            assert os.environ["GRPC_VERBOSITY"] == ("INFO" if verbose else "ERROR")
            expected = logging.INFO if verbose else logging.ERROR
            assert logging.getLogger("tensorflow").level == expected
        finally:
            for name, saved in saved_levels.items():
                logging.getLogger(name).setLevel(saved)
            absl_logging.set_verbosity(saved_absl_verbosity)


def test_worker_environment_sets_malloc_defaults_unless_told_otherwise():
    arenas = workers.WORKER_MALLOC_DEFAULTS["MALLOC_ARENA_MAX"]
    assert int(arenas) >= 2
    # The heap-trim library (`worker_heap`), where it can be built.
    preload = worker_heap.worker_preload_environment({})
    assert workers.worker_environment({"A": "1"}) == {
        "A": "1", "MALLOC_ARENA_MAX": arenas, "MALLOC_MMAP_THRESHOLD_": "1048576", **preload}
    # A value the environment already has wins, one variable at a time.
    assert workers.worker_environment({"MALLOC_ARENA_MAX": "8"}) == {
        "MALLOC_ARENA_MAX": "8", "MALLOC_MMAP_THRESHOLD_": "1048576", **preload}
    assert workers.worker_environment({"MALLOC_MMAP_THRESHOLD_": "0"}) == {
        "MALLOC_ARENA_MAX": arenas, "MALLOC_MMAP_THRESHOLD_": "0", **preload}
    glibc = {workers.WORKER_MALLOC_ENV: "glibc"}
    assert workers.worker_environment(glibc) == glibc
    with pytest.raises(ValueError, match="FEDPRUNE_WORKER_MALLOC='jemalloc'"):
        workers.worker_environment({workers.WORKER_MALLOC_ENV: "jemalloc"})


def test_start_worker_refuses_a_port_in_use():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        with pytest.raises(workers.WorkerStartError, match="already in use"):
            workers.start_worker_process(sock.getsockname()[1])


# ----------------------------------------------------------------------------
# Exit paths of a training process: no worker survives, pipes reach EOF.

_EXIT_PATH_SCRIPT = textwrap.dedent(
    """
    import sys
    import time

    from fedprune.runtime import contexts, interrupts, tf_logging

    tf_logging.quiet_tensorflow_logging(verbose=False)
    interrupts.install_worker_cleanup()
    contexts.set_local_context()

    import numpy as np
    import tensorflow_federated as tff


    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(values):
        return tff.federated_mean(values)


    assert mean([1.0, 3.0]) == 2.0  # the worker really runs
    print("READY", flush=True)
    mode = sys.argv[1]
    if mode == "exception":
        sys.stdin.readline()  # the test records the worker pids, then says go
        raise RuntimeError("boom")
    # Signals land both in computations and in sleeps; the deadline is a hang guard.
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        mean([1.0, 3.0])
        time.sleep(0.05)
    sys.exit(3)  # the signal never came
    """
)

_EXPECTED_STATUS = {"exception": 1, "sigterm": 128 + signal.SIGTERM}


@pytest.mark.slow
# A library script's exit paths (a driver's are tests/test_reliability.py's):
# an uncaught exception reaches the atexit hook, as a normal exit and an
# uncaught KeyboardInterrupt (SIGINT: test_interrupt_handlers_only_record_and_raise
# shows the handler raises it) do; SIGTERM's Terminated is a SystemExit.
@pytest.mark.parametrize("mode", ["exception", "sigterm"])
def test_no_worker_survives_exit_path(tmp_path, mode):
    script = tmp_path / "train.py"
    script.write_text(_EXIT_PATH_SCRIPT)
    child = subprocess.Popen(
        [sys.executable, str(script), mode],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
    )
    found = []
    try:
        head = _read_until(child.stdout, b"READY\n", CHILD_TIMEOUT_S)
        if b"READY\n" not in head:
            child.kill()
            _, err = child.communicate(timeout=30)
            pytest.fail(f"child never got READY: {head!r}\n{err.decode()[-2000:]}")
        found = _identities(workers.worker_descendants(child.pid))
        assert workers, "the computation did not start a worker_binary under the child"

        if mode == "exception":
            child.stdin.write(b"go\n")
            child.stdin.flush()
        else:
            child.send_signal(signal.SIGTERM)
        try:
            # (c) EOF on both pipes: nothing the child started still holds them.
            out, err = child.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            child.kill()
            pytest.fail(f"pipes of the {mode} child did not reach EOF within 60 s")

        # (a) exit status.
        assert child.returncode == _EXPECTED_STATUS[mode], err.decode()[-2000:]
        if mode == "exception":
            assert b"RuntimeError: boom" in err
        # (b) no worker_binary started under the child outlives it.
        assert not _survivors(found), f"surviving workers after {mode}: {found}"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
        _kill(found)


# ----------------------------------------------------------------------------
# fedprune.worker as a service.


def _start_worker_module(port: int, log_file: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedprune.worker", f"--port={port}", f"--log_file={log_file}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_child_env(),
    )


@pytest.mark.slow
def test_worker_module_serves_and_stops_on_sigterm(tmp_path):
    port = workers.pick_unused_port()
    service = _start_worker_module(port, tmp_path / "worker.log")
    found = []
    try:
        banner = _read_until(service.stderr, b"serving port", 60)
        assert b"serving port" in banner, banner
        found = _identities(workers.worker_descendants(service.pid))
        assert len(found) == 1
        environ = psutil.Process(found[0][0]).environ()
        expected = workers.worker_environment()
        for name in workers.WORKER_MALLOC_DEFAULTS:
            assert environ.get(name) == expected[name], name
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        service.send_signal(signal.SIGTERM)
        _, err = service.communicate(timeout=30)
        assert service.returncode == 0, err
        assert b"stopped on SIGTERM" in err
        assert not _survivors(found)
        # The binary's output goes to the log, never to our pipes (it may not have
        # written anything yet under load, so only the file's existence is certain).
        assert (tmp_path / "worker.log").exists()
    finally:
        if service.poll() is None:
            service.kill()
            service.wait(timeout=30)
        _kill(found)


@pytest.mark.slow
@pytest.mark.skipif(not workers._pdeathsig_prefix(), reason="needs Linux setpriv --pdeathsig")
def test_worker_dies_with_a_sigkilled_parent(tmp_path):
    service = _start_worker_module(workers.pick_unused_port(), tmp_path / "worker.log")
    found = []
    try:
        assert b"serving port" in _read_until(service.stderr, b"serving port", 60)
        found = _identities(workers.worker_descendants(service.pid))
        assert workers
        service.kill()  # no handler, no atexit: only the parent-death signal is left
        service.communicate(timeout=30)
        assert not _survivors(found)
    finally:
        _kill(found)


def test_worker_module_refuses_a_port_in_use(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        service = _start_worker_module(sock.getsockname()[1], tmp_path / "worker.log")
        _, err = service.communicate(timeout=60)
    assert service.returncode == 1
    assert b"already in use" in err


def test_worker_module_rejects_a_bad_port(tmp_path):
    service = _start_worker_module(70000, tmp_path / "worker.log")
    _, err = service.communicate(timeout=60)
    assert service.returncode == 2
    assert b"--port=70000: expected an integer TCP port" in err


# ----------------------------------------------------------------------------
# Contexts in this process: local vs remote give the same FedAvg round.


@pytest.fixture(scope="module")
def tff():
    import tensorflow_federated

    return tensorflow_federated


@pytest.fixture(scope="module")
def two_workers():
    processes, addresses = [], []
    for _ in range(2):  # one after the other, so the second probe sees the first port taken
        port = workers.pick_unused_port()
        processes.append(workers.start_worker_process(port))
        addresses.append(f"127.0.0.1:{port}")
    yield addresses
    for process in processes:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def fedavg(tff):
    """A FedAvg process on a 4 -> 3 softmax model, 5 clients of 10 examples, one local round."""
    import tensorflow as tf

    def model_fn():
        keras_model = tf.keras.Sequential(
            [tf.keras.layers.InputLayer(input_shape=(4,)), tf.keras.layers.Dense(3)]
        )
        return tff.learning.models.from_keras_model(
            keras_model,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=(tf.TensorSpec([None, 4], tf.float32), tf.TensorSpec([None], tf.int32)),
        )

    def client_data(seed):
        rng = np.random.default_rng(seed)
        features = rng.normal(size=(10, 4)).astype(np.float32)
        labels = rng.integers(0, 3, size=10).astype(np.int32)
        return tf.data.Dataset.from_tensor_slices((features, labels)).batch(4)

    process = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn, client_optimizer_fn=tff.learning.optimizers.build_sgdm(learning_rate=0.5)
    )
    clients = [client_data(seed) for seed in range(5)]
    contexts.set_local_context()
    state = process.initialize()
    local = process.next(state, clients)
    return process, state, clients, local


def _trainable(output) -> list[np.ndarray]:
    return [np.asarray(w) for w in output.state.global_model_weights.trainable]


@pytest.mark.parametrize("num_workers", [1, 2])
def test_remote_round_matches_local(tff, two_workers, fedavg, num_workers):
    process, state, clients, local = fedavg
    context = contexts.set_remote_context(two_workers[:num_workers], connect_timeout_s=10)
    expected_type = (
        tff.framework.SyncExecutionContext
        if num_workers == 1
        else tff.framework.MergeableCompExecutionContext
    )
    assert isinstance(context, expected_type)

    remote = process.next(state, clients)

    initial = [np.asarray(w) for w in state.global_model_weights.trainable]
    assert any(not np.allclose(a, b) for a, b in zip(_trainable(local), initial, strict=True))
    for got, want in zip(_trainable(remote), _trainable(local), strict=True):
        np.testing.assert_allclose(got, want, atol=1e-5)
    train = "client_work", "train", "num_examples"
    assert remote.metrics[train[0]][train[1]][train[2]] == 50
    assert local.metrics[train[0]][train[1]][train[2]] == 50


def test_unreachable_address_fails_fast_naming_it(two_workers):
    dead = f"127.0.0.1:{workers.pick_unused_port()}"
    start = time.monotonic()
    with pytest.raises(contexts.WorkerUnreachableError) as error:
        contexts.set_remote_context([two_workers[0], dead], connect_timeout_s=1.0)
    assert time.monotonic() - start < 5
    message = str(error.value)
    assert "\n" not in message
    assert dead in message and two_workers[0] not in message


def test_async_local_context_serves_tff_programs(tff):
    context = contexts.set_local_context(asynchronous=True, default_num_clients=3)
    assert isinstance(context, tff.program.NativeFederatedContext)

    @tff.federated_computation()
    def count_clients():
        return tff.federated_sum(tff.federated_value(1, tff.CLIENTS))

    async def program():  # tff.program contexts run inside an event loop
        return await tff.program.materialize_value(count_clients())

    assert asyncio.run(program()) == 3  # the cardinality came from default_num_clients


def test_local_context_restarts_a_dead_worker(tff):
    before = {p.pid for p in workers.worker_descendants()}
    contexts.set_local_context()
    (worker,) = [p for p in workers.worker_descendants() if p.pid not in before]

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(values):
        return tff.federated_mean(values)

    assert mean([1.0, 3.0]) == 2.0
    worker.kill()
    worker.wait(timeout=10)
    assert mean([2.0, 4.0]) == 3.0  # TFF retries; the stack is rebuilt on a new worker
    assert not worker.is_running()


def test_remote_worker_that_dies_raises_instead_of_retrying_forever(tff):
    port = workers.pick_unused_port()
    worker = workers.start_worker_process(port)
    address = f"127.0.0.1:{port}"
    try:
        contexts.set_remote_context([address], connect_timeout_s=1.0)

        @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
        def mean(values):
            return tff.federated_mean(values)

        assert mean([1.0, 3.0]) == 2.0
        worker.kill()
        worker.wait(timeout=10)
        start = time.monotonic()
        # TFF alone would retry UNAVAILABLE forever.
        with pytest.raises(contexts.WorkerUnreachableError, match=address):
            mean([1.0, 3.0])
        assert time.monotonic() - start < 10
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(timeout=10)


# ----------------------------------------------------------------------------
# Interrupts: the handlers only record and raise; a swallowed interrupt is
# raised again; nothing restarts a worker during shutdown; a restarted worker
# leaves no executor on the dead one (issue 15).

_HANDLER_SCRIPT = textwrap.dedent(
    """
    import json, os, signal
    from fedprune.runtime import interrupts, workers

    interrupts.install_worker_cleanup()
    worker = workers.start_worker_process(workers.pick_unused_port())
    result = {"own_group": os.getpgid(worker.pid) != os.getpgid(0)}
    for name in ("SIGINT", "SIGTERM"):
        try:
            os.kill(os.getpid(), getattr(signal, name))
            for _ in range(10**6):  # the handler runs between bytecodes, i.e. here
                pass
            result[name] = "not raised"
        except KeyboardInterrupt as e:
            result[name] = [type(e).__name__, interrupts.interrupt_signal(), worker.poll() is None]
        except interrupts.Terminated as e:
            result[name] = [type(e).__name__, e.code, interrupts.interrupt_signal(),
                            worker.poll() is None]
        interrupts.clear_interrupt()

    # Inside deferred_interrupts() the handler only records; the block's end raises.
    try:
        with interrupts.deferred_interrupts():
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):
                pass
            result["deferred"] = ["not raised inside", interrupts.interrupt_signal()]
    except KeyboardInterrupt:
        result["deferred"].append("raised at the end")
    interrupts.clear_interrupt()
    # ... except inside interruptible() (waiting on the worker): raised at once.
    try:
        with interrupts.deferred_interrupts():
            with interrupts.interruptible():
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):
                    pass
                result["interruptible"] = "not raised"
    except interrupts.Terminated:
        result["interruptible"] = "raised at once"
    print(json.dumps(result))
    """
)


def test_interrupt_handlers_only_record_and_raise(tmp_path):
    """The worker leads its own process group and survives both handlers.

    The handlers raise at once, except inside `deferred_interrupts()` (outside
    an `interruptible()` block), where the block's end raises.

    Stopping it is the exit path's job (atexit, or a driver's `_exit_interrupted`),
    not the handler's: a handler that stopped it left a dead worker behind
    whenever its exception was swallowed.
    """
    import json

    script = tmp_path / "handlers.py"
    script.write_text(_HANDLER_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=_child_env(), timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr == ""
    assert json.loads(result.stdout) == {
        "own_group": True,
        "SIGINT": ["KeyboardInterrupt", signal.SIGINT, True],
        "SIGTERM": ["Terminated", 128 + signal.SIGTERM, signal.SIGTERM, True],
        "deferred": ["not raised inside", signal.SIGINT, "raised at the end"],
        "interruptible": "raised at once",
    }


_FINALIZER_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from fedprune.runtime import interrupts

    if sys.argv[1] == "installed":
        interrupts.install_worker_cleanup()


    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(10**6):  # the KeyboardInterrupt is raised in here
                pass


    Finalized()  # dropped at once: Python swallows what its __del__ raises
    print("carried on", flush=True)
    try:
        interrupts.raise_if_interrupted()
        print("not raised again")
    except KeyboardInterrupt:
        print("raised again")
    """
)


@pytest.mark.parametrize(("handlers", "stdout", "reported"), [
    ("installed", "carried on\nraised again\n", False),
    # Control: Python's own handler; the interrupt is lost and "Exception ignored" printed.
    ("default", "carried on\nnot raised again\n", True),
])
def test_interrupt_swallowed_by_a_finalizer_is_raised_again(tmp_path, handlers, stdout,
                                                             reported):
    script = tmp_path / "finalizer.py"
    script.write_text(_FINALIZER_SCRIPT)
    result = subprocess.run([sys.executable, str(script), handlers], capture_output=True,
                            text=True, env=_child_env(), timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout == stdout
    assert ("Exception ignored" in result.stderr) is reported, result.stderr


_NATIVE_EXIT_SCRIPT = textwrap.dedent(
    """
    import ctypes, os, signal, sys
    from experiments import common
    from fedprune.runtime import interrupts


    def main(argv):
        with interrupts.deferred_interrupts():  # recorded, raised at the block's end
            os.kill(os.getpid(), signal.SIGTERM)
            if PATH == "native":
                # Native code running Python that raises the interrupt, and reporting it
                # with PyErr_Print (PyRun_SimpleString does): on a SystemExit the
                # interpreter exits at once, status 143, without unwinding to `run`.
                ctypes.pythonapi.PyRun_SimpleString(
                    b"from fedprune.runtime import interrupts; interrupts.raise_if_interrupted()")
                print("not reached", flush=True)
            if PATH == "converted":
                # Native code that turns the interrupt into another error: pybind11 raises
                # `ImportError: initialization failed` for an exception in a module's init.
                try:
                    interrupts.raise_if_interrupted()
                except BaseException as e:
                    raise ImportError("initialization failed") from e
        return 0


    PATH = sys.argv.pop(1)
    common.run(main)
    """
)


@pytest.mark.parametrize("path", ["native", "python", "converted"])
def test_sigterm_that_skips_the_driver_handler_still_reports_one_line(tmp_path, path):
    """Status 143 and the one interrupt line, whether the interrupt unwinds to `common.run`
    (python), native code ends the interpreter on it (native: before the fix, status 143
    and an empty stderr, seen once in tests/test_interrupts_random.py), or native code
    turns it into another error (converted: before the fix, status 1 and a traceback of
    `ImportError: initialization failed`, seen once there when SIGTERM hit the TF import)."""
    script = tmp_path / "native_exit.py"
    script.write_text(_NATIVE_EXIT_SCRIPT)
    result = subprocess.run([sys.executable, str(script), path], capture_output=True,
                            text=True, env=_child_env(), timeout=CHILD_TIMEOUT_S)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr[-2000:]
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "interrupted (SIGTERM); completed rounds are kept: rerun with --resume to continue"]


_EXIT_SCRIPT = textwrap.dedent(
    """
    import atexit, sys
    from experiments import common


    class Finalized:
        def __del__(self):  # runs in the interpreter's teardown, which `common.run` skips
            print("finalized", flush=True)


    KEEP = Finalized()
    atexit.register(lambda: print("atexit hook ran", flush=True))


    def main(argv):
        print("main ran", flush=True)
        if HOW == "return":
            return 3
        if HOW == "fail":
            common.fail("--x=1: expected y")
        raise ValueError("boom")


    HOW = sys.argv.pop(1)
    common.run(main)
    """
)


@pytest.mark.parametrize(("how", "status", "stderr_tail"), [
    ("return", 3, []),
    ("fail", 2, ["error: --x=1: expected y"]),
    ("raise", 1, ["ValueError: boom"]),
])
def test_driver_exits_with_its_status_after_atexit_without_teardown(tmp_path, how, status,
                                                                    stderr_tail):
    """`common.run` ends by `os._exit` after the atexit hooks: the status main gave, no
    finalizers (the interpreter's teardown crashed with SIGSEGV once after a complete run)."""
    script = tmp_path / "exit.py"
    script.write_text(_EXIT_SCRIPT)
    result = subprocess.run([sys.executable, str(script), how], capture_output=True,
                            text=True, env=_child_env(), timeout=CHILD_TIMEOUT_S)
    assert result.returncode == status, result.stderr[-2000:]
    assert result.stdout == "main ran\natexit hook ran\n"  # and no "finalized"
    lines = result.stderr.splitlines()
    assert lines[len(lines) - len(stderr_tail):] == stderr_tail
    assert ("Traceback (most recent call last):" in result.stderr) is (how == "raise")


def _new_worker(before: set[int]) -> psutil.Process:
    (worker,) = [p for p in workers.worker_descendants() if p.pid not in before]
    return worker


def test_no_worker_is_restarted_once_shutdown_has_begun(tff, monkeypatch):
    """After `begin_shutdown` a call that needs the dead worker fails; none is started."""
    before = {p.pid for p in workers.worker_descendants()}
    contexts.set_local_context()
    worker = _new_worker(before)

    @tff.federated_computation(tff.FederatedType(np.float32, tff.CLIENTS))
    def mean(values):
        return tff.federated_mean(values)

    assert mean([1.0, 3.0]) == 2.0
    try:
        monkeypatch.setattr(interrupts, "_shutting_down", True)  # what begin_shutdown() sets
        worker.kill()
        worker.wait(timeout=10)
        with pytest.raises(interrupts.ShutdownInProgress, match="exiting"):
            mean([1.0, 3.0])
        assert [p.pid for p in workers.worker_descendants() if p.pid not in before] == []
    finally:
        monkeypatch.undo()
        contexts.set_local_context()  # a live context for the tests after this one


@pytest.mark.parametrize("first", ["next", "get_model_weights"])
def test_killed_worker_then_next_and_get_model_weights_recover(tff, fedavg, first):
    """Both calls, in either order, run on the restarted worker with the same results.

    `next` (CLIENTS = 5) and `get_model_weights` (no clients) use two cached
    executors. TFF rebuilds only the one whose call failed; before every cached
    executor was dropped on a restart, the other one still held the dead
    worker's closed channel: `ValueError: Cannot invoke RPC on closed channel!`.
    """
    process, state, clients, local = fedavg
    before = {p.pid for p in workers.worker_descendants()}
    contexts.set_local_context()
    worker = _new_worker(before)
    process.get_model_weights(process.next(state, clients).state)  # both executors cached
    worker.kill()
    worker.wait(timeout=10)
    calls = {
        "next": lambda: _trainable(process.next(state, clients)),
        "get_model_weights": lambda: [
            np.asarray(w) for w in process.get_model_weights(local.state).trainable],
    }
    results = {first: calls[first]()}
    results.update({name: call() for name, call in calls.items() if name not in results})
    for got, want in zip(results["next"], _trainable(local), strict=True):
        np.testing.assert_array_equal(got, want)
    for got, want in zip(results["get_model_weights"], _trainable(local), strict=True):
        np.testing.assert_array_equal(got, want)
    assert len([p for p in workers.worker_descendants() if p.pid not in before]) == 1
