"""The benchmark's quality section: final test accuracy against target sparsity."""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from experiments.benchmark import Plan


# The dense row: target sparsity 0 trains without pruning (masking none).
DENSE_ROW = {"target sparsity": "0 %", "masking": "none"}


def _has_dense_row(rows: Sequence[dict]) -> bool:
    return any(all(row[k] == v for k, v in DENSE_ROW.items()) for row in rows)


def quality_markdown(rows: Sequence[dict]) -> str:
    """The quality table: accuracy and measured sparsity, mean ± 95 % CI over seeds.

    Args:
      rows: one per run: `target sparsity` (e.g. "50 %"), `masking`, `seed`,
        `final_test_accuracy` and `final_global_sparsity` (fractions).

    Returns:
      A Markdown table, one row per (target sparsity, masking). With a dense row
      (`DENSE_ROW`), a column right after the accuracy holds each row's paired
      difference to it: the mean ± 95 % CI of the per-seed accuracy minus the
      dense run's of the same seed (`reporting.add_paired`; dense's own is 0).

    Raises:
      reporting.UnpairedError: a row's seeds differ from the dense row's.
    """
    from fedprune.outputs import reporting

    table = reporting.aggregate(rows, list(DENSE_ROW), ["final_test_accuracy",
                                                        "final_global_sparsity"])
    accuracy = reporting.MetricFormat(spec=".3f", label="test accuracy")
    formats = {
        "final_test_accuracy": accuracy,
        "final_global_sparsity": reporting.MetricFormat(spec=".1f", scale=0.01, unit="%",
                                                        label="measured sparsity"),
    }
    if _has_dense_row(rows):
        table = reporting.add_paired(table, rows, ["final_test_accuracy"], DENSE_ROW)
        formats["delta_final_test_accuracy"] = dataclasses.replace(
            accuracy, label=f"Δ {accuracy.label} vs dense")
    return reporting.to_markdown(table, formats)


def run_quality(plan: Plan, log) -> tuple[str, str]:
    """Trains every (sparsity, seed) with `loop.run_experiment`; returns (table, notes)."""
    from fedprune.program import loop

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedprune-quality-") as root:
        for sparsity, seed, config in plan.quality:
            start = time.perf_counter()
            summary = loop.run_experiment(config, Path(root) / f"s{sparsity:g}-seed{seed}",
                                             log=lambda _line: None)
            rows.append({"target sparsity": f"{100 * sparsity:g} %", "masking": config.masking,
                         "seed": seed,
                         "final_test_accuracy": summary["final_test_accuracy"],
                         "final_global_sparsity": summary["final_global_sparsity"]})
            log(f"quality: sparsity {sparsity:g} seed {seed}: test accuracy "
                f"{summary['final_test_accuracy']:.4f}, sparsity "
                f"{summary['final_global_sparsity']:.4f} ({time.perf_counter() - start:.0f} s)")
    config = plan.quality[-1][2]
    paired = """ Every row shares those seeds with the dense row, so Δ vs dense is
paired: the mean ± 95 % t-interval of the per-seed differences (`reporting.paired_mean_ci`),
narrower than the difference of two means when a seed's partition moves both runs alike."""
    if not _has_dense_row(rows):
        paired = ""  # no dense row to pair with
    seeds = sorted({seed for _, seed, _ in plan.quality})
    notes = f"""Setting: {config.dataset} ({config.num_clients} clients, {config.partition}
partition), model `{config.model}`, {config.rounds} rounds of {config.clients_per_round}
clients, batch {config.batch_size}, {config.local_epochs} local epoch(s), client lr
{config.client_lr}. 0 % is dense FedAvg (masking none); the others prune with masking both,
polynomial (power {config.power:g}) {config.initial_sparsity:g} → target over rounds
{config.begin_round}–{config.end_round}. Test accuracy after the last round on the
dataset's global test set; mean ± 95 % t-interval half width (`reporting.mean_ci`) over seeds
{', '.join(map(str, seeds))} (the seed drives the partition, initial model, sampling and
shuffling).{paired}"""
    return quality_markdown(rows), notes
