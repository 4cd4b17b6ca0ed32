"""The benchmark's speed section: round time of fedprune vs TFF FedAvg vs Keras.

Variants (a), (s), (b), (c), (c-iter), (c-mrf), (d), (e), (f) and (a+) as described in
`experiments/benchmark.py`; each runs its round 1 in `prepare` and one round
per `step`, interleaved round by round. Each step trains on its own fresh
`assembly.round_inputs` of the round (the same clients and batches), built
outside its timer, and the variant that opens a round rotates.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.process_stats import cpu_seconds, format_seconds, median_ci, median_range
from fedprune.program.assembly import RoundInputs, round_inputs

if TYPE_CHECKING:
    from experiments.benchmark import Plan

# Targets for fedprune's round time against like-for-like references (issue 18):
# pruning's overhead over dense fedprune, fedprune over stock TFF on the same
# client loop, and a whole experiment round over stock TFF.
TARGETS = {"a/b": 1.10, "a/c-iter": 1.10, "a+/c-iter": 1.25}

# Headline ratios first; then what the references cost against each other.
RATIOS = ("a/b", "a/c-iter", "a+/c-iter", "a/s", "s/b", "b/c-iter", "a/c-mrf", "c-iter/c-mrf",
          "a+/a", "c/c-iter", "c-iter/f", "d/f")
# The columns "vs" each row: stock TFF on fedprune's client loop, and the compute floor.
REFERENCES = ("c-iter", "f")


@dataclasses.dataclass(frozen=True)
class Ablation:
    """(a) with some of its computations taken out: a variant to time, not to train.

    Attributes:
      label: the ablation table's row label.
      parts: what `without` takes out while the process is built (traced):
        `pruning` (the clients' end-of-round pruning: all-ones client masks,
        so clients keep the mask they were sent), `bytes` (the upload's byte
        count: 0) and `mask` (the wrappers' per-batch mask: the layer's call
        alone, so clients train outside the mask).
    """

    label: str
    parts: tuple[str, ...]


ABLATION_TITLE = "What (a) costs, part by part: (a) with computations taken out"
# The ablation section's reference rows, paired with (a) like the ablations.
ABLATION_REFERENCES = {
    "a": "(a) masking both, as built",
    "s": "(s) masking server: clients do not prune",
    "b": "(b) masking none",
}
# `--ablations`: what each computation of (a) costs, timed in the same rounds as
# (a). Their results are wrong by design.
ABLATION_PARTS = ("pruning", "bytes", "mask")
ABLATIONS = {
    "pruning": Ablation("(a) without the clients' pruning", ("pruning",)),
    "bytes": Ablation("(a) without the upload's byte count", ("bytes",)),
    "mask": Ablation("(a) without the wrappers' per-batch mask", ("mask",)),
    "all": Ablation("(a) without all three", ABLATION_PARTS),
}


@contextlib.contextmanager
def without(parts: Sequence[str]):
    """While active, processes are built with `parts` (`Ablation.parts`) taken out.

    Patches, for the processes traced inside the block only:
    `client_work._prune_kernels` (all-ones masks), `client_work.uplink_bytes`
    (int64 0) and `MaskOnlyPruneLowMagnitude.call` (its `call_layer` alone).
    Build with `assembly.build_process(..., reuse=False)`, so that no process
    traced here is reused by a later config.
    """
    from unittest import mock

    import tensorflow as tf

    from fedprune.federated import client_work
    from fedprune.pruning import wrappers

    unknown = sorted(set(parts) - set(ABLATION_PARTS))
    if unknown:
        raise ValueError(f"unknown parts {unknown}: not in {ABLATION_PARTS}")

    def all_ones(kernels, *args, **kwargs):
        del args, kwargs
        return [tf.ones_like(k) for k in kernels]

    def no_bytes(*args, **kwargs):
        del args, kwargs
        return tf.constant(0, tf.int64)

    def layer_call_only(self, inputs, training=None, **kwargs):
        return self.call_layer(inputs, training, **kwargs)

    with contextlib.ExitStack() as stack:
        if "pruning" in parts:
            stack.enter_context(mock.patch.object(client_work, "_prune_kernels", all_ones))
        if "bytes" in parts:
            stack.enter_context(mock.patch.object(client_work, "uplink_bytes", no_bytes))
        if "mask" in parts:
            stack.enter_context(mock.patch.object(wrappers.mask_only_wrapper_class(), "call",
                                                  layer_call_only))
        yield


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


def paired_ratios(timings: Sequence[VariantTiming]) -> dict[str, tuple[float, float, float]]:
    """Per `RATIOS` name: the per-round ratios' (median, 95 % CI low, high) (`median_ci`).

    Variants are timed in the same rounds, interleaved, so round r of the
    numerator and of the denominator ran under the same machine conditions;
    the ratio of each such pair cancels drifts that move every variant.
    """
    walls = {t.key: t.wall for t in timings}
    paired = {}
    for name in RATIOS:
        top, bottom = name.split("/")
        if top in walls and bottom in walls:
            paired[name] = median_ci([x / y for x, y in
                                      zip(walls[top], walls[bottom], strict=True)])
    return paired


def speed_markdown(timings: Sequence[VariantTiming], input_seconds: Sequence[float]) -> str:
    """The speed tables: per-variant round time and CPU, then the tracked ratios.

    Each ratio is the ratio of median round times (the targets' measure), with
    the median of the per-round paired ratios and its distribution-free 95 %
    interval beside it (`paired_ratios`): a target whose interval straddles
    it is not resolved by the run.
    """
    medians = {t.key: statistics.median(t.wall) for t in timings}
    refs = [k for k in REFERENCES if k in medians]
    lines = ["| variant | median (s) | min–max (s) | "
             + "".join(f"vs ({k}) | " for k in refs) + "Python CPU (s) | worker CPU (s) |",
             "| :-- | --: | --: | " + "--: | " * len(refs) + "--: | --: |"]
    for t in timings:
        med, lo, hi = median_range(t.wall)
        lines.append(
            f"| {t.label} | {format_seconds(med)} | {format_seconds(lo)}–{format_seconds(hi)} | "
            + "".join(f"{med / medians[k]:.2f} | " for k in refs)
            + f"{format_seconds(statistics.median(t.python_cpu))} "
            f"| {format_seconds(statistics.median(t.worker_cpu))} |")
    med, lo, hi = median_range(input_seconds)
    lines.append(f"| (input) build the round's client datasets, not in any row above "
                 f"| {format_seconds(med)} | {format_seconds(lo)}–{format_seconds(hi)} | "
                 + "| " * len(refs) + "| |")
    paired = paired_ratios(timings)
    lines += ["", "| ratio | median round time ratio | per-round ratio, median [95 % CI] "
              "| target |", "| :-- | --: | --: | :-- |"]
    for name, value in speed_ratios(medians).items():
        target = TARGETS.get(name)
        verdict = "" if target is None else (
            f"≤ {target:g} ({'met' if value <= target else 'not met'})")
        mid, low, high = paired[name]
        lines.append(f"| {name} | {value:.2f} | {mid:.2f} [{low:.2f}, {high:.2f}] | {verdict} |")
    return "\n".join(lines) + "\n"


def ablation_markdown(timings: Sequence[VariantTiming], reference: VariantTiming) -> str:
    """Variants against (a), timed in the same rounds: the ablation section's table.

    Per row: median round seconds, its ratio to (a)'s median, the median of the
    per-round paired ratios to (a) with its 95 % interval (`median_ci`), and
    (a)'s median less the row's, in ms: for (a) with parts taken out
    (`ABLATIONS`), what those parts cost (a).
    """
    ref = statistics.median(reference.wall)
    lines = ["| variant, each paired with (a) round by round | median (s) | vs (a) "
             "| per-round ratio to (a), median [95 % CI] | (a) − row (ms) |",
             "| :-- | --: | --: | --: | --: |"]
    for t in timings:
        med = statistics.median(t.wall)
        mid, low, high = median_ci([x / y for x, y in zip(t.wall, reference.wall, strict=True)])
        lines.append(f"| {t.label} | {format_seconds(med)} | {med / ref:.3f} "
                     f"| {mid:.3f} [{low:.3f}, {high:.3f}] | {1000 * (ref - med):+.1f} |")
    return "\n".join(lines) + "\n"


def profile_notes(medians: dict[str, float], phases: Sequence[dict[str, float]]) -> str:
    """Where the round time goes: differences of median round times, and (a+)'s phases.

    Args:
      medians: variant key -> median round seconds.
      phases: per timed round of (a+), loop.py's phase ("train", "evaluate",
        "checkpoint") -> seconds from its start to the next phase or the round's end.
    """
    def ms(seconds: float) -> str:
        return f"{1000 * seconds:+.1f} ms" if seconds < 0 else f"{1000 * seconds:.1f} ms"

    parts = []
    if all(k in medians for k in ("a", "s", "b", "c-iter")):
        a, s_, b, c = (medians[k] for k in ("a", "s", "b", "c-iter"))
        compiled = ""
        if "c-mrf" in medians:
            compiled = (f" ((c-iter) − (c-mrf) = {ms(c - medians['c-mrf'])} is what the "
                        "same saves stock FedAvg)")
        parts.append(
            f"(a) − (s) = {ms(a - s_)}: the clients' pruning, the byte count of their masked "
            "upload and its masks (summed beside the mean, `mask_aggregation.py`); (s) − (b) = "
            f"{ms(s_ - b)}: the wrappers' mask in local training, the masked upload, the "
            "server's re-mask and the state's masks and schedules; (b) − (c-iter) = "
            f"{ms(b - c)}: what fedprune's dense process adds to stock FedAvg on the same "
            "loop (round counters, the upload's byte count, the finalizer's mask "
            "diagnostics), less what its round compiled to one MapReduceForm and called "
            f"with its state packed saves (`map_reduce.py`){compiled}. What each computation "
            f"of (a) costs: the section \"{ABLATION_TITLE}\" (`--sections=ablation`).")
    if phases:
        med = {name: statistics.median(p.get(name, 0.0) for p in phases)
               for name in ("train", "evaluate", "checkpoint")}
        extra = f" ((a) alone: {ms(medians['a'])})" if "a" in medians else ""
        parts.append(
            f"(a+)'s phases in loop.py, medians per timed round: train {ms(med['train'])} "
            f"(byte accounting and `PruningProcess.next`{extra}; the round's client datasets "
            f"were built beside the round before), evaluate {ms(med['evaluate'])} (one "
            f"compiled function on the cached test tensors), checkpoint "
            f"{ms(med['checkpoint'])} (the log line; metrics.csv, the checkpoint and "
            "TensorBoard scalars are written beside the next round's training, "
            "`fedprune/program/background.py`).")
    return " ".join(parts)


class TffVariant:
    """A TFF learning process: `state = next_fn(state, datasets).state`.

    `next_fn` is how a run calls the round: `PruningProcess.next` for fedprune's
    processes and `CompiledRound.next` for (c-mrf) (`map_reduce.py`), stock
    TFF's `process.next` otherwise.
    """

    def __init__(self, process, state, next_fn=None, pruning_process=None):
        self.process = process
        self.state = state
        self._next = next_fn or process.next
        self.pruning_process = pruning_process  # fedprune's `PruningProcess`, if any

    @classmethod
    def of(cls, pruning_process) -> TffVariant:
        """A fedprune process, from its initial state, run as `loop.py` runs it."""
        return cls(pruning_process.process, pruning_process.process.initialize(),
                   pruning_process.next, pruning_process)

    def step(self, batches: RoundInputs) -> None:
        # `next` returns numpy values: the state is back in Python when it returns.
        self.state = self._next(self.state, batches.datasets).state

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


class LoopVariant:
    """The compute floor: one compiled `tf.function` SGD loop over the round's batches.

    The same model, loss, optimizer and batches (the client datasets one
    after another) as Keras `fit` in (d), without Keras' training machinery
    (callbacks, metrics, the step-function dispatch): forward, gradient and
    SGD update per batch, traced once (the datasets' element spec does not
    change between rounds).
    """

    def __init__(self, model, config):
        import tensorflow as tf

        self.model = model
        optimizer = tf.keras.optimizers.SGD(learning_rate=config.client_lr,
                                            momentum=config.client_momentum)
        loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        variables = model.trainable_variables

        @tf.function
        def train(dataset):
            for batch in dataset:
                with tf.GradientTape() as tape:
                    loss = loss_fn(batch["y"], model(batch["x"], training=True))
                gradients = tape.gradient(loss, variables)
                optimizer.apply_gradients(zip(gradients, variables, strict=True))

        self._train = train

    def step(self, batches: RoundInputs) -> None:
        self._train(functools.reduce(lambda a, b: a.concatenate(b), batches.datasets))


class ProgramVariant:
    """`loop.run_experiment` in a thread, released one round at a time.

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
        # (phase, perf_counter) of the round being run: its phases, then "end" at its log line.
        self._marks: list[tuple[str, float]] = []
        self.phases: list[dict[str, float]] = []  # per round after round 1: phase -> seconds
        self._thread = threading.Thread(
            target=self._run, args=(config, output_dir, last_round), daemon=True)

    def _run(self, config, output_dir, last_round) -> None:
        import tensorflow_federated as tff

        from fedprune.program import loop

        try:
            with tff.framework.get_context_stack().install(self._context):
                loop.run_experiment(config, output_dir, log=self._on_log,
                                    on_phase=self._on_phase, stop_after_round=last_round)
            self._done.put(None)
        except BaseException as e:  # handed to the main thread, which re-raises
            self._done.put(e)

    def _on_phase(self, name: str) -> None:
        if name.startswith("round "):  # "round N train|evaluate|checkpoint"
            self._marks.append((name.split()[-1], time.perf_counter()))

    def _on_log(self, line: str) -> None:
        if line.startswith("round "):
            marks = [*self._marks, ("end", time.perf_counter())]
            self.phases.append({name: marks[i + 1][1] - t
                                for i, (name, t) in enumerate(marks[:-1])})
            self._marks = []
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
    "s": "(s) fedprune, masking server, (a)'s schedule (clients do not prune)",
    "b": "(b) fedprune, masking none",
    "c": "(c) TFF build_weighted_fed_avg",
    "c-iter": "(c-iter) the same, loop_implementation=DATASET_ITERATOR",
    "c-mrf": "(c-mrf) (c-iter) with its round compiled and called as fedprune's "
             "(map_reduce.py)",
    "d": "(d) Keras fit, same batches",
    "e": "(e) Keras fit + tfmot pruning",
    "f": "(f) one compiled tf.function SGD loop, same batches (floor)",
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

    from fedprune.federated import map_reduce
    from fedprune.federated import process as process_lib
    from fedprune.program import assembly

    config = plan.pruned
    variants = {}
    log("building (a) fedprune masking both")
    pruned = assembly.build_process(plan.pruned, data)
    variants["a"] = TffVariant.of(pruned)
    log("building (s) fedprune masking server")
    server = assembly.build_process(dataclasses.replace(plan.pruned, masking="server"), data)
    variants["s"] = TffVariant.of(server)
    log("building (b) fedprune masking none")
    dense = assembly.build_process(plan.dense, data)
    variants["b"] = TffVariant.of(dense)
    initial = variants["b"].weights()

    log("building (c), (c-iter) and (c-mrf) build_weighted_fed_avg")

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
    # c-mrf: stock FedAvg's round compiled to one MapReduceForm, as fedprune compiles its
    # own (`map_reduce.py`): how much of (b) - (c-iter) is that compilation.
    compiled = map_reduce.compile_round(fed_avg)
    variants["c-mrf"] = TffVariant(
        compiled.process, compiled.process.set_model_weights(compiled.process.initialize(),
                                                             initial), compiled.next)

    log("building (d) Keras fit, (e) Keras fit + tfmot and (f) a tf.function loop")
    keras_fit = _compile(dense.keras_model_fn(), config)
    keras_fit.set_weights([*initial.trainable, *initial.non_trainable])
    variants["d"] = KerasVariant(keras_fit)
    variants["e"] = KerasVariant(_tfmot_model(dense.keras_model_fn, initial, config,
                                              steps_per_round=_num_batches(first)),
                                 [tfmot.sparsity.keras.UpdatePruningStep()])
    floor = dense.keras_model_fn()
    floor.set_weights([*initial.trainable, *initial.non_trainable])
    variants["f"] = LoopVariant(floor, config)
    for key, variant in variants.items():
        log(f"round 1 (untimed) of ({key})")
        variant.step(first)
    if plan.program_round:
        log("starting (a+) run_experiment and its round 1 (untimed)")
        variants["a+"] = ProgramVariant(plan.pruned, work_dir / "program",
                                        last_round=1 + plan.warmup_rounds + plan.timed_rounds)
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


