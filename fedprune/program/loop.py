"""The round loop: one experiment from its config to its output folder.

`run_experiment(config, output_dir)` is what `experiments/run.py` calls. It
takes a validated `ExperimentConfig` (plain arguments; no flags here), builds
the data and process (`assembly`), runs the rounds on `assembly.round_inputs`,
evaluates (`evaluation`), checkpoints, and writes (`outputs`, `provenance`,
`privacy_report`) into `output_dir`:

  config.json          every setting, package versions, git commit, seeds, and what
                       the numbers depend on beyond the settings (`provenance`)
  metrics.csv          one row per round (rewritten atomically every round)
  summary.json         final numbers (atomic)
  partition.json, label_heatmap.{png,pdf}   client sizes and label skew
  curves.{png,pdf}     accuracy, loss and sparsity vs round (schedule window shaded)
  bytes.{png,pdf}      bytes per round, up and down, beside dense
                       (the three figures not with `figures=False`, --nofigures)
  tensorboard/         TensorBoard event files
  model/model.h5, model/model.zip    the final model after tfmot `strip_pruning`
                       (after a shrink: the smaller model, plain Keras layers)
  model/model.tflite   --deploy=latency|size: the same model as a TFLite flatbuffer;
                       summary.json's `deployment` has its size and latency beside the
                       dense initial and pruned models' (`outputs/deployment.py`)
  shrink.json          `--structure=neuron|filter` runs: the shrink round, the kept
                       units, sizes before/after and the masked-vs-shrunk check
  checkpoints/         atomic per-round state for `--resume`

Structured runs (`--structure=neuron|filter`) are physically shrunk after
round `config.shrink_round()` (`shrinking.py`): the global model's removed
units are cut out, a new TFF process is built for the smaller model, which
trains on dense (the schedule has ended), and the server optimizer state is
sliced to the kept units. `--resume` works on either side of the shrink: a
checkpoint of a later round is loaded into the shrunk process, rebuilt from
the kept units in shrink.json.

Seeds: `seed` drives the partition, the initial model, client sampling
(`sampling.sample_round(mode, ..., seed, round)`) and client shuffling
(`datasets.client_shuffle_seed`); each is a pure function of (seed, round), so
a resumed run samples and shuffles exactly as an uninterrupted one.

Differential privacy (`config.dp != "none"`): the aggregator is TFF's DP mean
(`privacy.build_dp_aggregator`), the accountant's epsilon after every round is
in metrics.csv (`epsilon`, by `--dp_accountant`; `epsilon_rdp`, and
`epsilon_pld` under Poisson sampling) and the final one in summary.json, after
checking every round that the event TFF's aggregator reports is the one
accounted for. The clients' training loss and accuracy, which TFF sums without
noise, are left blank; the columns in `privacy_report.NON_PRIVATE_DIAGNOSTICS`
are written but not covered by the guarantee (config.json's `privacy` section says so). TFF's
DP noise is not seeded, so DP runs are not bit-reproducible.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedprune.config import ExperimentConfig
from fedprune.federated import communication, privacy_accounting
from fedprune.outputs import atomic_files, privacy_report, run_files, scalars
from fedprune.program import assembly, background, checkpoint, evaluation, shrinking
from fedprune.runtime import interrupts, memory, worker_heap, workers

# What `run_experiment` passes to `on_phase`, in order; the per-round ones as
# `round N train`, `round N evaluate` (rounds that evaluate), `round N checkpoint`.
PHASES = ("build", "initialize", "train", "evaluate", "checkpoint", "export", "deploy")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf loss or weight."""


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"


