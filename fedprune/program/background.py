"""One background thread for a run's per-round work that can overlap training.

While TFF's worker trains round r (the Python process mostly waits on it; the
worker uses about one core of two), `loop.py` has this thread build round
r + 1's client datasets (`assembly.round_inputs`) and write round r - 1's
outputs (metrics.csv, the checkpoint, TensorBoard). Jobs run one at a time in
the order they were submitted, so the writes of a round keep their order
(metrics.csv before the checkpoint) and rounds are written in order.

A job's exception is raised in the caller's thread by the next `check`,
`result` or `drain`; `drain` (and leaving the `with` block, whatever the exit
path: normal, exception, Ctrl-C, SIGTERM) waits for every job submitted so far,
so a run never returns or dies with a round's writes half done in memory. Jobs
do not receive signals (Python delivers them to the main thread only).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable


class Background:
    """A single worker thread running submitted jobs in order.

    Use as a context manager; `submit` returns a `concurrent.futures.Future`.
    """

    def __init__(self, name: str = "fedprune-background"):
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name)
        self._pending: list[concurrent.futures.Future] = []

    def __enter__(self) -> Background:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            # On an error the caller's exception wins; a job's own error is only
            # re-raised on the normal path.
            self.drain(raise_errors=exc_type is None)
        finally:
            self._executor.shutdown(wait=True)

    def submit(self, job: Callable, *args, **kwargs) -> concurrent.futures.Future:
        """Queues `job(*args, **kwargs)` after every job submitted before it."""
        self.check()
        future = self._executor.submit(job, *args, **kwargs)
        self._pending.append(future)
        return future

    def check(self) -> None:
        """Raises the exception of the first finished job that failed (and forgets done jobs)."""
        while self._pending and self._pending[0].done():
            self._pending.pop(0).result()

    def drain(self, *, raise_errors: bool = True) -> None:
        """Waits for every submitted job; raises the first failure (unless not `raise_errors`)."""
        first_error = None
        while self._pending:
            future = self._pending.pop(0)
            try:
                future.result()
            except Exception as e:  # noqa: BLE001 (re-raised below, or the caller's wins)
                first_error = first_error or e
        if first_error is not None and raise_errors:
            raise first_error