def _opening_with(keys: Sequence[str], round_num: int) -> list[str]:
    """`keys` rotated so that round r opens with variant r mod len(keys): each opens in turn."""
    shift = round_num % len(keys)
    return [*keys[shift:], *keys[:shift]]


def interleave(plan: Plan, data, variants: dict, labels: dict[str, str], log):
    """Rounds 2.. of `variants` (built, round 1 run), interleaved round by round.

    Each round opens with the next variant in turn (`_opening_with`); each
    variant steps on its own fresh `round_inputs` of the round, built outside
    its timer (BUILD_NOTES.md, "Each speed variant on fresh inputs"). The
    first `plan.warmup_rounds` are untimed.

    Returns:
      (key -> `VariantTiming` of the timed rounds, labelled by `labels`; the
      seconds each round's inputs took to build, per variant and timed round).
    """
    timings = {key: VariantTiming(key, labels[key]) for key in variants}
    input_seconds = []
    last = 1 + plan.warmup_rounds + plan.timed_rounds
    keys = list(variants)
    for round_num in range(2, last + 1):
        timed = round_num > 1 + plan.warmup_rounds
        walls = {}
        for key in _opening_with(keys, round_num):
            start = time.perf_counter()
            batches = round_inputs(plan.pruned, data, round_num)
            built = time.perf_counter() - start
            cpu0, worker0 = cpu_seconds()
            start = time.perf_counter()
            variants[key].step(batches)
            walls[key] = time.perf_counter() - start
            cpu1, worker1 = cpu_seconds()
            if timed:
                timings[key].wall.append(walls[key])
                timings[key].python_cpu.append(cpu1 - cpu0)
                timings[key].worker_cpu.append(worker1 - worker0)
                input_seconds.append(built)
        log(f"round {round_num}/{last} ({'timed' if timed else 'warm-up'}): "
            + ", ".join(f"{key} {walls[key]:.3f}" for key in keys) + " s")
    return timings, input_seconds


