"""`experiments/benchmark.py` (issue 8): its tables and file, not its timings.

The benchmark is not a timed test. The slow case runs a tiny speed section in
a subprocess (3 clients, 1 warm-up and 2 timed rounds) and checks that it
prints the table with every variant row and the ratio columns, and writes the
Markdown file when asked; another runs the scaleout section at 4 clients (one
run per execution mode). The other cases check the pure helpers (tables,
ratios, section replacement) and flag validation, without TensorFlow.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from cli_util import CHEAP_FLAGS

from experiments import (
    benchmark,
    benchmark_deploy,
    benchmark_grid,
    benchmark_quality,
    benchmark_scale,
    benchmark_scaleout,
    benchmark_speed,
)
from fedprune.errors import InvalidArgument
from fedprune.outputs import reporting
from fedprune.runtime import worker_heap
from fedprune.runtime import workers as workers_lib

REPO_ROOT = Path(__file__).resolve().parents[1]
SMOKE_FLAGS = ("--timed_rounds=2", "--warmup_rounds=1", "--num_clients=3",
               "--clients_per_round=3")
# Every wait below ends on an event (the CLI exits, its workers are gone); the
# limit only guards against a hang, far beyond the ~40 s the smoke run takes
# alone, so a loaded machine cannot fail a test by being slow.
HANG_GUARD_S = 900
VARIANT_ROWS = ("(a) fedprune", "(s) fedprune", "(b) fedprune", "(c) TFF", "(c-iter)", "(c-mrf)",
                "(d) Keras", "(e) Keras", "(f) one compiled", "(a+) fedprune")


def _run(*args: str) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs the benchmark CLI; returns its result and every `worker_binary` seen under it.

    A thread polls the CLI's descendants every 20 ms for TFF workers, so the
    caller can check that none survives the CLI. Should it hang (HANG_GUARD_S),
    the CLI and its descendants are killed.
    """
    proc = subprocess.Popen([sys.executable, "-m", "experiments.benchmark", *CHEAP_FLAGS, *args],
                            cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    workers: dict[int, psutil.Process] = {}

    def watch():
        try:
            parent = psutil.Process(proc.pid)
            while proc.poll() is None:
                for child in parent.children(recursive=True):
                    try:
                        if child.name() == "worker_binary":
                            workers.setdefault(child.pid, child)
                    except psutil.NoSuchProcess:
                        pass
                time.sleep(0.02)
        except psutil.NoSuchProcess:
            pass

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        stdout, stderr = proc.communicate(timeout=HANG_GUARD_S)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"benchmark hung (still running after {HANG_GUARD_S} s); "
                    f"stdout tail {stdout[-500:]}")
    finally:
        watcher.join(timeout=HANG_GUARD_S)  # it returns once it sees the CLI gone
    assert not watcher.is_alive()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), workers


def _assert_gone(workers: dict) -> None:
    # Returns as soon as every worker has exited; the CLI stops them before it exits.
    _, alive = psutil.wait_procs(list(workers.values()), timeout=HANG_GUARD_S)
    assert not alive, f"worker_binary outlived the benchmark: {[p.pid for p in alive]}"


def _table_rows(text: str) -> dict[str, list[str]]:
    """Markdown table rows keyed by their first cell."""
    rows = {}
    for line in text.splitlines():
        if line.startswith("| ") and not line.startswith("| :--"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0]] = cells[1:]
    return rows


def _quality_rows(dense, drops, seeds=range(5)):
    """Quality rows: dense accuracies per seed, and a 50 % row `drops` below them."""
    rows = [{"target sparsity": "0 %", "masking": "none", "seed": s, "final_test_accuracy": a,
             "final_global_sparsity": 0.0} for s, a in zip(seeds, dense, strict=True)]
    rows += [{"target sparsity": "50 %", "masking": "both", "seed": s,
              "final_test_accuracy": a - d, "final_global_sparsity": 0.5}
             for s, a, d in zip(seeds, dense, drops, strict=True)]
    return rows


def test_quality_table_pairs_every_row_with_dense_by_seed():
    dense = [0.90, 0.96, 0.84, 0.91, 0.93]  # seeds spread the means far apart...
    drops = [0.01, 0.02, 0.00, 0.03, 0.01]  # ...while each seed's drop is small
    rows = _table_rows(benchmark_quality.quality_markdown(_quality_rows(dense, drops)))
    assert rows["target sparsity"] == ["masking", "n", "test accuracy",
                                       "Δ test accuracy vs dense", "measured sparsity (%)"]
    assert rows["0 %"][:4] == ["none", "5", "0.908 ± 0.055", "0.000 ± 0.000"]
    # Per-seed drops: mean 0.014, sd 0.0114, t(0.975, 4) 2.776 -> half width 0.0142,
    # 3-4x narrower than the intervals of the two means (0.055 and 0.048).
    assert rows["50 %"] == ["both", "5", "0.894 ± 0.048", "-0.014 ± 0.014", "50.0 ± 0.0"]


def test_quality_table_without_dense_has_no_paired_column_and_refuses_unpaired_seeds():
    rows = [r for r in _quality_rows([0.9] * 5, [0.0] * 5) if r["masking"] != "none"]
    assert "Δ" not in benchmark_quality.quality_markdown(rows)
    unpaired = _quality_rows([0.9] * 5, [0.0] * 5)[:-1]  # the 50 % row lacks seed 4
    with pytest.raises(reporting.UnpairedError, match=r"target sparsity=50 % masking=both: "
                                                      r"seeds do not match"):
        benchmark_quality.quality_markdown(unpaired)


