"""The benchmark's grid section: one trace per grid and --parallel_cells, against a build per cell.

Trains one reduced grid (--schedules=none,constant,polynomial ×
--grid_final_sparsities × --grid_maskings × --grid_seeds, on the
benchmark's experiment flags) along up to three code paths, each as a fresh `python -m
experiments.compare_schedules` child into its own temporary run tree:

    build per cell      FEDPRUNE_REBUILD_PROCESSES=1 --parallel_cells=1: every
                        cell builds and traces its own process, one after
                        another (the code path before one trace per grid);
    one trace per grid  --parallel_cells=1: cells that differ only in schedule
                        values, sparsity or seed share one built process;
    + parallel cells    --parallel_cells=<usable cores>: the same, the cells
                        split into that many child processes.

Each wall time is the whole command's (imports, tracing, training, tables), so
the ratios are what a user waits. Its CPU time is user + system seconds of the
command and of every process it waited for (the cell children and the TFF
workers, which fedprune stops and reaps), from `RUSAGE_CHILDREN`; CPU / wall is
how many cores the path kept busy. Every run's metrics.csv must agree across the
paths to 1e-6 (all columns but the wall-clock ones); the section fails otherwise.
`--grid_paths` picks and orders the paths (default all three); speed-ups are
against the first.
"""

from __future__ import annotations

import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from experiments.benchmark import Plan

SCHEDULES = "--schedules=none,constant,polynomial"
TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class GridPath:
    label: str
    flags: tuple[str, ...]
    rebuild: bool = False


# --grid_paths values, in the default order.
PATH_NAMES = ("build", "trace", "parallel")


def paths(names, cores: int) -> tuple[GridPath, ...]:
    """The `GridPath` of each of `names` (`PATH_NAMES` values), in that order."""
    every = {"build": GridPath("build per cell", ("--parallel_cells=1",), rebuild=True),
             "trace": GridPath("one trace per grid", ("--parallel_cells=1",)),
             "parallel": GridPath(f"one trace per grid + {cores} parallel cells",
                                  (f"--parallel_cells={cores}",))}
    return tuple(every[name] for name in names)


def base_flags(config) -> list[str]:
    """The experiment flags of `config` that a grid does not set per cell."""
    from experiments import flagfile, grid

    per_cell = {f for f in grid.CELL_FIELDS if f not in grid.OPTIONAL_CELL_FIELDS}
    return [line for line in flagfile.flagfile_text(config).splitlines()
            if line.startswith("--") and line[2:].split("=", 1)[0].removeprefix("no")
            not in per_cell]


def max_difference(a_dir: Path, b_dir: Path) -> float:
    """The largest |a - b| over two runs' metrics (inf if their rows or blanks differ)."""
    from fedprune.outputs.run_files import metric_values

    a_rows, b_rows = metric_values(a_dir), metric_values(b_dir)
    if len(a_rows) != len(b_rows):
        return float("inf")
    worst = 0.0
    for a, b in zip(a_rows, b_rows, strict=True):
        if a.keys() != b.keys():
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
                 "--final_sparsities=" + ",".join(map(str, plan.grid_sparsities)),
                 "--seeds=" + ",".join(map(str, plan.grid_seeds))]
    rows, trees = [], []
    with tempfile.TemporaryDirectory(prefix="fedprune-grid-") as tmp:
        flagfile_path = Path(tmp) / "base.flags"
        flagfile_path.write_text("\n".join(base_flags(plan.grid_base)) + "\n")
        for i, path in enumerate(paths(plan.grid_paths, cores)):
            root = Path(tmp) / f"path{i}"
            env = dict(os.environ)
            env.pop("FEDPRUNE_REBUILD_PROCESSES", None)
            if path.rebuild:
                env["FEDPRUNE_REBUILD_PROCESSES"] = "1"
            command = [sys.executable, "-m", "experiments.compare_schedules",
                       f"--flagfile={flagfile_path}", *grid_args, *path.flags,
                       f"--output_dir={root}"]
            cpu_before = children_cpu_seconds()
            start = time.perf_counter()
            done = subprocess.run(command, env=env, capture_output=True, text=True,
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
        worst = 0.0
        for root, cells in trees[1:]:
            if cells != reference_cells:
                raise RuntimeError(f"grid section: the paths trained different cells: "
                                   f"{reference_cells} vs {cells}")
            for cell in cells:
                worst = max(worst, max_difference(reference_root / cell, root / cell))
        if worst > TOLERANCE:
            raise RuntimeError(f"grid section: metrics differ between paths by {worst:g} "
                               f"(> {TOLERANCE:g})")
    return grid_table(rows), grid_notes(plan, grid_args, worst)


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


def grid_notes(plan: Plan, grid_args, worst: float) -> str:
    """The notes under the table: the grid, the paths, the metrics check, the target."""
    config = plan.grid_base
    return f"""Grid: {' '.join(grid_args)} on {config.dataset} ({config.num_clients} clients,
{config.rounds} rounds of {config.clients_per_round}, model `{config.model}`), each path a
fresh `python -m experiments.compare_schedules` (wall: the whole command, imports
included). Build per cell sets FEDPRUNE_REBUILD_PROCESSES=1 (`experiments/grid.py`),
the code path before one trace per grid. Every run's metrics agree across the paths:
max |difference| {worst:.2g} over all metrics.csv values (tolerance {TOLERANCE:g}). The
section's target: the last row at least 3× the first. CPU counts the command and every
process it waited for (cell children, TFF workers); cores busy near the usable cores
means the path is bound by CPU, not by waiting."""
