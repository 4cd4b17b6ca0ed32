"""Reporting: confidence intervals and comparison tables.

Files are written through `fedprune.outputs.atomic_files`; the figures are in
`fedprune.outputs.plots`.

* `mean_ci`: mean and Student-t confidence half width over seeds.
  `paired_mean_ci`: the same for the per-seed differences between two
  configurations run on the same seeds.
* `aggregate` groups result rows (e.g. one per run) by configuration keys;
  `add_paired` adds columns of paired differences to a baseline group;
  `to_markdown`, `to_latex` and `to_csv` write the resulting `Table`. Groups
  keep the order in which they first appear in the rows: sort the rows first
  for another order.
* `replace_marked_sections`: rewrites the generated sections of a Markdown
  file (BENCHMARKS.md, RESULTS.md) and keeps the rest.

Pure Python + numpy/scipy; no TensorFlow import.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from fedprune.outputs.atomic_files import PathLike, atomic_write_csv

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


class UnpairedError(ValueError):
    """Paired values whose units (seeds) do not match one to one."""


def paired_mean_ci(values: Mapping[Hashable, float], baseline: Mapping[Hashable, float],
                   confidence: float = 0.95) -> tuple[float, float]:
    """Mean and confidence half width of the paired differences `values[u] - baseline[u]`.

    For two configurations run on the same units (seeds: the same partition,
    initialization and client order), the differences d_u = values[u] -
    baseline[u] are what varies independently between units; their mean equals
    the difference of the two means, and its interval is `mean_ci(d)`,
    t_{(1 + confidence) / 2, n - 1} * s_d / sqrt(n), narrower than the two
    separate intervals whenever the configurations move together across units.

    Args:
      values: unit (e.g. seed) -> value of one configuration.
      baseline: unit -> value of the configuration it is compared with.
      confidence: the interval's coverage, in (0, 1).

    Returns:
      (mean difference, half width); the half width is NaN for a single unit.

    Raises:
      UnpairedError: the units differ (naming those only in `values` and those
        only in `baseline`), or there are none; never an unpaired difference.
    """
    only_values = sorted(set(values) - set(baseline))
    only_baseline = sorted(set(baseline) - set(values))
    if only_values or only_baseline or not values:
        raise UnpairedError(
            f"unpaired units: {_units(only_values)} only in the values, "
            f"{_units(only_baseline)} only in the baseline" if values else "no units to pair")
    units = sorted(values)
    return mean_ci([float(values[u]) - float(baseline[u]) for u in units], confidence)


def _units(units: Sequence) -> str:
    return "[" + ", ".join(map(str, units)) + "]" if units else "none"


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


def add_paired(table: Table, rows: Iterable[Mapping[str, Any]], metrics: Sequence[str],
               baseline: Mapping[str, Any], *, unit: str = "seed",
               name: Callable[[str], str] = "delta_{}".format) -> Table:
    """`table` with a column of paired differences to a baseline group per metric.

    Each group's baseline is the group whose key has the `baseline` values in
    those keys and the group's own values in the others (keys of `baseline`
    that `table` does not group by are ignored): with `baseline =
    {"schedule": "dense", "masking": "none"}`, a row's baseline is the dense row
    with the same values of the other keys (e.g. the same noise multiplier).
    The column `name(metric)`, placed right after the metric's own column (or
    last), holds `paired_mean_ci` of the group's values and its baseline's,
    unit by unit; the baseline group's own is 0 ± 0.

    Args:
      table: from `aggregate(rows, ...)`, at the confidence used here too.
      rows: the rows `table` was aggregated from, each with `unit`.
      metrics: the metrics to pair (each in the rows).
      baseline: key -> value of the baseline group.
      unit: the row key that pairs values (the seed).
      name: metric -> the new column's name.

    Raises:
      UnpairedError: a group without a baseline group, a unit twice in one
        group, or units that do not match its baseline's; the message names the
        group (`key=value ...`) and the units.
    """
    per_group: dict[tuple, dict[Hashable, Mapping[str, Any]]] = {}
    for row in rows:
        key = tuple(row[k] for k in table.group_by)
        units = per_group.setdefault(key, {})
        if row[unit] in units:
            raise UnpairedError(f"{_group_name(table.group_by, key)}: {unit} {row[unit]} "
                                "appears twice")
        units[row[unit]] = row
    fixed = {k: v for k, v in baseline.items() if k in table.group_by}
    groups = []
    for group in table.groups:
        own = dict(zip(table.group_by, group.key, strict=True))
        base_key = tuple({**own, **fixed}[k] for k in table.group_by)
        where = _group_name(table.group_by, group.key)
        if base_key not in per_group:
            raise UnpairedError(f"{where}: no baseline row "
                                f"{_group_name(table.group_by, base_key)} to pair with")
        mine, theirs = per_group[group.key], per_group[base_key]
        if set(mine) != set(theirs):
            raise UnpairedError(
                f"{where}: {unit}s do not match its baseline row "
                f"{_group_name(table.group_by, base_key)}'s: "
                f"{_units(sorted(set(mine) - set(theirs)))} only in this row, "
                f"{_units(sorted(set(theirs) - set(mine)))} only in the baseline")
        mean, ci = dict(group.mean), dict(group.ci)
        for m in metrics:
            mean[name(m)], ci[name(m)] = paired_mean_ci(
                {u: float(r[m]) for u, r in mine.items()},
                {u: float(r[m]) for u, r in theirs.items()}, table.confidence)
        groups.append(dataclasses.replace(group, mean=mean, ci=ci))
    order = [c for m in table.metrics for c in ((m, name(m)) if m in metrics else (m,))]
    order += [name(m) for m in metrics if m not in table.metrics]
    return dataclasses.replace(table, metrics=tuple(order), groups=tuple(groups))


def _group_name(group_by: Sequence[str], key: tuple) -> str:
    return " ".join(f"{k}={v}" for k, v in zip(group_by, key, strict=True))


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
# Generated sections of Markdown files.


def replace_marked_sections(text: str, bodies: Mapping[str, str],
                            markers: Callable[[str], tuple[str, str]], *,
                            order: Sequence[str] = ()) -> str:
    """`text` with each section of `bodies` replaced between its markers.

    The writer behind BENCHMARKS.md and RESULTS.md: a generated section sits
    between two comment lines, `markers(name)` = (start, end), and rerunning one
    section replaces only it; everything else in `text` (hand-written notes,
    other sections) is kept as it is. A section not yet in `text` goes after
    the nearest earlier section of `order` present, else before the nearest
    later one, else at the end.

    Args:
      text: the file's current content.
      bodies: section name -> its Markdown (without the markers).
      markers: a section name -> its (start, end) marker lines.
      order: the order of the sections in the file, for placing new ones.
    """
    names = [n for n in order if n in bodies] + [n for n in bodies if n not in order]
    for name in names:
        start, end = markers(name)
        block = f"{start}\n{bodies[name].rstrip()}\n{end}"
        at_start = text.find(start)
        at_end = text.find(end, at_start + len(start)) if at_start >= 0 else -1
        if at_end >= 0:
            text = text[:at_start] + block + text[at_end + len(end):]
            continue
        index = list(order).index(name) if name in order else len(order)
        earlier = [text.find(markers(n)[1]) for n in order[:index]]
        later = [text.find(markers(n)[0]) for n in order[index + 1:]]
        if any(p >= 0 for p in earlier):
            at = max(p for p in earlier if p >= 0)
            at = text.index("\n", at) if "\n" in text[at:] else len(text)
            text = f"{text[:at]}\n\n{block}{text[at:]}"
        elif any(p >= 0 for p in later):
            at = min(p for p in later if p >= 0)
            text = f"{text[:at]}{block}\n\n{text[at:]}"
        else:
            text = f"{text.rstrip()}\n\n{block}\n"
    return text