@pytest.mark.slow
def test_speed_smoke_prints_table_and_writes_file(tmp_path):
    output = tmp_path / "BENCH.md"
    result, workers = _run(*SMOKE_FLAGS, "--write", f"--output={output}",
                           "--sections=speed,ablation")
    assert result.returncode == 0, result.stderr[-2000:]
    assert workers, "no worker_binary was seen under the benchmark (watcher broken?)"
    _assert_gone(workers)
    rows = _table_rows(result.stdout)
    text = output.read_text()
    header = rows["variant"]
    assert header[:4] == ["median (s)", "min–max (s)", "vs (c-iter)", "vs (f)"]
    for label in VARIANT_ROWS:
        (row,) = [cells for first, cells in rows.items() if first.startswith(label)]
        median, spread = float(row[0]), row[1]
        low, high = (float(x) for x in spread.split("–"))
        assert 0 < low <= median <= high
    c_row = next(cells for first, cells in rows.items() if first.startswith("(c-iter)"))
    assert c_row[2] == "1.00"  # (c-iter) relative to itself
    for ratio in benchmark_speed.RATIOS:
        assert float(rows[ratio][0]) > 0
        mid, low, high = (float(x) for x in re.findall(r"[0-9.]+", rows[ratio][1]))
        assert 0 < low <= mid <= high  # the per-round ratios' median and interval
    for ratio, target in benchmark_speed.TARGETS.items():
        assert rows[ratio][2].startswith(f"≤ {target:g} (")
    # (d) and (f) train centrally on the same batches from the same weights; so do the
    # dense federated variants, stock FedAvg compiled or not among them.
    floor_diff = re.search(r"\(d\) and \(f\) within ([0-9.]+e[+-][0-9]+)", text.replace("\n", " "))
    assert float(floor_diff.group(1)) < 1e-5
    dense_diff = re.search(r"\(b\), \(c\), \(c-iter\) and \(c-mrf\) end with weights equal to "
                           r"within ([0-9.]+e[+-][0-9]+)", text.replace("\n", " "))
    assert float(dense_diff.group(1)) < 1e-5

    assert "<!-- benchmark:speed -->" in text and "<!-- /benchmark:speed -->" in text
    command = " ".join(("python -m experiments.benchmark", *CHEAP_FLAGS, "--timed_rounds=2"))
    assert f"Command: `{command}" in text
    assert re.search(r"Machine: .+ usable cores .+ GiB RAM.+TensorFlow 2\.14", text)
    assert re.search(r"load average \(1/5/15 min\) [0-9./]+ before, [0-9./]+ after, "
                     r"mean 1-min [0-9.]+ during it", text)
    assert "(a) fedprune, masking both, polynomial |" in text
    # The profile: differences of the medians and (a+)'s phases, as measured.
    medians = {key: float(next(cells for first, cells in rows.items()
                               if first.startswith(f"({key})"))[0])
               for key in ("a", "s", "b", "c-iter")}
    flat = text.replace("\n", " ")
    found = re.search(r"\(a\) − \(s\) = (-?[0-9.+]+) ms", flat)
    assert abs(float(found.group(1)) - 1000 * (medians["a"] - medians["s"])) <= 1.0
    # The ablation section: (a), (s), (b) and (a) with parts taken out, interleaved
    # among themselves; each row against (a)'s median there, and paired per round.
    assert f"the section \"{benchmark_speed.ABLATION_TITLE}\"" in flat
    assert "<!-- benchmark:ablation -->" in text
    labels = [*benchmark_speed.ABLATION_REFERENCES.values(),
              *(a.label for a in benchmark_speed.ABLATIONS.values())]
    a_median = float(rows[labels[0]][0])
    assert rows[labels[0]][1:] == ["1.000", "1.000 [1.000, 1.000]", "+0.0"]
    for label in labels:
        median, versus, paired, saved = rows[label]
        mid, low, high = (float(x) for x in re.findall(r"[0-9.]+", paired))
        assert 0 < low <= mid <= high
        # The columns agree to the rounding of the printed values (1 ms, 0.1 ms).
        assert 1000 * float(median) == pytest.approx(1000 * a_median - float(saved), abs=1.0)
    assert re.search(r"\(a\) − \(b\) here is -?[0-9.]+ ms, of which \(a\) without all "
                     r"three saves -?[0-9.]+ ms", flat)
    phases = re.search(r"train ([0-9.]+) ms .*evaluate ([0-9.]+) ms .*checkpoint ([0-9.]+) ms",
                       flat)
    train, evaluate, logged = (float(x) for x in phases.groups())
    assert train > 0 and evaluate > 0  # every round evaluates (eval_every 1)
    assert logged >= 0  # the log line only: the writes run beside the next round


@pytest.mark.parametrize("phases, words", [
    ([{"train": 0.1, "evaluate": 0.004, "checkpoint": 0.002}] * 3,
     ["train 100.0 ms", "evaluate 4.0 ms", "checkpoint 2.0 ms", "(a) alone: 80.0 ms"]),
    ([{"train": 0.1, "checkpoint": 0.002}, {"train": 0.3, "evaluate": 0.01, "checkpoint": 0.004},
      {"train": 0.2, "checkpoint": 0.003}],
     ["train 200.0 ms", "evaluate 0.0 ms", "checkpoint 3.0 ms"]),  # median: 0 where not evaluated
])
def test_profile_notes_differences_and_phases(phases, words):
    medians = {"a": 0.08, "s": 0.07, "b": 0.065, "c-iter": 0.066, "c-mrf": 0.0605}
    text = benchmark_speed.profile_notes(medians, phases)
    for w in ["(a) − (s) = 10.0 ms", "(s) − (b) = 5.0 ms", "(b) − (c-iter) = -1.0 ms",
              "(c-iter) − (c-mrf) = 5.5 ms", *words]:
        assert w in text, (w, text)
    assert benchmark_speed.profile_notes({"a": 0.08}, []) == ""
    assert f"What each computation of (a) costs: the section \"{benchmark_speed.ABLATION_TITLE}" \
        in text


@pytest.mark.slow
@pytest.mark.skipif(not benchmark_grid.is_commit(benchmark_grid.FILED_COMMIT),
                    reason=f"a clone without {benchmark_grid.FILED_COMMIT} in its history")