def _train_round(config: ExperimentConfig, pp, evaluator, state, weights, inputs, round_num: int,
                 *, phase, accounting, schedule_table, size: dict, t0: float,
                 elapsed: Callable[[], float], ckpt_dir: Path):
    """One round: `process.next`, evaluation and the round's metrics.csv row.

    Returns:
      (row, the new state, its global weights, the round's wall seconds).

    Raises:
      NonFiniteError: a NaN/Inf loss or weight (nothing of this round is kept).
    """
    clients = inputs.clients
    masks = evaluation.kernel_masks(pp, weights)
    down = communication.downlink_bytes(list(weights.trainable), masks, len(clients))
    mask_entropy_bits = communication.mask_coding(masks).entropy_bits
    tff_bytes = communication.tff_simulation_bytes(
        list(weights.trainable), list(weights.non_trainable), num_clients=len(clients))
    with interrupts.interruptible():  # most of a round: waiting on the worker
        output = pp.next(state, inputs.datasets)
        new_weights = pp.model_weights(output.state)
    # The worker is idle until the next round: its free heap pages go back to the
    # OS now, beside this round's evaluation, at most once a second
    # (`runtime.worker_heap`, `memory.ROUND_TRIM_INTERVAL_S`; issue 18).
    worker_heap.release_worker_heaps(workers.started_worker_pids(),
                                     min_interval_s=memory.ROUND_TRIM_INTERVAL_S)
    train = output.metrics["client_work"]["train"]
    # No client, no training loss (0/0): only the model is checked then.
    train_loss = float(train["loss"]) if clients else 0.0
    test_loss = test_accuracy = ""
    if (math.isfinite(train_loss) and evaluation.all_finite(new_weights)
            and (round_num % config.eval_every == 0 or round_num == config.rounds)):
        # Finite but huge weights can still give NaN logits: TFF drops
        # clients' non-finite updates and then reports a training loss of 0.
        phase(f"round {round_num} evaluate")
        test_loss, test_accuracy = evaluator(new_weights)
    if not (math.isfinite(train_loss) and evaluation.all_finite(new_weights)
            and (test_loss == "" or math.isfinite(test_loss))):
        raise NonFiniteError(
            f"round {round_num}: the training loss ({train_loss}), the test loss "
            f"({test_loss or 'not evaluated'}) or the global weights became NaN/Inf; kept "
            f"the state after round {round_num - 1} in {ckpt_dir}. "
            "Lower --client_lr or --server_lr.")
    state, weights = output.state, new_weights
    round_seconds = time.time() - t0
    row = {"round": round_num, "train_loss": train_loss if clients else "",
           "train_accuracy": float(train["sparse_categorical_accuracy"]) if clients else "",
           "test_loss": test_loss, "test_accuracy": test_accuracy}
    if config.dp != "none":
        row.update(dict.fromkeys(privacy_report.NON_PRIVATE_COLUMNS, ""))
        row.update(privacy_report.round_row(config, accounting, output, round_num))
    row.update(evaluation.sparsity_metrics(pp, weights))
    row.update(size)
    diagnostics = output.metrics["finalizer"]["masks"]
    row.update({k: float(diagnostics[k]) if k in diagnostics else ""
                for k in ("mask_drift", "regrowth", "client_mask_jaccard",
                          "client_sparsity")})
    for k in run_files.REGROW_COLUMNS:  # only with --regrow; NaN: no adjustment
        if k in diagnostics:
            value = float(diagnostics[k])
            row[k] = value if math.isfinite(value) else ""
    row["target_sparsity"] = evaluation.target_sparsity(config, schedule_table, round_num)
    dense_up = 4 * sum(int(np.size(w)) for w in weights.trainable) * len(clients)
    bytes_up = int(output.metrics["client_work"]["uplink_bytes"])
    row.update(clients=len(clients), bytes_down=down.sent, bytes_up=bytes_up,
               dense_bytes_down=down.dense, dense_bytes_up=dense_up,
               mask_entropy_bits=mask_entropy_bits,
               tff_bytes_down=tff_bytes.down, tff_bytes_up=tff_bytes.up,
               round_seconds=round_seconds, elapsed_seconds=elapsed())
    return row, state, weights, round_seconds


