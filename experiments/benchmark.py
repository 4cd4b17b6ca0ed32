r"""Benchmarks fedprune's round time, memory at scale and accuracy (issue 8).

    python -m experiments.benchmark                                 # speed table only
    python -m experiments.benchmark --sections=speed,scale,quality --write
    python -m experiments.benchmark --sections=scale --scale_clients_per_round=10 --write

The ordinary experiment flags set the data/model setting (default: digits,
the `mlp` model 64-128-10, 10 clients, all 10 per round, batch 16, 1 local
epoch). Sections:

speed    Per-round wall time of, side by side on the same model, initial
         weights, client batches and local epochs:
           (a)  fedprune, masking `both`, polynomial schedule (`process.next` only);
           (b)  fedprune, masking `none` (dense; TFF's own parts);
           (c)  stock `tff.learning.algorithms.build_weighted_fed_avg`, same
                initial weights (`set_model_weights`) and client optimizer;
           (c-iter) the same with `loop_implementation=DATASET_ITERATOR`, TFF's
                other client loop (stock's default is `DATASET_REDUCE`);
           (d)  the compute floor: one Keras `fit` epoch over the concatenation
                of the round's client datasets (the same batches), SGD with the
                client learning rate, compiled once;
           (e)  centralized tfmot pruning: the same `fit` on the
                `prune_low_magnitude` model with `UpdatePruningStep`;
           (a+) fedprune's whole experiment round (`program.run_experiment`:
                (a) plus building the client datasets, byte accounting,
                test-set evaluation, metrics CSV, TensorBoard and checkpoint),
                stepped round by round from a thread (`--program_round`).
         (a) deliberately excludes what (a+) adds, so that a/c and a/d
         compare like with like; a+ - a is program.py's per-round cost.
         Every variant first runs round 1 untimed (tracing, compilation and,
         for a+, the experiment's set-up), then `--warmup_rounds` untimed and
         `--timed_rounds` timed rounds, interleaved round by round
         (a, b, c, c-iter, d, e, a+, a, ...) so that machine noise hits all of
         them alike. All variants of a round train on the same `tf.data`
         datasets, built before the round (their construction time is
         reported on its own line). Reports median and min-max wall seconds,
         this process's and TFF's worker's CPU seconds per round, and the
         ratios a/c, a/d and c/d (project targets: a/c <= 1.0, a/d <= 1.5).
scale    fedprune (a) on `--scale_clients` clients (default 1,000 Synthetic(1, 1)
         clients) with each of `--scale_clients_per_round` (default 10 and 100)
         for `--scale_rounds` rounds, each setting in a fresh child process:
         round time, peak RSS of the Python process and of the `worker_binary`
         child, and RSS growth from round `--scale_baseline_round` to the last
         (a per-round leak shows as growth; the limit is 5 %), for the Python
         process, the worker and both. Each setting runs with the worker's
         allocator settings of each of `--scale_worker_malloc` (fedprune's
         defaults, `runtime.workers.WORKER_MALLOC_DEFAULTS`, and glibc's own), and,
         with `--scale_control`, once more with fedprune's defaults on digits
         split iid over the same number of clients (1-2 examples each, no
         large client): a per-round leak of the round machinery (TFF calls,
         masks, state) grows there too, while memory kept after large clients
         does not.
quality  Final test accuracy of `program.run_experiment` at each of
         `--quality_sparsities` (0 = dense, masking `none`; the others masking
         `both`, polynomial schedule) over `--quality_seeds`: mean +- 95 % CI.

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
import functools
import json
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from absl import flags

from experiments import common, usage
from fedprune import config as config_lib
from fedprune.assembly import RoundInputs, round_inputs
from fedprune.errors import InvalidArgument, check

REPO_ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("speed", "scale", "quality")
SCALE_DATASETS = ("synthetic", "digits")
# Fixed per variant, so giving them on the command line would be silently ignored.
FIXED_FLAGS = ("masking", "schedule")
# Targets the project set for fedprune's round time (issue 8).
TARGETS = {"a/c": 1.0, "a/d": 1.5}
# Allocator settings of the scale section's workers: fedprune's defaults, or glibc's own.
WORKER_MALLOC_MODES = ("fedprune", "glibc")
MAX_RSS_GROWTH = 0.05  # fraction; more from the baseline round to the last suggests a leak
SCALE_RESULT_PREFIX = "SCALE_RESULT "

common.define_experiment_flags()
_SECTIONS = flags.DEFINE_list("sections", ["speed"], f"Which of {','.join(SECTIONS)} to run.")
_WARMUP_ROUNDS = flags.DEFINE_integer(
    "warmup_rounds", 3, "speed: untimed rounds per variant after round 1 (which is always "
    "untimed: it traces and compiles).")
_TIMED_ROUNDS = flags.DEFINE_integer("timed_rounds", 10, "speed: timed rounds per variant (>= 2).")
_PROGRAM_ROUND = flags.DEFINE_bool(
    "program_round", True, "speed: also time (a+), fedprune's whole `run_experiment` round.")
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
_SCALE_ROUNDS = flags.DEFINE_integer("scale_rounds", 100, "scale: rounds per setting.")
_SCALE_BASELINE = flags.DEFINE_integer(
    "scale_baseline_round", 10, "scale: RSS growth is measured from this round to the last.")
_SCALE_MALLOC = flags.DEFINE_list(
    "scale_worker_malloc", ["fedprune", "glibc"],
    "scale: allocator settings of the worker, one child each per clients-per-round value: "
    "fedprune (fedprune's defaults) or glibc (FEDPRUNE_WORKER_MALLOC=glibc: glibc's own).")
_SCALE_CONTROL = flags.DEFINE_bool(
    "scale_control", True,
    "scale: also run each clients-per-round value with fedprune's defaults on digits split "
    "iid over --scale_clients clients (a control without large clients).")
# The control's data: every client gets 1-2 of digits' 1,437 training examples.
CONTROL_FLAGS = ("--scale_dataset=digits", "--partition=iid")
_SCALE_CHILD = flags.DEFINE_integer("scale_child", 0, "Internal: run one scale setting with "
                                    "this many clients per round and print its result.")
_QUALITY_SPARSITIES = flags.DEFINE_list("quality_sparsities", ["0", "0.5", "0.75", "0.9", "0.95"],
                                        "quality: final sparsities (0 = dense training).")
_QUALITY_SEEDS = flags.DEFINE_list("quality_seeds", ["0", "1", "2"], "quality: seeds.")
usage.set_topic("sections", _SECTIONS)
usage.set_topic("speed section", _WARMUP_ROUNDS, _TIMED_ROUNDS, _PROGRAM_ROUND)
usage.set_topic("scale section", _SCALE_DATASET, _SCALE_CLIENTS, _SCALE_CPR, _SCALE_ROUNDS,
                _SCALE_BASELINE, _SCALE_MALLOC, _SCALE_CONTROL, _SCALE_CHILD)
usage.set_topic("quality section", _QUALITY_SPARSITIES, _QUALITY_SEEDS)
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
    """

    sections: tuple[str, ...]
    pruned: config_lib.ExperimentConfig
    dense: config_lib.ExperimentConfig
    scale: dict[int, config_lib.ExperimentConfig]
    scale_runs: tuple[tuple[int, str, bool], ...]
    quality: tuple[tuple[float, int, config_lib.ExperimentConfig], ...]