def test_grid_section_trains_the_grid_along_three_paths_with_equal_metrics(tmp_path):
    """The code of issue 18's day (from the repository's history), then today's one trace
    per grid, sequential and in parallel children, as the section runs them (--grid_paths):
    equal metrics (1e-6) between the older code's cells, a sequential grid and the same
    grid's cells trained in child processes (`compare_schedules --parallel_cells`).

    The fourth path, a process built per cell (`FEDPRUNE_REBUILD_PROCESSES=1`), would
    cost one more TensorFlow import; that a reused process computes what a process
    built for the cell does is tests/test_one_trace.py's.
    """
    output = tmp_path / "BENCH.md"
    result, workers = _run("--sections=grid", "--grid_final_sparsities=0.5",
                           "--grid_maskings=server", "--grid_prune_granularities=round",
                           "--grid_seeds=0", "--grid_paths=commit,trace,parallel",
                           "--rounds=2", "--end_round=2", "--num_clients=4",
                           "--clients_per_round=4", "--write", f"--output={output}",
                           "--figures")  # the older code always draws them
    assert result.returncode == 0, result.stderr[-2000:]
    _assert_gone(workers)
    rows = _table_rows(result.stdout)
    commit = benchmark_grid.FILED_COMMIT
    assert rows["path"] == ["cells", "wall (s)", "s per cell", "CPU (s)",
                            "cores busy (CPU / wall)", f"speed-up vs code at {commit}"]
    cores = len(os.sched_getaffinity(0))
    labels = [f"code at {commit}", "one trace per grid",
              f"one trace per grid + {cores} parallel cells"]
    assert [label for label in rows if label != "path"] == labels
    for label in labels:
        cells, wall, per_cell, cpu, busy, speedup = rows[label]
        assert cells == "3"  # dense, constant, polynomial
        assert float(per_cell) == pytest.approx(float(wall) / 3, abs=0.03)  # both rounded
        # A TensorFlow import and a trace alone take seconds of CPU.
        assert float(cpu) > 3
        assert float(busy) == pytest.approx(float(cpu) / float(wall), abs=0.02)
        assert float(speedup.rstrip("×")) > 0
    assert rows[labels[0]][5] == "1.00×"
    text = output.read_text()
    difference = re.search(r"max \|difference\| ([0-9.e+-]+) over the", text)
    assert float(difference.group(1)) <= 1e-6
    # The older code writes every column but the mask's entropy (added since).
    assert "columns only one side writes: mask_entropy_bits." in " ".join(text.split())
    assert "<!-- benchmark:grid -->" in text


@pytest.mark.parametrize("spinner", ["child", "grandchild"])
def test_children_cpu_seconds_counts_waited_for_descendants(spinner):
    """The grid section's CPU column: a child's CPU, and that of a process the child
    started and waited for (as a cell child waits for its TFF worker)."""
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass\n"
    code = spin if spinner == "child" else (
        f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {spin!r}], check=True)\n")
    before = benchmark_grid.children_cpu_seconds()
    subprocess.run([sys.executable, "-S", "-c", code], check=True)
    assert benchmark_grid.children_cpu_seconds() - before >= 0.4


def test_grid_table_reports_cpu_and_cores_busy():
    table = benchmark_grid.grid_table([("build per cell", 18, 200.0, 190.0),
                                       ("one trace per grid + 2 parallel cells", 18, 100.0,
                                        180.0)])
    assert table.splitlines()[2:] == [
        "| build per cell | 18 | 200.0 | 11.11 | 190.0 | 0.95 | 1.00× |",
        "| one trace per grid + 2 parallel cells | 18 | 100.0 | 5.56 | 180.0 | 1.80 | 2.00× |"]


@pytest.mark.slow
def test_scaleout_section_runs_both_modes_with_equal_metrics(tmp_path):
    """The section end to end at 4 clients: its own two loopback workers and each run's
    local worker all stop with it; remote and local metrics agree (1e-5)."""
    output = tmp_path / "BENCH.md"
    result, workers = _run("--sections=scaleout", "--scaleout_clients=4",
                           "--scaleout_clients_per_round=4", "--scaleout_rounds=3",
                           "--scaleout_baseline_round=2", "--scaleout_repeats=1", "--write",
                           f"--output={output}")
    assert result.returncode == 0, result.stderr[-2000:]
    # Two services plus the local run's own worker (the driver starts none: no TensorFlow).
    assert len(workers) == 3, workers
    _assert_gone(workers)
    rows = _table_rows(result.stdout)
    assert rows["execution"] == ["runs", "clients per round", "median round (s)", "min–max (s)",
                                 "vs local", "max abs metric difference vs local"]
    labels = ["1 local worker", "2 loopback workers (mergeable context)"]
    assert [label for label in rows if label != "execution"] == labels
    for label in labels:
        runs, per_round, median, spread, ratio, _ = rows[label]
        assert (runs, per_round) == ("1", "4")
        assert spread == f"{median}–{median}"  # one timed round per run
        assert float(median) > 0 and float(ratio.rstrip("×")) > 0
    assert rows[labels[0]][4:] == ["1.00×", "reference"]
    assert 0 <= float(rows[labels[1]][5]) <= benchmark_scaleout.TOLERANCE
    text = output.read_text()
    assert "<!-- benchmark:scaleout -->" in text and "<!-- /benchmark:scaleout -->" in text
    assert "## Scale-out: one local worker vs 2 loopback workers" in text
    assert "The 2 runs alternate (local, remote); round time is metrics.csv's" in text


@pytest.mark.parametrize("repeats, order", [
    (1, ["local", "remote"]),
    (2, ["local", "remote", "remote", "local"]),
    (3, ["local", "remote", "remote", "local", "local", "remote"]),
])
def test_scaleout_runs_alternate_the_modes(repeats, order):
    assert benchmark_scaleout.run_order(repeats) == order