def _round_line(config: ExperimentConfig, row: dict, round_seconds: float, mean_round: float,
                *, dp: bool) -> str:
    """The progress line of a round (`mean_round`: wall seconds per round so far, for the ETA)."""
    round_num = row["round"]
    test = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] != "" else "  -   "
    train_text = (f"train_loss {row['train_loss']:.4f}" if row["train_loss"] != ""
                  else "train_loss   -   ")
    eps_text = f"  eps {row['epsilon']:.3g}" if dp else ""
    return (f"round {round_num:>{len(str(config.rounds))}}/{config.rounds}  "
            f"test_acc {test}  {train_text}  "
            f"sparsity {row['global_sparsity']:.4f}{eps_text}  {round_seconds:.2f}s  "
            f"elapsed {_fmt_seconds(row['elapsed_seconds'])}  "
            f"ETA {_fmt_seconds(mean_round * (config.rounds - round_num))}")


def _write_round(metrics: run_files.MetricsFile, rows: list[dict], ckpt_dir: Path, state, *,
                 fingerprint: str, writer: scalars.ScalarWriter) -> None:
    """Writes the last of `rows`: metrics.csv, then the checkpoint, then TensorBoard.

    Metrics first: a kill between the two writes leaves the round in the CSV
    but not in a checkpoint, and `resume` redoes it (never a gap).
    """
    row = rows[-1]
    metrics.write(rows)
    checkpoint.save(ckpt_dir, row["round"], state, fingerprint=fingerprint)
    writer.write(row["round"], {key: value for key, value in row.items()
                                if key != "round" and value != ""})


def run_experiment(config: ExperimentConfig, output_dir, *, resume: bool = False,
                   log: Callable[[str], None] = print,
                   on_phase: Callable[[str], None] | None = None,
                   stop_after_round: int | None = None, provenance: dict | None = None) -> dict:
    """Runs (or resumes) one experiment and writes its outputs.

    Interrupts (with the runtime's handlers installed): SIGINT/SIGTERM raise at
    once while the run waits on the TFF worker (most of a round), and otherwise
    at the next phase boundary: TensorFlow code running in this thread (tracing,
    evaluation, tf.data, summaries) is never unwound mid-way
    (`interrupts.deferred_interrupts`). Every boundary re-raises a recorded
    interrupt, so one whose first raise was swallowed (e.g. inside a finalizer)
    still stops the run within one phase.

    Args:
      config: a validated configuration.
      output_dir: where outputs go (created if missing).
      resume: continue from the newest checkpoint in `output_dir/checkpoints`.
      log: receives one progress line per round and the final summary line.
      on_phase: called with the name of each phase as it starts (`PHASES`;
        per-round phases are prefixed `round N `), e.g. to log where time goes.
      stop_after_round: for tests: stop (as if killed) after this round.
      provenance: what the caller knows that the config does not show (e.g. the
        TFF workers it runs on), recorded in config.json (`write_config`).

    Returns:
      The summary dict also written to `summary.json`.

    Raises:
      NonFiniteError: a loss or weight became NaN/Inf (the last good
        checkpoint and metrics are kept).
      checkpoint.CheckpointError: `resume` with an incompatible checkpoint.
      KeyboardInterrupt, interrupts.Terminated: SIGINT / SIGTERM (with the
        runtime's handlers installed); the recorded interrupt is cleared as it
        leaves, so a later run in the same process (a notebook) starts afresh.
    """
    try:
        with interrupts.deferred_interrupts():
            return _run_experiment(config, Path(output_dir), resume=resume, log=log,
                                   on_phase=on_phase, stop_after_round=stop_after_round,
                                   provenance=provenance)
    except (KeyboardInterrupt, interrupts.Terminated):
        interrupts.clear_interrupt()
        raise


