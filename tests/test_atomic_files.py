"""Tests for fedprune.outputs.atomic_files: atomic writes, JSON/CSV formats, leftovers."""

import csv
import json
import math
import os

import numpy as np
import pytest

from fedprune.outputs import atomic_files


class TestAtomicWrites:
    def test_text_replaces_and_leaves_no_temp_file(self, tmp_path):
        path = tmp_path / "notes.txt"
        path.write_text("old")
        assert atomic_files.atomic_write_text(path, "new\nline\n") == path
        assert path.read_text() == "new\nline\n"
        assert os.listdir(tmp_path) == ["notes.txt"]

    def test_new_file_has_default_permissions(self, tmp_path):
        umask = os.umask(0o022)
        try:
            path = atomic_files.atomic_write_text(tmp_path / "a.txt", "x")
        finally:
            os.umask(umask)
        assert path.stat().st_mode & 0o777 == 0o644  # 0o666 minus the umask, like open()

    def test_json_format(self, tmp_path):
        path = tmp_path / "config.json"
        atomic_files.atomic_write_json(
            path, {"b": np.float32(0.5), "a": [1, np.int64(2)], "c": np.arange(2)}
        )
        assert path.read_text() == (
            '{\n  "a": [\n    1,\n    2\n  ],\n  "b": 0.5,\n  "c": [\n    0,\n    1\n  ]\n}\n'
        )

    @pytest.mark.parametrize("bad", [math.nan, math.inf, np.float32("nan")])
    def test_json_nan_keeps_the_previous_file(self, tmp_path, bad):
        path = tmp_path / "metrics.json"
        atomic_files.atomic_write_json(path, {"accuracy": 0.9})
        before = path.read_text()
        with pytest.raises(ValueError):
            atomic_files.atomic_write_json(path, {"accuracy": bad})
        assert path.read_text() == before
        assert os.listdir(tmp_path) == ["metrics.json"]

    def test_failure_while_writing_keeps_the_previous_file(self, tmp_path, monkeypatch):
        path = tmp_path / "metrics.csv"
        atomic_files.atomic_write_text(path, "round\n1\n")

        def failing_fsync(fd):
            raise OSError("disk full")

        monkeypatch.setattr(atomic_files.os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            atomic_files.atomic_write_text(path, "round\n1\n2\n")
        assert path.read_text() == "round\n1\n"
        assert os.listdir(tmp_path) == ["metrics.csv"]

    def test_csv_round_trip_is_exact(self, tmp_path):
        path = tmp_path / "metrics.csv"
        rows = [
            {"round": 1, "test_accuracy": 0.1 + 0.2, "bytes_up": 123456},
            {"round": 2, "test_accuracy": 1 / 3},  # bytes_up missing: empty cell
        ]
        atomic_files.atomic_write_csv(path, rows, ["round", "test_accuracy", "bytes_up"])
        assert path.read_text().splitlines()[0] == "round,test_accuracy,bytes_up"
        back = list(csv.DictReader(path.open()))
        assert [float(r["test_accuracy"]) for r in back] == [0.1 + 0.2, 1 / 3]
        assert [r["bytes_up"] for r in back] == ["123456", ""]

    def test_csv_unknown_key_keeps_the_previous_file(self, tmp_path):
        path = tmp_path / "metrics.csv"
        atomic_files.atomic_write_csv(path, [{"round": 1}], ["round"])
        before = path.read_text()
        with pytest.raises(ValueError):
            atomic_files.atomic_write_csv(path, [{"round": 2, "typo": 0}], ["round"])
        assert path.read_text() == before
        assert os.listdir(tmp_path) == ["metrics.csv"]

    def test_writer_and_path_replace_atomically_and_clean_up(self, tmp_path):
        path = tmp_path / "state.bin"
        with atomic_files.atomic_writer(path) as f:
            f.write(b"one")
        with pytest.raises(RuntimeError), atomic_files.atomic_writer(path) as f:
            f.write(b"partial")
            raise RuntimeError("killed")
        assert path.read_bytes() == b"one"
        with atomic_files.atomic_path(tmp_path / "model.h5") as tmp:
            assert tmp.suffix == ".h5" and tmp.name.startswith(".tmp")
            tmp.write_bytes(b"h5")
        assert (tmp_path / "model.h5").read_bytes() == b"h5"
        assert sorted(os.listdir(tmp_path)) == ["model.h5", "state.bin"]


def test_json_loads_back(tmp_path):
    obj = {"z": {"b": 1, "a": [0.25, None, "s"]}, "a": True}
    path = atomic_files.atomic_write_json(tmp_path / "x.json", obj)
    assert json.loads(path.read_text()) == obj