@pytest.mark.parametrize("workers, remote_label", [
    (1, "1 loopback worker (mergeable context)"),
    (3, "3 loopback workers (mergeable context)"),
])
def test_scaleout_markdown_medians_ratio_and_differences(workers, remote_label):
    results = {"local": {"runs": 2, "seconds": [4.0, 3.0, 5.0, 4.5], "difference": 0.0},
               "remote": {"runs": 2, "seconds": [5.0, 4.0, 6.0, 5.0], "difference": 2.4e-7}}
    rows = _table_rows(benchmark_scaleout.scaleout_markdown(
        results, num_workers=workers, clients_per_round=100))
    assert rows["1 local worker"] == ["2", "100", "4.250", "3.000–5.000", "1.00×", "0"]
    assert rows[remote_label] == ["2", "100", "5.000", "4.000–6.000", "1.18×", "2.4e-07"]


@pytest.mark.parametrize("names, cores, labels", [
    (benchmark_grid.PATH_NAMES, 2,
     ["code at abc1234", "build per cell", "one trace per grid",
      "one trace per grid + 2 parallel cells"]),
    (("parallel", "trace"), 4, ["one trace per grid + 4 parallel cells", "one trace per grid"]),
])
def test_grid_paths_in_the_order_asked(names, cores, labels):
    chosen = benchmark_grid.paths(names, cores, "abc1234")
    assert [p.label for p in chosen] == labels
    assert [p.rebuild for p in chosen] == [name == "build" for name in names]
    assert [p.commit for p in chosen] == ["abc1234" if name == "commit" else None
                                         for name in names]
    # The older code has no --parallel_cells: it always trained the cells in turn.
    assert [p.flags for p in chosen] == [
        () if name == "commit" else (f"--parallel_cells={cores if name == 'parallel' else 1}",)
        for name in names]


def test_flags_known_to_an_older_driver():
    """Flags the older driver lacks are left out at the value that does what it did, and
    refused at any other: the comparison would not be like for like."""
    lines = ["--rounds=30", "--noprune_output_layer", "--upload_quantization=none",
             "--regrow_fraction=0.3", "--figures"]
    known = frozenset({"rounds", "prune_output_layer"})
    assert benchmark_grid.flags_known_to(lines, known, "abc1234") == [
        "--rounds=30", "--noprune_output_layer"]
    for line, words in (("--upload_quantization=int8",
                         "--upload_quantization='int8': expected none with --grid_paths=commit: "
                         "the code at abc1234 has no --upload_quantization and did what "
                         "--upload_quantization=none does"),
                        ("--nofigures", "--figures='false': expected true with")):
        with pytest.raises(InvalidArgument) as error:
            benchmark_grid.flags_known_to([*lines, line], known, "abc1234")
        assert str(error.value).startswith(words), str(error.value)


def _metrics(folder: Path, header: str, *rows: str) -> Path:
    folder.mkdir()
    (folder / "metrics.csv").write_text("\n".join([header, *rows]) + "\n")
    return folder


def test_older_runs_compare_on_shared_columns_with_layers_by_position(tmp_path):
    """An older commit's runs name the layers differently and lack later columns: compared
    on the columns both write, per-layer ones by position; today's runs must match whole."""
    old = _metrics(tmp_path / "old", "round,test_loss,sparsity/dense_32,sparsity/dense_33,"
                   "round_seconds", "1,2.0,0.5,0.25,9.0", "2,1.5,0.5,0.25,8.0")
    new = _metrics(tmp_path / "new", "round,test_loss,sparsity/dense,sparsity/dense_1,"
                   "mask_entropy_bits,round_seconds", "1,2.0000002,0.5,0.25,0.7,1.0",
                   "2,1.5,0.5,0.2500004,0.6,1.0")
    assert benchmark_grid.max_difference(old, new, shared_columns=True) == pytest.approx(
        4e-7, rel=1e-3)
    assert benchmark_grid.max_difference(old, new) == float("inf")
    assert benchmark_grid.unshared_columns(old, new) == {"mask_entropy_bits"}
    swapped = _metrics(tmp_path / "swapped", "round,test_loss,sparsity/a,sparsity/b,"
                       "round_seconds", "1,2.0,0.25,0.5,9.0", "2,1.5,0.25,0.5,8.0")
    assert benchmark_grid.max_difference(old, swapped, shared_columns=True) == 0.25


def test_bad_flags_fail_fast_without_tensorflow():
    for flag, words in (("--masking=none", "sets it per variant"),
                        ("--sections=speed,fast", "all, or one or more of "
                         "speed,ablation,scale,quality,grid,deploy,scaleout"),
                        ("--deploy_sparsities=0,0.5", "one or more sparsities in (0, 1)"),
                        ("--deploy_sparsities=0.5,x", "comma-separated fractions"),
                        ("--deploy_runs=2", ">= 3"),
                        ("--grid_maskings=none", "one or more of client,server,both"),
                        ("--grid_paths=build,build",
                         "one or more of commit,build,trace,parallel"),
                        ("--grid_paths=fast", "one or more of commit,build,trace,parallel"),
                        ("--grid_prune_granularities=epoch", "one or more of round,step"),
                        ("--timed_rounds=1", ">= 2"),
                        ("--ablations=bytes,optimizer", "one or more of pruning,bytes,mask,all"),
                        ("--ablations=", "one or more of pruning,bytes,mask,all"),
                        ("--scale_baseline_round=300", "--scale_rounds=300"),
                        ("--scale_worker_malloc=tcmalloc", "one or more of fedprune,glibc"),
                        ("--scale_slope_rounds=9", "a whole number in [10, 290]"),
                        ("--scale_slope_rounds=291", "a whole number in [10, 290]"),
                        ("--scaleout_clients_per_round=101", "[1, --scaleout_clients=100]"),
                        ("--scaleout_baseline_round=1", "(--begin_round=1, --scaleout_rounds=8)"),
                        ("--scaleout_repeats=0", ">= 1"),
                        ("--tff_workers=127.0.0.1:1", "the section starts its own workers")):
        result, workers = _run("--sections=speed,scale,scaleout", flag)  # flag wins
        assert result.returncode == 2, (flag, result.stderr)
        name = flag.split("=")[0]
        assert result.stderr.startswith(f"error: {name}") and words in result.stderr, \
            result.stderr
        assert not workers  # failed before TFF was started


