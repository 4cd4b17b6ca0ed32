r"""Benchmarks fedprune's round time, memory at scale and accuracy (issue 8).

    python -m experiments.benchmark                                 # speed table only
    python -m experiments.benchmark --sections=all --write            # BENCHMARKS.md
    python -m experiments.benchmark --sections=speed,scale,quality --write
    python -m experiments.benchmark --sections=scale --write     # ~10-12 min
    python -m experiments.benchmark --sections=deploy --write
    python -m experiments.benchmark --sections=scaleout --scaleout_repeats=3 --write

The ordinary experiment flags set the data/model setting (default: digits,
the `mlp` model 64-128-10, 10 clients, all 10 per round, batch 16, 1 local
epoch). Sections:

speed    Per-round wall time of, side by side on the same model, initial
         weights, client batches and local epochs:
           (a)  fedprune, masking `both`, polynomial schedule (only
                `PruningProcess.next`, as `loop.py` calls it);
           (s)  fedprune, masking `server`, (a)'s schedule: the server re-masks,
                clients train inside the mask and do not prune;
           (b)  fedprune, masking `none` (dense; TFF's own parts);
           (c)  stock `tff.learning.algorithms.build_weighted_fed_avg`, same
                initial weights (`set_model_weights`) and client optimizer;
           (c-iter) the same with `loop_implementation=DATASET_ITERATOR`, TFF's
                other client loop (stock's default is `DATASET_REDUCE`);
           (c-mrf) (c-iter) with its round compiled to one MapReduceForm and
                called with its state packed, as fedprune runs its own
                (`fedprune/federated/map_reduce.py`, `CompiledRound.next`): how
                much of fedprune's speed over (c-iter) is that;
           (d)  Keras `fit`: one epoch over the concatenation of the round's
                client datasets (the same batches), SGD with the client
                learning rate, compiled once;
           (e)  centralized tfmot pruning: the same `fit` on the
                `prune_low_magnitude` model with `UpdatePruningStep`;
           (f)  the compute floor: one compiled `tf.function` loop over the
                same batches (forward, gradient, SGD update; no Keras `fit`
                machinery), traced once;
           (a+) fedprune's whole experiment round (`loop.run_experiment`:
                (a) plus byte accounting and test-set evaluation, with the
                next round's client datasets, metrics CSV, TensorBoard and
                checkpoint done by its background thread beside training),
                stepped round by round from a thread (`--program_round`).
                A round's background work is queued after its log line, where
                the benchmark holds (a+), so it overlaps (a+)'s own next round
                rather than the other variants' rounds.
         (a) deliberately excludes what (a+) adds, so that a/b and a/c-iter
         compare like with like; a+ - a is loop.py's per-round cost.
         Every variant first runs round 1 untimed (tracing, compilation and,
         for a+, the experiment's set-up), then `--warmup_rounds` untimed and
         `--timed_rounds` timed rounds, interleaved round by round
         (a, s, b, c, c-iter, c-mrf, d, e, f, a+, rotated by one each round,
         so that each variant opens a round in turn) so that machine noise hits
         all of them alike. Each variant trains on its own copy of the
         round's `tf.data` datasets (the same clients and batches), built
         just before its step, outside its timer (their construction time
         is reported on its own line), as every round of a run builds fresh
         ones. Reports median and min-max wall seconds,
         this process's and TFF's worker's CPU seconds per round, each row
         relative to (c-iter) (stock TFF on fedprune's client loop) and (f)
         (the floor), and the ratios of `benchmark_speed.RATIOS` (targets:
         a/b <= 1.10, pruning's overhead over dense fedprune; a/c-iter <= 1.10;
         a+/c-iter <= 1.25, a whole experiment round over stock TFF). The notes
         say where the time goes: (a) - (s), (s) - (b), (b) - (c-iter) and
         (c-iter) - (c-mrf), and (a+)'s phases in loop.py (train, evaluate,
         checkpoint) per round.
ablation What each computation of (a) costs: (a), (s), (b) and (a) traced with
         parts taken out (`--ablations`, default all four: the clients'
         pruning, the upload's byte count, the wrappers' per-batch mask, all
         three; `benchmark_speed.without`), interleaved among themselves
         only (the speed section's setting and rounds), so that the speed
         section's rows are timed without them. Each row's round time
         against (a)'s, paired per round. The ablated variants train wrongly
         by design and exist to be timed.
scale    fedprune (a) on `--scale_clients` clients (default 1,000 Synthetic(1, 1)
         clients) with each of `--scale_clients_per_round` (default 10, a cheap
         row, and 100, issue 18's setting) for `--scale_rounds` rounds
         (default 300), each setting in a fresh child process: round time, peak
         RSS (MiB) of the Python process and of the `worker_binary` child, and
         the least-squares slope of each one's anonymous RSS (RssAnon, MiB per
         round) over the last `--scale_slope_rounds` rounds (default 100);
         issue 18's limit is a slope of at most 0.05 MiB per round for both
         (`benchmark_scale.MAX_RSS_SLOPE`). Beside them, the slope of each
         one's 10-round minima (`benchmark_scale.minima_slope`), which a leak
         raises and memory held for a few rounds after large clients does not.
         The worker runs with fedprune's allocator settings
         (`runtime.workers.WORKER_MALLOC_DEFAULTS`);
         `--scale_worker_malloc=fedprune,glibc` adds rows with glibc's own.
         With `--scale_control` (default on), each clients-per-round value
         runs once more on digits split iid over the same number of clients
         (1-2 examples each, no large client): a per-round leak of the round
         machinery (TFF calls, masks, state) grows there too, while memory kept
         after large clients does not. The default section runs ~10-12 minutes
         on an idle 2-core machine.
grid     The wall time of one reduced Table 1 grid (its axes, fewer seeds and
         sparsities) trained four ways: by the code of --grid_commit (default:
         the day issue 18 was filed, from this repository's history), and by
         today's code with a process built per cell, one trace per grid, and
         one trace per grid with --parallel_cells at the usable cores; each a
         fresh compare_schedules command; the metrics must agree to 1e-6
         (`benchmark_grid.py`).
quality  Final test accuracy of `loop.run_experiment` at each of
         `--quality_sparsities` (0 = dense, masking `none`; the others masking
         `both`, polynomial schedule) over `--quality_seeds`: mean +- 95 % CI,
         and each row's paired difference to dense (per seed, mean +- 95 % CI).
deploy   tfmot's latency-oriented pruning (`PruneForLatencyOnXNNPack`) where it
         applies: a MobileNet-like model (`deployment.mobilenet_like`) with its
         1x1 convolutions pruned to each of `--deploy_sparsities`, converted to
         TFLite plainly and with EXPERIMENTAL_SPARSITY, timed at batch 1 and 64
         (one thread, `--deploy_runs` runs after `--deploy_warmup`, the
         flatbuffers alternating run by run) against the dense model; plus
         fedprune's `mlp` at 90 %, where the policy does not apply
         (`benchmark_deploy.py`). Sizes raw and zipped, median (IQR) latency,
         speed-up vs dense.
scaleout One experiment (`--scaleout_clients` clients, default 100, iid,
         `--scaleout_clients_per_round` a round, default 100, for
         `--scaleout_rounds` rounds, default 8) run as `python -m experiments.run`
         with its own local worker and with `--tff_workers` set to
         `--scaleout_workers` (default 2) loopback worker services that the
         section starts and stops itself; `--scaleout_repeats` runs of each
         mode (default 2), alternating: median and min-max round time of the
         rounds after `--scaleout_baseline_round` (default 3), and the max
         |difference| of every run's metrics from the first local run's, which
         must be <= 1e-5 (`benchmark_scaleout.py`).

Every section prints a Markdown table. With `--write`, the sections that ran
replace theirs in `--output` (default BENCHMARKS.md, other sections are kept),
each with the exact command, the machine (CPU, cores, RAM, versions) and the
load average before and after it ran: other jobs on the machine slow every
variant, but ratios measured round by round are robust to moderate load.

`--masking` and `--schedule` are set per variant and may not be given. Flags
are validated before TensorFlow is imported (--only_check_args stops there);
bad input exits with status 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags

from experiments import (
    benchmark_deploy,
    benchmark_grid,
    benchmark_quality,
    benchmark_scale,
    benchmark_scaleout,
    benchmark_speed,
    common,
    process_stats,
    usage,
)
from fedprune import config as config_lib
from fedprune.data import partitions
from fedprune.errors import InvalidArgument, check

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("speed", "ablation", "scale", "quality", "grid", "deploy", "scaleout")
# Sections that run everything in child processes: without others, this process
# neither imports TensorFlow nor starts a TFF worker of its own.
CHILD_SECTIONS = ("scaleout",)
SCALE_DATASETS = ("synthetic", "digits")
# Fixed per variant, so giving them on the command line would be silently ignored.
FIXED_FLAGS = ("masking", "schedule")

common.define_experiment_flags()
_SECTIONS = flags.DEFINE_list("sections", ["speed"],
                              f"Which of {','.join(SECTIONS)} to run; `all`: every one.")
_WARMUP_ROUNDS = flags.DEFINE_integer(
    "warmup_rounds", 3, "speed and ablation: untimed rounds per variant after round 1 (which "
    "is always untimed: it traces and compiles).")
_TIMED_ROUNDS = flags.DEFINE_integer("timed_rounds", 10,
                                     "speed and ablation: timed rounds per variant (>= 2).")
_PROGRAM_ROUND = flags.DEFINE_bool(
    "program_round", True, "speed: also time (a+), fedprune's whole `run_experiment` round.")
_ABLATIONS = flags.DEFINE_list(
    "ablations", list(benchmark_speed.ABLATIONS),
    "ablation: the variants of (a) traced with parts taken out and timed in the same rounds "
    "as (a), (s) and (b) (timing only; they train wrongly): pruning (the clients' pruning), "
    "bytes (the upload's byte count), mask (the wrappers' per-batch mask), all (the three).")
_WRITE = flags.DEFINE_bool("write", False, "Write the sections that ran into --output.")
_OUTPUT = flags.DEFINE_string("output", str(REPO_ROOT / "BENCHMARKS.md"),
                              "Markdown file that --write updates.")
_SCALE_DATASET = flags.DEFINE_enum("scale_dataset", "synthetic", SCALE_DATASETS,
                                   "scale: dataset (synthetic: Synthetic(--synthetic_alpha, "
                                   "--synthetic_beta); digits: --partition of 1,437 examples).")
_SCALE_CLIENTS = flags.DEFINE_integer("scale_clients", 1000, "scale: number of clients.")
_SCALE_CPR = flags.DEFINE_list("scale_clients_per_round", ["10", "100"],
                               "scale: clients per round; one child process per value and "
                               "--scale_worker_malloc value, plus the control.")
_SCALE_ROUNDS = flags.DEFINE_integer("scale_rounds", 300, "scale: rounds per setting.")
_SCALE_BASELINE = flags.DEFINE_integer(
    "scale_baseline_round", 10, "scale: round times are medians over the rounds after this one.")
_SCALE_SLOPE_ROUNDS = flags.DEFINE_integer(
    "scale_slope_rounds", 100, "scale: the RSS slopes (MiB per round) are fitted over this many "
    "last rounds (>= 10, at most --scale_rounds - --scale_baseline_round).")
_SCALE_MALLOC = flags.DEFINE_list(
    "scale_worker_malloc", ["fedprune"],
    "scale: allocator settings of the worker, one child each per clients-per-round value: "
    "fedprune (fedprune's defaults) or glibc (FEDPRUNE_WORKER_MALLOC=glibc: glibc's own).")
_SCALE_CONTROL = flags.DEFINE_bool(
    "scale_control", True,
    "scale: also run each clients-per-round value with fedprune's defaults on digits split "
    "iid over --scale_clients clients (a control without large clients).")
_SCALE_CHILD = flags.DEFINE_integer("scale_child", 0, "Internal: run one scale setting with "
                                    "this many clients per round and print its result.")
_QUALITY_SPARSITIES = flags.DEFINE_list("quality_sparsities", ["0", "0.5", "0.75", "0.9", "0.95"],
                                        "quality: final sparsities (0 = dense training).")
_QUALITY_SEEDS = flags.DEFINE_list("quality_seeds", ["0", "1", "2", "3", "4"],
                                   "quality: seeds (each row's runs are paired with dense's "
                                   "by seed).")
_GRID_SPARSITIES = flags.DEFINE_list("grid_final_sparsities", ["0.5", "0.9"],
                                     "grid: the reduced grid's --final_sparsities.")
_GRID_MASKINGS = flags.DEFINE_list("grid_maskings", ["client", "server", "both"],
                                   "grid: the reduced grid's --maskings.")
_GRID_GRANULARITIES = flags.DEFINE_list("grid_prune_granularities", ["round", "step"],
                                        "grid: the reduced grid's --prune_granularities.")
_GRID_SEEDS = flags.DEFINE_list("grid_seeds", ["0", "1"], "grid: the reduced grid's --seeds.")
_GRID_PATHS = flags.DEFINE_list(
    "grid_paths", list(benchmark_grid.PATH_NAMES),
    "grid: the code paths to train the grid along, in this order (speed-ups are against the "
    "first): commit (the code of --grid_commit), build (today's, a process per cell), trace "
    "(one trace per grid), parallel (one trace per grid + --parallel_cells=<usable cores>).")
_GRID_COMMIT = flags.DEFINE_string(
    "grid_commit", benchmark_grid.FILED_COMMIT,
    "grid: the commit whose code the `commit` path runs (a commit of this repository's "
    "history; default: the last before the work on issue 18).")
_DEPLOY_SPARSITIES = flags.DEFINE_list(
    "deploy_sparsities", ["0.5", "0.75", "0.9"],
    "deploy: sparsities the 1x1 convolutions of the MobileNet-like model are pruned to.")
_DEPLOY_RUNS = flags.DEFINE_integer("deploy_runs", 50, "deploy: timed invokes per flatbuffer "
                                    "and batch size (>= 3).")
_DEPLOY_WARMUP = flags.DEFINE_integer("deploy_warmup", 10, "deploy: untimed invokes first "
                                      "(>= 0).")
_SCALEOUT_CLIENTS = flags.DEFINE_integer("scaleout_clients", 100,
                                         "scaleout: number of clients (--dataset's examples "
                                         "split by --scaleout_partition).")
_SCALEOUT_CPR = flags.DEFINE_integer("scaleout_clients_per_round", 100,
                                     "scaleout: clients per round (<= --scaleout_clients).")
_SCALEOUT_ROUNDS = flags.DEFINE_integer("scaleout_rounds", 8, "scaleout: rounds per run.")
_SCALEOUT_BASELINE = flags.DEFINE_integer(
    "scaleout_baseline_round", 3, "scaleout: rounds up to this one are not timed; the pruning "
    "schedule ends at it (--end_round), so the timed rounds run at the final sparsity.")
_SCALEOUT_PARTITION = flags.DEFINE_enum(
    "scaleout_partition", "iid", partitions.PARTITIONERS,
    "scaleout: how the examples are split among the clients.")
_SCALEOUT_WORKERS = flags.DEFINE_integer(
    "scaleout_workers", 2, "scaleout: loopback worker services of the remote mode (>= 1).")
_SCALEOUT_REPEATS = flags.DEFINE_integer(
    "scaleout_repeats", 2, "scaleout: runs of each mode (>= 1), alternating local and remote "
    "(local, remote, remote, local, ...).")
usage.set_topic("deploy section", _DEPLOY_SPARSITIES, _DEPLOY_RUNS, _DEPLOY_WARMUP)
usage.set_topic("grid section", _GRID_SPARSITIES, _GRID_MASKINGS, _GRID_GRANULARITIES,
                _GRID_SEEDS, _GRID_PATHS, _GRID_COMMIT)
usage.set_topic("sections", _SECTIONS)
usage.set_topic("speed section", _WARMUP_ROUNDS, _TIMED_ROUNDS, _PROGRAM_ROUND)
usage.set_topic("ablation section", _ABLATIONS)
usage.set_topic("scale section", _SCALE_DATASET, _SCALE_CLIENTS, _SCALE_CPR, _SCALE_ROUNDS,
                _SCALE_BASELINE, _SCALE_SLOPE_ROUNDS, _SCALE_MALLOC, _SCALE_CONTROL, _SCALE_CHILD)
usage.set_topic("quality section", _QUALITY_SPARSITIES, _QUALITY_SEEDS)
usage.set_topic("scaleout section", _SCALEOUT_CLIENTS, _SCALEOUT_CPR, _SCALEOUT_ROUNDS,
                _SCALEOUT_BASELINE, _SCALEOUT_PARTITION, _SCALEOUT_WORKERS, _SCALEOUT_REPEATS)
usage.set_topic(usage.OUTPUTS, _WRITE, _OUTPUT)
usage.not_accepted(FIXED_FLAGS, "the benchmark sets it per variant")
FLAGS = flags.FLAGS


# --------------------------------------------------------------------------
# Validation and configurations (no TensorFlow).


@dataclasses.dataclass(frozen=True)
class Plan:
    """What to run, validated before TensorFlow is imported.

    Attributes:
      sections: the sections to run, in `SECTIONS` order.
      pruned: the config of variants (a) and (a+): masking `both`, polynomial.
      dense: the config of variant (b): masking `none`, no schedule.
      scale: per clients-per-round value, the config of its scale children.
      scale_runs: (clients per round, worker malloc mode, control?) per scale
        child, in table order.
      quality: (target sparsity, seed, config) per quality run.
      grid_base, grid_sparsities, grid_maskings, grid_granularities, grid_seeds,
        grid_paths, grid_commit: the grid section's base experiment (no TFLite
        export) and its `--grid_final_sparsities`, `--grid_maskings`,
        `--grid_prune_granularities`, `--grid_seeds`, `--grid_paths` and
        `--grid_commit`; grid_commit_flags: the flags the driver at that commit
        defines (empty without the `commit` path).
      warmup_rounds, timed_rounds, program_round: the speed section's
        `--warmup_rounds`, `--timed_rounds`, `--program_round` (the first two
        also the ablation section's).
      ablations: the ablation section's `--ablations` (keys of
        `benchmark_speed.ABLATIONS`).
      scale_clients, scale_rounds, scale_baseline, scale_slope_rounds: the scale
        section's `--scale_clients`, `--scale_rounds`, `--scale_baseline_round`,
        `--scale_slope_rounds`.
      deploy_sparsities, deploy_runs, deploy_warmup: the deploy section's
        `--deploy_sparsities`, `--deploy_runs`, `--deploy_warmup`.
      scaleout: the scaleout section's experiment (`benchmark_scaleout.scaleout_config`),
        or None when the section does not run.
      scaleout_baseline, scaleout_workers, scaleout_repeats: its
        `--scaleout_baseline_round`, `--scaleout_workers`, `--scaleout_repeats`.
    """

    sections: tuple[str, ...]
    pruned: config_lib.ExperimentConfig
    dense: config_lib.ExperimentConfig
    scale: dict[int, config_lib.ExperimentConfig]
    scale_runs: tuple[tuple[int, str, bool], ...]
    quality: tuple[tuple[float, int, config_lib.ExperimentConfig], ...]
    grid_base: config_lib.ExperimentConfig | None = None
    grid_sparsities: tuple[float, ...] = ()
    grid_maskings: tuple[str, ...] = ()
    grid_granularities: tuple[str, ...] = ()
    grid_seeds: tuple[int, ...] = ()
    grid_paths: tuple[str, ...] = ()
    grid_commit: str = benchmark_grid.FILED_COMMIT
    grid_commit_flags: frozenset[str] = frozenset()
    warmup_rounds: int = 0
    timed_rounds: int = 2
    program_round: bool = True
    ablations: tuple[str, ...] = ()
    scale_clients: int = 0
    scale_rounds: int = 2
    scale_baseline: int = 1
    scale_slope_rounds: int = benchmark_scale.MIN_SLOPE_ROUNDS
    deploy_sparsities: tuple[float, ...] = ()
    deploy_runs: int = 50
    deploy_warmup: int = 10
    scaleout: config_lib.ExperimentConfig | None = None
    scaleout_baseline: int = 1
    scaleout_workers: int = 2
    scaleout_repeats: int = 1


def _int_list(name: str, values: Sequence[str], minimum: int) -> list[int]:
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise InvalidArgument(name, ",".join(values), "comma-separated whole numbers") from None
    check(bool(ints) and min(ints) >= minimum, name, ",".join(values),
          f"one or more whole numbers >= {minimum}")
    return ints


def _float_list(name: str, values: Sequence[str], *, zero: bool = True) -> list[float]:
    """Sparsities in [0, 1), or in (0, 1) without `zero`."""
    try:
        floats = [float(v) for v in values]
    except ValueError:
        raise InvalidArgument(name, ",".join(values), "comma-separated fractions") from None
    check(bool(floats) and all((0 <= f if zero else 0 < f) and f < 1 for f in floats),
          name, ",".join(values),
          f"one or more sparsities in {'[' if zero else '('}0, 1)")
    return floats


def pruned_and_dense(base: config_lib.ExperimentConfig, rounds: int):
    """The (a) and (b) configs of `base`, with at least `rounds` rounds; validated."""
    rounds = max(base.rounds, rounds)
    pruned = dataclasses.replace(base, masking="both", schedule="polynomial", rounds=rounds)
    dense = dataclasses.replace(base, masking="none", schedule="none", rounds=rounds)
    return pruned.validate(), dense.validate()


def make_plan(base: config_lib.ExperimentConfig) -> Plan:
    """Validates the benchmark flags against `base` (the experiment flags).

    Raises:
      InvalidArgument: naming the first offending flag.
    """
    for name in FIXED_FLAGS:
        check(not FLAGS[name].present, name, FLAGS[name].value,
              "no value: the benchmark sets it per variant")
    asked = SECTIONS if _SECTIONS.value == ["all"] else _SECTIONS.value
    sections = tuple(s for s in SECTIONS if s in asked)
    unknown = sorted(set(asked) - set(SECTIONS))
    check(bool(sections) and not unknown, "sections", ",".join(_SECTIONS.value),
          f"all, or one or more of {','.join(SECTIONS)}")
    check(_WARMUP_ROUNDS.value >= 0, "warmup_rounds", _WARMUP_ROUNDS.value, "a whole number >= 0")
    check(_TIMED_ROUNDS.value >= 2, "timed_rounds", _TIMED_ROUNDS.value, "a whole number >= 2")
    ablations = tuple(dict.fromkeys(_ABLATIONS.value))
    check(bool(ablations) and set(ablations) <= set(benchmark_speed.ABLATIONS), "ablations",
          ",".join(_ABLATIONS.value),
          f"one or more of {','.join(benchmark_speed.ABLATIONS)}")
    pruned, dense = pruned_and_dense(base, 1 + _WARMUP_ROUNDS.value + _TIMED_ROUNDS.value)
    scale, scale_runs = {}, []
    if "scale" in sections or _SCALE_CHILD.value:
        mallocs = list(dict.fromkeys(_SCALE_MALLOC.value))
        modes = benchmark_scale.WORKER_MALLOC_MODES
        check(bool(mallocs) and set(mallocs) <= set(modes), "scale_worker_malloc",
              ",".join(_SCALE_MALLOC.value), f"one or more of {','.join(modes)}")
        check(_SCALE_ROUNDS.value >= 2, "scale_rounds", _SCALE_ROUNDS.value, "a whole number >= 2")
        check(1 <= _SCALE_BASELINE.value < _SCALE_ROUNDS.value, "scale_baseline_round",
              _SCALE_BASELINE.value, f"a round in [1, --scale_rounds={_SCALE_ROUNDS.value})")
        most = _SCALE_ROUNDS.value - _SCALE_BASELINE.value
        check(benchmark_scale.MIN_SLOPE_ROUNDS <= _SCALE_SLOPE_ROUNDS.value <= most,
              "scale_slope_rounds", _SCALE_SLOPE_ROUNDS.value,
              f"a whole number in [{benchmark_scale.MIN_SLOPE_ROUNDS}, {most}] (--scale_rounds - "
              "--scale_baseline_round)")
        per_round = ([_SCALE_CHILD.value] if _SCALE_CHILD.value
                     else _int_list("scale_clients_per_round", _SCALE_CPR.value, 1))
        for cpr in per_round:
            check(cpr <= _SCALE_CLIENTS.value, "scale_clients_per_round", cpr,
                  f"at most --scale_clients={_SCALE_CLIENTS.value}")
            config = dataclasses.replace(base, dataset=_SCALE_DATASET.value,
                                         num_clients=_SCALE_CLIENTS.value, clients_per_round=cpr)
            scale[cpr] = pruned_and_dense(config, _SCALE_ROUNDS.value)[0]
            scale_runs += [(cpr, malloc, False) for malloc in mallocs]
            if _SCALE_CONTROL.value and not _SCALE_CHILD.value:
                scale_runs.append((cpr, "fedprune", True))
    quality = []
    if "quality" in sections:
        seeds = _int_list("quality_seeds", _QUALITY_SEEDS.value, 0)
        for sparsity in _float_list("quality_sparsities", _QUALITY_SPARSITIES.value):
            for seed in seeds:
                # Only the final evaluation matters here, and the runs' folders are
                # temporary: skipping the other evaluations, the TFLite export and the
                # figures (output-only: the same results) saves time.
                config = dataclasses.replace(
                    base, seed=seed, final_sparsity=sparsity or base.final_sparsity,
                    eval_every=base.rounds, deploy="none", figures=False)
                pruned_q, dense_q = pruned_and_dense(config, config.rounds)
                quality.append((sparsity, seed, dense_q if sparsity == 0 else pruned_q))
    deploy_sparsities = tuple(_float_list("deploy_sparsities", _DEPLOY_SPARSITIES.value,
                                          zero=False))
    check(_DEPLOY_RUNS.value >= 3, "deploy_runs", _DEPLOY_RUNS.value, "a whole number >= 3")
    check(_DEPLOY_WARMUP.value >= 0, "deploy_warmup", _DEPLOY_WARMUP.value,
          "a whole number >= 0")
    grid_sparsities = tuple(_float_list("grid_final_sparsities", _GRID_SPARSITIES.value))
    grid_seeds = tuple(_int_list("grid_seeds", _GRID_SEEDS.value, 0))
    from experiments import grid as grid_lib

    grid_maskings = tuple(_GRID_MASKINGS.value)
    check(bool(grid_maskings) and set(grid_maskings) <= set(grid_lib.GRID_MASKINGS),
          "grid_maskings", ",".join(grid_maskings),
          "one or more of " + ",".join(grid_lib.GRID_MASKINGS))
    from fedprune.pruning import step_schedule

    grid_granularities = tuple(_GRID_GRANULARITIES.value)
    check(bool(grid_granularities)
          and set(grid_granularities) <= set(step_schedule.GRANULARITIES),
          "grid_prune_granularities", ",".join(grid_granularities),
          "one or more of " + ",".join(step_schedule.GRANULARITIES))
    grid_paths = tuple(_GRID_PATHS.value)
    check(bool(grid_paths) and set(grid_paths) <= set(benchmark_grid.PATH_NAMES)
          and len(set(grid_paths)) == len(grid_paths), "grid_paths", ",".join(grid_paths),
          "one or more of " + ",".join(benchmark_grid.PATH_NAMES) + ", each once")
    # No TFLite export in the grid: the code at --grid_commit has none.
    grid_base = dataclasses.replace(base, deploy="none")
    grid_commit_flags = frozenset()
    if "grid" in sections and "commit" in grid_paths:
        check(benchmark_grid.is_commit(_GRID_COMMIT.value), "grid_commit", _GRID_COMMIT.value,
              "a commit of this repository's history (a clone with its git history)")
        with tempfile.TemporaryDirectory(prefix="fedprune-commit-") as tree:
            try:
                grid_commit_flags = benchmark_grid.driver_flags(
                    benchmark_grid.check_out(_GRID_COMMIT.value, Path(tree)))
            except RuntimeError:
                check(False, "grid_commit", _GRID_COMMIT.value,
                      "a commit whose experiments.compare_schedules imports")
        benchmark_grid.flags_known_to(benchmark_grid.base_flags(grid_base), grid_commit_flags,
                                      _GRID_COMMIT.value)
    scaleout = None
    if "scaleout" in sections:
        check(not FLAGS.tff_workers, "tff_workers", ",".join(FLAGS.tff_workers),
              "no value with --sections=scaleout: the section starts its own workers")
        check(_SCALEOUT_CLIENTS.value >= 1, "scaleout_clients", _SCALEOUT_CLIENTS.value,
              "a whole number >= 1")
        check(1 <= _SCALEOUT_CPR.value <= _SCALEOUT_CLIENTS.value,
              "scaleout_clients_per_round", _SCALEOUT_CPR.value,
              f"a whole number in [1, --scaleout_clients={_SCALEOUT_CLIENTS.value}]")
        check(_SCALEOUT_ROUNDS.value >= 2, "scaleout_rounds", _SCALEOUT_ROUNDS.value,
              "a whole number >= 2")
        # The pruning schedule ends at the baseline round, after --begin_round.
        check(base.begin_round < _SCALEOUT_BASELINE.value < _SCALEOUT_ROUNDS.value,
              "scaleout_baseline_round", _SCALEOUT_BASELINE.value,
              f"a round in (--begin_round={base.begin_round}, "
              f"--scaleout_rounds={_SCALEOUT_ROUNDS.value})")
        check(_SCALEOUT_WORKERS.value >= 1, "scaleout_workers", _SCALEOUT_WORKERS.value,
              "a whole number >= 1")
        check(_SCALEOUT_REPEATS.value >= 1, "scaleout_repeats", _SCALEOUT_REPEATS.value,
              "a whole number >= 1")
        scaleout = benchmark_scaleout.scaleout_config(
            base, clients=_SCALEOUT_CLIENTS.value, per_round=_SCALEOUT_CPR.value,
            rounds=_SCALEOUT_ROUNDS.value, baseline_round=_SCALEOUT_BASELINE.value,
            partition=_SCALEOUT_PARTITION.value)
    return Plan(sections, pruned, dense, scale, tuple(scale_runs), tuple(quality),
                grid_base=grid_base, grid_commit_flags=grid_commit_flags,
                grid_sparsities=grid_sparsities, grid_maskings=grid_maskings,
                grid_granularities=grid_granularities, grid_seeds=grid_seeds,
                grid_paths=grid_paths, grid_commit=_GRID_COMMIT.value,
                warmup_rounds=_WARMUP_ROUNDS.value, timed_rounds=_TIMED_ROUNDS.value,
                program_round=_PROGRAM_ROUND.value, ablations=ablations,
                scale_clients=_SCALE_CLIENTS.value,
                scale_rounds=_SCALE_ROUNDS.value, scale_baseline=_SCALE_BASELINE.value,
                scale_slope_rounds=_SCALE_SLOPE_ROUNDS.value,
                deploy_sparsities=deploy_sparsities, deploy_runs=_DEPLOY_RUNS.value,
                deploy_warmup=_DEPLOY_WARMUP.value, scaleout=scaleout,
                scaleout_baseline=_SCALEOUT_BASELINE.value,
                scaleout_workers=_SCALEOUT_WORKERS.value,
                scaleout_repeats=_SCALEOUT_REPEATS.value)


# --------------------------------------------------------------------------
# The BENCHMARKS.md file (no TensorFlow).


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"


_HEADER = """# fedprune benchmarks

