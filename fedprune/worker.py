"""Serve TFF's C++ worker for `set_remote_context`: `python -m fedprune.worker --port=N`.

    python -m fedprune.worker --port=8000 [--log_file=PATH]
        [--max_concurrent_computation_calls=-1]

Runs the `worker_binary` shipped inside the installed TFF package, with its
output in `--log_file` (default: `<tmpdir>/fedprune_worker_<port>.log`), and
stays in the foreground until SIGTERM or SIGINT, which it forwards to the
binary (SIGKILL after a few seconds if that does not stop it); it then exits
with status 0. If the binary dies by itself, this exits non-zero. On Linux the
binary also dies if this process is SIGKILLed (see `runtime.workers.start_worker_process`).
Like every worker fedprune starts, it runs with glibc's malloc arenas capped
(`MALLOC_ARENA_MAX` = usable cores, at least 2) and blocks of 1 MiB or more
mapped on their own (`MALLOC_MMAP_THRESHOLD_`), each unless the environment
sets it (`FEDPRUNE_WORKER_MALLOC=glibc` keeps glibc's defaults): see
`runtime.workers.worker_environment`.
A port already in use is refused: gRPC's SO_REUSEPORT would otherwise let two
workers share it and split the calls between them.

SECURITY: the service speaks unauthenticated, unencrypted gRPC and executes any
TFF computation it is sent. `worker_binary` has no bind-address flag -- it
always listens on all interfaces (`[::]:PORT`), so there is no loopback-only
mode. Run it only on a trusted host or private network, or firewall the port.

Flags are parsed with argparse, not absl: this module lives in the library
package, and absl's global flag registry would clash with the drivers' flags
when both are imported. It never imports TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
from pathlib import Path

from fedprune.errors import InvalidArgument
from fedprune.runtime import workers

_PROG = "fedprune.worker"


class _StopRequested(Exception):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _request_stop(signum, frame):
    del frame
    # A second signal during shutdown must not interrupt the shutdown itself.
    for other in (signal.SIGTERM, signal.SIGINT):
        signal.signal(other, signal.SIG_IGN)
    raise _StopRequested(signum)


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog=f"python -m {_PROG}",
        description="Serve TFF's C++ worker (unauthenticated gRPC on ALL interfaces).",
    )
    parser.add_argument("--port", type=int, required=True, help="TCP port, 1..65535")
    parser.add_argument(
        "--log_file",
        default=None,
        help="file for the worker's output (default: <tmpdir>/fedprune_worker_<port>.log)",
    )
    parser.add_argument(
        "--max_concurrent_computation_calls",
        type=int,
        default=-1,
        help="limit on parallel calls of one computation (non-positive: none)",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.port <= 65535:
        parser.error(str(InvalidArgument("port", args.port, "an integer TCP port in 1..65535")))
    if args.log_file is None:
        args.log_file = os.path.join(tempfile.gettempdir(), f"fedprune_worker_{args.port}.log")
    return args


def _say(message: str) -> None:
    print(f"{_PROG}: {message}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Runs the worker until a signal asks it to stop.

    Args:
      argv: command-line arguments without the program name (default: sys.argv[1:]).

    Returns:
      The exit status: 0 after SIGTERM/SIGINT, the binary's status (or 1) if it
      died by itself, 1 if it could not start.
    """
    args = _parse_args(argv)
    # Installed before the worker starts, so a signal during start-up still
    # reaches the `finally` below rather than leaving an orphan.
    previous_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for signum in previous_handlers:
        signal.signal(signum, _request_stop)
    process = None
    try:
        process = workers.start_worker_process(
            args.port,
            log_path=args.log_file,
            max_concurrent_computation_calls=args.max_concurrent_computation_calls,
        )
        _say(
            f"worker_binary pid {process.pid} serving port {args.port} on ALL interfaces "
            f"([::]:{args.port}); unauthenticated, insecure gRPC: keep it on a private "
            f"network. Log: {Path(args.log_file).resolve()}"
        )
        returncode = process.wait()
        _say(f"worker_binary exited by itself with status {returncode}")
        return returncode if returncode > 0 else 1
    except _StopRequested as stop:
        name = signal.Signals(stop.signum).name
        if process is not None and process.poll() is None:
            try:
                process.send_signal(stop.signum)
                process.wait(timeout=workers.STOP_GRACE_S)
            except Exception:  # the finally below kills it regardless
                pass
        _say(f"stopped on {name}")
        return 0
    except workers.WorkerStartError as e:
        _say(str(e))
        return 1
    finally:
        # Ignore further signals while tearing down, then make sure nothing we
        # started survives (also covers a signal that arrived mid-start).
        for signum in previous_handlers:
            signal.signal(signum, signal.SIG_IGN)
        workers.stop_workers()
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)


if __name__ == "__main__":
    sys.exit(main())
