"""Giving the Python process's free heap pages back to the OS between rounds (glibc).

Each round the Python process builds and serializes its clients' datasets
(TFF copies a client's whole data into the dataset's graph, then into the
gRPC message: megabytes for a large Synthetic client), from the main thread
and from gRPC's. glibc's malloc serves these from several arenas and returns
free memory to the OS only from the top of each heap, so the free space left
between live blocks stays resident and the Python process's anonymous RSS
crept up by ~0.07 MiB a round at 1,000 Synthetic clients and 100 per round
while the memory in use stayed flat (issue 18; BUILD_NOTES.md, "Python
process memory"). `release_free_heap` (glibc's `malloc_trim(0)`: every
arena's whole free pages are handed back with `madvise`, no block moves) runs
from `assembly.round_inputs`, at most once a second (`ROUND_TRIM_INTERVAL_S`).
The TFF worker, where no Python runs, gets the same from `runtime.worker_heap`.

`FEDPRUNE_MALLOC_TRIM=0` turns off both (e.g. to measure without them); other C
libraries (no `malloc_trim`) and other systems are left alone.

Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import time

TRIM_ENV = "FEDPRUNE_MALLOC_TRIM"


@functools.cache
def _malloc_trim():
    """glibc's `malloc_trim`, or None (turned off, or not glibc on Linux)."""
    if not sys.platform.startswith("linux") or os.environ.get(TRIM_ENV, "1") == "0":
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


# Seconds between two trims during a run: `round_inputs` asks for one every
# round, with this as `min_interval_s`. A trim hands back pages that the next
# round touches again, and the next `process.next` pays for faulting them in:
# on the default experiment (10 digits clients a round, ~60 ms rounds) rounds
# took 72-85 ms with a trim of both processes every round against 63 ms
# without (BUILD_NOTES.md, "Python process memory"). Rounds of a second or
# more still trim every round.
ROUND_TRIM_INTERVAL_S = 1.0


class Pacer:
    """Lets each key go ahead at most once per interval (seconds on `clock`).

    What both heap trims use: this process's (`release_free_heap`) and the
    workers' (`worker_heap.release_worker_heaps`, one key per worker pid).
    """

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._last: dict = {}  # key -> clock() when it last went ahead

    def go(self, key, min_interval_s: float) -> bool:
        """True (and remembers now) unless `key` went ahead less than `min_interval_s` ago."""
        now = self._clock()
        if min_interval_s > 0 and now - self._last.get(key, -math.inf) < min_interval_s:
            return False
        self._last[key] = now
        return True


_trims = Pacer()  # this process's trims, under one key


def release_free_heap(*, min_interval_s: float = 0.0) -> bool:
    """Returns malloc's free whole pages to the OS; True if it did (glibc, not turned off).

    Live memory is untouched, so results are the same; it costs one walk of
    malloc's free lists (about a millisecond with a few hundred MiB free),
    and the pages handed back are faulted in again when next used.

    Args:
      min_interval_s: skip (return False) when this process trimmed less than
        this many seconds ago (`ROUND_TRIM_INTERVAL_S` for the per-round call).
    """
    trim = _malloc_trim()
    if trim is None:
        return False
    if not _trims.go("python", min_interval_s):
        return False
    trim(0)
    return True