def _run_experiment(config: ExperimentConfig, output_dir: Path, *, resume: bool,
                    log: Callable[[str], None], on_phase: Callable[[str], None] | None,
                    stop_after_round: int | None, provenance: dict | None) -> dict:

    def phase(name: str) -> None:
        interrupts.raise_if_interrupted()
        if on_phase is not None:
            on_phase(name)

    start = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    phase("build")
    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    full_pp = pp  # the initial architecture's process (a shrink replaces `pp`)
    evaluator = evaluation.Evaluator.shared(pp.keras_model_fn, data)
    schedule_table = pp.table  # the schedule's levels (a shrunk process has none)
    fingerprint = config.fingerprint()
    ckpt_dir = output_dir / "checkpoints"

    shrink_round = config.shrink_round()
    phase("initialize")
    with interrupts.interruptible():
        state = pp.process.initialize()
    rows: list[dict] = []
    first_round = 1
    if resume:
        if shrink_round and checkpoint.check_latest(
                ckpt_dir, fingerprint=fingerprint) >= shrink_round:
            pp, evaluator = _shrunk_architecture(config, data, pp, output_dir)
            with interrupts.interruptible():
                state = pp.process.initialize()
        loaded, done = checkpoint.load_latest(ckpt_dir, state, fingerprint=fingerprint)
        # metrics.csv is written before each round's checkpoint, so it may hold
        # one round more than the checkpoint (redone here) but never fewer.
        rows = [r for r in run_files.read_metrics(output_dir) if int(r["round"]) <= done]
        if [int(r["round"]) for r in rows] != list(range(1, done + 1)) or (
                loaded is None and run_files.read_metrics(output_dir)):
            raise checkpoint.CheckpointError(
                f"{output_dir}/metrics.csv does not match the newest checkpoint (round {done}) "
                f"in {ckpt_dir}; cannot resume, use --overwrite to start again")
        if loaded is not None:
            state, first_round = loaded, done + 1
            log(f"resuming after round {done} from {ckpt_dir}")
    dp = config.dp != "none"
    accounting = None
    if dp:
        accounting = privacy_accounting.run_accounting(
            config.dp, noise_multiplier=config.dp_noise_multiplier,
            sampling=config.client_sampling, clients_per_round=config.clients_per_round,
            num_clients=len(data.client_ids), rounds=config.rounds, delta=config.dp_delta,
            accountant=config.dp_accountant)
    if first_round == 1:
        num_clients = len(data.client_ids)
        run_files.write_config(config, output_dir, {
            "num_train_clients": num_clients,
            "num_test_examples": int(len(data.test_y)),
            "privacy": privacy_report.config_section(config, num_clients),
            "pruning_steps": evaluation.step_section(pp),
            "layer_budgets": evaluation.budget_section(config, pp)},
                     data=data, provenance=provenance)
        run_files.write_partition(data, output_dir, run_files.partition_title(config),
                                  heatmap=config.figures)
        checkpoint.save(ckpt_dir, 0, state, fingerprint=fingerprint)

    writer = scalars.ScalarWriter(output_dir / "tensorboard")
    metrics = run_files.MetricsFile(output_dir)
    with interrupts.interruptible():
        weights = pp.model_weights(state)
    size = shrinking.process_model_size(pp)
    elapsed_before = float(rows[-1]["elapsed_seconds"]) if rows else 0.0
    loop_start = time.time()
    # Off the critical path (`background.py`): while the worker trains round r, the
    # background thread writes round r - 1's outputs, then builds round r + 1's
    # client datasets. Leaving this block waits for it, whatever the exit path.
    with background.Background() as later:
        if first_round <= config.rounds:
            prefetched = later.submit(assembly.round_inputs, config, data, first_round)
        for round_num in range(first_round, config.rounds + 1):
            t0 = time.time()
            # Built beside the last round, after its predecessor's writes: once this
            # round's train phase starts, rounds up to round_num - 2 are on disk.
            inputs = prefetched.result()
            phase(f"round {round_num} train")
            if round_num < config.rounds:
                prefetched = later.submit(assembly.round_inputs, config, data, round_num + 1)
            row, state, weights, round_seconds = _train_round(
                config, pp, evaluator, state, weights, inputs, round_num, phase=phase,
                accounting=accounting, schedule_table=schedule_table, size=size,
                t0=t0, elapsed=lambda: elapsed_before + time.time() - loop_start,
                ckpt_dir=ckpt_dir)
            rows.append(row)
            if round_num == shrink_round:
                later.drain()  # the shrink reads nothing they write, but seeds Keras
                pp, evaluator, state, weights, shrink_line = _shrink(
                    config, data, pp, evaluator, state, weights, round_num, output_dir)
                size = shrinking.process_model_size(pp)
            phase(f"round {round_num} checkpoint")
            mean_round = (time.time() - loop_start) / (round_num - first_round + 1)
            log(_round_line(config, row, round_seconds, mean_round, dp=dp))
            if round_num == shrink_round:
                log(shrink_line)
            # Logged first, written beside the next round: the writes of a round a
            # caller sees logged finish before the run returns or raises.
            later.submit(_write_round, metrics, list(rows), ckpt_dir, state,
                         fingerprint=fingerprint, writer=writer)
            if stop_after_round is not None and round_num >= stop_after_round:
                later.drain()
                writer.flush()
                return {}
    writer.flush()
    phase("export")
    summary = run_files.summarize(config, rows, start)
    if dp:
        summary.update(privacy_report.summary_fields(config, accounting))
    summary.update(run_files.size_summary(config, rows, output_dir))
    summary["mask_coding"] = run_files.mask_coding_summary(evaluation.kernel_masks(pp, weights))
    summary.update(run_files.export_model(pp, weights, output_dir, model=evaluator.model))
    if config.deploy != "none":
        phase("deploy")
        summary["deployment"] = _deployment(config, data, full_pp, pp, weights, output_dir)
        if not summary["deployment"]["converted"]:
            log(f"deploy: no model.tflite, TFLite's converter refused the model: "
                f"{summary['deployment']['reason']}")
    atomic_files.atomic_write_json(output_dir / "summary.json", summary)
    if config.figures:
        run_files.write_figures(config, rows, output_dir)
    eps_text = (f"epsilon {rows[-1]['epsilon']:.3g} (delta {config.dp_delta:g})  "
                if dp else "")
    log(f"done: test_accuracy {summary['final_test_accuracy']:.4f}  "
        f"sparsity {summary['final_global_sparsity']:.4f}  {eps_text}"
        f"bytes down/up {summary['total_bytes_down']:,}/{summary['total_bytes_up']:,}  "
        f"wall {summary['wall_seconds']:.1f}s  -> {output_dir}")
    return summary


