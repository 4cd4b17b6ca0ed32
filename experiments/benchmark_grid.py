"""The benchmark's grid section: a reduced Table 1, by issue 18's day's code and by today's.

Trains one reduced grid (Table 1's axes: --schedules=none,constant,polynomial ×
--grid_final_sparsities × --grid_maskings × --grid_prune_granularities ×
--grid_seeds, on the benchmark's experiment flags, no TFLite export) along up to
four code paths, each as a fresh `python -m experiments.compare_schedules` child
into its own temporary run tree:

    code at <commit>    the driver and library of `--grid_commit` (default
                        `FILED_COMMIT`, the code of the day issue 18 asked for a
                        3x faster Table 1), taken from this repository's history
                        by `git archive` into a temporary folder and run with
                        the same Python environment; cells one after another, as
                        it always ran them;
    build per cell      today's code with FEDPRUNE_REBUILD_PROCESSES=1
                        --parallel_cells=1: every cell builds and traces its own
                        process, one after another;
    one trace per grid  --parallel_cells=1: cells that differ only in schedule
                        values, sparsity or seed share one built process;
    + parallel cells    --parallel_cells=<usable cores>: the same, the cells
                        split into that many child processes.

Each wall time is the whole command's (imports, tracing, training, tables), so
the ratios are what a user waits. Its CPU time is user + system seconds of the
command and of every process it waited for (the cell children and the TFF
workers, which fedprune stops and reaps), from `RUSAGE_CHILDREN`; CPU / wall is
how many cores the path kept busy. Every run's metrics.csv must agree across the
paths to 1e-6 (all columns but the wall-clock ones; against the commit's code,
the columns both write); the section fails otherwise. `--grid_paths` picks and
orders the paths (default all four); speed-ups are against the first.
"""

from __future__ import annotations

import dataclasses
import io
import os
import resource
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from experiments.benchmark import Plan

SCHEDULES = "--schedules=none,constant,polynomial"
TOLERANCE = 1e-6
REPOSITORY = Path(__file__).resolve().parents[1]
# --grid_commit's default: the last commit before the work on issue 18 (one trace
# per grid, parallel cells, the leaner round) began, 2026-12-01. Table 1's 205
# runs took 81.4 minutes at it on a loaded machine (RESULTS.md as written at 22b68e9).
FILED_COMMIT = "1a355ba"


@dataclasses.dataclass(frozen=True)
class GridPath:
    label: str
    flags: tuple[str, ...]
    rebuild: bool = False
    commit: str | None = None  # run the code of this commit instead of today's


# --grid_paths values, in the default order.
PATH_NAMES = ("commit", "build", "trace", "parallel")


def paths(names, cores: int, commit: str = FILED_COMMIT) -> tuple[GridPath, ...]:
    """The `GridPath` of each of `names` (`PATH_NAMES` values), in that order."""
    every = {"commit": GridPath(f"code at {commit}", (), commit=commit),
             "build": GridPath("build per cell", ("--parallel_cells=1",), rebuild=True),
             "trace": GridPath("one trace per grid", ("--parallel_cells=1",)),
             "parallel": GridPath(f"one trace per grid + {cores} parallel cells",
                                  (f"--parallel_cells={cores}",))}
    return tuple(every[name] for name in names)


def is_commit(commit: str) -> bool:
    """Whether `commit` names a commit of this repository's history."""
    try:
        return subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"],
                              cwd=REPOSITORY, capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def check_out(commit: str, folder: Path) -> Path:
    """Writes the tree of `commit` into `folder` (by `git archive`); returns `folder`."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPOSITORY,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def driver_flags(tree: Path) -> frozenset[str]:
    """The flag names `experiments.compare_schedules` defines in the code at `tree`.

    Raises:
      RuntimeError: if the driver does not import there, or imports a module of
        today's checkout instead (the editable install's finder supplies a
        module `tree` lacks).
    """
    code = ("import sys\nimport experiments.compare_schedules\nfrom absl import flags\n"
            "names = [m.__name__ for m in list(sys.modules.values()) if m.__name__.split('.')[0]"
            " in ('experiments', 'fedprune') and not (getattr(m, '__file__', None) or '')"
            f".startswith({str(tree.resolve()) + os.sep!r})]\n"
            "print('OUTSIDE ' + ' '.join(names) if names else '\\n'.join(flags.FLAGS))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tree, env=_code_env(tree),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode != 0 or done.stdout.startswith("OUTSIDE"):
        raise RuntimeError(f"grid section: the driver at {tree} does not import from there: "
                           f"{(done.stdout + done.stderr).strip()[-500:]}")
    return frozenset(done.stdout.split())


def _code_env(tree: Path | None) -> dict[str, str]:
    """The environment of a grid command: today's code, or the code at `tree`."""
    env = dict(os.environ)
    env.pop("FEDPRUNE_REBUILD_PROCESSES", None)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    return env