@pytest.mark.parametrize("flag, message", [
    ("--grid_commit=0000000", "error: --grid_commit='0000000': expected a commit of this "
                              "repository's history (a clone with its git history)\n"),
    # The repository's first commit: a skeleton without the driver.
    ("--grid_commit=FIRST", "expected a commit whose experiments.compare_schedules imports\n"),
    ("--nofigures", "error: --figures='false': expected true with --grid_paths=commit: the "
                    "code at 1a355ba has no --figures and did what --figures does\n"),
])
def test_a_grid_commit_whose_code_cannot_run_the_grid_fails_fast(flag, message):
    if flag.endswith("FIRST"):
        if not benchmark_grid.is_commit(benchmark_grid.FILED_COMMIT):
            pytest.skip("a clone without the repository's history")
        first = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], capture_output=True,
                               text=True, cwd=benchmark_grid.REPOSITORY, check=True).stdout.split()
        flag = f"--grid_commit={first[-1]}"
    result, workers = _run("--sections=grid", flag)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.splitlines()) == 1, result.stderr
    assert not workers


def _timing(key: str, seconds: list[float]) -> benchmark_speed.VariantTiming:
    return benchmark_speed.VariantTiming(key, benchmark_speed.VARIANT_LABELS[key], wall=seconds,
                                   python_cpu=[0.01] * len(seconds),
                                   worker_cpu=[0.1] * len(seconds))


@pytest.mark.parametrize("count", [1, 2, 9])
def test_each_speed_variant_opens_a_round_in_turn(count):
    keys = [f"v{i}" for i in range(count)]
    orders = [benchmark_speed._opening_with(keys, r) for r in range(2, 2 + count)]
    assert sorted(order[0] for order in orders) == keys  # each opens once in `count` rounds
    for order in orders:  # the same cyclic order, only rotated
        assert sorted(order) == keys
        start = keys.index(order[0])
        assert order == keys[start:] + keys[:start]


def test_speed_markdown_ratios_and_targets():
    timings = [_timing("a", [0.3, 0.2, 0.4]), _timing("b", [0.28, 0.28, 0.28]),
               _timing("c-iter", [0.25, 0.2, 0.3]), _timing("d", [0.1, 0.1, 0.1]),
               _timing("f", [0.125, 0.1, 0.2])]
    rows = _table_rows(benchmark_speed.speed_markdown(timings, [0.01, 0.02]))
    assert rows["variant"][2:4] == ["vs (c-iter)", "vs (f)"]
    a = rows[benchmark_speed.VARIANT_LABELS["a"]]
    # median 0.3 / median of (c-iter) 0.25 = 1.2, / median of (f) 0.125 = 2.4
    assert a[:4] == ["0.300", "0.200–0.400", "1.20", "2.40"]
    # Per-round ratios a/b: 1.07, 0.71, 1.43; three rounds are too few for a 95 %
    # interval of their median, so it is their range.
    assert rows["a/b"] == ["1.07", "1.07 [0.71, 1.43]", "≤ 1.1 (met)"]
    assert rows["a/c-iter"] == ["1.20", "1.20 [1.00, 1.33]", "≤ 1.1 (not met)"]
    assert rows["c-iter/f"] == ["2.00", "2.00 [1.50, 2.00]", ""]
    assert rows["d/f"] == ["0.80", "0.80 [0.50, 1.00]", ""]
    assert "a+/c-iter" not in rows and "c/c-iter" not in rows  # not measured, not reported
    # Without the floor, only the reference columns that were measured.
    rows = _table_rows(benchmark_speed.speed_markdown(timings[:3], [0.01]))
    assert rows["variant"][2:4] == ["vs (c-iter)", "Python CPU (s)"]
    assert benchmark_speed.speed_ratios({"a": 1.0, "c-iter": 2.0, "b": 2.0})["a/c-iter"] == 0.5


def test_ablation_markdown_pairs_each_row_with_a():
    a = _timing("a", [0.30, 0.20, 0.40])
    rows_in = [benchmark_speed.VariantTiming("bytes", benchmark_speed.ABLATIONS["bytes"].label,
                                             wall=[0.27, 0.19, 0.32]),
               benchmark_speed.VariantTiming("all", benchmark_speed.ABLATIONS["all"].label,
                                             wall=[0.24, 0.20, 0.36])]
    rows = _table_rows(benchmark_speed.ablation_markdown(rows_in, a))
    # medians 0.27 and 0.24 against (a)'s 0.30; per-round ratios 0.9, 0.95, 0.8 and
    # 0.8, 1.0, 0.9 (three rounds: the interval is their range); (a) - row in ms.
    assert rows["(a) without the upload's byte count"] == [
        "0.270", "0.900", "0.900 [0.800, 0.950]", "+30.0"]
    assert rows["(a) without all three"] == ["0.240", "0.800", "0.900 [0.800, 1.000]", "+60.0"]


@pytest.mark.parametrize("parts", [(), ("pruning",), ("bytes",), ("mask",),
                                   ("pruning", "bytes", "mask")])
