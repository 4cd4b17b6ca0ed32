r"""Regenerates a table of RESULTS.md from its checked-in flagfiles and checks it.

    python -m experiments.reproduce --table=1                  # full size, check only
    python -m experiments.reproduce --table=1 --write_results  # and rewrite RESULTS.md
    python -m experiments.reproduce --table=1 --size=ci        # the tiny variant the tests run

A table is a grid (see `experiments/grid.py`) whose base configuration and
grid flags come only from flagfiles under `experiments/configs/`: the size
`full` reads `table<N>.flags`, the size `ci` reads `table<N>.flags` and then
`table<N>_ci.flags` (a few clients, rounds and cells; the same code paths). No
experiment or grid flag is accepted on the command line, so the command in
RESULTS.md is the whole recipe; `experiments.compare_schedules
--flagfile=experiments/configs/table<N>.flags` runs the same grid.

The runs go to --output_dir (default `runs/table<N>-<size>`); complete runs
there are reused, so a second invocation only re-checks. The table is printed
and compared with the committed expected values (`table<N>_expected.json`,
`table<N>_ci_expected.json`, or --expected): exit status 1 and one line per
value outside its tolerance when they differ. --write_results instead stores
the new values as expected and, for the full size, rewrites the table's section
of RESULTS.md between `<!-- table<N>:start -->` and `<!-- table<N>:end -->`
(atomically) with the command, hardware and time. That is the only way
RESULTS.md is written, and it names the commit the runs trained at: the full
size with --write_results trains runs only in a clean checkout (no
uncommitted changes to tracked files) and writes only runs trained at one
clean commit (reusing complete runs needs no clean checkout, so the tables
can be written one after another once their runs are trained).
--write_results also copies the table's figures (PNG and PDF,
`grid_results.write_figures`) to docs/figures/table<N>-<figure> (the full
size) or to --figures_dir.

The tables are registered in `experiments/tables.py` (`TABLES`, one
`TableSpec` each, which `--table` lists); adding a table is registering a
`TableSpec` there, or in a module of one's own passed with `--extensions`, and
writing its flagfiles (docs/extending.md). A new grid dimension goes into
`experiments/grid.py`. A table whose rows need different base flags (Table 3:
other models, structures and sparsities) lists `parts`: each part is its own
grid over `table<N>.flags` + `table<N>_<part>.flags`, and the table's rows gain
`model`/`structure` columns when those differ.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from absl import flags

from experiments import common, grid, grid_results, process_stats, registry_flags, usage
from experiments.tables import CONFIGS, REPO, SIZES, TABLES, TableSpec, register_table
from fedprune.config import OUTPUT_ONLY_FIELDS, ExperimentConfig
from fedprune.errors import InvalidArgument, check
from fedprune.outputs import atomic_files, reporting

__all__ = ["CONFIGS", "REPO", "SIZES", "TABLES", "TableSpec", "main", "record_invocation",
           "register_table", "render_section", "table_cells"]


def _table_number(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise InvalidArgument("table", text, TABLES.accepted()) from None


_TABLE = registry_flags.define_registry_flag(TABLES, "table", None,
                                            "The table of RESULTS.md to regenerate:",
                                            convert=_table_number)
_SIZE = flags.DEFINE_enum("size", "full", SIZES, "full: the published grid; ci: a tiny "
                          "variant (few clients, rounds and cells) for the test suite.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "Root of the run tree "
                                  "(default: runs/table<N>-<size>); complete runs are reused.")
_EXPECTED = flags.DEFINE_string("expected", "", "Expected-values JSON (default: "
                                "experiments/configs/table<N>[_ci]_expected.json).")
_RESULTS = flags.DEFINE_string("results", "", "The RESULTS.md that --write_results rewrites "
                               "for --size=full (default: the repository's RESULTS.md).")
_WRITE_RESULTS = flags.DEFINE_bool("write_results", False, "Store the new values as expected "
                                   "and, for --size=full, rewrite the table in --results.")
_FIGURES_DIR = flags.DEFINE_string("figures_dir", "", "Where --write_results copies the "
                                   "table's figures, as table<N>[_ci]-<figure>.{png,pdf} "
                                   "(default: docs/figures/ for --size=full; for --size=ci only "
                                   "when given).")
_ROUND_LOGS = flags.DEFINE_bool("round_logs", False, "Print every run's per-round lines.")
common.define_experiment_flags()  # the flagfiles set these; only --verbose/--tff_workers here
# Experiment flags the tables' flagfiles set: all but the output-only ones (--deploy).
_TABLE_FIELDS = [f.name for f in dataclasses.fields(ExperimentConfig)
                 if f.name not in OUTPUT_ONLY_FIELDS]
grid.define_grid_flags()
usage.set_topic("table", _TABLE, _SIZE)
usage.set_topic(usage.OUTPUTS, _OUTPUT_DIR, _EXPECTED, _RESULTS, _WRITE_RESULTS, _FIGURES_DIR,
                _ROUND_LOGS)
usage.not_accepted([*_TABLE_FIELDS, *grid.GRID_FLAGS, "flagfile"],
                   "the table's flagfiles in experiments/configs/ set them (python -m "
                   "experiments.compare_schedules runs a grid of your own)",
                   shown_as="--flagfile, the experiment flags (python -m experiments.run --help) "
                            "and the grid flags (--schedules, --seeds, ...)")
FLAGS = flags.FLAGS
_RUNTIME_FLAGS = ("verbose", "tff_workers")


# --------------------------------------------------------------------------
# RESULTS.md.

_RESULTS_HEADER = """# Results

