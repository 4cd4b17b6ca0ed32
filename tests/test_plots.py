"""Tests for fedprune.outputs.plots: every figure is an atomic PNG."""

import os

import numpy as np
import pytest

from fedprune.outputs import plots, reporting

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def table():
    rows = [{"schedule": "constant", "final_sparsity": 0.5, "accuracy": a, "bytes_up": 100}
            for a in (0.90, 0.92)]
    return reporting.aggregate(rows, ["schedule", "final_sparsity"], ["accuracy", "bytes_up"])


def assert_png(path):
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(PNG_SIGNATURE)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp file left


def run_rows(seed, num_rounds=6):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(num_rounds):
        rows.append(
            {
                "round": str(r),  # as read back from metrics.csv
                # evaluated every other round: empty cells are skipped
                "test_accuracy": "" if r % 2 else str(0.5 + 0.05 * r + 0.01 * rng.random()),
                "global_sparsity": str(min(0.8, 0.2 * r)),
            }
        )
    return rows


def test_plot_run_curves(tmp_path):
    path = plots.plot_run_curves(run_rows(0), tmp_path / "run.png", title="seed 0")
    assert path == tmp_path / "run.png"
    assert_png(path)


def test_plot_curves_by_group(tmp_path):
    runs = [
        ({"schedule": "constant", "seed": 0}, run_rows(0)),
        ({"schedule": "constant", "seed": 1}, run_rows(1)),
        ({"schedule": "polynomial", "seed": 0}, run_rows(2, num_rounds=4)),  # one run: no band
    ]
    path = plots.plot_curves_by_group(runs, "schedule", "test_accuracy", tmp_path / "g.png")
    assert_png(path)


@pytest.mark.parametrize("x", ["final_sparsity", "measured_sparsity"])
def test_plot_accuracy_vs_sparsity(tmp_path, x):
    rows = [
        {"schedule": s, "final_sparsity": fs, "accuracy": 0.9 - fs / 4 + 0.01 * seed,
         "measured_sparsity": fs + 0.001 * seed}
        for s in ("constant", "polynomial") for fs in (0.5, 0.8, 0.9) for seed in range(3)
    ]  # fmt: skip
    rows.append({"schedule": "oneshot", "final_sparsity": 0.9, "accuracy": 0.6,
                 "measured_sparsity": 0.9})  # fmt: skip
    table = reporting.aggregate(
        rows, ["schedule", "final_sparsity"], ["accuracy", "measured_sparsity"]
    )
    path = plots.plot_accuracy_vs_sparsity(table, tmp_path / "avs.png", x=x)
    assert_png(path)


def test_plot_accuracy_vs_sparsity_rejects_unknown_columns(table, tmp_path):
    with pytest.raises(ValueError, match="not a metric"):
        plots.plot_accuracy_vs_sparsity(table, tmp_path / "x.png", y="test_accuracy")
    with pytest.raises(ValueError, match="neither"):
        plots.plot_accuracy_vs_sparsity(table, tmp_path / "x.png", x="sparsity")


def test_label_heatmap_is_an_atomic_png_without_a_global_backend_switch(tmp_path):
    import matplotlib

    backend = matplotlib.get_backend()
    counts = np.array([[3, 0, 1], [0, 5, 0]])  # 2 clients, 3 classes
    path = plots.plot_label_heatmap(counts, tmp_path / "heat.png", title="iid")
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    assert os.listdir(tmp_path) == ["heat.png"]
    assert matplotlib.get_backend() == backend
