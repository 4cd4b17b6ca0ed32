"""The order test files go to xdist's workers (`tests/scheduling.py`)."""

from __future__ import annotations

import json

import pytest
import scheduling

IDS = ["tests/test_a.py::t1", "tests/test_a.py::t2[x]", "tests/test_b.py::t1",
       "tests/test_c.py::t1", "tests/test_c.py::t2", "tests/test_d.py::t1"]


@pytest.mark.parametrize("seconds,want", [
    # Longest file first; a file's tests together and in their order.
    ({"tests/test_a.py": 1, "tests/test_b.py": 5, "tests/test_c.py": 3, "tests/test_d.py": 2},
     [2, 3, 4, 5, 0, 1]),
    # Ties keep the collection order.
    ({"tests/test_a.py": 2, "tests/test_b.py": 2, "tests/test_c.py": 2, "tests/test_d.py": 9},
     [5, 0, 1, 2, 3, 4]),
    # A file without an entry counts as the mean file (here (1 + 9 + 2) / 3 = 4).
    ({"tests/test_a.py": 1, "tests/test_b.py": 9, "tests/test_d.py": 2}, [2, 3, 4, 5, 0, 1]),
    # No entries at all: the collection order.
    ({}, [0, 1, 2, 3, 4, 5]),
])
def test_longest_first(seconds, want):
    assert scheduling.longest_first(IDS, seconds) == want


def test_merged_file_seconds_sums_phases_of_files_that_ran_and_keeps_the_rest():
    old = {"tests/test_a.py": 10.0, "tests/test_b.py": 20.0, "tests/test_gone.py": 5.0}
    durations = [("tests/test_b.py::t1", 1.04), ("tests/test_b.py::t1", 2.0),
                 ("tests/test_b.py::t2[p::q]", 0.5), ("tests/test_c.py::t1", 0.25)]
    existing = ["tests/test_a.py", "tests/test_b.py", "tests/test_c.py"]
    assert scheduling.merged_file_seconds(old, durations, existing) == {
        "tests/test_a.py": 10.0, "tests/test_b.py": 3.5, "tests/test_c.py": 0.2}


def test_file_seconds_round_trip_and_cover_every_test_file(tmp_path):
    path = tmp_path / "seconds.json"
    assert scheduling.read_file_seconds(path) == {}
    scheduling.write_file_seconds({"tests/test_a.py": 1.5}, path)
    assert json.loads(path.read_text()) == {"tests/test_a.py": 1.5}
    assert scheduling.read_file_seconds(path) == {"tests/test_a.py": 1.5}
    assert [p.name for p in tmp_path.iterdir()] == ["seconds.json"]  # no temporary left
    checked_in = scheduling.read_file_seconds()
    files = {f"tests/{p.name}" for p in scheduling.FILE_SECONDS.parent.glob("test_*.py")}
    assert set(checked_in) <= files
    assert sum(checked_in.values()) > 600  # a full run's seconds, not a partial one
