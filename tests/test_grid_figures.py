"""Grid figures (experiments/grid_results.py on fedprune/outputs/grid_plots.py): legend
labels, the files per masking mode, and their copies for a paper's figures folder,
from synthetic runs (no training)."""

import numpy as np
import pytest
from figure_util import assert_figure

from experiments import grid, grid_results
from fedprune.config import ExperimentConfig


def fake_result(schedule, masking, sparsity, seed, power=3.0, granularity=None):
    config = ExperimentConfig(
        schedule=schedule, masking=masking, final_sparsity=sparsity, power=power, seed=seed,
        rounds=6, end_round=4, **({"prune_granularity": granularity} if granularity else {}))
    label = grid.DENSE if schedule == "none" else schedule
    cell = grid.Cell(f"{label}-s{sparsity}-{masking}-seed{seed}", label, config,
                     shown_keys=(grid.GRANULARITY_KEY,) if granularity else ())
    rng = np.random.default_rng(seed)
    rows = [{"round": str(r), "test_accuracy": str(0.5 + 0.05 * r + 0.02 * rng.random())}
            for r in range(1, 7)]
    accuracy = float(rows[-1]["test_accuracy"])
    summary = {"final_test_accuracy": accuracy, "final_global_sparsity": sparsity,
               "total_bytes_down": int(2**20 * (1 - sparsity) * 6),
               "total_bytes_up": int(2**20 * (1 - sparsity) * 5), "rounds_completed": 6}
    return grid_results.RunResult(cell, summary, rows)


@pytest.mark.parametrize("args, label", [
    (("polynomial", "both", 0.8, 0), "polynomial (p = 3), both"),
    (("polynomial", "client", 0.8, 0, 1.0, "step"), "polynomial (p = 1), client, step"),
    (("oneshot", "server", 0.5, 1), "oneshot, server"),
    (("none", "none", 0.0, 0), "dense"),
])
def test_series_label_of_a_run(args, label):
    assert grid_results.series_label(fake_result(*args)) == label


def test_runs_of_different_models_or_structures_are_never_one_series():
    # Table 3's parts: the dense MLP and the dense CNN are two series, not one average.
    import dataclasses

    mlp = fake_result("none", "none", 0.0, 0)
    cnn = dataclasses.replace(mlp, cell=dataclasses.replace(
        mlp.cell, config=dataclasses.replace(mlp.cell.config, model="cnn")))
    neuron = fake_result("polynomial", "server", 0.75, 0)
    neuron = dataclasses.replace(neuron, cell=dataclasses.replace(
        neuron.cell, config=dataclasses.replace(neuron.cell.config, structure="neuron")))
    assert grid_results.varying_part_fields([mlp, neuron]) == ("structure",)
    assert grid_results.varying_part_fields([mlp, cnn, neuron]) == ("model", "structure")
    assert grid_results.varying_part_fields([mlp, mlp]) == ()
    parts = grid_results.varying_part_fields([mlp, cnn, neuron])
    assert [grid_results.series_label(r, parts) for r in (mlp, cnn, neuron)] == [
        "mlp, unstructured: dense", "cnn, unstructured: dense",
        "mlp, neuron: polynomial (p = 3), server"]


def test_write_and_publish_figures(tmp_path):
    results = [fake_result("none", "none", 0.0, s) for s in range(3)]
    results += [fake_result(schedule, masking, sparsity, s)
                for schedule in ("polynomial", "oneshot") for masking in ("server", "both")
                for sparsity in (0.5, 0.9) for s in range(3)]
    headline = grid_results.write_figures(results, tmp_path / "grid")
    assert headline == {name: tmp_path / "grid" / f"{name}.png"
                        for name in grid_results.HEADLINE_FIGURES}
    plots = sorted(p.name for p in (tmp_path / "grid" / "plots").glob("*.png"))
    assert plots == sorted(
        [f"accuracy_vs_round-{m}-s{s}.png" for m in ("server", "both") for s in (0.5, 0.9)]
        + [f"{kind}-{m}.png" for kind in ("accuracy_vs_sparsity", "accuracy_vs_bytes")
           for m in ("server", "both")])
    for png in headline.values():
        assert_figure(png, (6.4, 4.5))
    written = grid_results.publish_figures(tmp_path / "grid", tmp_path / "figures", "table9")
    assert [p.name for p in written] == [f"table9-{name}" for name in plots]
    assert len(list((tmp_path / "figures").glob("*.pdf"))) == len(plots)
    for png in written:
        assert png.read_bytes() == (tmp_path / "grid" / "plots"
                                    / png.name.removeprefix("table9-")).read_bytes()