def flags_known_to(lines, known: frozenset[str], commit: str) -> list[str]:
    """The flagfile `lines` a driver that defines only the flags `known` accepts.

    A flag it does not define came later; its line is left out if it holds the
    value that does what the older code did (today's default, which keeps every
    later feature off: no upload quantization, no regrowth; figures drawn), and
    with any other value the comparison would not be like for like.

    Raises:
      fedprune.errors.InvalidArgument: naming the first such flag, its value,
        the value it must have and `commit`.
    """
    from fedprune import config as config_lib
    from fedprune.errors import InvalidArgument

    reference = {_flag_name(line): line for line in base_flags(
        dataclasses.replace(config_lib.ExperimentConfig(), deploy="none"))}
    kept = []
    for line in lines:
        name = _flag_name(line)
        if name in known:
            kept.append(line)
        elif line != reference.get(name):
            expected = reference.get(name, "its default")
            raise InvalidArgument(name, _flag_value(line),
                                  f"{_flag_value(expected)} with --grid_paths=commit: the code "
                                  f"at {commit} has no --{name} and did what {expected} does")
    return kept


def _flag_name(line: str) -> str:
    """The flag a flagfile line sets: `rounds` for --rounds=30, `figures` for --nofigures."""
    name = line[2:].split("=", 1)[0]
    return name[2:] if "=" not in line and name.startswith("no") else name


def _flag_value(line: str) -> str:
    """The value a flagfile line sets: `30` for --rounds=30, `false` for --nofigures."""
    if "=" in line:
        return line.split("=", 1)[1]
    return "false" if line[2:].startswith("no") else "true"


def base_flags(config) -> list[str]:
    """The experiment flags of `config` that a grid does not set per cell."""
    from experiments import flagfile, grid

    per_cell = {f for f in grid.CELL_FIELDS if f not in grid.OPTIONAL_CELL_FIELDS}
    return [line for line in flagfile.flagfile_text(config).splitlines()
            if line.startswith("--") and _flag_name(line) not in per_cell]


def layers_by_position(row: dict) -> dict:
    """`row` with its per-layer columns (`sparsity/<layer>`) keyed by position instead.

    Older commits' runs name the same layers differently (`sparsity/dense_32`
    there, `sparsity/dense` now: Keras' global name counter then ran on across
    a grid's cells).
    """
    out, layer = {}, 0
    for key, value in row.items():
        if key.startswith("sparsity/"):
            key, layer = f"sparsity/#{layer}", layer + 1
        out[key] = value
    return out


def unshared_columns(a_dir: Path, b_dir: Path) -> set[str]:
    """The metrics.csv columns one of two runs writes and the other does not (layers by
    position, wall-clock columns left out)."""
    from fedprune.outputs.run_files import metric_values

    a, b = (set(layers_by_position(metric_values(d)[0])) for d in (a_dir, b_dir))
    return a ^ b


def max_difference(a_dir: Path, b_dir: Path, *, shared_columns: bool = False) -> float:
    """The largest |a - b| over two runs' metrics (inf if their rows or blanks differ).

    Args:
      shared_columns: compare only the columns both runs write, per-layer ones by
        position (`layers_by_position`), as between today's code and an older
        commit's; otherwise the columns must be the same.
    """
    from fedprune.outputs.run_files import metric_values

    a_rows, b_rows = metric_values(a_dir), metric_values(b_dir)
    if len(a_rows) != len(b_rows):
        return float("inf")
    worst = 0.0
    for a, b in zip(a_rows, b_rows, strict=True):
        if shared_columns:
            a, b = layers_by_position(a), layers_by_position(b)
            a = {key: value for key, value in a.items() if key in b}
        elif a.keys() != b.keys():
            return float("inf")
        for key, value in a.items():
            if (value is None) != (b[key] is None):
                return float("inf")
            if value is not None:
                worst = max(worst, abs(value - b[key]))
    return worst