Generated by `experiments/benchmark.py` (see its docstring for what each
variant measures): `python -m experiments.benchmark --sections=all
--timed_rounds=100 --write` regenerates the whole file. Each section states the
command that regenerates it, the commit, the machine and the load it ran
under; rerunning one section replaces only it.
"""


def replace_sections(text: str, bodies: dict[str, str]) -> str:
    """Replaces each section of `bodies` between its markers in `text`, in place.

    Everything else in `text` (hand-written notes, other tools' sections) is
    kept as it is. A section not yet in `text` goes after the nearest earlier
    section of `SECTIONS` present, else before the nearest later one, else at
    the end; an empty `text` gets the standard header first.
    """
    from fedprune.outputs import reporting

    return reporting.replace_marked_sections(text if text.strip() else _HEADER, bodies,
                                             _section_markers, order=SECTIONS)


def command_line(argv: Sequence[str]) -> str:
    """The shell command that reruns this benchmark with `argv`'s flags."""
    import shlex

    flags_ = [a for a in argv[1:] if not a.startswith("--scale_child")]
    return " ".join(["python -m experiments.benchmark", *map(shlex.quote, flags_)])


def machine_description() -> str:
    """CPU model, cores, RAM, and the versions that decide speed and results."""
    from fedprune.outputs import provenance

    return (f"{provenance.environment_description()}; "
            f"fedprune {provenance.git_commit() or 'unknown commit'}")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def section_body(title: str, table: str, notes: str, *, load_before: str,
                 seconds: float, mean_load: float | None = None) -> str:
    """One BENCHMARKS.md section: title, command, machine, load, table, notes.

    `mean_load`: the mean 1-minute load average while the section ran
    (`process_stats.LoadSampler`).
    """
    during = f", mean 1-min {mean_load:.2f} during it" if mean_load is not None else ""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"## {title}\n\n"
            f"Command: `{command_line(sys.argv)}`\n\n"
            f"Machine: {machine_description()}.\n\n"
            f"Run {date}, {seconds / 60:.1f} min; load average (1/5/15 min) "
            f"{load_before} before, {_load()} after{during}, on {os.cpu_count()} cores.\n\n"
            f"{table}\n{' '.join(notes.split())}\n")


