"""Plots: PNG figures of runs, grids and partitions.

Drawn with matplotlib's Agg canvas on a bare `Figure` (no pyplot, no global
backend switch) and written atomically (`fedprune.outputs.atomic_files`); matplotlib
is imported inside the plotting functions so importing this module stays
cheap.

* `plot_run_curves`: one run's test accuracy and global sparsity per round.
* `plot_curves_by_group`: a metric per round, mean and band over the runs of a group.
* `plot_accuracy_vs_sparsity`: a grid's accuracy against sparsity, a line per schedule.
* `plot_label_heatmap`: examples per (client, class) of a partition.

Pure Python + numpy; no TensorFlow import.
"""

from __future__ import annotations

import io
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedprune.outputs.atomic_files import PathLike, atomic_write_bytes
from fedprune.outputs.reporting import Table, mean_ci


def _agg_figure(figsize: tuple[float, float], **kwargs):
    """A bare matplotlib `Figure` of `figsize` inches, drawn by the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _new_figure(nrows: int = 1, *, height: float = 3.2):
    """A bare figure of `nrows` stacked axes sharing the x axis, and those axes."""
    fig = _agg_figure((6.0, height * nrows), layout="constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _label_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers


def _save_png(fig, path: PathLike, *, dpi: int = 120) -> pathlib.Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def _number(value: Any) -> float:
    """A float from a metrics cell; empty cells (metric not computed that round) are NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def _series(rows: Iterable[Mapping[str, Any]], round_key: str, key: str):
    """(rounds, values) of one metric, rows where it is missing or NaN left out."""
    points = [(_number(r[round_key]), _number(r.get(key))) for r in rows]
    points = [(x, y) for x, y in points if not math.isnan(y)]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def plot_run_curves(
    metrics_rows: Sequence[Mapping[str, Any]],
    path: PathLike,
    *,
    round_key: str = "round",
    accuracy_key: str = "test_accuracy",
    sparsity_key: str = "global_sparsity",
    title: str | None = None,
) -> pathlib.Path:
    """Plots one run: test accuracy (top) and global sparsity (bottom) against the round.

    Args:
      metrics_rows: the run's metrics, one mapping per round (e.g. read back
        from metrics.csv; numeric strings are fine, empty cells are skipped).
      path: the PNG file to write (atomically).
      round_key, accuracy_key, sparsity_key: the column names.
      title: optional figure title.

    Returns:
      `path` as a `pathlib.Path`.
    """
    fig, (acc_ax, sparsity_ax) = _new_figure(2)
    for ax, key in ((acc_ax, accuracy_key), (sparsity_ax, sparsity_key)):
        rounds, values = _series(metrics_rows, round_key, key)
        ax.plot(rounds, values, marker="." if len(rounds) < 50 else None)
        ax.set_ylabel(key.replace("_", " "))
        _label_rounds(ax)
        ax.grid(alpha=0.3)
    sparsity_ax.set_ylim(-0.02, 1.02)  # sparsity is a fraction
    if title:
        fig.suptitle(title)
    return _save_png(fig, path)