def test_without_takes_out_exactly_its_parts_and_restores_them(parts):
    """`without` replaces what (a)'s computations call while a process is traced."""
    import tensorflow as tf

    from fedprune.federated import client_work
    from fedprune.pruning import wrappers
    from fedprune.pruning.masking import MaskSpec

    kernel = tf.constant([[0.5, -2.0], [0.0, 1.0]])
    mask = tf.constant([[1.0, 1.0], [0.0, 1.0]])

    def effects():
        pruned = client_work._prune_kernels([kernel], MaskSpec(), 0.5, tf.constant(True))[0]
        sent = int(client_work.uplink_bytes([kernel], [mask]))
        model = wrappers.wrap_for_pruning(tf.keras.Sequential(
            [tf.keras.Input((2,)), tf.keras.layers.Dense(2, use_bias=False)]))
        layer = model.layers[0]
        layer.layer.kernel.assign(kernel)
        layer.pruning_vars[0][1].assign(tf.zeros_like(mask))
        model(tf.ones((1, 2)), training=True)
        return pruned.numpy().tolist(), sent, layer.layer.kernel.numpy().tolist()

    real = effects()
    # The largest half of |w|; 3 nonzeros inside the known mask: 4 bytes each; all zeroed.
    assert real == ([[0.0, 1.0], [0.0, 1.0]], 12, [[0.0, 0.0], [0.0, 0.0]])
    with benchmark_speed.without(parts):
        ablated = effects()
    assert ablated[0] == ([[1.0, 1.0], [1.0, 1.0]] if "pruning" in parts else real[0])
    assert ablated[1] == (0 if "bytes" in parts else real[1])
    assert ablated[2] == (kernel.numpy().tolist() if "mask" in parts else real[2])
    assert effects() == real  # restored on leaving
    with pytest.raises(ValueError, match="unknown parts"), benchmark_speed.without(("optimizer",)):
        pass


class _FakeProcess:
    def __init__(self, environ=None):
        self._environ = environ

    def environ(self):
        if self._environ is None:
            raise psutil.NoSuchProcess(1)
        return self._environ


@pytest.mark.parametrize("environs, expected", [
    ([{"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": "1048576", "MALLOC_ARENA_MAX": "2"}],
     "MALLOC_ARENA_MAX=2, MALLOC_MMAP_THRESHOLD_=1048576"),
    ([None, {"MALLOC_ARENA_MAX": "4"}], "MALLOC_ARENA_MAX=4"),  # a worker that is gone
    ([{"PATH": "/bin", "GLIBC_TUNABLES": "x"}], "none"),
    ([None], "unknown"),
    ([], "unknown"),
])
def test_malloc_settings_reads_the_workers_malloc_variables(environs, expected):
    from experiments.process_stats import malloc_settings

    assert malloc_settings([_FakeProcess(e) for e in environs]) == expected


@pytest.mark.parametrize("n, k", [(5, 0), (6, 1), (10, 2), (20, 6), (30, 10), (100, 40)])
def test_median_ci_takes_the_binomial_order_statistics(n, k):
    """95 % intervals of the median: the k-th smallest and largest of n (k = 0: the range)."""
    from experiments.process_stats import median_ci

    values = [float(i) for i in range(n, 0, -1)]  # n, ..., 1: sorted inside
    median, low, high = median_ci(values)
    assert median == (n + 1) / 2
    assert (low, high) == ((1.0, float(n)) if k == 0 else (float(k), float(n - k + 1)))


@pytest.mark.parametrize("slope, rounds", [(0.5, 100), (0.0, 10), (-0.25, 37), (0.04, 2)])
def test_rss_slope_fits_the_last_rounds_only(slope, rounds):
    # A jump of 900 MiB and noise in the rounds before the window do not count.
    before = [(800 + 900 * (i % 2)) * 2**20 for i in range(50)]
    window = [(1000 + slope * i) * 2**20 for i in range(rounds)]
    assert benchmark_scale.rss_slope(before + window, rounds) == pytest.approx(slope, abs=1e-9)


def test_rss_slope_least_squares_on_noisy_samples():
    # MiB 10, 13, 11, 16 over rounds 2-5: slope = 8 / 5 = 1.6 MiB per round.
    samples = [x * 2**20 for x in (500, 10, 13, 11, 16)]
    assert benchmark_scale.rss_slope(samples, 4) == pytest.approx(1.6)
    with pytest.raises(ValueError, match="rounds=6: expected 2..5"):
        benchmark_scale.rss_slope(samples, 6)


@pytest.mark.parametrize("rounds, block, fitted", [
    (30, 10, True),  # blocks of rounds 1-10, 11-20, 21-30
    (30, 15, True),  # 1-15, 16-30
    (25, 10, True),  # the last 25 rounds: 6-10 are left out, so 11-20, 21-30
    (19, 10, False),  # one whole block: no slope
])
def test_minima_slope_fits_block_minima_and_ignores_spikes(rounds, block, fitted):
    # A floor rising 0.01 MiB per round with a +40 MiB spike in rounds 5, 12, 19 and 26:
    # each block's minimum is its first round's, so the minima rise 0.01 MiB per round.
    samples = [(100 + 0.01 * (i - 1) + (40 if i % 7 == 5 else 0)) * 2**20
               for i in range(1, 31)]
    slope = benchmark_scale.minima_slope(samples, rounds, block)
    assert slope == (pytest.approx(0.01, abs=1e-9) if fitted else None)


def test_minima_slope_is_flat_where_only_spikes_rise():
    # A flat floor with spikes late in the window: every sample's fit rises, the floor's not.
    samples = [(216 + (30 if i in (24, 27, 29) else 0)) * 2**20 for i in range(1, 31)]
    assert benchmark_scale.rss_slope(samples, 30) > 0.4
    assert benchmark_scale.minima_slope(samples, 30) == pytest.approx(0.0, abs=1e-12)


def test_minima_slope_rejects_a_bad_window():
    with pytest.raises(ValueError, match="rounds=6: expected 2..5"):
        benchmark_scale.minima_slope([2**20] * 5, 6)
    with pytest.raises(ValueError, match="block=0"):
        benchmark_scale.minima_slope([2**20] * 5, 5, block=0)


