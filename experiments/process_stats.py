"""Measurements for the benchmark's sections, and how their tables summarize them.

CPU seconds, RSS, peak RSS and malloc arenas of this process and of the TFF
`worker_binary` processes it started (psutil and /proc, imported by the
functions that need them); `median_range` and `format_seconds` for the tables.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path


def worker_processes():
    from fedprune.runtime import workers

    return workers.worker_descendants()


def cpu_seconds() -> tuple[float, float]:
    """(this process, its TFF workers): user + system CPU seconds so far."""
    import psutil

    own = psutil.Process().cpu_times()
    worker = 0.0
    for proc in worker_processes():
        try:
            t = proc.cpu_times()
            worker += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system, worker


def malloc_settings(workers) -> str:
    """The glibc `MALLOC_*` variables in the workers' environment, e.g. "MALLOC_ARENA_MAX=2".

    Comma-separated in name order; "none" when there are none (glibc's defaults),
    "unknown" when no worker's environment can be read.
    """
    import psutil

    for proc in workers:
        try:
            environ = proc.environ()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        return ", ".join(f"{k}={v}" for k, v in sorted(environ.items())
                         if k.startswith("MALLOC_")) or "none"
    return "unknown"


def rss(proc) -> int:
    import psutil

    try:
        return proc.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def _status_kib(proc, field: str) -> int | None:
    """A `kB` field of Linux's /proc/PID/status in bytes, or None where there is none."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def anon_rss(proc) -> int:
    """Anonymous resident memory in bytes (Linux RssAnon; elsewhere the whole RSS).

    RSS less the file-backed pages (shared libraries' code, memory-mapped files),
    which the kernel may drop and reload at will; heap growth, a leak included,
    is anonymous.
    """
    anon = _status_kib(proc, "RssAnon")
    return rss(proc) if anon is None else anon


def peak_rss(proc) -> int:
    """Peak RSS in bytes (Linux VmHWM; elsewhere the current RSS)."""
    peak = _status_kib(proc, "VmHWM")
    return rss(proc) if peak is None else peak


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of `values`."""
    return statistics.median(values), min(values), max(values)


def median_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free confidence interval of the median.

    The interval is (x_(k), x_(n-k+1)) of the sorted values, k the largest
    whole number with P(Binomial(n, 1/2) <= k - 1) <= (1 - confidence) / 2
    (e.g. n = 20: the 6th and 15th smallest, 95.9 % coverage). With too few
    values for that confidence (n <= 5 at 95 %) it is their whole range.
    """
    import math

    xs = sorted(values)
    n = len(xs)
    tail, cdf, k = (1 - confidence) / 2, 0.0, 0
    for i in range(n + 1):
        cdf += math.comb(n, i) / 2**n
        if cdf > tail:
            break
        k = i + 1
    if k == 0:
        return statistics.median(xs), xs[0], xs[-1]
    return statistics.median(xs), xs[k - 1], xs[n - k]


def format_seconds(x: float) -> str:
    return f"{x:.3f}"


class LoadSampler:
    """The machine's mean 1-minute load average over a stretch of time.

    Samples `os.getloadavg()[0]` at `start`, every `interval_s` seconds from a
    daemon thread, and at `stop`: the load during a long run, not only at its
    end (a benchmark section, a `reproduce` invocation).
    """

    def __init__(self, interval_s: float = 5.0):
        import threading

        self._interval_s = interval_s
        self._samples: list[float] = []
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import os

        while not self._stopped.wait(self._interval_s):
            self._samples.append(os.getloadavg()[0])

    def start(self) -> LoadSampler:
        import os

        self._samples.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def stop(self) -> float:
        """Stops sampling; returns the mean of the samples."""
        import os

        self._stopped.set()
        self._thread.join()
        self._samples.append(os.getloadavg()[0])
        return statistics.fmean(self._samples)