def _shrink(config: ExperimentConfig, data, pp, evaluator: evaluation.Evaluator, state, weights,
            round_num: int, output_dir: Path):
    """Cuts the removed units out of the global model.

    Writes shrink.json (atomically, before the round's checkpoint holds the
    shrunk state) with the kept units and the check that the shrunk model
    computes what the masked one did on the test set.

    Returns:
      The shrunk run's (pp, evaluator, state, weights) and a line for the log.
    """
    from fedprune.model import surgery
    from fedprune.pruning import unit_layout

    start = time.time()
    kept_by_kernel = shrinking.kept_units(pp, weights)
    plain = shrinking.plain_model(pp, weights)
    layout = unit_layout.structured_layout(plain)
    kept = shrinking.by_name(layout, kept_by_kernel)
    small = surgery.shrink(plain, kept)
    new_pp = assembly.build_process(config, data, shrunk_model=small)
    new_state = shrinking.transfer_state(state, new_pp.process, layout=layout, kept=kept,
                                         shrunk_model=small)
    new_weights = new_pp.model_weights(new_state)
    new_evaluator = evaluation.Evaluator.create(new_pp.keras_model_fn, data)
    difference = float(np.max(np.abs(evaluation.logits(evaluator, weights)
                                     - evaluation.logits(new_evaluator, new_weights))))
    before, after = shrinking.model_size(plain), shrinking.model_size(small)
    info = {
        "round": round_num,
        # Keyed by the kernel's index in the trainable weights (layer names vary per instance).
        "kept_units": {str(i): k.tolist() for i, k in kept_by_kernel.items()},
        "layers": {str(p.kernel_index): p.name for p in layout.layers if p.name in kept},
        "units_before": {str(p.kernel_index): p.num_units for p in layout.layers
                         if p.name in kept},
        "before": before, "after": after,
        "test_accuracy_masked": evaluator(weights)[1],
        "test_accuracy_shrunk": new_evaluator(new_weights)[1],
        "max_abs_logit_difference": difference,
        "server_optimizer_state": "sliced to the kept units (surgery.slice_weights)",
        "shrink_seconds": time.time() - start,
    }
    atomic_files.atomic_write_json(output_dir / "shrink.json", info)
    line = (f"shrunk after round {round_num}: params {before['params']:,} -> {after['params']:,}, "
        f"multiply-adds/example {before['macs_per_example']:,} -> "
        f"{after['macs_per_example']:,}, units " + ", ".join(
            f"{info['layers'][i]} {len(k)}/{info['units_before'][i]}"
            for i, k in info["kept_units"].items())
        + f"; max |logit difference| {difference:.2g}")
    return new_pp, new_evaluator, new_state, new_weights, line