def test_scale_markdown_slopes_over_the_last_rounds_against_the_limit():
    # Python RSS rises 0.04 MiB per round (within the limit), the worker's 2 MiB per round,
    # over the last 3 rounds (3-5); the jumps before them do not count.
    python = [600, 700, 700, 700.04, 700.08]
    worker = [100, 200, 300, 302, 304]
    # Of Python's rise, 0.03 MiB per round is newly cached client data: 0.01 is left.
    cache = [1, 2, 3, 3.03, 3.06]
    result = {"num_clients": 1000, "clients_per_round": 10, "malloc_env": "MALLOC_ARENA_MAX=2",
              "worker_malloc": "fedprune", "dataset": "synthetic",
              "rounds": 5, "baseline_round": 2, "slope_rounds": 3,
              "round_seconds": [9.0, 9.0, 0.2, 0.4, 0.3],
              "largest_client": [50, 60, 60, 900, 900],
              "rss": [{"python_anon": p * 2**20, "worker_anon": w * 2**20,
                       "client_cache": c * 2**20}
                      for p, w, c in zip(python, worker, cache, strict=True)],
              "peak_rss": {"python": 700.4 * 2**20, "worker": 304 * 2**20}}
    rows = _table_rows(benchmark_scale.scale_markdown([result]))
    assert rows["dataset"] == ["clients", "per round",
                               "worker malloc (its MALLOC_ variables; heap trim)",
                               "rounds", "median round (s)", "min–max (s)",
                               "peak RSS Python (MiB)", "peak RSS worker (MiB)",
                               "anon. RSS slope Python (MiB/round)",
                               "the same less the client-data cache",
                               "anon. RSS slope worker (MiB/round)", "slope rounds",
                               "slope of 10-round minima Python",
                               "slope of 10-round minima worker",
                               "client-data cache (MiB)", "largest client so far (examples)"]
    # Rounds 1..baseline are left out of the round-time statistics; the cache and the
    # largest client are shown before the slope's rounds (after round 2) and at the end.
    assert rows["synthetic"] == ["1000", "10", "fedprune (MALLOC_ARENA_MAX=2)", "5", "0.300",
                                 "0.200–0.400", "700", "304", "+0.040 ✓", "+0.010 ✓",
                                 "+2.000 ✗", "3–5", "—", "—", "2.0 → 3.1", "60 → 900"]


@pytest.mark.slow
def test_scale_smoke_reports_peaks_and_slopes_of_both_processes():
    result, workers = _run("--sections=scale", "--scale_clients=20",
                           "--scale_clients_per_round=4", "--scale_rounds=12",
                           "--scale_baseline_round=2", "--scale_slope_rounds=10",
                           "--noscale_control")
    assert result.returncode == 0, result.stderr[-2000:]
    assert workers, "no worker_binary was seen under the benchmark (watcher broken?)"
    _assert_gone(workers)
    rows = _table_rows(result.stdout)
    (row,) = [cells for first, cells in rows.items() if first.startswith("synthetic")]
    arenas = workers_lib.WORKER_MALLOC_DEFAULTS["MALLOC_ARENA_MAX"]
    trim = "; heap trimmed after each round" if worker_heap.trim_library() else ""
    assert row[:4] == ["20", "4",
                       f"fedprune (MALLOC_ARENA_MAX={arenas}, MALLOC_MMAP_THRESHOLD_=1048576"
                       f"{trim})", "12"]
    assert float(row[6]) > 100 and float(row[7]) > 10  # peak RSS, MiB: TF alone is more
    for cell in row[8:11]:
        value, mark = cell.split()
        assert mark == ("✓" if float(value) <= benchmark_scale.MAX_RSS_SLOPE else "✗")
    assert row[11] == "3–12"
    assert row[12:14] == ["—", "—"]  # 10 rounds: one block of 10, no minima slope
    # 4 of 20 clients a round: the cache holds clients before the slope's rounds and never
    # shrinks.
    before, end = (float(v) for v in row[14].split(" → "))
    assert 0 < before <= end


def test_replace_sections_replaces_in_place_and_keeps_everything_else():
    first = benchmark.replace_sections("", {"speed": "## Speed\nold\n", "quality": "## Q\n"})
    assert first.startswith("# fedprune benchmarks")
    edited = (first.replace("# fedprune benchmarks", "# fedprune benchmarks\n\nNotes by hand.")
              + "\n<!-- scaleout -->\n## Another tool's section\n<!-- /scaleout -->\n")
    second = benchmark.replace_sections(edited, {"scale": "## Scale\n", "speed": "## Speed\nnew\n"})
    assert "Notes by hand." in second and "## Another tool's section" in second
    assert "old" not in second and "new" in second and "## Q" in second
    # A new section goes between its neighbours of SECTIONS.
    positions = [second.index(f"<!-- benchmark:{name} -->") for name in benchmark.SECTIONS
                 if name not in ("ablation", "grid", "deploy", "scaleout")]  # not written here
    assert positions == sorted(positions)
    assert second.index("<!-- /benchmark:quality -->") < second.index("<!-- scaleout -->")
    assert benchmark.replace_sections(second, {}) == second
    # Replacing with the same bodies changes nothing; backslashes are kept verbatim.
    again = benchmark.replace_sections(second, {"scale": "## Scale\n", "quality": "## Q\n"})
    assert again == second
    assert "a\\1 b" in benchmark.replace_sections(second, {"quality": "a\\1 b"})


def test_command_line_drops_internal_flags_and_quotes():
    argv = ["/x/benchmark.py", "--sections=scale", "--scale_child=10", "--output=a b.md"]
    assert (benchmark.command_line(argv)
            == "python -m experiments.benchmark --sections=scale '--output=a b.md'")


# --------------------------------------------------------------------------
# The deploy section, in process (small models, few runs: its numbers, not its timings).

_DEPLOY_SPARSITIES = (0.5, 0.9)


