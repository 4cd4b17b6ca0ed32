"""Grid plots: figures over the runs of a grid, mean ± CI over seeds (PNG and PDF).

Drawn on the helpers of `fedprune/outputs/plots.py` (object API, Agg
canvas, atomic PNG at `plots.DPI` plus PDF).

* `series_label`: the one legend label of a configuration, e.g.
  "polynomial (p = 3), both".
* `plot_curves_by_group`: a metric per round, mean and 95 % CI band over the
  runs of each series (`reporting.mean_ci` per round).
* `plot_tradeoff`: one metric against another (accuracy vs sparsity, accuracy
  vs bytes), means with CI error bars on both axes, a line per series.

Pure Python + numpy; no TensorFlow import.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedprune.outputs import plots
from fedprune.outputs.atomic_files import PathLike
from fedprune.outputs.reporting import Table, mean_ci


def series_label(schedule: str, *, masking: str | None = None, power: float | None = None,
                 granularity: str | None = None,
                 noise_multiplier: float | None = None) -> str:
    """A configuration's legend label: schedule (and its power), masking, the rest.

    Args:
      schedule: the `--schedule` name ("dense" for the dense baseline).
      masking: `--masking`; None leaves it out.
      power: the polynomial's exponent; None leaves it out (schedules without one).
      granularity: `--prune_granularity`; None leaves it out (callers pass it
        when the grid varies it).
      noise_multiplier: the DP noise multiplier z; None: not a DP run.

    Returns:
      e.g. "polynomial (p = 3), both", "constant, server, step",
      "oneshot, server, z = 1", "dense".
    """
    parts = [schedule + (f" (p = {power:g})" if power is not None else "")]
    parts += [p for p in (masking, granularity) if p]
    if noise_multiplier is not None:
        parts.append(f"z = {noise_multiplier:g}")
    return ", ".join(parts)


def plot_curves_by_group(
    runs: Iterable[tuple[str, Sequence[Mapping[str, Any]]]],
    metric: str,
    path: PathLike,
    *,
    round_key: str = "round",
    confidence: float = 0.95,
    title: str | None = None,
) -> pathlib.Path:
    """Plots `metric` against the round: per series, the mean and its CI band over runs.

    Args:
      runs: (series label, metrics rows) per run; runs of one label (e.g. the
        seeds of a configuration) make one line; labels in order of first appearance.
      metric: the metrics column to plot (e.g. 'test_accuracy').
      path: the PNG file to write (the PDF goes beside it).
      round_key: the rounds column.
      confidence: the band's coverage (`mean_ci` per round, Student t over
        runs; no band at rounds with a single run).
      title: the figure title.

    Returns:
      The PNG's path.
    """
    by_label: dict[str, list[dict[float, float]]] = {}
    for label, rows in runs:
        rounds, values = plots.series(rows, round_key, metric)
        by_label.setdefault(label, []).append(dict(zip(rounds, values, strict=True)))
    fig, (ax,) = plots.new_figure(1, height=4.0)
    for label, curves in by_label.items():
        rounds = sorted(set().union(*curves))
        stats = [mean_ci([c[r] for c in curves if r in c], confidence) for r in rounds]
        mean = np.array([s[0] for s in stats])
        half = np.array([s[1] for s in stats])
        (line,) = ax.plot(rounds, mean, label=f"{label} (n = {len(curves)})")
        ax.fill_between(rounds, mean - half, mean + half, where=np.isfinite(half), alpha=0.2,
                        color=line.get_color(), linewidth=0)
    plots.label_rounds(ax)
    ax.set_ylabel(metric.replace("_", " ") + f" (mean, {confidence:.0%} CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return plots.save_figure(fig, path)


def plot_tradeoff(
    table: Table,
    path: PathLike,
    *,
    x: str,
    y: str = "accuracy",
    series_by: Sequence[str] | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    log_x: bool = False,
    title: str | None = None,
) -> pathlib.Path:
    """Plots one column of a table against another: group means with CI error bars.

    Args:
      table: from `reporting.aggregate`.
      path: the PNG file to write (the PDF goes beside it).
      x: a metric (horizontal error bar) or a grouping key (e.g. the target
        'final_sparsity', no bar).
      y: a metric (e.g. 'accuracy').
      series_by: the grouping keys whose values make a line, joined by ", " as
        its legend label (group by a `series_label` column for readable
        legends); default: every grouping key other than `x`.
      xlabel, ylabel: axis labels (default: the column names).
      log_x: a logarithmic x axis (e.g. bytes).
      title: the figure title.
      A group with n == 1 has no error bar; points are sorted by x.

    Returns:
      The PNG's path.

    Raises:
      ValueError: `x` or `y` is not in the table.
    """
    if y not in table.metrics:
        raise ValueError(f"y={y!r} is not a metric of the table {table.metrics}")
    if x not in table.metrics and x not in table.group_by:
        raise ValueError(f"x={x!r} is neither a metric nor a grouping key of the table")
    series_keys = list(series_by) if series_by is not None else [
        k for k in table.group_by if k != x]
    unknown = [k for k in series_keys if k not in table.group_by]
    if unknown:
        raise ValueError(f"series_by={unknown!r} are not grouping keys {table.group_by}")
    points_by_label: dict[str, list[tuple[float, float, float, float]]] = {}
    for g in table.groups:
        config = dict(zip(table.group_by, g.key, strict=True))
        if x in table.metrics:
            x_mean, x_ci = g.mean[x], g.ci[x]
        else:
            x_mean, x_ci = float(config[x]), math.nan
        label = ", ".join(str(config[k]) for k in series_keys) or y
        points_by_label.setdefault(label, []).append((x_mean, x_ci, g.mean[y], g.ci[y]))
    fig, (ax,) = plots.new_figure(1, height=4.0)
    for label, points in points_by_label.items():
        xs, x_cis, ys, y_cis = np.array(sorted(points)).T
        ax.errorbar(xs, ys, xerr=np.nan_to_num(x_cis) if x in table.metrics else None,
                    yerr=np.nan_to_num(y_cis),  # NaN (n == 1): no bar
                    marker="o", capsize=3, label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(ylabel or y.replace("_", " "))
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        ax.set_title(title)
    return plots.save_figure(fig, path)