Every table below is written by `python -m experiments.reproduce --table=N
--write_results` and by nothing else; edit `experiments/reproduce.py` or the
flagfiles in `experiments/configs/`, never this file. Each section names the
command that regenerates it, the flagfiles, the hardware and the time it took.
Without `--write_results` the same command re-runs (or reuses) the runs and
checks them against `experiments/configs/table<N>_expected.json`.

Each table also has a `ci` size, the one the test suite runs
(`tests/test_compare_reproduce.py`): `python -m experiments.reproduce --table=N
--size=ci` reads `experiments/configs/table<N>_ci.flags` after the table's own
flagfiles (a few clients, rounds and cells, the same code paths) and checks
`experiments/configs/table<N>_ci_expected.json`, written by the same command
with `--write_results`. The `ci` numbers are not the tables', but they mean
something: each size is chosen so the models learn (test accuracy 0.65-0.89 on
10 classes, chance 0.1; each flagfile says how and what it costs: Table 1
4 clients × 3 rounds, Table 2 ~24 of 30 clients a round × 8 rounds so that
DP noise at z = 1 still lets the model learn, Table 3 4 clients × 5 rounds
with the shrink after round 3, Table 5 4 clients × 3 rounds, float32 and int8
under both masking and the neuron-shrunk MLP), and the tests fail when an expected or a
rerun accuracy is not above 0.5, so a model broken down to chance cannot
match its expected values.
"""


def _shown(path: Path) -> str:
    """A path as RESULTS.md and the expected values show it: relative to the repository if in it."""
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def record_invocation(root: Path, *, trained: int, seconds: float,
                      mean_load: float | None = None) -> list[dict]:
    """Appends an invocation that trained runs to `<root>/invocations.json`; returns all.

    Each records its wall seconds, the 1-minute load average at its end and,
    with `mean_load`, the mean 1-minute load average over it
    (`process_stats.LoadSampler`).

    RESULTS.md reports the time of the invocations that trained the runs, also
    when a later invocation (e.g. with --write_results) only reuses them.
    """
    path = root / "invocations.json"
    invocations = (atomic_files.read_json(path) or {}).get("invocations", [])
    if trained:
        invocation = {"date": time.strftime("%Y-%m-%d %H:%M"), "runs_trained": trained,
                      "seconds": seconds, "load_average_1min": os.getloadavg()[0]}
        if mean_load is not None:
            invocation["mean_load_average_1min"] = mean_load
        invocations.append(invocation)
        atomic_files.atomic_write_json(path, {"invocations": invocations})
    return invocations


def figures_dir(size: str) -> Path | None:
    """Where --write_results copies the figures: --figures_dir, else docs/figures/ for the
    full size; None: nowhere."""
    if _FIGURES_DIR.value:
        return Path(_FIGURES_DIR.value)
    return REPO / "docs" / "figures" if size == "full" else None


def grid_command(spec: TableSpec, part: str | None = None) -> str:
    """The `compare_schedules` command that runs a table's grid (of one part) on its own.

    Args:
      spec: the table.
      part: for a table of parts, the part's name (in `spec.parts`, or "P" for
        the pattern RESULTS.md shows).
    """
    flagfiles = [_shown(spec.flagfiles("full")[0])]
    folder = f"runs/table{spec.number}"
    if part is not None:
        flagfiles.append(f"experiments/configs/table{spec.number}_{part}.flags")
        folder += f"-{part}"
    return ("python -m experiments.compare_schedules "
            + " ".join(f"--flagfile={f}" for f in flagfiles) + f" --output_dir={folder}")


def grid_commands(spec: TableSpec) -> list[str]:
    """Every command that runs a table's grid outside `reproduce` (one per part)."""
    return [grid_command(spec, part) for part in spec.parts] or [grid_command(spec)]


