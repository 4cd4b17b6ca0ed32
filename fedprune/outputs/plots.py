"""Plots: a run's figures, in PNG (`DPI` dots per inch) and PDF.

Drawn with matplotlib's object API: a bare `Figure` on the Agg canvas (no
pyplot, no global backend switch), saved as `<name>.png` and `<name>.pdf`
side by side, each written atomically (`fedprune.outputs.atomic_files`).
matplotlib is imported inside the functions, so importing this module stays
cheap. The grid figures are in `fedprune/outputs/grid_plots.py`, on the
helpers here.

* `plot_run_curves`: accuracy, loss and sparsity per round; the schedule's
  window shaded, its target drawn.
* `plot_bytes_per_round`: bytes sent per round, up and down, beside dense.
* `plot_label_heatmap`: examples per (client, class) of a partition, with the
  clients' sizes beside it.

Pure Python + numpy; no TensorFlow import.
"""

from __future__ import annotations

import collections
import io
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedprune.outputs.atomic_files import PathLike, atomic_write_bytes

DPI = 150  # dots per inch of every PNG: its pixel size is the figure's inches x DPI
FORMATS = ("png", "pdf")


def agg_figure(figsize: tuple[float, float], **kwargs):
    """A bare matplotlib `Figure` of `figsize` inches, drawn by the Agg canvas."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, **kwargs)
    FigureCanvasAgg(fig)
    return fig


# Where a run's figures put their axes, in inches from the figure's edges
# ("gap": between two stacked axes): room on the left for y tick labels of up to
# 7 characters ("-900000", `tests/test_plots.py`) and the y label, under each
# axes for its x tick labels and x label, above for an offset text (x1e7) or
# the title. A run's figures are drawn for every cell of a grid, and
# constrained layout cost a third of their drawing (BUILD_NOTES.md, "A run's
# figures at fixed margins").
RUN_MARGINS_IN = {"left": 1.0, "right": 0.2, "top": 0.55, "bottom": 0.55, "gap": 0.6}


def new_figure(nrows: int = 1, *, height: float = 2.6, width: float = 6.4,
               fixed_margins: bool = False):
    """A bare figure of `nrows` stacked axes sharing the x axis, and those axes.

    The figure is `width` x (`height` x `nrows` + 0.5) inches. Every axes keeps
    its own tick labels (matplotlib hides the upper ones of a shared axis
    otherwise).

    Args:
      fixed_margins: place the axes at `RUN_MARGINS_IN` (a run's figures)
        instead of by constrained layout (the grid's figures, whose labels vary
        more).
    """
    figsize = (width, height * nrows + 0.5)
    fig = agg_figure(figsize, layout=None if fixed_margins else "constrained")
    axes = fig.subplots(nrows, 1, sharex=True, squeeze=False)[:, 0]
    for ax in axes:
        ax.tick_params(labelbottom=True)
    if fixed_margins:
        m = RUN_MARGINS_IN
        axes_height = (figsize[1] - m["top"] - m["bottom"] - (nrows - 1) * m["gap"]) / nrows
        fig.subplots_adjust(left=m["left"] / width, right=1 - m["right"] / width,
                            top=1 - m["top"] / figsize[1], bottom=m["bottom"] / figsize[1],
                            hspace=m["gap"] / axes_height)
    return fig, axes


def label_rounds(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # rounds are whole numbers


def figure_bytes(fig) -> dict[str, bytes]:
    """{format: the file's bytes} of `fig` in each of `FORMATS` (PNG at `DPI`).

    The figure's layout engine (constrained layout), if it has one, runs for the
    first format only; the later ones keep the axes where it put them (each
    `savefig` with an engine pays an extra draw to lay out: BUILD_NOTES.md,
    "Figures lay out once"). Leaves `fig` without a layout engine.
    """
    out = {}
    for fmt in FORMATS:
        buffer = io.BytesIO()
        fig.savefig(buffer, format=fmt, dpi=DPI)
        out[fmt] = buffer.getvalue()
        fig.set_layout_engine("none")  # keeps the positions the first format's layout set
    return out


def write_figure_bytes(files: Mapping[str, bytes], path: PathLike) -> pathlib.Path:
    """Writes `figure_bytes` as `path` (.png) and beside it (.pdf), each atomically."""
    path = pathlib.Path(path).with_suffix(".png")
    for fmt in FORMATS:
        atomic_write_bytes(path.with_suffix(f".{fmt}"), files[fmt])
    return path


def save_figure(fig, path: PathLike) -> pathlib.Path:
    """Writes `fig` as `path` (.png, `DPI`) and beside it as .pdf, each atomically.

    Returns:
      The PNG's path; the PDF is `path.with_suffix(".pdf")`.
    """
    return write_figure_bytes(figure_bytes(fig), path)


def number(value: Any) -> float:
    """A float from a metrics cell; empty cells (metric not computed that round) are NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def series(rows: Iterable[Mapping[str, Any]], round_key: str, key: str):
    """(rounds, values) of one metric, rows where it is missing or NaN left out."""
    points = [(number(r[round_key]), number(r.get(key))) for r in rows]
    points = [(x, y) for x, y in points if not math.isnan(y)]
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def _shade_window(ax, window: tuple[float, float] | None) -> None:
    if window is not None and window[1] >= window[0]:
        # Half a round either side, so a one-round window (oneshot) is visible too.
        ax.axvspan(window[0] - 0.5, window[1] + 0.5, color="0.85", zorder=0,
                   label="schedule window")


def plot_run_curves(
    metrics_rows: Sequence[Mapping[str, Any]],
    path: PathLike,
    *,
    title: str | None = None,
    window: tuple[int, int] | None = None,
    target: float | None = None,
    events: Mapping[str, float] | None = None,
    round_key: str = "round",
) -> pathlib.Path:
    """Plots one run against the round: accuracy, loss, sparsity (3 panels, PNG and PDF).

    Args:
      metrics_rows: the run's metrics, one mapping per round (e.g. read back
        from metrics.csv; numeric strings are fine, empty cells are skipped).
        Columns drawn where present: test_/train_accuracy, test_/train_loss,
        global_sparsity, and the schedule's `target_sparsity` per round.
      path: the PNG file to write (the PDF goes beside it).
      title: the figure title (e.g. dataset, model, masking, schedule, target, seed).
      window: (first, last) round whose end updates the mask, shaded in every
        panel; None: no window (dense).
      target: the schedule's final sparsity, a dashed horizontal line.
      events: {label: round} drawn as dotted vertical lines after that round
        (e.g. {"shrink": 20}: from then on the model is smaller, its
        global sparsity 0).
      round_key: the rounds column.

    Returns:
      The PNG's path.
    """
    panels = (("accuracy", ("test_accuracy", "train_accuracy")),
              ("loss", ("test_loss", "train_loss")),
              ("sparsity", ("global_sparsity", "target_sparsity")))
    fig, axes = new_figure(len(panels), fixed_margins=True)
    for ax, (ylabel, keys) in zip(axes, panels, strict=True):
        _shade_window(ax, window)
        for i, (label, round_num) in enumerate((events or {}).items()):
            ax.axvline(round_num + 0.5, color=f"C{i + 3}", linestyle=":", label=label)
        for key, style in zip(keys, ("-", ":"), strict=True):
            rounds, values = series(metrics_rows, round_key, key)
            if len(rounds):
                ax.plot(rounds, values, style, marker="." if len(rounds) < 50 else None,
                        label=key.replace("_", " "))
        ax.set_ylabel(ylabel)
        label_rounds(ax)
        ax.grid(alpha=0.3)
    sparsity_ax = axes[-1]
    sparsity_ax.set_ylim(-0.02, 1.02)  # sparsity is a fraction
    if target is not None:
        sparsity_ax.axhline(target, color="k", linestyle="--", linewidth=1,
                            label=f"target {target:g}")
    for ax in axes:
        ax.legend(fontsize="small", loc="best")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


def plot_bytes_per_round(
    metrics_rows: Sequence[Mapping[str, Any]],
    path: PathLike,
    *,
    title: str | None = None,
    round_key: str = "round",
) -> pathlib.Path:
    """Plots the bytes one round sends (summed over its clients) in KiB, up and down.

    Solid: `bytes_up`/`bytes_down` (the efficient encodings,
    fedprune/federated/communication.py); dashed: `dense_bytes_up`/
    `dense_bytes_down`, the same tensors sent dense.

    Returns:
      The PNG's path (the PDF goes beside it).
    """
    fig, (ax,) = new_figure(1, height=3.4, fixed_margins=True)
    for direction, color in (("up", "C0"), ("down", "C1")):
        for prefix, style in (("", "-"), ("dense_", "--")):
            rounds, values = series(metrics_rows, round_key, f"{prefix}bytes_{direction}")
            ax.plot(rounds, values / 1024, style, color=color,
                    label=f"{direction}" + (" (dense)" if prefix else ""))
    ax.set_ylabel("KiB per round")
    ax.set_ylim(bottom=0)
    label_rounds(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path)


# (count matrix, title) -> `figure_bytes` of the last few label heat maps drawn: the cells
# of a grid with one seed share their partition, so each draws it once per process.
_HEATMAPS: collections.OrderedDict = collections.OrderedDict()
_HEATMAP_CACHE_SIZE = 8


def plot_label_heatmap(count_matrix: np.ndarray, path: PathLike, *,
                       title: str | None = None) -> pathlib.Path:
    """Writes a heat map of examples per (client, class), with each client's size beside it.

    Every client and class tick is labelled; each client's total is a bar on
    the right, with its number. The files of a (count matrix, title) drawn
    before in this process (the last `_HEATMAP_CACHE_SIZE`) are written again
    from memory, not redrawn.

    Args:
      count_matrix: int [num_clients, num_classes], e.g.
        `partitions.partition_stats(...)["count_matrix"]`.
      path: the PNG file to write (the PDF goes beside it).
      title: the figure title (e.g. the partition and its Dirichlet α).

    Returns:
      The PNG's path.
    """
    count_matrix = np.asarray(count_matrix)
    key = (count_matrix.shape, str(count_matrix.dtype), count_matrix.tobytes(), title)
    files = _HEATMAPS.pop(key, None)
    if files is None:
        files = figure_bytes(_label_heatmap_figure(count_matrix, title))
    _HEATMAPS[key] = files
    while len(_HEATMAPS) > _HEATMAP_CACHE_SIZE:
        _HEATMAPS.popitem(last=False)
    return write_figure_bytes(files, path)


def _label_heatmap_figure(count_matrix: np.ndarray, title: str | None):
    num_clients, num_classes = count_matrix.shape
    sizes = count_matrix.sum(axis=1)
    fig = agg_figure((min(3.5 + 0.35 * num_classes, 18), min(1.6 + 0.22 * num_clients, 40)),
                     layout="constrained")
    heat_ax, size_ax = fig.subplots(1, 2, sharey=True, width_ratios=(3, 1))
    image = heat_ax.imshow(count_matrix, aspect="auto", interpolation="nearest",
                           cmap="viridis")
    heat_ax.set_xticks(range(num_classes), [str(c) for c in range(num_classes)])
    heat_ax.set_yticks(range(num_clients), [str(c) for c in range(num_clients)])
    heat_ax.set_xlabel("class")
    heat_ax.set_ylabel("client")
    fig.colorbar(image, ax=heat_ax, label="examples", location="bottom", shrink=0.8)
    size_ax.barh(range(num_clients), sizes, color="0.5")
    for client, size in enumerate(sizes):
        size_ax.text(size, client, f" {size}", va="center", fontsize="small")
    size_ax.set_xlim(0, sizes.max() * 1.3 if sizes.max() > 0 else 1)
    size_ax.set_xlabel("examples")
    size_ax.tick_params(labelleft=False)
    if title:
        fig.suptitle(title)
    return fig