def _int_list(name: str, values: Sequence[str], minimum: int) -> list[int]:
    try:
        ints = [int(v) for v in values]
    except ValueError:
        raise InvalidArgument(name, ",".join(values), "comma-separated whole numbers") from None
    check(bool(ints) and min(ints) >= minimum, name, ",".join(values),
          f"one or more whole numbers >= {minimum}")
    return ints


def _float_list(name: str, values: Sequence[str]) -> list[float]:
    try:
        floats = [float(v) for v in values]
    except ValueError:
        raise InvalidArgument(name, ",".join(values), "comma-separated fractions") from None
    check(bool(floats) and all(0 <= f < 1 for f in floats), name, ",".join(values),
          "one or more sparsities in [0, 1)")
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
    sections = tuple(s for s in SECTIONS if s in _SECTIONS.value)
    unknown = sorted(set(_SECTIONS.value) - set(SECTIONS))
    check(bool(sections) and not unknown, "sections", ",".join(_SECTIONS.value),
          f"one or more of {','.join(SECTIONS)}")
    check(_WARMUP_ROUNDS.value >= 0, "warmup_rounds", _WARMUP_ROUNDS.value, "a whole number >= 0")
    check(_TIMED_ROUNDS.value >= 2, "timed_rounds", _TIMED_ROUNDS.value, "a whole number >= 2")
    pruned, dense = pruned_and_dense(base, 1 + _WARMUP_ROUNDS.value + _TIMED_ROUNDS.value)
    scale, scale_runs = {}, []
    if "scale" in sections or _SCALE_CHILD.value:
        mallocs = list(dict.fromkeys(_SCALE_MALLOC.value))
        check(bool(mallocs) and set(mallocs) <= set(WORKER_MALLOC_MODES), "scale_worker_malloc",
              ",".join(_SCALE_MALLOC.value), f"one or more of {','.join(WORKER_MALLOC_MODES)}")
        check(_SCALE_ROUNDS.value >= 2, "scale_rounds", _SCALE_ROUNDS.value, "a whole number >= 2")
        check(1 <= _SCALE_BASELINE.value < _SCALE_ROUNDS.value, "scale_baseline_round",
              _SCALE_BASELINE.value, f"a round in [1, --scale_rounds={_SCALE_ROUNDS.value})")
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
                # Only the final evaluation matters here; skipping the others saves time.
                config = dataclasses.replace(
                    base, seed=seed, final_sparsity=sparsity or base.final_sparsity,
                    eval_every=base.rounds)
                pruned_q, dense_q = pruned_and_dense(config, config.rounds)
                quality.append((sparsity, seed, dense_q if sparsity == 0 else pruned_q))
    return Plan(sections, pruned, dense, scale, tuple(scale_runs), tuple(quality))


