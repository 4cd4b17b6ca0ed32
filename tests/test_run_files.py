"""Tests for fedprune.outputs.run_files: a run's figures, titles, per-layer table, and
the README's description of metrics.csv."""

import re
from pathlib import Path

import numpy as np
import pytest

from fedprune.config import ExperimentConfig
from fedprune.federated import encodings
from fedprune.outputs import atomic_files, plots, run_files

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_readme_lists_every_metrics_column_in_order():
    readme = (REPO_ROOT / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if line.startswith("| `metrics.csv` |")]
    listed = re.search(r"one row per round: `([^`]*)`", row).group(1).split(", ")
    assert listed == list(run_files.METRIC_COLUMNS)
    assert "`sparsity/<layer>`" in row  # the per-layer columns after them


def test_layer_table_counts_kept_weights_and_the_stored_bytes():
    kernel = np.zeros((64, 4), np.float32)
    # 3 of 256 kept: a coordinate list (8 bytes each: 24) beats a bitmap (32 + 12) and dense
    kernel[0, :3] = 1.0
    bias = np.arange(1, 5, dtype=np.float32)  # all 4 nonzero: dense (16) beats a bitmap (17)
    rows = run_files.layer_table([("dense/kernel:0", kernel), ("dense/bias:0", bias)])
    assert rows == [
        {"name": "dense/kernel:0", "shape": [64, 4], "parameters": 256, "kept": 3,
         "sparsity": 1 - 3 / 256, "bytes_dense": 1024, "bytes_stored": 24, "encoding": "coo"},
        {"name": "dense/bias:0", "shape": [4], "parameters": 4, "kept": 4, "sparsity": 0.0,
         "bytes_dense": 16, "bytes_stored": 16, "encoding": "dense"},
    ]
    assert rows[0]["bytes_stored"] == encodings.expected_size(256, 3, encodings.COO)


@pytest.mark.parametrize("flags, title, window, target", [
    ({}, "digits, mlp: polynomial (p = 3), both; target 0.8, seed 0", (1, 20), 0.8),
    (dict(schedule="oneshot", begin_round=5, masking="server", final_sparsity=0.9, seed=2),
     "digits, mlp: oneshot, server; target 0.9, seed 2", (5, 5), 0.9),
    (dict(schedule="constant", begin_round=2, end_round=-1, rounds=12, power=2.0),
     "digits, mlp: constant, both; target 0.8, seed 0", (2, 12), 0.8),
    (dict(schedule="none", masking="none", seed=4), "digits, mlp: dense; seed 4",
     None, None),
])
def test_run_title_and_schedule_window(flags, title, window, target):
    config = ExperimentConfig(**flags).validate()
    assert run_files.run_title(config) == title
    assert run_files.schedule_window(config) == window
    assert run_files.schedule_target(config) == target


@pytest.mark.parametrize("flags, title", [
    ({}, "digits: 10 clients, dirichlet (α = 0.5)"),
    (dict(partition="shards", num_clients=20, clients_per_round=5),
     "digits: 20 clients, shards (2 shards per client)"),
    (dict(partition="iid"), "digits: 10 clients, iid"),
])
def test_partition_title(flags, title):
    assert run_files.partition_title(ExperimentConfig(**flags).validate()) == title


@pytest.mark.parametrize("flags, events", [
    ({}, {}),
    (dict(structure="neuron", masking="server", prune_output_layer=False),
     {"shrink after round 20": 20}),
    (dict(structure="neuron", masking="server", prune_output_layer=False, shrink_at_round=25),
     {"shrink after round 25": 25}),
    (dict(structure="neuron", masking="server", prune_output_layer=False, shrink_at_round=0),
     {}),
])
def test_curve_events_mark_the_shrink(flags, events):
    assert run_files.curve_events(ExperimentConfig(**flags).validate()) == events


