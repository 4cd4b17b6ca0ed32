"""Tests for fedprune.outputs.plots and grid_plots: each figure is an atomic PNG of
the stated size (inches x DPI) that is not blank, with a PDF beside it."""

import numpy as np
import pytest
from figure_util import assert_figure

from fedprune.outputs import grid_plots, plots, reporting


def run_rows(seed, num_rounds=6):
    rng = np.random.default_rng(seed)
    rows = []
    for r in range(1, num_rounds + 1):
        rows.append({
            "round": str(r),  # as read back from metrics.csv
            # evaluated every other round: empty cells are skipped
            "test_accuracy": "" if r % 2 else str(0.5 + 0.05 * r + 0.01 * rng.random()),
            "train_accuracy": str(0.5 + 0.04 * r), "test_loss": "" if r % 2 else str(2 / r),
            "train_loss": str(2.2 / r), "global_sparsity": str(min(0.8, 0.2 * r)),
            "target_sparsity": str(min(0.8, 0.2 * r)),
            "bytes_up": str(4000 - 300 * r), "bytes_down": str(5000 - 400 * r),
            "dense_bytes_up": "4400", "dense_bytes_down": "5400",
        })
    return rows


@pytest.mark.parametrize("window, target, events", [
    ((1, 4), 0.8, None), ((3, 3), 0.5, None), (None, None, None),
    ((1, 3), 0.75, {"shrink after round 3": 3})])
def test_plot_run_curves(tmp_path, window, target, events):
    path = plots.plot_run_curves(run_rows(0), tmp_path / "curves.png", title="digits, mlp",
                                 window=window, target=target, events=events)
    assert path == tmp_path / "curves.png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.pdf", "curves.png"]
    assert_figure(path, (6.4, 3 * 2.6 + 0.5))


def test_plot_bytes_per_round(tmp_path):
    path = plots.plot_bytes_per_round(run_rows(0), tmp_path / "bytes.png", title="t")
    assert_figure(path, (6.4, 3.4 + 0.5))


@pytest.mark.parametrize("num_clients, num_classes", [(2, 3), (10, 10), (25, 10)])
def test_label_heatmap_labels_every_tick(tmp_path, num_clients, num_classes):
    import matplotlib

    backend = matplotlib.get_backend()
    counts = np.random.default_rng(0).integers(0, 30, (num_clients, num_classes))
    path = plots.plot_label_heatmap(counts, tmp_path / "heat.png", title="dirichlet (α = 0.5)")
    assert_figure(path, (3.5 + 0.35 * num_classes, 1.6 + 0.22 * num_clients))
    assert matplotlib.get_backend() == backend  # no global backend switch


@pytest.mark.parametrize("args, label", [
    (dict(schedule="polynomial", masking="both", power=3.0), "polynomial (p = 3), both"),
    (dict(schedule="polynomial", masking="client", power=1.5, granularity="step"),
     "polynomial (p = 1.5), client, step"),
    (dict(schedule="oneshot", masking="server", noise_multiplier=1.0), "oneshot, server, z = 1"),
    (dict(schedule="dense"), "dense"),
])
def test_series_label(args, label):
    assert grid_plots.series_label(**args) == label


def test_plot_curves_by_group_bands(tmp_path):
    runs = [("constant, both", run_rows(0)), ("constant, both", run_rows(1)),
            ("polynomial (p = 3), both", run_rows(2, num_rounds=4))]  # one run: no band
    path = grid_plots.plot_curves_by_group(runs, "test_accuracy", tmp_path / "g.png", title="t")
    assert_figure(path, (6.4, 4.5))


@pytest.mark.parametrize("x, log_x", [("final_sparsity", False), ("sparsity", False),
                                      ("total_mib", True)])
def test_plot_tradeoff(tmp_path, x, log_x):
    rows = [
        {"series": s, "final_sparsity": fs, "accuracy": 0.9 - fs / 4 + 0.01 * seed,
         "sparsity": fs + 0.001 * seed, "total_mib": 10 * (1 - fs) + 0.1 * seed}
        for s in ("constant, both", "polynomial (p = 3), both") for fs in (0.5, 0.8, 0.9)
        for seed in range(3)
    ]  # fmt: skip
    rows.append({"series": "oneshot, both", "final_sparsity": 0.9, "accuracy": 0.6,
                 "sparsity": 0.9, "total_mib": 1.0})  # fmt: skip
    table = reporting.aggregate(rows, ["series", "final_sparsity"],
                                ["accuracy", "sparsity", "total_mib"])
    path = grid_plots.plot_tradeoff(table, tmp_path / "t.png", x=x, log_x=log_x,
                                    series_by=["series"])
    assert_figure(path, (6.4, 4.5))


def test_plot_tradeoff_rejects_unknown_columns(tmp_path):
    table = reporting.aggregate([{"series": "a", "final_sparsity": 0.5, "accuracy": 0.9}],
                                ["series", "final_sparsity"], ["accuracy"])
    with pytest.raises(ValueError, match="not a metric"):
        grid_plots.plot_tradeoff(table, tmp_path / "x.png", x="final_sparsity",
                                 y="test_accuracy")
    with pytest.raises(ValueError, match="neither"):
        grid_plots.plot_tradeoff(table, tmp_path / "x.png", x="sparsity")
    with pytest.raises(ValueError, match="not grouping keys"):
        grid_plots.plot_tradeoff(table, tmp_path / "x.png", x="final_sparsity",
                                 series_by=["schedule"])