def run_ablation(plan: Plan, log) -> tuple[str, str]:
    """Runs the ablation section: (a), (s), (b) and `plan.ablations`; returns (table, notes)."""
    from fedprune.program import assembly

    data = assembly.load_data(plan.pruned)
    labels = dict(ABLATION_REFERENCES)
    variants = {}
    for key, config in (("a", plan.pruned),
                        ("s", dataclasses.replace(plan.pruned, masking="server")),
                        ("b", plan.dense)):
        log(f"building {labels[key]}")
        variants[key] = TffVariant.of(assembly.build_process(config, data))
    for key in plan.ablations:
        labels[key] = ABLATIONS[key].label
        log(f"building {labels[key]} (timing only)")
        with without(ABLATIONS[key].parts):  # traced anew, and not kept for later configs
            variants[key] = TffVariant.of(assembly.build_process(plan.pruned, data, reuse=False))
    first = round_inputs(plan.pruned, data, 1)
    for key, variant in variants.items():
        log(f"round 1 (untimed) of ({key})")
        variant.step(first)
    timings, _ = interleave(plan, data, variants, labels, log)
    table = ablation_markdown(list(timings.values()), timings["a"])
    medians = {key: statistics.median(t.wall) for key, t in timings.items()}
    config = plan.pruned
    overhead = f"(a) − (b) here is {1000 * (medians['a'] - medians['b']):.1f} ms"
    if "all" in medians:
        overhead += (f", of which (a) without all three saves "
                     f"{1000 * (medians['a'] - medians['all']):.1f} ms")
    notes = f"""Setting: the speed section's ({config.dataset}, model `{config.model}`,
{config.clients_per_round} clients per round, batch {config.batch_size},
{config.local_epochs} local epoch(s); (a) prunes {config.initial_sparsity:g} →
{config.final_sparsity:g} over rounds {config.begin_round}–{config.end_round}), the
rows above interleaved among themselves only: round 1 untimed, then
{plan.warmup_rounds} warm-up and {plan.timed_rounds} timed rounds per variant,
round by round, each variant on its own fresh copy of the round's client
datasets, as in the speed section. The rows "(a) without …" are (a) traced
with parts taken out (`benchmark_speed.without`): the clients' pruning →
all-ones client masks
(clients keep the mask they were sent and still upload it), the upload's byte
count → 0, the wrappers' per-batch mask → the wrapped layer's call alone
(clients train outside the mask). Their results are wrong by design; they are
timed only. Every row's round time is paired with (a)'s in the same round.
{overhead}. The rest is not a single computation but what (a) makes TFF carry:
three more variables per wrapped layer in every client's model (mask,
threshold, pruning step), created, initialized and assigned from the
broadcast, the masked upload, the payload's pruned kernels and masks through
the aggregation, the server's re-mask, and a larger state (BUILD_NOTES.md,
"What (a) adds to (b), compiled", op counts). (s) and (b) are timed here in
another interleaving than in the speed section, so their ratios to (a) differ
between the two sections by the run-to-run spread."""
    return table, notes