# --------------------------------------------------------------------------
# Statistics and Markdown (no TensorFlow).


def median_range(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of `values`."""
    return statistics.median(values), min(values), max(values)


RATIOS = ("a/c", "a/d", "c/d", "b/c", "a/c-iter", "c-iter/d", "a+/a")


def speed_ratios(medians: dict[str, float]) -> dict[str, float]:
    """Ratios of median round seconds (`RATIOS` whose variants were measured).

    Args:
      medians: variant key (e.g. "a", "c-iter") -> median round seconds.
    """
    ratios = {}
    for name in RATIOS:
        top, bottom = name.split("/")
        if top in medians and bottom in medians:
            ratios[name] = medians[top] / medians[bottom]
    return ratios


@dataclasses.dataclass
class VariantTiming:
    """Per-round measurements of one speed variant (timed rounds only).

    Attributes:
      key: short name, e.g. "a" or "a+".
      label: the table's row label.
      wall: wall seconds per round.
      python_cpu: CPU seconds of this process (all threads) per round.
      worker_cpu: CPU seconds of TFF's worker processes per round.
    """

    key: str
    label: str
    wall: list[float] = dataclasses.field(default_factory=list)
    python_cpu: list[float] = dataclasses.field(default_factory=list)
    worker_cpu: list[float] = dataclasses.field(default_factory=list)


def _seconds(x: float) -> str:
    return f"{x:.3f}"


def speed_markdown(timings: Sequence[VariantTiming], input_seconds: Sequence[float]) -> str:
    """The speed tables: per-variant round time and CPU, then the tracked ratios."""
    medians = {t.key: statistics.median(t.wall) for t in timings}
    lines = ["| variant | median (s) | min–max (s) | vs (c) | vs (d) | Python CPU (s) "
             "| worker CPU (s) |", "| :-- | --: | --: | --: | --: | --: | --: |"]
    for t in timings:
        med, lo, hi = median_range(t.wall)
        lines.append(
            f"| {t.label} | {_seconds(med)} | {_seconds(lo)}–{_seconds(hi)} "
            f"| {med / medians['c']:.2f} | {med / medians['d']:.2f} "
            f"| {_seconds(statistics.median(t.python_cpu))} "
            f"| {_seconds(statistics.median(t.worker_cpu))} |")
    med, lo, hi = median_range(input_seconds)
    lines.append(f"| (input) build the round's client datasets, not in any row above "
                 f"| {_seconds(med)} | {_seconds(lo)}–{_seconds(hi)} | | | | |")
    lines += ["", "| ratio | median round time ratio | target |", "| :-- | --: | :-- |"]
    for name, value in speed_ratios(medians).items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (
            f"≤ {target:g} ({'met' if value <= target else 'not met'})")
        lines.append(f"| {name} | {value:.2f} | {verdict} |")
    return "\n".join(lines) + "\n"


def rss_slope(result: dict, key: str = "worker") -> float:
    """Least-squares RSS slope in MiB per round over the second half of a scale run.

    A per-round leak shows as a positive slope however the first rounds went;
    a one-off rise (e.g. after the largest client so far) does not.
    """
    rss = result["rss"]
    first = len(rss) // 2
    rounds = list(range(first + 1, len(rss) + 1))
    mib = [r[key] / 2**20 for r in rss[first:]]
    return statistics.linear_regression(rounds, mib).slope


def scale_markdown(results: Sequence[dict]) -> str:
    """The scale table, one row per child process (from `run_scale_child`)."""
    mib = 1024**2
    lines = ["| dataset | clients | per round | worker malloc | MALLOC_ARENA_MAX | rounds "
             "| median round (s) | min–max (s) | peak RSS Python (MiB) | peak RSS worker (MiB) "
             "| RSS growth Python | RSS growth worker | RSS growth total "
             "| worker RSS slope, 2nd half (MiB/round) | largest client so far (examples) |",
             "| :-- | --: | --: | :-- | --: | --: | --: | --: | --: | --: | --: | --: | --: "
             "| --: | --: |"]
    for r in results:
        med, lo, hi = median_range(r["round_seconds"][r["baseline_round"]:])
        growth = r["rss_growth"]
        cells = [f"{100 * growth[k]:+.1f} %" + ("" if growth[k] < MAX_RSS_GROWTH else " ✗")
                 for k in ("python", "worker", "total")]
        largest = r["largest_client"]
        lines.append(
            f"| {r.get('dataset', '')} | {r['num_clients']} | {r['clients_per_round']} "
            f"| {r.get('worker_malloc', '')} | {r.get('malloc_arena_max', 'unset')} "
            f"| {r['rounds']} "
            f"| {_seconds(med)} | {_seconds(lo)}–{_seconds(hi)} "
            f"| {r['peak_rss']['python'] / mib:.0f} | {r['peak_rss']['worker'] / mib:.0f} "
            f"| {' | '.join(cells)} | {rss_slope(r):+.2f} "
            f"| {largest[r['baseline_round'] - 1]:,} → {largest[-1]:,} |")
    return "\n".join(lines) + "\n"


def quality_markdown(rows: Sequence[dict]) -> str:
    """The quality table: accuracy and measured sparsity, mean ± 95 % CI over seeds."""
    from fedprune import reporting

    table = reporting.aggregate(rows, ["target sparsity", "masking"],
                                ["final_test_accuracy", "final_global_sparsity"])
    return reporting.to_markdown(table, {
        "final_test_accuracy": reporting.MetricFormat(spec=".3f", label="test accuracy"),
        "final_global_sparsity": reporting.MetricFormat(spec=".1f", scale=0.01, unit="%",
                                                        label="measured sparsity"),
    })


def _section_markers(name: str) -> tuple[str, str]:
    return f"<!-- benchmark:{name} -->", f"<!-- /benchmark:{name} -->"


_HEADER = """# fedprune benchmarks

Generated by `experiments/benchmark.py` (see its docstring for what each
variant measures). Each section states the command that regenerates it, the
machine and the load it ran under; rerunning one section replaces only it.
"""


def replace_sections(text: str, bodies: dict[str, str]) -> str:
    """Replaces each section of `bodies` between its markers in `text`, in place.

    Everything else in `text` (hand-written notes, other tools' sections) is
    kept as it is. A section not yet in `text` goes after the nearest earlier
    section of `SECTIONS` present, else before the nearest later one, else at
    the end; an empty `text` gets the standard header first.
    """
    from fedprune import reporting

    return reporting.replace_marked_sections(text if text.strip() else _HEADER, bodies,
                                             _section_markers, order=SECTIONS)


def command_line(argv: Sequence[str]) -> str:
    """The shell command that reruns this benchmark with `argv`'s flags."""
    import shlex

    flags_ = [a for a in argv[1:] if not a.startswith("--scale_child")]
    return " ".join(["python -m experiments.benchmark", *map(shlex.quote, flags_)])


def machine_description() -> str:
    """CPU model, cores, RAM, and the versions that decide speed and results."""
    from fedprune import provenance

    return (f"{provenance.machine_description()}; {provenance.software_description()}; "
            f"fedprune {provenance.git_commit() or 'unknown commit'}")


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def section_body(title: str, table: str, notes: str, *, load_before: str,
                 seconds: float) -> str:
    """One BENCHMARKS.md section: title, command, machine, load, table, notes."""
    date = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    return (f"## {title}\n\n"
            f"Command: `{command_line(sys.argv)}`\n\n"
            f"Machine: {machine_description()}.\n\n"
            f"Run {date}, {seconds / 60:.1f} min; load average (1/5/15 min) "
            f"{load_before} before, {_load()} after, on {os.cpu_count()} cores.\n\n"
            f"{table}\n{' '.join(notes.split())}\n")


# --------------------------------------------------------------------------
# Process measurements.


def _workers():
    from fedprune.runtime import workers

    return workers.worker_descendants()


def _cpu_seconds() -> tuple[float, float]:
    """(this process, its TFF workers): user + system CPU seconds so far."""
    import psutil

    own = psutil.Process().cpu_times()
    worker = 0.0
    for proc in _workers():
        try:
            t = proc.cpu_times()
            worker += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return own.user + own.system, worker


def _arena_max(workers) -> str:
    """MALLOC_ARENA_MAX in the workers' environment ("unset": glibc's default)."""
    import psutil

    for proc in workers:
        try:
            return proc.environ().get("MALLOC_ARENA_MAX", "unset")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return "unknown"


def _rss(proc) -> int:
    import psutil

    try:
        return proc.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def _peak_rss(proc) -> int:
    """Peak RSS in bytes (Linux VmHWM; elsewhere the current RSS)."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return _rss(proc)


# --------------------------------------------------------------------------
# Speed variants. Each runs its round 1 in `prepare` and one round per `step`.


class TffVariant:
    """A TFF learning process: `state = process.next(state, datasets).state`."""

    def __init__(self, process, state, pruning_process=None):
        self.process = process
        self.state = state
        self.pruning_process = pruning_process  # fedprune's `PruningProcess`, if any

    def step(self, batches: RoundInputs) -> None:
        # `next` returns numpy values: the state is back in Python when it returns.
        self.state = self.process.next(self.state, batches.datasets).state

    def weights(self):
        return self.process.get_model_weights(self.state)


class KerasVariant:
    """Keras `fit`, one epoch over the concatenation of the round's client datasets."""

    def __init__(self, model, callbacks=()):
        self.model = model
        self.callbacks = list(callbacks)

    def step(self, batches: RoundInputs) -> None:
        dataset = functools.reduce(lambda a, b: a.concatenate(b), batches.datasets)
        dataset = dataset.map(lambda b: (b["x"], b["y"]))
        self.model.fit(dataset, epochs=1, verbose=0, callbacks=self.callbacks)


class ProgramVariant:
    """`program.run_experiment` in a thread, released one round at a time.

    Its `log` callback, called once at the end of every round, reports the
    round and blocks until the next `step`, so the benchmark interleaves whole
    experiment rounds (data, `next`, byte accounting, evaluation, metrics CSV,
    TensorBoard, checkpoint) with the other variants' rounds.
    """

    def __init__(self, config, output_dir: Path, last_round: int):
        import tensorflow_federated as tff

        # TFF's context stack is thread-local: hand the thread this thread's context.
        self._context = tff.framework.get_context_stack().current
        self._go: queue.Queue[bool] = queue.Queue()
        self._done: queue.Queue[object] = queue.Queue()
        self._thread = threading.Thread(
            target=self._run, args=(config, output_dir, last_round), daemon=True)

    def _run(self, config, output_dir, last_round) -> None:
        import tensorflow_federated as tff

        from fedprune import program

        try:
            with tff.framework.get_context_stack().install(self._context):
                program.run_experiment(config, output_dir, log=self._on_log,
                                       stop_after_round=last_round)
            self._done.put(None)
        except BaseException as e:  # handed to the main thread, which re-raises
            self._done.put(e)

    def _on_log(self, line: str) -> None:
        if line.startswith("round "):
            self._done.put(line)
            self._go.get()

    def _wait(self) -> None:
        result = self._done.get()
        if isinstance(result, BaseException):
            raise RuntimeError("run_experiment failed in variant (a+)") from result
        if result is None:
            raise RuntimeError("run_experiment stopped before the benchmark's last round")

    def prepare(self) -> None:
        """Starts the thread and waits for round 1 (set-up included) to finish."""
        self._thread.start()
        self._wait()

    def step(self, batches: RoundInputs) -> None:
        del batches  # run_experiment builds its own, for the same round
        self._go.put(True)
        self._wait()

    def finish(self) -> None:
        self._go.put(True)
        result = self._done.get()
        self._thread.join(timeout=60)
        if isinstance(result, BaseException):
            raise RuntimeError("run_experiment failed in variant (a+)") from result


VARIANT_LABELS = {
    "a": "(a) fedprune, masking both, polynomial",
    "b": "(b) fedprune, masking none",
    "c": "(c) TFF build_weighted_fed_avg",
    "c-iter": "(c-iter) the same, loop_implementation=DATASET_ITERATOR",
    "d": "(d) Keras fit, same batches (floor)",
    "e": "(e) Keras fit + tfmot pruning",
    "a+": "(a+) fedprune run_experiment round",
}


def _compile(model, config):
    import tensorflow as tf

    model.compile(
        optimizer=tf.keras.optimizers.SGD(learning_rate=config.client_lr,
                                          momentum=config.client_momentum),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
    return model


def build_variants(plan: Plan, data, first: RoundInputs, work_dir: Path, log) -> dict:
    """Builds every speed variant from identical initial weights and runs its round 1.

    Returns:
      key -> variant, in interleaving order.
    """
    import tensorflow as tf
    import tensorflow_federated as tff
    import tensorflow_model_optimization as tfmot

    from fedprune import assembly
    from fedprune import process as process_lib

    config = plan.pruned
    variants = {}
    log("building (a) fedprune masking both")
    pruned = assembly.build_process(plan.pruned, data)
    variants["a"] = TffVariant(pruned.process, pruned.process.initialize(), pruned)
    log("building (b) fedprune masking none")
    dense = assembly.build_process(plan.dense, data)
    variants["b"] = TffVariant(dense.process, dense.process.initialize())
    initial = variants["b"].weights()

    log("building (c) and (c-iter) build_weighted_fed_avg")

    def model_fn():
        return tff.learning.models.from_keras_model(
            dense.keras_model_fn(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=data.element_spec,
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

    # c-iter: the same with TFF's other client loop (a `for` over a dataset
    # iterator instead of `DatasetReduce`): stock FedAvg at its best, and the
    # like-for-like baseline when fedprune's client work uses that loop.
    for key, loop in (("c", tff.learning.LoopImplementation.DATASET_REDUCE),
                      ("c-iter", tff.learning.LoopImplementation.DATASET_ITERATOR)):
        fed_avg = tff.learning.algorithms.build_weighted_fed_avg(
            model_fn,
            client_optimizer_fn=process_lib.make_optimizer("sgd", config.client_lr,
                                                           momentum=config.client_momentum),
            server_optimizer_fn=process_lib.make_optimizer(config.server_optimizer,
                                                           config.server_lr),
            loop_implementation=loop)
        variants[key] = TffVariant(fed_avg,
                                   fed_avg.set_model_weights(fed_avg.initialize(), initial))

    log("building (d) Keras fit and (e) Keras fit + tfmot")
    floor = _compile(dense.keras_model_fn(), config)
    floor.set_weights([*initial.trainable, *initial.non_trainable])
    variants["d"] = KerasVariant(floor)
    variants["e"] = KerasVariant(_tfmot_model(dense.keras_model_fn, initial, config,
                                              steps_per_round=_num_batches(first)),
                                 [tfmot.sparsity.keras.UpdatePruningStep()])
    for key, variant in variants.items():
        log(f"round 1 (untimed) of ({key})")
        variant.step(first)
    if _PROGRAM_ROUND.value:
        log("starting (a+) run_experiment and its round 1 (untimed)")
        variants["a+"] = ProgramVariant(plan.pruned, work_dir / "program",
                                        last_round=1 + _WARMUP_ROUNDS.value + _TIMED_ROUNDS.value)
        variants["a+"].prepare()
    return variants


def _num_batches(batches: RoundInputs) -> int:
    return sum(int(d.reduce(0, lambda n, _: n + 1)) for d in batches.datasets)


def _tfmot_model(keras_model_fn, initial, config, *, steps_per_round: int):
    """The plain model wrapped by tfmot with the run's schedule, in steps of one round each.

    One round is `steps_per_round` optimizer steps (the batches of round 1),
    so rounds `begin_round..end_round` become steps and the mask is updated
    every `prune_every` rounds' worth of steps, as fedprune does per round.
    """
    import tensorflow_model_optimization as tfmot

    model = keras_model_fn()
    model.set_weights([*initial.trainable, *initial.non_trainable])
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=config.initial_sparsity, final_sparsity=config.final_sparsity,
        begin_step=config.begin_round * steps_per_round,
        end_step=config.end_round * steps_per_round, power=config.power,
        frequency=config.prune_every * steps_per_round)
    model = tfmot.sparsity.keras.prune_low_magnitude(model, pruning_schedule=schedule)
    return _compile(model, config)


def run_speed(plan: Plan, log) -> tuple[str, str]:
    """Runs the speed section; returns (table, notes)."""
    import numpy as np

    from fedprune import assembly, evaluation

    data = assembly.load_data(plan.pruned)
    timings = {k: VariantTiming(k, label) for k, label in VARIANT_LABELS.items()}
    input_seconds = []
    steps_per_round = _num_batches(round_inputs(plan.pruned, data, 1))
    with tempfile.TemporaryDirectory(prefix="fedprune-benchmark-") as work_dir:
        variants = build_variants(plan, data, round_inputs(plan.pruned, data, 1),
                                  Path(work_dir), log)
        last = 1 + _WARMUP_ROUNDS.value + _TIMED_ROUNDS.value
        for round_num in range(2, last + 1):
            timed = round_num > 1 + _WARMUP_ROUNDS.value
            start = time.perf_counter()
            batches = round_inputs(plan.pruned, data, round_num)
            built = time.perf_counter() - start
            line = []
            for key, variant in variants.items():
                cpu0, worker0 = _cpu_seconds()
                start = time.perf_counter()
                variant.step(batches)
                wall = time.perf_counter() - start
                cpu1, worker1 = _cpu_seconds()
                line.append(f"{key} {wall:.3f}")
                if timed:
                    timings[key].wall.append(wall)
                    timings[key].python_cpu.append(cpu1 - cpu0)
                    timings[key].worker_cpu.append(worker1 - worker0)
            if timed:
                input_seconds.append(built)
            log(f"round {round_num}/{last} ({'timed' if timed else 'warm-up'}): "
                f"{', '.join(line)} s")
        if "a+" in variants:
            variants["a+"].finish()
        # (b), (c) and (c-iter) saw the same weights and batches: they should agree.
        dense = [variants[k].weights() for k in ("b", "c", "c-iter")]
        max_diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                       for other in dense[1:]
                       for x, y in zip(dense[0].trainable, other.trainable, strict=True))
        sparsity = evaluation.sparsity_metrics(variants["a"].pruning_process,
                                            variants["a"].weights())["global_sparsity"]
    table = speed_markdown([t for t in timings.values() if t.wall], input_seconds)
    config = plan.pruned
    notes = f"""Setting: {config.dataset} ({len(data.client_ids)} clients, {config.partition}
partition), model `{config.model}`, {config.clients_per_round} clients per round, batch
{config.batch_size}, {config.local_epochs} local epoch(s), client SGD lr {config.client_lr},
server {config.server_optimizer} lr {config.server_lr}; (a) prunes
{config.initial_sparsity:g} → {config.final_sparsity:g} over rounds
{config.begin_round}–{config.end_round} (global sparsity {sparsity:.3f} after the last
timed round). Round 1 untimed, then {_WARMUP_ROUNDS.value} warm-up and {_TIMED_ROUNDS.value}
timed rounds per variant, interleaved round by round. Python CPU counts all threads of the
benchmark process (Keras runs there); worker CPU is TFF's `worker_binary`, where TFF
executes the rounds. (b), (c) and (c-iter) end with weights equal to within {max_diff:.1e}
(same initial weights, batches and optimizers). (a+) − (a) is what program.py adds per
round (client datasets, byte accounting, evaluation, CSV, TensorBoard, checkpoint). (e)
maps one round to the {steps_per_round} steps of round 1 for tfmot's PolynomialDecay."""
    return table, notes


# --------------------------------------------------------------------------
# Scale.


def run_scale_child(config, *, rounds: int, baseline_round: int, log) -> dict:
    """Runs fedprune (a) for `rounds` rounds, sampling RSS after every round.

    Returns:
      A JSON-able dict: round seconds, RSS samples, peak RSS and growth.
    """
    import psutil

    from fedprune import assembly
    from fedprune.runtime import workers

    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    state = pp.process.initialize()
    me = psutil.Process()
    round_seconds, rss, largest = [], [], []
    for round_num in range(1, rounds + 1):
        start = time.perf_counter()
        batches = round_inputs(config, data, round_num)
        state = pp.process.next(state, batches.datasets).state
        round_seconds.append(time.perf_counter() - start)
        # Memory that malloc keeps after the largest client so far is not a leak.
        largest.append(max([*largest[-1:], *(data.num_examples(c) for c in batches.clients)]))
        procs = _workers()
        rss.append({"python": _rss(me), "worker": sum(_rss(w) for w in procs)})
        if round_num % 10 == 0 or round_num == rounds:
            log(f"round {round_num}/{rounds}: {round_seconds[-1]:.3f} s, RSS python "
                f"{rss[-1]['python'] / 2**20:.0f} MiB, worker {rss[-1]['worker'] / 2**20:.0f} MiB")
    procs = _workers()
    peak = {"python": _peak_rss(me), "worker": sum(_peak_rss(w) for w in procs)}
    before, after = rss[baseline_round - 1], rss[-1]
    growth = {k: after[k] / before[k] - 1 for k in ("python", "worker")}
    growth["total"] = (after["python"] + after["worker"]) / (
        before["python"] + before["worker"]) - 1
    return {"num_clients": len(data.client_ids), "clients_per_round": config.clients_per_round,
            "malloc_arena_max": _arena_max(procs),
            "worker_malloc": os.environ.get(workers.WORKER_MALLOC_ENV) or "fedprune",
            "dataset": config.dataset + ("" if config.dataset == "synthetic"
                                         else f" {config.partition}"),
            "rounds": rounds, "baseline_round": baseline_round, "round_seconds": round_seconds,
            "rss": rss, "peak_rss": peak, "rss_growth": growth, "largest_client": largest}


def _child_env(malloc: str) -> dict[str, str]:
    """This process's environment, for a child whose worker gets `malloc`'s settings.

    The glibc variables are removed, so the child (Python) runs with glibc's
    defaults either way and its worker with `runtime.workers.worker_environment`'s.
    """
    from fedprune.runtime import workers

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    env[workers.WORKER_MALLOC_ENV] = malloc
    return env


def run_scale(plan: Plan, log) -> tuple[str, str]:
    """Runs each scale setting in a child process (clean peak RSS); returns (table, notes).

    glibc gives each thread that allocates concurrently its own malloc arena (up
    to 8 per core) and rarely returns their free space, so a multi-threaded
    process such as TFF's worker can grow without leaking. fedprune caps the
    worker's arenas (`runtime.workers.WORKER_MALLOC_DEFAULTS`); the `glibc` rows start
    it with glibc's defaults (`FEDPRUNE_WORKER_MALLOC=glibc`). The child Python
    process runs with glibc's defaults in every row.
    """
    results = []
    for cpr, malloc, control in plan.scale_runs:
        log(f"scale: {_SCALE_CLIENTS.value} clients, {cpr} per round, worker malloc {malloc}"
            f"{', control' if control else ''}, in a child process")
        args = [sys.executable, "-m", "experiments.benchmark", *sys.argv[1:],
                f"--scale_child={cpr}", *(CONTROL_FLAGS if control else ())]
        child = subprocess.Popen(args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, text=True, env=_child_env(malloc))
        result = None
        try:
            for line in child.stdout:
                if line.startswith(SCALE_RESULT_PREFIX):
                    result = json.loads(line[len(SCALE_RESULT_PREFIX):])
                else:
                    log(f"  [{cpr}/round] {line.rstrip()}")
            status = child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if status != 0 or result is None:
            raise RuntimeError(f"scale child (--scale_child={cpr}) failed with status {status}")
        results.append(result)
    config = next(iter(plan.scale.values()))
    if config.dataset == "synthetic":
        dataset = (f"Synthetic(α={config.synthetic_alpha:g}, β={config.synthetic_beta:g}) "
                   "(Li et al. 2020; log-normal client sizes)")
    else:
        dataset = f"{config.dataset} ({config.partition} partition)"
    notes = f"""Setting: {dataset} with {config.num_clients} clients, model `{config.model}`,
batch {config.batch_size}, {config.local_epochs} local epoch(s), fedprune masking both,
polynomial (power {config.power:g}) {config.initial_sparsity:g} →
{config.final_sparsity:g} over rounds
{config.begin_round}–{config.end_round}. Each setting runs in a fresh child process
(its own `worker_binary`), one after another, so their round times compare only as well as
the machine's load allowed (the load averages above); the speed section interleaves its
variants. Round time includes building the round's client datasets and
`process.next`, medians over rounds {_SCALE_BASELINE.value + 1}–{_SCALE_ROUNDS.value}. Peak
RSS is the kernel's high-water mark (VmHWM) of each process. RSS growth compares the RSS
sampled after round {_SCALE_BASELINE.value} with that after the last round; ✗ marks growth
of {100 * MAX_RSS_GROWTH:.0f} % or more. The slope is a least-squares fit of the worker's RSS
over the second half of the rounds: a per-round leak keeps it positive, while a one-off rise
does not, such as malloc keeping the memory of the largest client trained so far (last
column: its size at round {_SCALE_BASELINE.value} → at the end). "worker
malloc" is how the worker was started: `fedprune`, with fedprune's defaults
(`runtime.workers.WORKER_MALLOC_DEFAULTS`), or `glibc`, with glibc's own
(`FEDPRUNE_WORKER_MALLOC=glibc`); MALLOC_ARENA_MAX is read from the running worker's
environment ("unset": glibc's default, up to 8 arenas per core); the Python process runs
with glibc's defaults in every row. The `digits iid` rows are a control, not the workload:
the same rounds, model and worker on digits split iid over the same number of clients (1-2
examples each), so no round brings a larger client than before; a per-round leak of the
round machinery (TFF calls, masks, server state) would grow there too, while memory kept
after the largest client so far does not."""
    return scale_markdown(results), notes


# --------------------------------------------------------------------------
# Quality.


def run_quality(plan: Plan, log) -> tuple[str, str]:
    """Trains every (sparsity, seed) with `program.run_experiment`; returns (table, notes)."""
    from fedprune import program

    rows = []
    with tempfile.TemporaryDirectory(prefix="fedprune-quality-") as root:
        for sparsity, seed, config in plan.quality:
            start = time.perf_counter()
            summary = program.run_experiment(config, Path(root) / f"s{sparsity:g}-seed{seed}",
                                             log=lambda _line: None)
            rows.append({"target sparsity": f"{100 * sparsity:g} %", "masking": config.masking,
                         "final_test_accuracy": summary["final_test_accuracy"],
                         "final_global_sparsity": summary["final_global_sparsity"]})
            log(f"quality: sparsity {sparsity:g} seed {seed}: test accuracy "
                f"{summary['final_test_accuracy']:.4f}, sparsity "
                f"{summary['final_global_sparsity']:.4f} ({time.perf_counter() - start:.0f} s)")
    config = plan.quality[-1][2]
    seeds = sorted({seed for _, seed, _ in plan.quality})
    notes = f"""Setting: {config.dataset} ({config.num_clients} clients, {config.partition}
partition), model `{config.model}`, {config.rounds} rounds of {config.clients_per_round}
clients, batch {config.batch_size}, {config.local_epochs} local epoch(s), client lr
{config.client_lr}. 0 % is dense FedAvg (masking none); the others prune with masking both,
polynomial (power {config.power:g}) {config.initial_sparsity:g} → target over rounds
{config.begin_round}–{config.end_round}. Test accuracy after the last round on the
dataset's global test set; mean ± 95 % t-interval half width (`reporting.mean_ci`) over seeds
{', '.join(map(str, seeds))} (the seed drives the partition, initial model, sampling and
shuffling)."""
    return quality_markdown(rows), notes


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

    common.start_runtime(verbose=FLAGS.verbose, tff_workers=FLAGS.tff_workers)
    if _SCALE_CHILD.value:
        result = run_scale_child(plan.scale[_SCALE_CHILD.value], rounds=_SCALE_ROUNDS.value,
                                 baseline_round=_SCALE_BASELINE.value, log=log)
        print(SCALE_RESULT_PREFIX + json.dumps(result), flush=True)
        return 0
    runners: dict[str, tuple[str, Callable]] = {
        "speed": ("Round time: fedprune vs TFF FedAvg vs Keras", run_speed),
        "scale": ("Scale: 1,000 clients, round time and memory", run_scale),
        "quality": ("Quality: test accuracy vs sparsity", run_quality),
    }
    bodies = {}
    for name in plan.sections:
        title, runner = runners[name]
        load_before, start = _load(), time.perf_counter()
        table, notes = runner(plan, log)
        if name == "scale":
            title = f"Scale: {_SCALE_CLIENTS.value:,} clients, round time and memory"
        print(f"\n## {title}\n\n{table}", flush=True)
        bodies[name] = section_body(title, table, notes, load_before=load_before,
                                    seconds=time.perf_counter() - start)
    if _WRITE.value:
        from fedprune import atomic_files

        output = Path(_OUTPUT.value)
        old = output.read_text() if output.exists() else ""
        atomic_files.atomic_write_text(output, replace_sections(old, bodies))
        print(f"wrote {', '.join(plan.sections)} to {output}", flush=True)
    return 0


if __name__ == "__main__":
    common.run(main)