@pytest.fixture(scope="module")
def deploy_section():
    """(plan, table, notes, results) of a small deploy section: 16x16 inputs, 3 runs.

    `run_deploy_section` is `deploy_section_text` of `deploy_results` at the
    default model size (`benchmark_deploy.MOBILENET`); here the model is smaller.
    """
    plan = benchmark.Plan(("deploy",), None, None, {}, (), (),
                          deploy_sparsities=_DEPLOY_SPARSITIES, deploy_runs=3, deploy_warmup=1)
    small = dict(input_size=16, stem_channels=8, pointwise_channels=(16, 24))
    lines = []
    results = benchmark_deploy.deploy_results(plan.deploy_sparsities, runs=3, warmup=1,
                                              mobilenet=small, log=lines.append)
    assert lines[-1] == "deploy: timing 3 mlp flatbuffers, 3 runs each"
    table, notes = benchmark_deploy.deploy_section_text(plan, results)
    return plan, table, notes, results


@pytest.mark.parametrize("sparsity", _DEPLOY_SPARSITIES)
def test_deploy_prunes_exactly_the_1x1_kernels_to_the_sparsity(deploy_section, sparsity):
    results = deploy_section[-1]
    pruned = results["pruned"][sparsity]
    kernels = benchmark_deploy.pointwise_kernels(pruned)
    assert list(kernels) == results["policy"]["prunable_layers"]
    assert [k.shape for k in kernels.values()] == [(1, 1, 8, 16), (1, 1, 16, 24)]
    for kernel in kernels.values():
        # tfmot keeps the round(size * (1 - sparsity)) largest magnitudes.
        assert kernel.size - np.count_nonzero(kernel) == kernel.size - round(
            kernel.size * (1 - sparsity))
    # The policy wraps nothing else: the 3x3 stem and the classifier stay dense.
    others = [layer for layer in pruned.layers if layer.weights
              and layer.name not in kernels]
    assert [type(layer).__name__ for layer in others] == ["Conv2D", "Dense"]
    for layer in others:
        assert np.count_nonzero(layer.get_weights()[0]) == layer.get_weights()[0].size


def test_deploy_mlp_is_pruned_without_the_policy_which_refuses_it(deploy_section):
    results = deploy_section[-1]
    assert results["policy"]["applies"] and results["policy"]["reason"] is None
    assert results["mlp_policy"]["applies"] is False
    assert results["mlp_policy"]["reason"].startswith("Could not find `Conv2D 3x3` layer")
    for weights in results["mlp_pruned"].get_weights():
        if weights.ndim == 2:  # every Dense kernel at 90 %
            assert weights.size - np.count_nonzero(weights) == weights.size - round(
                weights.size * 0.1)


def test_deploy_table_has_every_flatbuffer_with_positive_latency(deploy_section):
    _, table, notes, results = deploy_section
    rows = results["rows"]
    expected = [("mobilenet_like", 0.0, "dense")] + [
        ("mobilenet_like", s, v) for s in _DEPLOY_SPARSITIES
        for v in ("pruned", "pruned, sparse format")] + [
        ("mlp", 0.0, "dense"), ("mlp", 0.9, "pruned"), ("mlp", 0.9, "pruned, sparse format")]
    assert [(r["model"], r["sparsity"], r["variant"]) for r in rows] == expected
    for row in rows:
        assert sorted(row["latency_ms"]) == ["1", "64"]
        for entry in row["latency_ms"].values():
            assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0 and entry["runs"] == 3
        assert row["tflite_bytes_zipped"] < row["tflite_bytes"]
    for dense in (rows[0], rows[5]):
        assert dense["speedup"] == {"1": 1.0, "64": 1.0}
    by_key = {(r["model"], r["sparsity"], r["variant"]): r for r in rows}
    for model, sparsity in (("mobilenet_like", 0.9), ("mlp", 0.9)):
        plain = by_key[(model, sparsity, "pruned")]
        # Same float32 tensors, zeros included: the plain flatbuffer is dense-sized.
        assert plain["tflite_bytes"] == by_key[(model, 0.0, "dense")]["tflite_bytes"]
        assert by_key[(model, sparsity, "pruned, sparse format")]["tflite_bytes"] < plain[
            "tflite_bytes"]
    assert 0 <= results["max_abs_difference"] <= benchmark_deploy.ATOL
    builtin = results["without_xnnpack"]
    assert [(r["variant"], r["sparsity"]) for r in builtin] == [
        ("dense", 0.0), ("pruned, sparse format", 0.9)]
    assert all(list(r["latency_ms"]) == ["1"] and r["latency_ms"]["1"]["median_ms"] > 0
               for r in builtin)
    lines = table.splitlines()
    assert len(lines) == 2 + len(expected)
    cells = _table_rows(table)["mlp"]
    assert cells[:2] == ["90 %", "pruned, sparse format"]  # the last mlp row wins the key
    speedup = rows[-1]["speedup"]["64"]
    assert cells[-1] == f"{speedup:.2f}×"
    assert "1x1 convs 16 → 24" in notes and "3 timed `invoke()`" in notes.replace("\n", " ")
    assert notes.count("speed-up") >= 2  # a verdict for each model


@pytest.mark.parametrize("ratios, words", [
    ((1.02, 0.97), "**no speed-up** (speed-ups 0.97–1.02×"),
    ((1.3, 0.9), "a speed-up of up to 1.30× (batch 64, pruned, 90 %; speed-ups 0.90–1.30×"),
])
def test_deploy_verdict_states_what_was_measured(ratios, words):
    rows = [{"model": "m", "sparsity": 0.0, "variant": "dense",
             "speedup": {"1": 1.0, "64": 1.0}},
            {"model": "m", "sparsity": 0.9, "variant": "pruned",
             "speedup": {"1": ratios[1], "64": ratios[0]}}]
    assert benchmark_deploy.verdict(rows, "m").startswith(words)
