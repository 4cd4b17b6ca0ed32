"""The order test files are handed to xdist's workers: the longest first.

`--dist loadfile` sends whole files to the workers, one at a time as they free
up. xdist's default order is by number of tests, most first, which put the
files with a few long end-to-end tests (tests/test_scale_out.py: 3 tests,
~100 s) last, where one worker ran them alone while the other had finished.
Handing out the longest files first (the longest-processing-time rule) leaves
the short ones for the end, so both workers finish close together. The lengths
are the seconds each file's tests took in a recent full run, kept in
tests/file_seconds.json and rewritten by `make test PYTEST_ARGS=--write-file-seconds`;
a stale or missing entry only costs balance, never a test.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path

from fedprune.outputs import atomic_files

FILE_SECONDS = Path(__file__).with_name("file_seconds.json")


def file_of(nodeid: str) -> str:
    """The file part of a pytest node id (`tests/test_x.py::test_y[1]` -> `tests/test_x.py`)."""
    return nodeid.split("::", 1)[0]


def longest_first(nodeids: Iterable[str], seconds: Mapping[str, float]) -> list[int]:
    """Indices of `nodeids` ordered by their file's `seconds`, longest first.

    A file missing from `seconds` counts as the mean file. The sort is stable:
    a file's tests keep their order and stay together, and files of equal
    length keep theirs.
    """
    nodeids = list(nodeids)
    default = statistics.fmean(seconds.values()) if seconds else 0.0
    return sorted(range(len(nodeids)),
                  key=lambda i: -seconds.get(file_of(nodeids[i]), default))


def read_file_seconds(path: Path = FILE_SECONDS) -> dict[str, float]:
    """{test file: seconds}, or {} without the file (or when it is unreadable)."""
    return atomic_files.read_json(path) or {}


def merged_file_seconds(old: Mapping[str, float], durations: Iterable[tuple[str, float]],
                        existing: Iterable[str]) -> dict[str, float]:
    """`old` updated with the summed `durations` ((node id, seconds) of every setup, call
    and teardown that ran) of the files that ran; files that did not run keep their
    entry, files no longer in `existing` (paths) are dropped. Rounded to 0.1 s, sorted."""
    ran: dict[str, float] = {}
    for nodeid, duration in durations:
        ran[file_of(nodeid)] = ran.get(file_of(nodeid), 0.0) + duration
    existing = set(existing)
    out = {name: value for name, value in {**old, **ran}.items() if name in existing}
    return {name: round(value, 1) for name, value in sorted(out.items())}


def write_file_seconds(seconds: Mapping[str, float], path: Path = FILE_SECONDS) -> None:
    """Writes `seconds` as JSON, atomically (`atomic_files.atomic_write_json`)."""
    atomic_files.atomic_write_json(path, dict(seconds))