def plot_curves_by_group(
    runs: Iterable[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]],
    key: str,
    metric: str,
    path: PathLike,
    *,
    round_key: str = "round",
    confidence: float = 0.95,
) -> pathlib.Path:
    """Plots `metric` against the round, one line per value of `key`, mean over runs.

    Args:
      runs: (config, metrics rows) per run; `config[key]` names the run's
        group (e.g. key='schedule'), runs of one group being e.g. seeds.
      key: the configuration key to group by; groups in order of first appearance.
      metric: the metrics column to plot (e.g. 'test_accuracy').
      path: the PNG file to write (atomically).
      round_key: the rounds column.
      confidence: the confidence of the shaded band (`mean_ci` per round;
        no band at rounds with a single run).

    Returns:
      `path` as a `pathlib.Path`.
    """
    by_group: dict[Any, list[dict[float, float]]] = {}
    for config, rows in runs:
        rounds, values = _series(rows, round_key, metric)
        by_group.setdefault(config[key], []).append(dict(zip(rounds, values, strict=True)))
    fig, (ax,) = _new_figure(1, height=4.0)
    for value, curves in by_group.items():
        rounds = sorted(set().union(*curves))
        stats = [mean_ci([c[r] for c in curves if r in c], confidence) for r in rounds]
        mean = np.array([s[0] for s in stats])
        half = np.array([s[1] for s in stats])
        (line,) = ax.plot(rounds, mean, label=f"{key}={value} (n={len(curves)})")
        ax.fill_between(
            rounds,
            mean - half,
            mean + half,
            where=np.isfinite(half),
            alpha=0.2,
            color=line.get_color(),
            linewidth=0,
        )
    _label_rounds(ax)
    ax.set_ylabel(metric.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_png(fig, path)


def plot_accuracy_vs_sparsity(
    table: Table,
    path: PathLike,
    *,
    x: str = "final_sparsity",
    y: str = "accuracy",
) -> pathlib.Path:
    """Plots final accuracy against sparsity with CI error bars, one series per configuration.

    Args:
      table: from `aggregate`.
      path: the PNG file to write (atomically).
      x: a grouping key (e.g. the target 'final_sparsity', no error bar) or a
        metric (e.g. the measured sparsity, with a horizontal error bar).
      y: a metric (e.g. 'accuracy').
      The series are the values of the remaining grouping keys (e.g. the
      schedule), points sorted by x; a group with n == 1 has no error bar.

    Returns:
      `path` as a `pathlib.Path`.

    Raises:
      ValueError: `x` or `y` is not in the table.
    """
    if y not in table.metrics:
        raise ValueError(f"y={y!r} is not a metric of the table {table.metrics}")
    if x not in table.metrics and x not in table.group_by:
        raise ValueError(f"x={x!r} is neither a metric nor a grouping key of the table")
    series_keys = [k for k in table.group_by if k != x]
    series: dict[str, list[tuple[float, float, float, float]]] = {}
    for g in table.groups:
        config = dict(zip(table.group_by, g.key, strict=True))
        if x in table.metrics:
            x_mean, x_ci = g.mean[x], g.ci[x]
        else:
            x_mean, x_ci = float(config[x]), math.nan
        label = ", ".join(f"{k}={config[k]}" for k in series_keys) or y
        series.setdefault(label, []).append((x_mean, x_ci, g.mean[y], g.ci[y]))
    fig, (ax,) = _new_figure(1, height=4.0)
    for label, points in series.items():
        xs, x_cis, ys, y_cis = np.array(sorted(points)).T
        ax.errorbar(
            xs,
            ys,
            xerr=np.nan_to_num(x_cis) if x in table.metrics else None,
            yerr=np.nan_to_num(y_cis),  # NaN (n == 1): no bar
            marker="o",
            capsize=3,
            label=label,
        )
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_png(fig, path)


def plot_label_heatmap(count_matrix: np.ndarray, path: PathLike, *,
                       title: str | None = None) -> pathlib.Path:
    """Writes a PNG heat map of examples per (client, class), atomically.

    Args:
      count_matrix: int [num_clients, num_classes], e.g.
        `partitions.partition_stats(...)["count_matrix"]`.
      path: output file path (PNG).
      title: optional figure title.

    Returns:
      `path` as a `pathlib.Path`.
    """
    count_matrix = np.asarray(count_matrix)
    num_clients, num_classes = count_matrix.shape
    fig = _agg_figure((min(2 + 0.3 * num_classes, 16), min(2 + 0.12 * num_clients, 12)))
    ax = fig.subplots()
    image = ax.imshow(count_matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="examples")
    fig.tight_layout()
    return _save_png(fig, path, dpi=100)