def test_write_figures_from_metrics_rows(tmp_path):
    rows = [{"round": r, "test_accuracy": 0.5 + 0.01 * r, "train_accuracy": 0.5,
             "test_loss": 1 / r, "train_loss": 1 / r, "global_sparsity": min(0.04 * r, 0.8),
             "target_sparsity": min(0.04 * r, 0.8), "bytes_up": 1000, "bytes_down": 2000,
             "dense_bytes_up": 4000, "dense_bytes_down": 4000} for r in range(1, 31)]
    pngs = run_files.write_figures(ExperimentConfig().validate(), rows, tmp_path)
    assert pngs == [tmp_path / "curves.png", tmp_path / "bytes.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "bytes.pdf", "bytes.png", "curves.pdf", "curves.png"]
    assert all(p.stat().st_size > 10_000 for p in tmp_path.iterdir())
    assert plots.DPI >= 150


def test_read_metrics_renames_the_old_flops_column(tmp_path):
    atomic_files.atomic_write_csv(tmp_path / "metrics.csv",
                                  [{"round": 1, "flops_per_example": 9472}],
                                  ["round", "flops_per_example"])
    assert run_files.read_metrics(tmp_path) == [{"round": "1", "macs_per_example": "9472"}]


def _metrics_row(round_num: int, **extra) -> dict:
    return {"round": round_num, "test_accuracy": 0.5 + 0.01 * round_num, "train_loss": 1 / 3,
            "bytes_up": 1000 * round_num, **extra}


@pytest.mark.parametrize("writes, columns", [
    # one row more each round, the same objects: only the new row is formatted
    ("grow", list(run_files.METRIC_COLUMNS)),
    # a regrowth column from round 3 and per-layer columns from round 4: every line again
    ("new columns", [*run_files.METRIC_COLUMNS, "itop", "sparsity/a", "sparsity/b"]),
    # resumed after round 4: the rows read back from the file (other objects), then round 5
    ("resumed", list(run_files.METRIC_COLUMNS)),
])
def test_metrics_file_writes_what_one_csv_pass_writes(tmp_path, writes, columns):
    def columns_of(rows):  # metrics.csv's columns: METRIC_COLUMNS, regrowth's, per layer
        keys = {k for r in rows for k in r}
        return [*run_files.METRIC_COLUMNS, *(k for k in run_files.REGROW_COLUMNS if k in keys),
                *sorted(k for k in keys if k.startswith("sparsity/"))]

    rows = []
    metrics = run_files.MetricsFile(tmp_path)
    for round_num in range(1, 6):
        extra = {}
        if writes == "new columns" and round_num >= 3:
            extra["itop"] = 0.25
        if writes == "new columns" and round_num >= 4:
            extra.update({"sparsity/b": 0.5, "sparsity/a": float("nan")})
        if writes == "resumed" and round_num == 5:
            metrics, rows = run_files.MetricsFile(tmp_path), run_files.read_metrics(tmp_path)
        rows.append(_metrics_row(round_num, **extra))
        metrics.write(list(rows))
        assert (tmp_path / "metrics.csv").read_text() == atomic_files.csv_text(
            rows, columns_of(rows))
    assert columns_of(rows) == columns
    assert [int(r["round"]) for r in run_files.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_metrics_file_refuses_an_unknown_column_and_keeps_the_file(tmp_path):
    metrics = run_files.MetricsFile(tmp_path)
    rows = [_metrics_row(1)]
    metrics.write(rows)
    before = (tmp_path / "metrics.csv").read_bytes()
    with pytest.raises(ValueError, match="typo"):
        metrics.write([*rows, _metrics_row(2, typo=1)])
    assert (tmp_path / "metrics.csv").read_bytes() == before
    metrics.write([*rows, _metrics_row(2)])  # and goes on from what it had written
    assert (tmp_path / "metrics.csv").read_text() == atomic_files.csv_text(
        [*rows, _metrics_row(2)], run_files.METRIC_COLUMNS)