# keras_model_fn of a process -> (its dense model for `_deployment`, {"dense": its flatbuffer}
# once converted): Keras' fresh initialization of the initial architecture, made and
# converted once for the cells that share a traced process (`assembly.build_process`).
_DENSE_MODELS: collections.OrderedDict = collections.OrderedDict()
_DENSE_CACHE_SIZE = 4


def _deployment(config: ExperimentConfig, data, full_pp, pp, weights, output_dir: Path) -> dict:
    """summary.json's `deployment` (`outputs/deployment.py`); writes model/model.tflite.

    Models: `dense`, the initial architecture freshly initialized; `pruned`, the
    final weights in the initial architecture (after a shrink: put back at the
    kept units of shrink.json, zeros elsewhere); `shrunk`, the final model of a
    structured run after its shrink. Latency inputs and the interpreter-vs-Keras
    check use the first 64 test examples.
    """
    from fedprune.model import surgery
    from fedprune.outputs import deployment
    from fedprune.pruning import unit_layout, wrappers

    def initial_architecture():
        model = full_pp.keras_model_fn()
        return wrappers.strip(model) if full_pp.masking_mode.wraps_model else model

    final = shrinking.plain_model(pp, weights)
    # The cells of a grid that share a traced process share its dense model and flatbuffer.
    dense = _DENSE_MODELS.pop(full_pp.keras_model_fn, None)
    if dense is None:
        dense = (initial_architecture(), {})
    _DENSE_MODELS[full_pp.keras_model_fn] = dense
    while len(_DENSE_MODELS) > _DENSE_CACHE_SIZE:
        _DENSE_MODELS.popitem(last=False)
    dense_model, dense_converted = dense
    models = {"dense": dense_model, "pruned": final}
    if pp is not full_pp:  # shrunk: the pruned model is the final one at full size
        info = atomic_files.read_json(output_dir / "shrink.json")
        pruned = initial_architecture()
        kept = shrinking.by_name(unit_layout.structured_layout(pruned), {
            int(i): np.asarray(k, np.int64) for i, k in info["kept_units"].items()})
        surgery.unshrink(pruned, final, kept)
        models = {"dense": models["dense"], "pruned": pruned, "shrunk": final}
    examples = np.asarray(data.test_x[:max(deployment.BATCH_SIZES)])
    converted = dict(dense_converted)
    section = deployment.deployment_section(models, "shrunk" if "shrunk" in models else "pruned",
                                            examples, output_dir, mode=config.deploy,
                                            converted=converted)
    if "dense" in converted:
        dense_converted["dense"] = converted["dense"]
    return section


def _shrunk_architecture(config: ExperimentConfig, data, pp, output_dir: Path):
    """The shrunk process and evaluator of a run resumed after its shrink (from shrink.json)."""
    from fedprune.model import surgery
    from fedprune.pruning import unit_layout, wrappers

    info = atomic_files.read_json(output_dir / "shrink.json")
    if info is None or "kept_units" not in info:
        raise checkpoint.CheckpointError(
            f"{output_dir}/checkpoints hold the state after the shrink (round "
            f"{config.shrink_round()}) but {output_dir}/shrink.json is missing or unreadable; "
            "cannot rebuild the shrunk model, use --overwrite to start again")
    plain = wrappers.strip(pp.keras_model_fn())
    kept = shrinking.by_name(unit_layout.structured_layout(plain), {
        int(i): np.asarray(k, np.int64) for i, k in info["kept_units"].items()})
    # Only the architecture matters: the weights come from the checkpoint.
    small = surgery.shrink(plain, kept)
    new_pp = assembly.build_process(config, data, shrunk_model=small)
    return new_pp, evaluation.Evaluator.create(new_pp.keras_model_fn, data)