def test_label_heatmap_of_a_partition_drawn_before_is_written_from_memory(tmp_path, monkeypatch):
    """A grid's cells of one seed share their partition: its heat map is drawn once, and
    every cell's files are the bytes of that drawing."""
    counts = np.random.default_rng(1).integers(0, 30, (4, 3))
    for name in "abcd":
        (tmp_path / name).mkdir()
    first = plots.plot_label_heatmap(counts, tmp_path / "a" / "heat.png", title="t1")

    def no_drawing(*args):
        raise AssertionError("drawn again")

    monkeypatch.setattr(plots, "_label_heatmap_figure", no_drawing)
    second = plots.plot_label_heatmap(counts.copy(), tmp_path / "b" / "heat.png", title="t1")
    for fmt in plots.FORMATS:
        assert (second.with_suffix(f".{fmt}").read_bytes()
                == first.with_suffix(f".{fmt}").read_bytes())
    with pytest.raises(AssertionError, match="drawn again"):  # another title: drawn
        plots.plot_label_heatmap(counts, tmp_path / "c" / "heat.png", title="t2")
    with pytest.raises(AssertionError, match="drawn again"):  # other counts: drawn
        plots.plot_label_heatmap(counts + 1, tmp_path / "d" / "heat.png", title="t1")


@pytest.mark.parametrize("figure", ["stacked axes", "heat map with colorbar"])
def test_figure_bytes_lays_out_once_and_keeps_that_layout(monkeypatch, figure):
    import io

    from matplotlib.layout_engine import ConstrainedLayoutEngine

    def draw():
        if figure == "stacked axes":
            fig, axes = plots.new_figure(3)
            for i, ax in enumerate(axes):
                ax.plot(range(10), np.arange(10) ** i, label=f"power {i}")
                ax.set_ylabel(f"a long label {i}")
                ax.legend()
            fig.suptitle("title")
            return fig
        counts = np.random.default_rng(0).integers(0, 30, (6, 4))
        return plots._label_heatmap_figure(counts, "title")

    reference = draw()
    reference.savefig(io.BytesIO(), format="png", dpi=plots.DPI)  # laid out once, by the PNG
    layouts = []
    execute = ConstrainedLayoutEngine.execute
    monkeypatch.setattr(ConstrainedLayoutEngine, "execute",
                        lambda self, fig: layouts.append(fig) or execute(self, fig))
    fig = draw()
    files = plots.figure_bytes(fig)
    assert len(layouts) == 1  # one layout for both formats (each savefig redid it before)
    assert files["png"].startswith(b"\x89PNG") and files["pdf"].startswith(b"%PDF")
    # The PDF was drawn where the PNG's layout put every axes (colorbar included).
    assert len(fig.axes) == len(reference.axes) >= 3
    for ax, ref in zip(fig.axes, reference.axes, strict=True):
        np.testing.assert_allclose(ax.get_position().bounds, ref.get_position().bounds,
                                   atol=1e-12)


def _drawn_figures(monkeypatch, draw):
    """The matplotlib figures `draw()` saves, drawn (Agg) so their text has extents."""
    figures = []
    save = plots.save_figure
    monkeypatch.setattr(plots, "save_figure",
                        lambda fig, path: figures.append(fig) or save(fig, path))
    draw()
    for fig in figures:
        fig.canvas.draw()
    return figures


@pytest.mark.parametrize("peak", [1.0, 1e3, 9e5, -9e5, 5e7])
def test_run_figures_fixed_margins_keep_every_label_inside(tmp_path, monkeypatch, peak):
    """A run's figures (curves, bytes) are placed at `RUN_MARGINS_IN`, without a layout
    engine; every label stays inside the figure and off the other axes, up to the
    7-character tick labels of losses and KiB per round peaking at +-900,000, and the
    offset text (x1e7) above axes whose values take one."""
    rows = run_rows(0, num_rounds=30)
    for key in ("train_loss", "test_loss", "bytes_up", "bytes_down", "dense_bytes_up"):
        kib = 1024 if "bytes" in key else 1  # the bytes figure draws KiB
        largest = max(abs(float(row[key])) for row in rows if row[key])
        for row in rows:
            if row[key]:
                row[key] = str(float(row[key]) / largest * peak * kib)
    figures = _drawn_figures(monkeypatch, lambda: (
        plots.plot_run_curves(rows, tmp_path / "curves.png", title="digits, mlp: a long title",
                              window=(1, 20), target=0.8),
        plots.plot_bytes_per_round(rows, tmp_path / "bytes.png", title="digits, mlp")))
    assert len(figures) == 2
    for fig in figures:
        assert fig.get_layout_engine() is None
        renderer = fig.canvas.get_renderer()
        width, _ = fig.get_size_inches()
        np.testing.assert_allclose(fig.axes[0].get_position().x0 * width,
                                   plots.RUN_MARGINS_IN["left"])
        inside = fig.bbox.padded(-1)  # 1 pixel in from the edges
        # Each axes with everything drawn for it (tick labels, labels, legend).
        boxes = [ax.get_tightbbox(renderer) for ax in fig.axes]
        boxes += [text.get_window_extent(renderer) for text in fig.texts]  # the title
        for i, box in enumerate(boxes):
            assert inside.x0 <= box.x0 and box.x1 <= inside.x1, (i, box)
            assert inside.y0 <= box.y0 and box.y1 <= inside.y1, (i, box)
            for other in boxes[i + 1:]:
                assert not box.overlaps(other), (box, other)
