"""Reporting: confidence intervals, comparison tables and plots.

Every file is written through `fedprune.atomic_files`.
* `mean_ci`: mean and Student-t confidence half width over seeds.
* `aggregate` groups result rows (e.g. one per run) by configuration keys;
  `to_markdown`, `to_latex` and `to_csv` write the resulting `Table`. Groups
  keep the order in which they first appear in the rows: sort the rows first
  for another order.
* Plots are PNG files drawn with matplotlib's Agg canvas on a bare `Figure`
  (no pyplot, no global backend switch); matplotlib is imported inside the
  plotting functions so importing this module stays cheap.

Pure Python + numpy/scipy; no TensorFlow import.
"""

from __future__ import annotations

import dataclasses
import io
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedprune.atomic_files import PathLike, atomic_write_bytes, atomic_write_csv

# --------------------------------------------------------------------------
# Statistics.


def mean_ci(values: Iterable[float], confidence: float = 0.95) -> tuple[float, float]:
    """Mean and the half width of its Student-t confidence interval.

    half width = t_{(1 + confidence) / 2, n - 1} * s / sqrt(n), with s the
    sample standard deviation (ddof = 1).

    Args:
      values: one value per independent run (e.g. per seed).
      confidence: the interval's coverage, in (0, 1).

    Returns:
      (mean, half width). With a single value the half width is NaN: one run
      says nothing about the spread (tables then print the mean alone); so it
      is with an infinite value (e.g. epsilon without noise).

    Raises:
      ValueError: no values, or `confidence` outside (0, 1).
    """
    from scipy import stats

    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    x = np.asarray(list(values), dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_ci needs at least one value")
    mean = float(x.mean())
    if x.size == 1 or not np.isfinite(x).all():  # an infinite epsilon has no spread either
        return mean, math.nan
    t = stats.t.ppf((1.0 + confidence) / 2.0, df=x.size - 1)
    return mean, float(t * x.std(ddof=1) / math.sqrt(x.size))


# --------------------------------------------------------------------------
# Tables.


@dataclasses.dataclass(frozen=True)
class Group:
    """One row of a `Table`: a configuration and its metrics over runs.

    Attributes:
      key: the values of `Table.group_by`, in that order.
      n: the number of rows (runs) in the group.
      mean: metric name -> mean over the runs.
      ci: metric name -> confidence half width (NaN when n == 1).
    """

    key: tuple
    n: int
    mean: Mapping[str, float]
    ci: Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Table:
    """Metrics aggregated per configuration, groups in order of first appearance."""

    group_by: tuple[str, ...]
    metrics: tuple[str, ...]
    groups: tuple[Group, ...]
    confidence: float


def aggregate(
    rows: Iterable[Mapping[str, Any]],
    group_by: Sequence[str],
    metrics: Sequence[str],
    *,
    confidence: float = 0.95,
) -> Table:
    """Groups result rows by `group_by` and summarizes each metric by `mean_ci`.

    Args:
      rows: one mapping per run, holding every `group_by` key and every metric
        (numbers or numeric strings, e.g. read back from CSV).
      group_by: the configuration keys that define a group (leave out `seed`
        to aggregate over seeds).
      metrics: the metric keys to summarize.
      confidence: the confidence of the intervals.

    Returns:
      A `Table` whose groups keep the order in which they first appear in `rows`.

    Raises:
      KeyError: a row lacks a grouping key or metric.
    """
    group_by, metrics = tuple(group_by), tuple(metrics)
    collected: dict[tuple, list[Mapping[str, Any]]] = {}  # dicts keep insertion order
    for row in rows:
        missing = [k for k in group_by + metrics if k not in row]
        if missing:
            raise KeyError(f"result row lacks {missing}: {dict(row)}")
        collected.setdefault(tuple(row[k] for k in group_by), []).append(row)
    groups = []
    for key, members in collected.items():
        stats = {m: mean_ci([float(r[m]) for r in members], confidence) for m in metrics}
        groups.append(
            Group(
                key=key,
                n=len(members),
                mean={m: s[0] for m, s in stats.items()},
                ci={m: s[1] for m, s in stats.items()},
            )
        )
    return Table(group_by=group_by, metrics=metrics, groups=tuple(groups), confidence=confidence)


@dataclasses.dataclass(frozen=True)
class MetricFormat:
    """How one metric is printed in a table.

    Attributes:
      spec: Python format spec applied to the scaled mean and half width.
      scale: the value is divided by this before formatting (1024 for KiB).
      unit: shown in the header after the name, e.g. `accuracy (%)`.
      label: header text; defaults to the metric name.
    """

    spec: str = ".4g"
    scale: float = 1.0
    unit: str = ""
    label: str | None = None

    def header(self, metric: str) -> str:
        label = self.label or metric
        return f"{label} ({self.unit})" if self.unit else label

    def cell(self, mean: float, ci: float, plus_minus: str) -> str:
        text = format(mean / self.scale, self.spec)
        if math.isnan(ci):
            return text
        return f"{text} {plus_minus} {format(ci / self.scale, self.spec)}"


ACCURACY = MetricFormat(spec=".3f")  # 0.912
PERCENT = MetricFormat(spec=".1f", scale=0.01, unit="%")  # a fraction printed as 91.2
KIB = MetricFormat(spec=".1f", scale=1024, unit="KiB")  # bytes printed in KiB
MIB = MetricFormat(spec=".2f", scale=1024**2, unit="MiB")  # bytes printed in MiB


def _formatted(
    table: Table, formats: Mapping[str, MetricFormat | str] | None, plus_minus: str
) -> tuple[list[str], list[list[str]]]:
    """(header, body rows) as unescaped strings; shared by the Markdown and LaTeX writers."""
    formats = dict(formats or {})
    unknown = set(formats) - set(table.metrics)
    if unknown:
        raise ValueError(f"formats given for metrics not in the table: {sorted(unknown)}")
    fmt = {}
    for m in table.metrics:
        given = formats.get(m, MetricFormat())
        fmt[m] = MetricFormat(spec=given) if isinstance(given, str) else given
    header = [*table.group_by, "n", *(fmt[m].header(m) for m in table.metrics)]
    body = [
        [
            *(str(v) for v in g.key),
            str(g.n),
            *(fmt[m].cell(g.mean[m], g.ci[m], plus_minus) for m in table.metrics),
        ]
        for g in table.groups
    ]
    return header, body


def to_markdown(table: Table, formats: Mapping[str, MetricFormat | str] | None = None) -> str:
    """A GitHub Markdown table: keys left-aligned, n and metrics right-aligned.

    Args:
      table: from `aggregate`.
      formats: metric name -> `MetricFormat` or a bare format spec (e.g.
        ".3f"); metrics not named use `MetricFormat()`.

    Returns:
      The table, one line per group, ending in a newline. Cells read
      `mean ± half width`, or the mean alone when n == 1.
    """
    header, body = _formatted(table, formats, "±")
    align = [":--"] * len(table.group_by) + ["--:"] * (1 + len(table.metrics))

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |\n"

    return "".join(line(cells) for cells in [header, align, *body])


_LATEX_SPECIALS = str.maketrans(
    {
        "\\": r"\textbackslash{}",
        "&": r"\&",
        "%": r"\%",
        "$": r"\$",
        "#": r"\#",
        "_": r"\_",
        "{": r"\{",
        "}": r"\}",
        "~": r"\textasciitilde{}",
        "^": r"\textasciicircum{}",
    }
)


def latex_escape(text: str) -> str:
    """Escapes LaTeX's special characters (`_`, `%`, `&`, `$`, `#`, braces, ...)."""
    return text.translate(_LATEX_SPECIALS)


def to_latex(table: Table, formats: Mapping[str, MetricFormat | str] | None = None) -> str:
    """A booktabs `tabular` (needs `\\usepackage{booktabs}`); arguments as `to_markdown`.

    Returns:
      The `tabular` environment, ending in a newline; wrap it in a `table`
      float with a caption where it is used.
    """
    header, body = _formatted(table, formats, "\x00")  # placeholder survives escaping

    def line(cells: Sequence[str]) -> str:
        escaped = (latex_escape(c).replace("\x00", r"$\pm$") for c in cells)
        return " & ".join(escaped) + r" \\" + "\n"

    columns = "l" * len(table.group_by) + "r" * (1 + len(table.metrics))
    return "".join(
        [
            f"\\begin{{tabular}}{{{columns}}}\n\\toprule\n",
            line(header),
            "\\midrule\n",
            *(line(cells) for cells in body),
            "\\bottomrule\n\\end{tabular}\n",
        ]
    )


def to_csv(table: Table, path: PathLike) -> pathlib.Path:
    """Atomically writes the table as CSV with raw, unscaled numbers.

    Columns: the `group_by` keys, `n`, then `<metric>_mean` and `<metric>_ci`
    (the half width at `table.confidence`; `nan` when n == 1) per metric.

    Returns:
      `path` as a `pathlib.Path`.
    """
    fieldnames = [*table.group_by, "n"]
    for m in table.metrics:
        fieldnames += [f"{m}_mean", f"{m}_ci"]
    rows = []
    for g in table.groups:
        row = {**dict(zip(table.group_by, g.key, strict=True)), "n": g.n}
        for m in table.metrics:
            row[f"{m}_mean"] = g.mean[m]
            row[f"{m}_ci"] = g.ci[m]
        rows.append(row)
    return atomic_write_csv(path, rows, fieldnames)


# --------------------------------------------------------------------------
# Plots.


def _new_figure(nrows: int = 1, *, height: float = 3.2):
    """A bare matplotlib `Figure` and its axes, drawn by the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.0, height * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def _label_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers


def _save_png(fig, path: PathLike) -> pathlib.Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    count_matrix = np.asarray(count_matrix)
    num_clients, num_classes = count_matrix.shape
    fig = Figure(figsize=(min(2 + 0.3 * num_classes, 16), min(2 + 0.12 * num_clients, 12)))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(count_matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    ax.set_xlabel("class")
    ax.set_ylabel("client")
    if title:
        ax.set_title(title)
    fig.colorbar(image, ax=ax, label="examples")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    return atomic_write_bytes(path, buffer.getvalue())