def render_section(spec: TableSpec, table: reporting.Table, results: list,
                   invocations: list[dict], root: Path, figures: Sequence[Path] = (),
                   written_at: str | None = None) -> str:
    """The Markdown of a table's RESULTS.md section (without the markers).

    Args:
      spec: the table.
      table: its aggregated values.
      results: the runs (`grid_results.load_results`), found under `root`.
      invocations: from `record_invocation`, for the time it took.
      root: the run tree; the runs' config.json name the commit they were trained at.
      figures: the table's published PNGs (`grid_results.publish_figures`); those
        of accuracy against sparsity and against bytes are embedded, linked
        relative to the repository root (where RESULTS.md is).
      written_at: the checkout's commit before --write_results changed any file
        (default: now, which its own writes of tracked files would mark dirty).
    """
    from fedprune.outputs import provenance

    commit = trained_commit(results, root)

    flag_lines = []
    for path in spec.all_flagfiles("full"):
        if len(spec.all_flagfiles("full")) > 1:
            flag_lines.append(f"# {_shown(path)}")
        flag_lines += [line for line in path.read_text().splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
    files = [_shown(p) for p in spec.all_flagfiles("full")]
    if spec.parts:
        same_grid = (f"each part P of {', '.join(spec.parts)} is a grid: "
                     f"`{grid_command(spec, 'P')}`")
    else:
        same_grid = f"the same grid: `{grid_command(spec)}`"
    train_seconds = sum(r.summary["wall_seconds"] for r in results)
    took = sum(i["seconds"] for i in invocations)
    loads = ", ".join(f"{i['mean_load_average_1min']:.1f} (mean over it)"
                      if "mean_load_average_1min" in i
                      else f"{i['load_average_1min']:.1f} (at its end)" for i in invocations)
    return "\n".join([
        f"## {spec.title}",
        "",
        spec.description,
        "",
        "Regenerate (add `--write_results` to rewrite this section):",
        "",
        "```sh",
        f"python -m experiments.reproduce --table={spec.number} --size=full",
        "```",
        "",
        f"Flagfile{'s' if len(files) > 1 else ''} `{'`, `'.join(files)}` ({same_grid}):",
        "",
        "<details><summary>flags</summary>",
        "",
        "```",
        *flag_lines,
        "```",
        "",
        "</details>",
        "",
        f"- Hardware: {provenance.environment_description()}.",
        f"- Time: {_minutes(took)} for the command above ({len(invocations)} invocation(s) "
        f"that trained runs; 1-minute load average: {loads}); "
        f"{len(results)} runs of {train_seconds / len(results):.1f} s on average "
        f"({_minutes(train_seconds)} in total; the rest is start-up and tables).",
        f"- Code: the {len(results)} runs trained at git commit `{commit}` (a clean "
        f"checkout); table written at `{written_at or provenance.git_commit()}`, "
        f"{time.strftime('%Y-%m-%d')}.",
        f"- Expected values and tolerances: "
        f"`{_shown(spec.expected_path('full'))}`.",
        "",
        grid_results.markdown(table).rstrip(),
        "",
        *_embedded_figures(figures),
        f"Figures (PNG and PDF) in the run tree (`runs/table{spec.number}-full/plots/`) and "
        f"in `docs/figures/table{spec.number}-*`: `accuracy_vs_round-<masking>-s<sparsity>` "
        "(mean and 95 % CI band over seeds), `accuracy_vs_sparsity-<masking>` and "
        "`accuracy_vs_bytes-<masking>` (means with 95 % CI error bars), one series per "
        "schedule and masking, with granularity or noise multiplier where the table varies "
        "them.",
    ])


# The figures a table's RESULTS.md section shows (the others are listed by name).
_EMBEDDED_FIGURES = ("accuracy_vs_sparsity", "accuracy_vs_bytes")


def _embedded_figures(figures: Sequence[Path]) -> list[str]:
    """Markdown image lines for the embedded figures, then a blank line (none: no lines)."""
    lines = []
    for png in figures:
        kind, _, tag = png.stem.partition("-")[2].partition("-")
        if kind in _EMBEDDED_FIGURES:
            caption = f"{kind.replace('_', ' ')}, {tag}"
            lines.append(f"![{caption}]({_shown(png)})")
    return [*lines, ""] if lines else []


def trained_commit(results: list, root: Path) -> str:
    """The one clean git commit that every run's config.json records.

    Raises:
      InvalidArgument: (`--output_dir`) runs trained with uncommitted changes, at
        no known commit, or at several commits; the message lists them.
    """
    commits: dict[str | None, list[str]] = {}
    for r in results:
        config = atomic_files.read_json(root / r.cell.name / "config.json") or {}
        commits.setdefault(config.get("git_commit"), []).append(r.cell.name)
    if len(commits) == 1:
        (commit,) = commits
        if commit and not commit.endswith("-dirty"):
            return commit
    found = "; ".join(f"{c or 'no commit'}: {len(names)} run(s), e.g. {names[0]}"
                      for c, names in commits.items())
    raise InvalidArgument("output_dir", str(root),
                          "runs trained at one clean git commit, for RESULTS.md to name "
                          f"(found {found}); retrain them at one clean commit (a new "
                          "--output_dir, or delete these runs)")


def _check_clean_checkout() -> None:
    """--write_results at full size trains only in a clean checkout (see `trained_commit`)."""
    from fedprune.outputs import provenance

    commit = provenance.git_commit()
    check(bool(commit) and not commit.endswith("-dirty"), "write_results", True,
          "a clean checkout for --size=full (uncommitted changes to tracked files, or no git "
          f"commit: {commit}): commit first, so that RESULTS.md names the code its runs "
          "trained with")


# --------------------------------------------------------------------------
# The driver.


def _check_command_line() -> None:
    """Rejects experiment and grid flags given to reproduce: the flagfiles set them."""
    names = _TABLE_FIELDS + list(grid.GRID_FLAGS)
    for name in [*names, "flagfile"]:
        if name in FLAGS and FLAGS[name].present:
            raise InvalidArgument(name, FLAGS[name].value,
                                  "no value: reproduce reads the configuration from "
                                  "experiments/configs/table<N>*.flags (use "
                                  "experiments.compare_schedules for other settings)")


def _reset_table_flags() -> None:
    """Experiment and grid flags back to their defaults (before the next part's flagfiles)."""
    names = _TABLE_FIELDS + list(grid.GRID_FLAGS)
    for name in names:
        FLAGS[name].unparse()


def table_cells(spec: TableSpec, size: str) -> list[grid.Cell]:
    """The validated cells of a table: its grid, or the union of its parts' grids."""
    cells = []
    for part in spec.parts or (None,):
        if part is not None:
            _reset_table_flags()
        grid.parse_flagfiles(spec.flagfiles(size, part))
        grid.check_no_cell_flags()
        part_cells = grid.grid_from_flags().cells(common.config_from_flags())
        if part is not None:
            part_cells = [dataclasses.replace(c, name=f"{part}-{c.name}") for c in part_cells]
        cells += part_cells
    return cells


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])} "
                    "(flags take the form --name=value)")
    try:
        spec, size = TABLES[_TABLE.value], _SIZE.value
        _check_command_line()
        cells = table_cells(spec, size)
        root = Path(_OUTPUT_DIR.value or REPO / "runs" / f"table{spec.number}-{size}")
        expected_path = Path(_EXPECTED.value or spec.expected_path(size))
        check(_WRITE_RESULTS.value or expected_path.is_file(), "expected", str(expected_path),
              "an existing expected-values JSON (create it with --write_results)")
        results_path = Path(_RESULTS.value or REPO / "RESULTS.md")
        check(not (_WRITE_RESULTS.value and size == "full") or results_path.parent.is_dir(),
              "results", str(results_path), "a file in an existing folder")
        check(not _FIGURES_DIR.value or not Path(_FIGURES_DIR.value).is_file(), "figures_dir",
              _FIGURES_DIR.value, "a folder (created when missing)")
        expected = None
        if expected_path.is_file():
            expected = atomic_files.read_json(expected_path)
            check(expected is not None and "rows" in expected, "expected", str(expected_path),
                  "an expected-values JSON written by --write_results")
        statuses = grid.statuses(cells, root)
        if (_WRITE_RESULTS.value and size == "full"
                and any(s is not grid.Status.DONE for s in statuses)):
            _check_clean_checkout()  # runs to train: they record the commit RESULTS.md names
        common.check_tff_workers(FLAGS.tff_workers)
        parallel = grid.check_parallel_cells(FLAGS.parallel_cells, tff_workers=FLAGS.tff_workers)
        if FLAGS.cell_shard:
            grid.parse_shard(FLAGS.cell_shard)
    except (InvalidArgument, FileNotFoundError) as e:
        common.fail(str(e))
    if FLAGS.only_check_args:
        return 0
    start = time.time()
    load = process_stats.LoadSampler().start()
    trained = sum(s is not grid.Status.DONE for s in statuses)
    failed = grid.run_grid(cells, root, verbose=FLAGS.verbose, tff_workers=FLAGS.tff_workers,
                           round_logs=_ROUND_LOGS.value, parallel_cells=parallel,
                           shard=FLAGS.cell_shard)
    if FLAGS.cell_shard:  # a child of --parallel_cells: the parent records and reports
        return 1 if failed else 0
    invocations = record_invocation(root, trained=trained, seconds=time.time() - start,
                                    mean_load=load.stop())
    if failed:
        common.fail(f"{len(failed)} run(s) failed: {', '.join(failed)}", code=1)
    results = grid_results.load_results(cells, root)
    try:
        if _WRITE_RESULTS.value and size == "full":
            trained_commit(results, root)
        table = grid_results.write_reports(results, root, spec.metrics, spec.paired,
                                           spec.baseline)
    except ValueError as e:  # InvalidArgument, reporting.UnpairedError
        common.fail(str(e), code=1)
    print(f"\nTable {spec.number} ({size}), {len(results)} runs in {root}:\n")
    print(grid_results.markdown(table), end="")
    problems = grid_results.compare(table, expected) if expected is not None else []
    for line in problems:
        print(f"differs: {line}", file=sys.stderr)
    if _WRITE_RESULTS.value:
        from fedprune.outputs import provenance

        written_at = provenance.git_commit()  # before this writes tracked files
        atomic_files.atomic_write_json(expected_path, grid_results.expected_values(
            table, spec.tolerances,
            {"table": spec.number, "size": size,
             "flagfiles": [_shown(p) for p in spec.all_flagfiles(size)]}))
        print(f"\nwrote {expected_path}")
        destination, written = figures_dir(size), []
        if destination is not None:
            prefix = f"table{spec.number}" + ("" if size == "full" else f"_{size}")
            written = grid_results.publish_figures(root, destination, prefix)
            print(f"wrote {len(written)} figure(s) (PNG and PDF) into {destination}")
        if size == "full":
            old = results_path.read_text() if results_path.exists() else ""
            # The header is this module's: rewritten with every table, the sections kept.
            first = old.find("<!-- table")
            old = _RESULTS_HEADER + ("\n" + old[first:] if first >= 0 else "")
            section = render_section(spec, table, results, invocations, root, written,
                                     written_at=written_at)
            atomic_files.atomic_write_text(results_path, grid_results.replace_section(
                old, f"table{spec.number}", section, order=[f"table{n}" for n in sorted(TABLES)]))
            print(f"wrote table {spec.number} into {results_path}")
        return 0
    if problems:
        common.fail(f"{len(problems)} value(s) of table {spec.number} ({size}) differ from "
                    f"{expected_path} beyond their tolerance (listed above)", code=1)
    values = len(table.groups) * len(expected["tolerances"])
    print(f"\nall {values} values of {len(table.groups)} rows within tolerance of {expected_path}")
    return 0


if __name__ == "__main__":
    common.run(main)
