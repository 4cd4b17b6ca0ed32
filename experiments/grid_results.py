"""A finished grid's results: metrics per run, tables, plots, expected values.

`load_results` reads the runs of a grid's cells (`experiments/grid.py`) from
disk; `aggregate` makes their table (mean ± 95 % CI over seeds per row, and
optionally paired differences to the dense row of the same seed, columns
`delta_<metric>`); `write_reports` writes comparison.{md,tex,csv} and the plots;
`expected_values`/`compare` are the checks of `reproduce.py`, and
`replace_section` writes its generated sections of RESULTS.md. Imports neither
TensorFlow nor TFF.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from experiments.grid import (
    DENSE,
    DENSE_KEY,
    DISTRIBUTION_KEY,
    DP_KEY,
    GRANULARITY_KEY,
    KEYS,
    OPTIONAL_KEYS,
    REGROW_AT_KEY,
    REGROW_KEY,
    VARYING_KEYS,
    Cell,
)
from fedprune.outputs import atomic_files, grid_plots, plots, reporting


@dataclasses.dataclass(frozen=True)
class Metric:
    """A table column computed from a run's summary.json.

    Attributes:
      name: the column (CSV: `<name>_mean`, `<name>_ci`).
      value: summary dict -> the run's value; None for a metric of a run and its
        dense run of the same seed (`DENSE_METRICS`), computed by `aggregate`.
      format: how Markdown and LaTeX print it.
    """

    name: str
    value: Callable[[Mapping], float] | None
    format: reporting.MetricFormat


def _number(value) -> float:
    """NaN for a value a run did not record (None or absent)."""
    return math.nan if value is None else value


def _per_round(key: str) -> Callable[[Mapping], float]:
    return lambda s: s[key] / s["rounds_completed"]


def _deployed(value: Callable[[Mapping], float]) -> Callable[[Mapping], float]:
    """A value of summary.json's `deployment` section (`fedprune/outputs/deployment.py`);
    NaN for runs without one (`--deploy=none`, or a model TFLite cannot convert)."""
    def read(summary: Mapping) -> float:
        section = summary.get("deployment") or {}
        return value(section) if section.get("converted") else math.nan
    return read


def _latency_us(batch: int) -> Callable[[Mapping], float]:
    """Median interpreter latency of the run's final model (shrunk when structured) at a
    batch size, in microseconds; NaN when deployed with `--deploy=size`."""
    def read(section: Mapping) -> float:
        latency = section["models"][section["final_model"]]["latency_ms"]
        return math.nan if latency is None else latency[str(batch)]["median_ms"] * 1e3
    return _deployed(read)


METRICS = {m.name: m for m in (
    Metric("accuracy", lambda s: s["final_test_accuracy"],
           reporting.MetricFormat(spec=".3f", label="test accuracy")),
    Metric("sparsity", lambda s: s["final_global_sparsity"],
           reporting.MetricFormat(spec=".4f", label="global sparsity")),
    Metric("nonzeros", lambda s: s["final_nonzero_params"],
           reporting.MetricFormat(spec=".0f", label="nonzero params")),
    # Mean over the rounds of what one round sends, summed over that round's clients.
    Metric("bytes_down", _per_round("total_bytes_down"),
           reporting.MetricFormat(spec=".1f", scale=1024, unit="KiB", label="down/round")),
    Metric("bytes_up", _per_round("total_bytes_up"),
           reporting.MetricFormat(spec=".1f", scale=1024, unit="KiB", label="up/round")),
    Metric("round_seconds", lambda s: s["median_round_seconds"],
           reporting.MetricFormat(spec=".3f", unit="s", label="median round")),
    # summary.json stores an infinite epsilon (no noise) as null.
    Metric("epsilon", lambda s: math.inf if s["final_epsilon"] is None else s["final_epsilon"],
           reporting.MetricFormat(spec=".2f", label="ε")),
    # The model as stored after the last round (after a shrink: the smaller one); NaN for
    # runs recorded before these were measured.
    Metric("params", lambda s: _number(s.get("params")),
           reporting.MetricFormat(spec=".0f", label="params")),
    # Multiply-adds (not FLOPs, which would be twice as many); runs recorded before the
    # rename call it flops_per_example.
    Metric("macs", lambda s: _number(s.get("macs_per_example", s.get("flops_per_example"))),
           reporting.MetricFormat(spec=".0f", label="mult-adds/example")),
    Metric("round_seconds_final", lambda s: _number(s.get("median_round_seconds_after_pruning")),
           reporting.MetricFormat(spec=".3f", unit="s", label="round after pruning")),
    # What a float32 dense upload would be, over what was sent (all rounds).
    Metric("compression_up", lambda s: s["total_dense_bytes_up"] / s["total_bytes_up"],
           reporting.MetricFormat(spec=".2f", unit="×", label="up compression")),
    # The final model as deployed (`--deploy`): model/model.tflite (shrunk when
    # structured), its deflate-zipped size, the pruned model at full size in TFLite's
    # sparse format (EXPERIMENTAL_SPARSITY), and the final model's interpreter latency.
    Metric("tflite_bytes", _deployed(lambda d: d["file_bytes"]),
           reporting.MetricFormat(spec=".1f", scale=1024, unit="KiB", label="TFLite")),
    Metric("tflite_zipped", _deployed(lambda d: d["file_bytes_zipped"]),
           reporting.MetricFormat(spec=".1f", scale=1024, unit="KiB", label="TFLite zipped")),
    Metric("tflite_sparse", _deployed(
        lambda d: d["models"]["pruned"]["sparsity_format"]["tflite_bytes"]),
           reporting.MetricFormat(spec=".1f", scale=1024, unit="KiB",
                                  label="TFLite sparse format")),
    Metric("latency_1", _latency_us(1),
           reporting.MetricFormat(spec=".2f", unit="µs", label="latency batch 1")),
    Metric("latency_64", _latency_us(64),
           reporting.MetricFormat(spec=".1f", unit="µs", label="latency batch 64")),
    # Everything sent over the run, all rounds and clients.
    Metric("total_bytes_down", lambda s: s["total_bytes_down"],
           reporting.MetricFormat(spec=".2f", scale=2**20, unit="MiB", label="down total")),
    Metric("total_bytes_up", lambda s: s["total_bytes_up"],
           reporting.MetricFormat(spec=".2f", scale=2**20, unit="MiB", label="up total")),
    # The first round whose test accuracy reaches TARGET_FRACTION of the final test
    # accuracy of the dense run of the same seed (`rounds_to_target`); inf: never.
    Metric("rounds_to_90", None,
           reporting.MetricFormat(spec=".1f", label="rounds to 90 % of dense")),
    # 1 if the run reaches that target in some round, else 0: a row's mean is the fraction
    # of its seeds that do (rounds_to_90 is inf as soon as one of them does not).
    Metric("reached_90", None,
           reporting.MetricFormat(spec=".1f", label="seeds reaching 90 % of dense")),
)}
TARGET_FRACTION = 0.9  # of the dense run's final test accuracy (`rounds_to_target`)


def rounds_to_target(run: RunResult, dense: RunResult,
                     fraction: float = TARGET_FRACTION) -> float:
    """The first round (1-based, as metrics.csv numbers them) whose test accuracy is at
    least `fraction` of `dense`'s final test accuracy; inf if no evaluated round is.

    Rounds without an evaluation (`--eval_every` > 1: a blank test_accuracy) are
    skipped, so the result is the first evaluated round at the target.
    """
    target = fraction * dense.summary["final_test_accuracy"]
    for row in run.metrics_rows:
        if row["test_accuracy"] not in ("", None) and float(row["test_accuracy"]) >= target:
            return float(row["round"])
    return math.inf


# Metrics of a run and the dense run of its seed: metric -> (run, dense run) -> value.
DENSE_METRICS: dict[str, Callable[[RunResult, RunResult], float]] = {
    "rounds_to_90": rounds_to_target,
    "reached_90": lambda run, dense: float(math.isfinite(rounds_to_target(run, dense)))}


@dataclasses.dataclass(frozen=True)
class RunResult:
    """A finished cell read back from disk."""

    cell: Cell
    summary: dict
    metrics_rows: list[dict]

    def row(self, metrics: Sequence[str]) -> dict:
        """{schedule, final_sparsity, masking, seed, <metric>: value, ...}."""
        values = {m: METRICS[m].value(self.summary) for m in metrics if m not in DENSE_METRICS}
        varying = {k: getattr(self.cell.config, k) for k in VARYING_KEYS}
        return {**varying, **self.cell.key, "seed": self.cell.config.seed, **values}


def load_results(cells: Sequence[Cell], root: Path) -> list[RunResult]:
    """The complete cells' summaries and metrics (incomplete cells are left out)."""
    results = []
    for cell in cells:
        folder = root / cell.name
        summary = atomic_files.read_json(folder / "summary.json")
        if summary is None or summary.get("fingerprint") != cell.config.fingerprint():
            continue
        with open(folder / "metrics.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        results.append(RunResult(cell, summary, rows))
    return results


def row_keys(results: Sequence[RunResult]) -> tuple[str, ...]:
    """KEYS, preceded by the `VARYING_KEYS` whose values differ between the runs, and
    followed by the `OPTIONAL_KEYS` (granularity, sparsity_distribution, regrow,
    regrow_at) the grid shows (it lists a value other than the default) and the
    noise multiplier (`DP_KEY`) when the runs are DP runs."""
    varying = tuple(k for k in VARYING_KEYS
                    if len({getattr(r.cell.config, k) for r in results}) > 1)
    optional = tuple(k for k in OPTIONAL_KEYS if any(k in r.cell.key for r in results))
    dp = (DP_KEY,) if any(DP_KEY in r.cell.key for r in results) else ()
    return varying + KEYS + optional + dp


PAIRED_PREFIX = "delta_"


def paired_name(metric: str) -> str:
    """The column of a metric's paired difference to the dense row: `delta_<metric>`."""
    return PAIRED_PREFIX + metric


def aggregate(results: Sequence[RunResult], metrics: Sequence[str],
              paired: Sequence[str] = (), baseline: Mapping | None = None) -> reporting.Table:
    """Mean ± 95% CI over seeds per `row_keys` (schedule, sparsity, masking, ...), in grid
    order; then, for each metric of `paired`, the column `delta_<metric>`.

    `delta_<metric>` of a row is `reporting.paired_mean_ci` of its runs' values
    minus those of the dense row's run with the same seed (the same partition,
    initialization and client order follow the seed): the mean of the per-seed
    differences and the Student-t interval of those differences, not of the
    difference of two means. The dense row is `grid.DENSE_KEY` plus `baseline`
    (e.g. `{"structure": "unstructured"}`), with the row's own values of the
    other keys (model, noise multiplier); its own difference is 0 ± 0. The same
    dense run of the seed gives the `DENSE_METRICS` (rounds to 90 % of its accuracy).

    Raises:
      reporting.UnpairedError: with `paired`, a row without a dense row or whose
        seeds differ from the dense row's (e.g. a run missing): the message names
        the row and the seeds.
    """
    rows = [r.row([*metrics, *(m for m in paired if m not in metrics)]) for r in results]
    keys = row_keys(results)
    if set(metrics) & set(DENSE_METRICS):
        _add_dense_metrics(results, rows, keys, [m for m in metrics if m in DENSE_METRICS],
                           {**DENSE_KEY, **(baseline or {})})
    table = reporting.aggregate(rows, keys, metrics)
    if not paired:
        return table
    return reporting.add_paired(table, rows, paired, {**DENSE_KEY, **(baseline or {})},
                                name=paired_name)


def _add_dense_metrics(results: Sequence[RunResult], rows: Sequence[dict],
                       keys: Sequence[str], metrics: Sequence[str], baseline: Mapping) -> None:
    """Adds each `DENSE_METRICS` value to `rows` (one per result, in order), from the
    run and the run of its dense row (`baseline`'s values in its keys, the row's own in
    the others) with the same seed.

    Raises:
      reporting.UnpairedError: a run without such a dense run; names the row and seed.
    """
    fixed = {k: v for k, v in baseline.items() if k in keys}
    runs = {(tuple(row[k] for k in keys), row["seed"]): r
            for r, row in zip(results, rows, strict=True)}
    for result, row in zip(results, rows, strict=True):
        base = tuple({**row, **fixed}[k] for k in keys)
        dense = runs.get((base, row["seed"]))
        if dense is None:
            where = " ".join(f"{k}={row[k]}" for k in keys)
            raise reporting.UnpairedError(f"{where}: no dense run of seed {row['seed']} for "
                                          f"{', '.join(metrics)}")
        for m in metrics:
            row[m] = DENSE_METRICS[m](result, dense)


def default_metrics(results: Sequence[RunResult]) -> list[str]:
    """Every metric of `METRICS` that `results` have: `epsilon` only for DP runs, the
    `DENSE_METRICS` only when every run has the dense run of its seed (a grid without
    `none` in --schedules has none)."""
    dp = any(DP_KEY in r.cell.key for r in results)
    rows = [r.row(()) for r in results]
    try:
        _add_dense_metrics(results, rows, row_keys(results), (), DENSE_KEY)
        paired = True
    except reporting.UnpairedError:
        paired = False
    return [m for m in METRICS
            if (dp or m != "epsilon") and (paired or m not in DENSE_METRICS)]


def formats(metrics: Sequence[str]) -> dict:
    """Metric name -> its `MetricFormat`, for `reporting.to_markdown`/`to_latex`.

    A paired column (`delta_<metric>`) is printed as its metric, headed
    `Δ <label> vs dense`.
    """
    shown = {}
    for m in metrics:
        if m.startswith(PAIRED_PREFIX) and m.removeprefix(PAIRED_PREFIX) in METRICS:
            base = METRICS[m.removeprefix(PAIRED_PREFIX)].format
            shown[m] = dataclasses.replace(base, label=f"Δ {base.header(m)} vs dense",
                                           unit="")
        else:
            shown[m] = METRICS[m].format
    return shown


def markdown(table: reporting.Table) -> str:
    """The Markdown of a grid table in the grid's metric formats."""
    return reporting.to_markdown(table, formats(table.metrics))


def write_reports(results: Sequence[RunResult], root: Path,
                  metrics: Sequence[str] | None = None, paired: Sequence[str] = (),
                  baseline: Mapping | None = None) -> reporting.Table:
    """Writes comparison.{md,tex,csv} and the plots into `root`; returns the table.

    `metrics` defaults to `default_metrics(results)`; `paired` and `baseline` add
    paired-difference columns (`aggregate`).

    Plots, per masking mode, dense included, one series per schedule (and
    granularity or noise multiplier, where the grid varies them; mean and 95%
    CI over seeds): `plots/accuracy_vs_sparsity-<masking>.png` (final
    test accuracy against the target sparsity) and
    `plots/accuracy_vs_round-<masking>-s<sparsity>.png` (test accuracy against
    the round, one file per target sparsity). `accuracy_vs_sparsity.png` and
    `accuracy_vs_round.png` in `root` are those of the last masking mode listed
    (at its last sparsity listed).
    """
    if metrics is None:
        metrics = default_metrics(results)
    table = aggregate(results, metrics, paired, baseline)
    root.mkdir(parents=True, exist_ok=True)
    atomic_files.atomic_write_text(root / "comparison.md", markdown(table))
    atomic_files.atomic_write_text(root / "comparison.tex",
                                reporting.to_latex(table, formats(table.metrics)))
    reporting.to_csv(table, root / "comparison.csv")
    write_figures(results, root)
    return table


def varying_part_fields(results: Sequence[RunResult]) -> tuple[str, ...]:
    """The `VARYING_KEYS` (model, structure, upload quantization) whose values differ
    between `results`: runs that differ in them are never averaged into one series (none
    for a one-part grid of one wire format)."""
    return tuple(f for f in VARYING_KEYS
                 if len({getattr(r.cell.config, f) for r in results}) > 1)


def series_label(result: RunResult, parts: Sequence[str] = ()) -> str:
    """A run's legend label (`grid_plots.series_label`): schedule with its power, masking,
    the granularity when the grid varies it, the noise multiplier of a DP run; prefixed by
    the values of the config fields `parts` (e.g. "mlp, neuron: ..."; an upload
    quantization as "int8 up", none as "float32 up"). The masking is
    followed by the sparsity distribution, regrow and regrow_at where the grid shows them
    (`grid.OPTIONAL_KEYS`; regrow and regrow_at only of cells that regrow), e.g.
    "oneshot, both, erk, gradient, client"."""
    config, key = result.cell.config, result.cell.key
    prefix = ", ".join(_part_label(f, getattr(config, f)) for f in parts)
    prefix = f"{prefix}: " if prefix else ""
    if result.cell.schedule == DENSE:
        return prefix + DENSE
    regrows = key.get(REGROW_KEY) not in (None, "none")  # static cells: no regrow_at
    masking = ", ".join(str(v) for v in (
        config.masking, key.get(DISTRIBUTION_KEY), *((key.get(REGROW_KEY),
                                                      key.get(REGROW_AT_KEY)) if regrows else ()))
        if v)
    return prefix + grid_plots.series_label(
        config.schedule, masking=masking,
        power=getattr(config.make_schedule(), "power", None),
        granularity=key.get(GRANULARITY_KEY), noise_multiplier=key.get(DP_KEY))


def _part_label(field: str, value) -> str:
    if field == "upload_quantization":
        return f"{'float32' if value == 'none' else value} up"
    return str(value)


HEADLINE_FIGURES = ("accuracy_vs_round", "accuracy_vs_sparsity", "accuracy_vs_bytes")


def _tradeoff_row(result: RunResult, parts: Sequence[str]) -> dict:
    s = result.summary
    return {"series": series_label(result, parts),
            "final_sparsity": result.cell.config.final_sparsity,
            "accuracy": s["final_test_accuracy"], "sparsity": s["final_global_sparsity"],
            # Everything the run sent, both directions, all rounds.
            "total_mib": (s["total_bytes_down"] + s["total_bytes_up"]) / 2**20}


def write_figures(results: Sequence[RunResult], root: Path) -> dict[str, Path]:
    """The grid's figures in root/plots/ (PNG and PDF), one set per masking mode.

    Per masking mode (dense runs drawn in each): `accuracy_vs_round-<masking>-s<sparsity>`
    (mean and 95 % CI band over seeds per round), `accuracy_vs_sparsity-<masking>`
    (accuracy against the measured final sparsity, CI error bars on both) and
    `accuracy_vs_bytes-<masking>` (against the total bytes sent, log scale). The last
    mode's figures are also copied to root/<name>.{png,pdf}.

    Returns:
      {name in `HEADLINE_FIGURES`: its PNG in root/} (the PDF is beside it).
    """
    parts = varying_part_fields(results)  # Table 3: one series per model and structure
    dense = [r for r in results if r.cell.schedule == DENSE]
    pruned = [r for r in results if r.cell.schedule != DENSE]
    plot_dir = root / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    headline = {}
    for masking in list(dict.fromkeys(r.cell.config.masking for r in pruned)) or [None]:
        runs = dense + [r for r in pruned if r.cell.config.masking == masking]
        tag = masking or DENSE
        by_sparsity = {}
        for r in runs:
            by_sparsity.setdefault(r.cell.config.final_sparsity, []).append(r)
        for sparsity, group in by_sparsity.items():
            if sparsity == 0.0 and len(by_sparsity) > 1:
                continue  # dense alone; it is drawn with every pruned sparsity
            curves = [(series_label(r, parts), r.metrics_rows)
                      for r in (group if sparsity == 0.0 else dense + group)]
            headline["accuracy_vs_round"] = grid_plots.plot_curves_by_group(
                curves, "test_accuracy", plot_dir / f"accuracy_vs_round-{tag}-s{sparsity:g}.png",
                title=f"final sparsity {sparsity:g}")
        table = reporting.aggregate([_tradeoff_row(r, parts) for r in runs],
                                    ("series", "final_sparsity"),
                                    ["accuracy", "sparsity", "total_mib"])
        headline["accuracy_vs_sparsity"] = grid_plots.plot_tradeoff(
            table, plot_dir / f"accuracy_vs_sparsity-{tag}.png", x="sparsity", series_by=["series"],
            xlabel="final global sparsity", ylabel="test accuracy")
        headline["accuracy_vs_bytes"] = grid_plots.plot_tradeoff(
            table, plot_dir / f"accuracy_vs_bytes-{tag}.png", x="total_mib", series_by=["series"],
            xlabel="total MiB sent (up + down, all rounds)", ylabel="test accuracy", log_x=True)
    return {name: copy_figure(source, root / f"{name}.png") for name, source in headline.items()}


def publish_figures(root: Path, destination: Path, prefix: str) -> list[Path]:
    """Copies every figure of root/plots/ to destination/<prefix>-<name>.{png,pdf}.

    For a paper's figures folder (`reproduce --write_results`: docs/figures/).
    The folder is created; files of other names in it are left alone.

    Returns:
      The PNGs written, sorted (each with its PDF beside it).
    """
    destination.mkdir(parents=True, exist_ok=True)
    return [copy_figure(png, destination / f"{prefix}-{png.name}")
            for png in sorted((root / "plots").glob("*.png"))]


def copy_figure(png: Path, destination: Path) -> Path:
    """Copies a figure's PNG and its PDF to `destination` (.png) and beside it; returns it."""
    for suffix in plots.FORMATS:
        atomic_files.atomic_write_bytes(destination.with_suffix(f".{suffix}"),
                                        png.with_suffix(f".{suffix}").read_bytes())
    return destination


def expected_values(table: reporting.Table, tolerances: Mapping[str, float],
                    info: Mapping) -> dict:
    """A table's expected-values JSON: its rows' means, the tolerances and `info`.

    Args:
      table: from `aggregate`.
      tolerances: metric -> the largest accepted |mean - expected mean|; only
        these metrics are stored and compared.
      info: stored as is (e.g. the table number and its flagfiles).
    """
    rows = [{**dict(zip(table.group_by, g.key, strict=True)), "n": g.n,
             **{m: None if math.isinf(g.mean[m]) else g.mean[m] for m in tolerances}}
            for g in table.groups]
    return {
        **info,
        "tolerances": dict(tolerances),
        "tolerance_note": "A value passes when |mean over seeds - expected| <= tolerance "
                          "(null: infinite, e.g. the epsilon of a run without noise). "
                          "On the same machine and software a rerun is bit-identical, except "
                          "for DP runs (TFF's noise is unseeded); other CPUs may move accuracy "
                          "by a few test examples. See the tolerances' comments in "
                          "experiments/tables.py.",
        "rows": rows,
    }


def _row_name(group_by: Sequence[str], key: tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(group_by, key, strict=True))


def compare(table: reporting.Table, expected: Mapping) -> list[str]:
    """Differences between a table and its expected values, one line each.

    Args:
      table: from `aggregate`.
      expected: from `expected_values` (e.g. read back from JSON).

    Returns:
      One message per missing or extra row, different number of runs, or
      metric mean outside its tolerance; empty when everything matches.
    """
    # A key the expected rows lack (values of another grid) leaves every row unmatched.
    wanted = {tuple(r.get(k) for k in table.group_by): r for r in expected["rows"]}
    found = {g.key: g for g in table.groups}
    problems = []
    for key, row in wanted.items():
        name = _row_name(table.group_by, key)
        if key not in found:
            problems.append(f"{name}: row missing")
            continue
        group = found[key]
        if group.n != row["n"]:
            problems.append(f"{name}: {group.n} run(s), expected {row['n']}")
        for metric, tolerance in expected["tolerances"].items():
            if metric not in group.mean or metric not in row:
                problems.append(f"{name}: {metric} is not in both the table and the expected "
                                "values")
                continue
            value, want = group.mean[metric], row[metric]
            want = math.inf if want is None else want
            if not math.isclose(value, want, rel_tol=0.0, abs_tol=tolerance):
                problems.append(f"{name}: {metric} {value!r}, expected {want!r} "
                                f"(tolerance ±{tolerance:g}, off by {value - want:+.6g})")
    problems += [f"{_row_name(table.group_by, key)}: row not in the expected values"
                 for key in found if key not in wanted]
    return problems


def replace_section(text: str, name: str, section: str, order: Sequence[str] = ()) -> str:
    """`text` with the block between `<!-- name:start -->` and `<!-- name:end -->` replaced.

    The markers stay; without them the block goes after the nearest earlier name of
    `order` present (e.g. table5 after table3 when there is no table4), else at the end.
    """
    return reporting.replace_marked_sections(
        text, {name: section}, lambda n: (f"<!-- {n}:start -->", f"<!-- {n}:end -->"),
        order=order)
