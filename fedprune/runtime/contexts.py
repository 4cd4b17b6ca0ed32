"""Execution contexts: TFF contexts over workers we start or that run elsewhere.

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

Importing this module is cheap (standard library only); TensorFlow, TFF and
gRPC are imported by the functions that need them.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Sequence

from fedprune.errors import InvalidArgument
from fedprune.runtime import channels, interrupts, workers
from fedprune.runtime.channels import WorkerUnreachableError  # noqa: F401 (what contexts raise)

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------
# Execution contexts.

# How many values the Python side lets go before it tells the worker to free them
# (one `Dispose` call). TFF's default, 20, is four rounds of a learning process
# (5 values each), so the worker held the client data of up to three past
# rounds: at 1,000 Synthetic clients and 100 per round its memory in use after
# a round cycled 58 -> 80 -> 106 -> 131 MiB with a period of exactly four
# rounds. With 5, one Dispose call a round, it stayed at 56-63 MiB. A call costs
# ~1 ms at 10 clients per round, so 1 (five calls a round) would cost ~5 ms
# (BUILD_NOTES.md, "Worker memory").
DISPOSE_BATCH_SIZE = 5


def _stack_fn(get_stub, *, default_num_clients: int, stream_structs: bool):
    """The executor-stack function TFF's `local_cpp_executor_factory` uses, over `get_stub`."""
    import tensorflow_federated as tff

    def stack_fn(cardinalities):
        cardinalities = dict(cardinalities)
        # Without an explicit CLIENTS cardinality the C++ worker rejects even
        # computations that place nothing at clients.
        if cardinalities.get(tff.CLIENTS) is None:
            cardinalities[tff.CLIENTS] = default_num_clients
        executor = tff.framework.RemoteExecutor(get_stub(), dispose_batch_size=DISPOSE_BATCH_SIZE,
                                                stream_structs=stream_structs)
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
            port = workers.pick_unused_port()
            try:
                self.process = workers.start_worker_process(
                    port,
                    log_path=self._log_path,
                    max_concurrent_computation_calls=self._max_calls,
                )
                break
            except workers.WorkerStartError as e:
                error = e
        else:
            raise error
        self.address = f"localhost:{port}"
        self._channel = channels.open_channel(self.address)
        if channels.wait_ready({self.address: self._channel}, 30.0):
            self.close()
            raise workers.WorkerStartError(
                f"local TFF worker on port {port} refused gRPC connections")
        self._stub = tff.framework.RemoteExecutorGrpcStub(self._channel)

    def get_stub(self):
        with self._lock:
            if self.process is None or self.process.poll() is not None:
                if interrupts.shutting_down():
                    raise interrupts.ShutdownInProgress(
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
            channels.close_channel(self._channel)
            self._channel = None
        if self.process is not None:
            workers.stop_popen(self.process, workers.STOP_GRACE_S)


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
    interrupts.install_worker_cleanup()
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
    by_address = {address: channels.open_channel(address) for address in addresses}
    try:
        unreachable = channels.wait_ready(by_address, timeout_s)
    finally:
        for ch in by_address.values():
            channels.close_channel(ch)
    if unreachable:
        raise channels.unreachable_error(unreachable, timeout_s)


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
    by_address = {address: channels.open_channel(address) for address in addresses}
    unreachable = channels.wait_ready(by_address, connect_timeout_s)
    if unreachable:
        for ch in by_address.values():
            channels.close_channel(ch)
        raise channels.unreachable_error(unreachable, connect_timeout_s)

    import tensorflow_federated as tff

    def factory_for(address):
        channel = by_address[address]
        stub = tff.framework.RemoteExecutorGrpcStub(channel)

        def get_stub():
            # Called when TFF (re)builds the executor, i.e. first use and after
            # a failed call: turn a dead worker into an error, not endless retries.
            if channels.wait_ready({address: channel}, connect_timeout_s):
                raise channels.unreachable_error([address], connect_timeout_s)
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