def run_speed(plan: Plan, log) -> tuple[str, str]:
    """Runs the speed section; returns (table, notes)."""
    import numpy as np

    from fedprune.program import assembly, evaluation

    data = assembly.load_data(plan.pruned)
    first = round_inputs(plan.pruned, data, 1)
    steps_per_round = _num_batches(first)
    with tempfile.TemporaryDirectory(prefix="fedprune-benchmark-") as work_dir:
        variants = build_variants(plan, data, first, Path(work_dir), log)
        timings, input_seconds = interleave(plan, data, variants, VARIANT_LABELS, log)
        phases = []
        if "a+" in variants:
            variants["a+"].finish()
            phases = variants["a+"].phases[-plan.timed_rounds:]
        # (b), (c), (c-iter) and (c-mrf) saw the same weights and batches: they should
        # agree; (d) and (f) train centrally on the same batches: they should agree too.
        dense = [variants[k].weights() for k in ("b", "c", "c-iter", "c-mrf")]
        max_diff = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                       for other in dense[1:]
                       for x, y in zip(dense[0].trainable, other.trainable, strict=True))
        floor_diff = max(float(np.max(np.abs(x - y))) for x, y in zip(
            variants["d"].model.get_weights(), variants["f"].model.get_weights(), strict=True))
        sparsity = evaluation.sparsity_metrics(variants["a"].pruning_process,
                                            variants["a"].weights())["global_sparsity"]
    measured = [t for t in timings.values() if t.wall]
    table = speed_markdown(measured, input_seconds)
    profile = profile_notes({t.key: statistics.median(t.wall) for t in measured}, phases)
    config = plan.pruned
    first_timed = 2 + plan.warmup_rounds
    steady = sum(r > config.end_round
                 for r in range(first_timed, first_timed + plan.timed_rounds))
    notes = f"""Setting: {config.dataset} ({len(data.client_ids)} clients, {config.partition}
partition), model `{config.model}`, {config.clients_per_round} clients per round, batch
{config.batch_size}, {config.local_epochs} local epoch(s), client SGD lr {config.client_lr},
server {config.server_optimizer} lr {config.server_lr}; (a) prunes
{config.initial_sparsity:g} → {config.final_sparsity:g} over rounds
{config.begin_round}–{config.end_round} (global sparsity {sparsity:.3f} after the last
timed round). Round 1 untimed, then {plan.warmup_rounds} warm-up and {plan.timed_rounds}
timed rounds per variant (rounds {first_timed}–{first_timed + plan.timed_rounds - 1}),
interleaved round by round, the variant that opens a round in turn; each variant
trains on its own copy of the round's client datasets, built just before its
step and outside its timer, as every round of a run builds fresh ones (and
at most once a second hands this process's free heap pages back to the OS,
which the next `next` pays for; BUILD_NOTES.md, "Each speed variant on fresh
inputs"); {steady} of
the timed rounds come after round {config.end_round}, where masks are recomputed at a
level already reached, which `masking.keep_top_k` does without the top-k. Python
CPU counts all threads of the benchmark process (Keras runs there); worker CPU is
TFF's `worker_binary`, where TFF executes the rounds. (b), (c), (c-iter) and (c-mrf) end with
weights equal to within {max_diff:.1e} (same initial weights, batches and
optimizers); (d) and (f) within {floor_diff:.1e}. (a+) − (a) is what loop.py adds
per round (byte accounting, evaluation, and what its background thread does beside
the next round: client datasets, CSV, TensorBoard, checkpoint). (e) maps one round
to the {steps_per_round} steps of round 1 for tfmot's PolynomialDecay.

Where the time goes (differences of the medians above): {profile}"""
    return table, notes