# --------------------------------------------------------------------------
# Driver.


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    try:
        plan = make_plan(common.config_from_flags())
        check(not _WRITE.value or Path(_OUTPUT.value).parent.is_dir(), "output", _OUTPUT.value,
              "a Markdown file in an existing folder")
        common.check_tff_workers(FLAGS.tff_workers)
    except (InvalidArgument, FileNotFoundError) as e:
        common.fail(str(e))
    if FLAGS.only_check_args:
        return 0

    def log(line: str) -> None:
        print(line, flush=True)

    if _SCALE_CHILD.value or not set(plan.sections) <= set(CHILD_SECTIONS):
        common.start_runtime(verbose=FLAGS.verbose, tff_workers=FLAGS.tff_workers)
    if _SCALE_CHILD.value:
        result = benchmark_scale.run_scale_child(plan.scale[_SCALE_CHILD.value],
                                                 rounds=plan.scale_rounds,
                                                 baseline_round=plan.scale_baseline,
                                                 slope_rounds=plan.scale_slope_rounds, log=log)
        print(benchmark_scale.SCALE_RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    runners: dict[str, tuple[str, Callable]] = {
        "speed": ("Round time: fedprune vs TFF FedAvg vs Keras", benchmark_speed.run_speed),
        "ablation": (benchmark_speed.ABLATION_TITLE, benchmark_speed.run_ablation),
        "scale": ("Scale: 1,000 clients, round time and memory", benchmark_scale.run_scale),
        "quality": ("Quality: test accuracy vs sparsity", benchmark_quality.run_quality),
        "grid": ("Grids: a reduced Table 1 by the code of issue 18's day and by today's",
                 benchmark_grid.run_grid_section),
        "deploy": ("Deployment: tfmot's PruneForLatencyOnXNNPack, TFLite latency",
                   benchmark_deploy.run_deploy_section),
        "scaleout": ("Scale-out: one local worker vs loopback workers",
                     benchmark_scaleout.run_scaleout_section),
    }
    bodies = {}
    for name in plan.sections:
        title, runner = runners[name]
        load_before, start = _load(), time.perf_counter()
        sampler = process_stats.LoadSampler().start()
        table, notes = runner(plan, log)
        mean_load = sampler.stop()
        if name == "scale":
            title = f"Scale: {_SCALE_CLIENTS.value:,} clients, round time and memory"
        if name == "scaleout":
            title = ("Scale-out: one local worker vs "
                     f"{benchmark_scaleout.mode_label('remote', plan.scaleout_workers)}")
        print(f"\n## {title}\n\n{table}", flush=True)
        bodies[name] = section_body(title, table, notes, load_before=load_before,
                                    seconds=time.perf_counter() - start, mean_load=mean_load)
    if _WRITE.value:
        from fedprune.outputs import atomic_files

        output = Path(_OUTPUT.value)
        old = output.read_text() if output.exists() else ""
        atomic_files.atomic_write_text(output, replace_sections(old, bodies))
        print(f"wrote {', '.join(plan.sections)} to {output}", flush=True)
    return 0


if __name__ == "__main__":
    common.run(main)