def run_grid_section(plan: Plan, log) -> tuple[str, str]:
    """Trains the grid along each path; returns (table, notes)."""
    cores = len(os.sched_getaffinity(0))
    grid_args = [SCHEDULES, "--maskings=" + ",".join(plan.grid_maskings),
                 "--prune_granularities=" + ",".join(plan.grid_granularities),
                 "--final_sparsities=" + ",".join(map(str, plan.grid_sparsities)),
                 "--seeds=" + ",".join(map(str, plan.grid_seeds))]
    rows, trees = [], []
    with tempfile.TemporaryDirectory(prefix="fedprune-grid-") as tmp:
        lines = base_flags(plan.grid_base)
        chosen = paths(plan.grid_paths, cores, plan.grid_commit)
        for i, path in enumerate(chosen):
            root = Path(tmp) / f"path{i}"
            tree, path_lines = None, lines
            if path.commit:
                tree = check_out(path.commit, Path(tmp) / f"code{i}")
                path_lines = flags_known_to(lines, plan.grid_commit_flags, path.commit)
            flagfile_path = Path(tmp) / f"base{i}.flags"
            flagfile_path.write_text("\n".join(path_lines) + "\n")
            env = _code_env(tree)
            if path.rebuild:
                env["FEDPRUNE_REBUILD_PROCESSES"] = "1"
            command = [sys.executable, "-m", "experiments.compare_schedules",
                       f"--flagfile={flagfile_path}", *grid_args, *path.flags,
                       f"--output_dir={root}"]
            cpu_before = children_cpu_seconds()
            start = time.perf_counter()
            done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True,
                                  stdin=subprocess.DEVNULL)
            wall = time.perf_counter() - start
            cpu = children_cpu_seconds() - cpu_before
            if done.returncode != 0:
                raise RuntimeError(f"grid section: {path.label} exited with status "
                                   f"{done.returncode}: {done.stderr.strip()[-500:]}")
            cells = sorted(p.parent.name for p in root.glob("*/summary.json"))
            rows.append((path.label, len(cells), wall, cpu))
            trees.append((root, cells))
            log(f"grid: {path.label}: {len(cells)} cells in {wall:.1f} s ({cpu:.1f} s CPU)")
        reference_root, reference_cells = trees[0]
        worst, unshared = 0.0, set()
        for path, (root, cells) in zip(chosen[1:], trees[1:], strict=True):
            if cells != reference_cells:
                raise RuntimeError(f"grid section: the paths trained different cells: "
                                   f"{reference_cells} vs {cells}")
            shared = bool(path.commit or chosen[0].commit)
            for cell in cells:
                worst = max(worst, max_difference(reference_root / cell, root / cell,
                                                  shared_columns=shared))
                if shared:
                    unshared |= unshared_columns(reference_root / cell, root / cell)
        if worst > TOLERANCE:
            raise RuntimeError(f"grid section: metrics differ between paths by {worst:g} "
                               f"(> {TOLERANCE:g})")
    return grid_table(rows), grid_notes(plan, grid_args, worst, sorted(unshared))


def children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's waited-for descendants so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def grid_table(rows) -> str:
    """The section's table; `rows`: (path label, cells, wall s, CPU s) per path, first = 1×."""
    first_label, _, first_wall, _ = rows[0]
    lines = [f"| path | cells | wall (s) | s per cell | CPU (s) | cores busy (CPU / wall) "
             f"| speed-up vs {first_label} |",
             "| :-- | --: | --: | --: | --: | --: | --: |"]
    lines += [f"| {label} | {cells} | {wall:.1f} | {wall / cells:.2f} | {cpu:.1f} | "
              f"{cpu / wall:.2f} | {first_wall / wall:.2f}× |"
              for label, cells, wall, cpu in rows]
    return "\n".join(lines) + "\n"


def grid_notes(plan: Plan, grid_args, worst: float, unshared=()) -> str:
    """The notes under the table: the grid, the paths, the metrics check, the target.

    Args:
      unshared: the metrics.csv columns only one side writes, where a path ran an
        older commit's code (compared on the columns both write).
    """
    config = plan.grid_base
    commit = ""
    if "commit" in plan.grid_paths:
        day = ("the code of the day issue 18 asked for Table 1 at least 3× faster, "
               if plan.grid_commit == FILED_COMMIT else "")
        commit = f"""The code at {plan.grid_commit} is that commit's tree (`git archive` of this
repository's history, run with the same Python environment): {day}before
one trace per grid and the leaner round; it trains the cells one after another (it has no
--parallel_cells) and leaves out the flags it does not have, each at the value that does
what it did (`benchmark_grid.flags_known_to`). No path exports a TFLite model
(--deploy=none): that commit cannot. Its metrics are compared on the columns both write
(per-layer columns by position); columns only one side writes:
{", ".join(unshared) or "none"}. """
    build = ("Build per cell is today's code with FEDPRUNE_REBUILD_PROCESSES=1 "
             "(`experiments/grid.py`): a process built and traced for every cell. "
             if "build" in plan.grid_paths else "")
    return f"""Grid (Table 1's axes, fewer seeds and sparsities): {' '.join(grid_args)} on
{config.dataset} ({config.num_clients} clients, {config.rounds} rounds of
{config.clients_per_round}, model `{config.model}`), each path a fresh `python -m
experiments.compare_schedules` (wall: the whole command, imports included).
{commit}{build}Every run's metrics agree across the paths: max |difference| {worst:.2g}
over the metrics.csv values (tolerance {TOLERANCE:g}). The section's target (issue 18):
the last row at least 3× the first. CPU counts the command and every
process it waited for (cell children, TFF workers); cores busy near the usable cores means
the path is bound by CPU, not by waiting."""
