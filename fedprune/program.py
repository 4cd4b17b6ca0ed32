"""The experiment loop: data, process, rounds, metrics, checkpoints, outputs.

`run_experiment(config, output_dir)` is what `experiments/run.py` calls. It
takes a validated `ExperimentConfig` (plain arguments; no flags here) and
writes into `output_dir`:

  config.json          every setting, package versions, git commit, seeds, and what
                       the numbers depend on beyond the settings (`provenance`)
  metrics.csv          one row per round (rewritten atomically every round)
  summary.json         final numbers (atomic)
  partition.json, label_heatmap.png   client sizes and label skew
  curves.png           test accuracy and global sparsity vs round
  tensorboard/         TensorBoard event files
  model/model.h5, model/model.zip    the final model after tfmot `strip_pruning`
                       (after a shrink: the smaller model, plain Keras layers)
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
noise, are left blank; the columns in `privacy_report.NON_PRIVATE_DIAGNOSTICS` are written but
not covered by the guarantee (config.json's `privacy` section says so). TFF's
DP noise is not seeded, so DP runs are not bit-reproducible.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import platform
import subprocess
import time
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedprune import (
    atomic_files,
    checkpoint,
    communication,
    datasets,
    privacy,
    privacy_accounting,
    privacy_report,
    reporting,
    sampling,
    shrinking,
)
from fedprune.config import ExperimentConfig
from fedprune.runtime import interrupts

METRIC_COLUMNS = (
    "round", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "global_sparsity",
    "nonzero_params", "params", "model_bytes", "flops_per_example",
    "mask_drift", "regrowth", "client_mask_jaccard", "bytes_down", "bytes_up",
    "dense_bytes_down", "dense_bytes_up",
    "tff_bytes_down", "tff_bytes_up", "clients", "epsilon", "epsilon_rdp", "epsilon_pld",
    "dp_clip", "round_seconds", "elapsed_seconds",
)
TIME_COLUMNS = ("round_seconds", "elapsed_seconds")
# What `run_experiment` passes to `on_phase`, in order; the per-round ones as
# `round N train`, `round N evaluate` (rounds that evaluate), `round N checkpoint`.
PHASES = ("build", "initialize", "train", "evaluate", "checkpoint", "export")


class NonFiniteError(RuntimeError):
    """Training produced a NaN or Inf loss or weight."""


# Every installed package whose version can change a number a run writes: the
# training stack (TF, Keras, TFF and what TFF computes with: jax, TF Privacy's DP
# queries, TF Probability), tfmot, the accountant, the data (scikit-learn's digits
# and split, numpy's generators, scipy), float types, and h5py (model.h5's bytes).
_RESULT_PACKAGES = ("tensorflow", "tensorflow-federated", "tensorflow-model-optimization",
                    "keras", "tensorflow-privacy", "tensorflow-probability", "dp-accounting",
                    "numpy", "scipy", "scikit-learn", "ml-dtypes", "h5py", "absl-py", "jax",
                    "jaxlib")
_REPO_ROOT = Path(__file__).resolve().parent.parent


def package_versions() -> dict:
    """Versions of the packages that decide results (None: not installed), and Python's."""
    from importlib import metadata

    names = _RESULT_PACKAGES
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    versions["python"] = platform.python_version()
    return versions


def git_commit() -> str | None:
    """The fedprune checkout's commit (with `-dirty` for local changes), or None."""
    root = _REPO_ROOT
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=root, capture_output=True, text=True, timeout=5).stdout
        return commit + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def uv_lock_sha256() -> str | None:
    """sha256 of the checkout's uv.lock (the locked environment), or None without one."""
    try:
        return hashlib.sha256((_REPO_ROOT / "uv.lock").read_bytes()).hexdigest()
    except OSError:
        return None


def cpu_model() -> str | None:
    """The CPU model (/proc/cpuinfo's `model name`; else what `platform` says, or None)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or None


def load_data(config: ExperimentConfig) -> datasets.FederatedData:
    """The federated dataset a config names."""
    common = dict(num_clients=config.num_clients, seed=config.seed)
    if config.dataset == "digits":
        return datasets.load_digits(partition=config.partition,
                                    dirichlet_alpha=config.dirichlet_alpha,
                                    shards_per_client=config.shards_per_client, **common)
    if config.dataset == "synthetic":
        return datasets.load_synthetic(alpha=config.synthetic_alpha, beta=config.synthetic_beta,
                                       **common)
    return datasets.load_dataset(config.dataset, data_dir=config.data_dir or None,
                                 num_clients=config.num_clients or None, seed=config.seed,
                                 max_test_examples=config.max_test_examples or None)


def model_aggregator(config: ExperimentConfig):
    """The weighted aggregator of plain client deltas a config asks for.

    DP: TFF's DP-FedAvg mean (uniform client weights, division by the expected
    `clients_per_round`; `privacy.build_dp_aggregator`). Otherwise the
    example-weighted mean; under Poisson sampling with `no_nan_division`, so that
    a round that sampled no client is a zero update instead of 0/0.
    """
    if config.dp != "none":
        return privacy.build_dp_aggregator(
            config.dp, noise_multiplier=config.dp_noise_multiplier, clip=config.dp_clip,
            clients_per_round=config.clients_per_round,
            target_unclipped_quantile=config.dp_target_quantile)
    import tensorflow_federated as tff

    return tff.aggregators.MeanFactory(no_nan_division=config.client_sampling == "poisson")


def build_process(config: ExperimentConfig, data: datasets.FederatedData, *,
                  shrunk_model=None):
    """The `PruningProcess` for a config and its data.

    With `shrunk_model` (a plain Keras model from `surgery.shrink`): the
    process that continues a structured run after its shrink, for a model of
    that architecture, dense (masking `none`, no schedule), with the config's
    optimizers; its initial weights are replaced by `shrinking.transfer_state`.
    """
    from fedprune import masking, models, schedules
    from fedprune import process as process_lib

    def model_builder():
        if shrunk_model is not None:
            import tensorflow as tf

            return tf.keras.models.clone_model(shrunk_model)
        return models.build_model(config.model, data.input_shape, data.num_classes)

    dense = shrunk_model is not None
    return process_lib.build_pruning_process(
        model_aggregator=model_aggregator(config),
        model_builder=model_builder,
        input_spec=data.element_spec,
        masking="none" if dense else config.masking,
        schedule=schedules.make_schedule("none") if dense else config.make_schedule(),
        mask_spec=masking.MaskSpec() if dense else config.mask_spec(),
        num_rounds=config.rounds,
        client_optimizer=process_lib.make_optimizer("sgd", config.client_lr,
                                                    momentum=config.client_momentum),
        server_optimizer=process_lib.make_optimizer(config.server_optimizer, config.server_lr),
        seed=config.seed,
        prune_output_layer=config.prune_output_layer,
        mask_aggregation=config.mask_aggregation,
    )


@dataclasses.dataclass
class _Evaluator:
    """Test loss and accuracy of global weights on the held-out set (Keras, no TFF)."""

    model: object
    test: object

    @classmethod
    def create(cls, keras_model_fn: Callable, data: datasets.FederatedData):
        import tensorflow as tf

        model = keras_model_fn()
        model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
        test = data.test_dataset(batch_size=512).map(lambda b: (b["x"], b["y"])).cache()
        return cls(model, test)

    def load(self, weights) -> None:
        for var, value in zip(self.model.trainable_weights, weights.trainable, strict=True):
            var.assign(value)
        for var, value in zip(self.model.non_trainable_weights, weights.non_trainable,
                              strict=True):
            var.assign(value)

    def __call__(self, weights) -> tuple[float, float]:
        self.load(weights)
        loss, accuracy = self.model.evaluate(self.test, verbose=0)
        return float(loss), float(accuracy)


def _kernel_masks(pp, weights) -> list:
    """Per trainable tensor: its broadcast 0/1 mask (pruned kernels) or None."""
    masks = [None] * len(weights.trainable)
    if pp.layout is not None and pp.masking != "none":
        for k in pp.layout.kernels:
            masks[k.trainable_index] = np.asarray(weights.non_trainable[k.mask_index])
    return masks


def sparsity_metrics(pp, weights) -> dict:
    """Global and per-layer sparsity (fraction of zeros) of the pruned kernels, and nonzeros.

    `global_sparsity` is over the kernels fedprune prunes (Dense/Conv, see
    `pruning.py`; for masking `none` the same kernels of the dense model);
    `nonzero_params` counts every trainable parameter, biases included.
    """
    metrics = {}
    zeros = total = 0
    for k in pp.layout.kernels:
        kernel = np.asarray(weights.trainable[k.trainable_index])
        z = int(kernel.size - np.count_nonzero(kernel))
        metrics[f"sparsity/{k.name}"] = z / kernel.size
        zeros, total = zeros + z, total + kernel.size
    metrics["global_sparsity"] = zeros / total
    metrics["nonzero_params"] = int(sum(np.count_nonzero(w) for w in weights.trainable))
    return metrics


def _finite(weights) -> bool:
    return all(np.isfinite(np.asarray(w)).all() for w in weights.trainable)


def _fmt_seconds(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    return f"{seconds // 60:.0f}m{seconds % 60:02.0f}s"


_SAMPLING_DESCRIPTIONS = {
    "fixed": "uniform without replacement, exactly --clients_per_round clients, drawn "
             "independently every round, a pure function of (seed, round)",
    "poisson": "Poisson: every client independently with probability q = clients_per_round / "
               "num_clients, every round, a pure function of (seed, round); rounds may be empty",
}


def write_config(config: ExperimentConfig, output_dir: Path, extra: dict | None = None, *,
                 data: datasets.FederatedData | None = None,
                 provenance: dict | None = None) -> None:
    """config.json: every setting, package versions, git commit, seeds, provenance.

    Args:
      config: the run's configuration.
      output_dir: the run folder.
      extra: more top-level entries (e.g. the privacy section).
      data: the run's data; its example-index digests go into `provenance`.
      provenance: what the caller knows that no setting shows (e.g. the driver's
        `tff_workers`); merged into the `provenance` section, which also has the
        uv.lock hash, the CPU model and the data digests.
    """
    payload = {
        "config": config.to_dict(),
        "fingerprint": config.fingerprint(),
        "versions": package_versions(),
        "git_commit": git_commit(),
        "provenance": {
            "uv_lock_sha256": uv_lock_sha256(),
            "cpu_model": cpu_model(),
            "example_indices_sha256": (datasets.example_index_digests(data)
                                       if data is not None else None),
            **(provenance or {}),
        },
        "seeds": {"partition": config.seed, "model_init": config.seed,
                  "client_sampling": config.seed, "client_shuffle": config.seed},
        "client_sampling": _SAMPLING_DESCRIPTIONS[config.client_sampling],
        **(extra or {}),
    }
    atomic_files.atomic_write_json(output_dir / "config.json", payload)


def _write_partition(data: datasets.FederatedData, output_dir: Path) -> None:
    sizes = [data.num_examples(c) for c in data.client_ids]
    info = {"num_clients": len(sizes), "examples_per_client": sizes,
            "min": int(min(sizes)), "max": int(max(sizes)), "mean": float(np.mean(sizes))}
    counts = data.label_count_matrix()
    if counts is not None:
        info["distinct_labels_per_client"] = [int((row > 0).sum()) for row in counts]
        info["label_counts"] = counts.tolist()
        reporting.plot_label_heatmap(counts, output_dir / "label_heatmap.png")
    atomic_files.atomic_write_json(output_dir / "partition.json", info)


def _export_model(pp, weights, output_dir: Path) -> dict:
    """Saves the stripped final model as HDF5 and a deflate zip; returns sizes in bytes."""
    from fedprune import pruning

    model_dir = output_dir / "model"
    model_dir.mkdir(exist_ok=True)
    model = pp.keras_model_fn()
    evaluator = _Evaluator(model, None)
    evaluator.load(weights)
    if pp.masking != "none":
        model = pruning.strip(model)
    h5 = model_dir / "model.h5"
    # HDF5 is "legacy" to Keras, but plain and portable.
    with atomic_files.atomic_path(h5) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model.save(tmp, save_format="h5")
    zipped = model_dir / "model.zip"
    with atomic_files.atomic_writer(zipped) as f, \
            zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.write(h5, arcname="model.h5")
    return {"model_bytes_h5": h5.stat().st_size, "model_bytes_zipped": zipped.stat().st_size,
            "model_params": int(sum(np.size(w) for w in model.get_weights()))}


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
    import tensorflow as tf

    def phase(name: str) -> None:
        interrupts.raise_if_interrupted()
        if on_phase is not None:
            on_phase(name)

    start = time.time()
    output_dir.mkdir(parents=True, exist_ok=True)
    phase("build")
    data = load_data(config)
    pp = build_process(config, data)
    evaluator = _Evaluator.create(pp.keras_model_fn, data)
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
        rows = [r for r in _read_metrics(output_dir) if int(r["round"]) <= done]
        if [int(r["round"]) for r in rows] != list(range(1, done + 1)) or (
                loaded is None and _read_metrics(output_dir)):
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
        write_config(config, output_dir, {
            "num_train_clients": num_clients,
            "num_test_examples": int(len(data.test_y)),
            "privacy": privacy_report.config_section(config, num_clients)},
                     data=data, provenance=provenance)
        _write_partition(data, output_dir)
        checkpoint.save(ckpt_dir, 0, state, fingerprint=fingerprint)

    writer = tf.summary.create_file_writer(str(output_dir / "tensorboard"))
    with interrupts.interruptible():
        weights = pp.process.get_model_weights(state)
    size = shrinking.model_size(shrinking.plain_model(pp, weights))
    elapsed_before = float(rows[-1]["elapsed_seconds"]) if rows else 0.0
    loop_start = time.time()
    for round_num in range(first_round, config.rounds + 1):
        phase(f"round {round_num} train")
        t0 = time.time()
        clients = sampling.sample_round(config.client_sampling, data.client_ids,
                                        clients_per_round=config.clients_per_round,
                                        seed=config.seed, round_num=round_num)
        client_data = [
            data.client_dataset(
                c, batch_size=config.batch_size, local_epochs=config.local_epochs,
                shuffle_seed=datasets.client_shuffle_seed(config.seed, round_num, c),
                max_examples=config.max_examples_per_client or None)
            for c in clients
        ]
        down = communication.downlink_bytes(list(weights.trainable), _kernel_masks(pp, weights),
                                            len(clients))
        tff_bytes = communication.tff_simulation_bytes(
            list(weights.trainable), list(weights.non_trainable), num_clients=len(clients))
        with interrupts.interruptible():  # most of a round: waiting on the worker
            output = pp.process.next(state, client_data)
            new_weights = pp.process.get_model_weights(output.state)
        train = output.metrics["client_work"]["train"]
        # No client, no training loss (0/0): only the model is checked then.
        train_loss = float(train["loss"]) if clients else 0.0
        test_loss = test_accuracy = ""
        if (math.isfinite(train_loss) and _finite(new_weights)
                and (round_num % config.eval_every == 0 or round_num == config.rounds)):
            # Finite but huge weights can still give NaN logits: TFF drops
            # clients' non-finite updates and then reports a training loss of 0.
            phase(f"round {round_num} evaluate")
            test_loss, test_accuracy = evaluator(new_weights)
        if not (math.isfinite(train_loss) and _finite(new_weights)
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
        if dp:
            row.update(dict.fromkeys(privacy_report.NON_PRIVATE_COLUMNS, ""))
            row.update(privacy_report.round_row(config, accounting, output, round_num))
        row.update(sparsity_metrics(pp, weights))
        row.update(size)
        diagnostics = output.metrics["finalizer"]["masks"]
        row.update({k: float(diagnostics[k]) if k in diagnostics else ""
                    for k in ("mask_drift", "regrowth", "client_mask_jaccard")})
        dense_up = 4 * sum(int(np.size(w)) for w in weights.trainable) * len(clients)
        bytes_up = int(output.metrics["client_work"]["uplink_bytes"])
        row.update(clients=len(clients), bytes_down=down.sent, bytes_up=bytes_up,
                   dense_bytes_down=down.dense, dense_bytes_up=dense_up,
                   tff_bytes_down=tff_bytes.down, tff_bytes_up=tff_bytes.up,
                   round_seconds=round_seconds,
                   elapsed_seconds=elapsed_before + time.time() - loop_start)
        rows.append(row)
        if round_num == shrink_round:
            pp, evaluator, state, weights, shrink_line = _shrink(
                config, data, pp, evaluator, state, weights, round_num, output_dir)
            size = shrinking.model_size(shrinking.plain_model(pp, weights))
        # Metrics first: a kill between the two writes leaves round_num in the
        # CSV but not in a checkpoint, and `resume` redoes it (never a gap).
        phase(f"round {round_num} checkpoint")
        _write_metrics(output_dir, rows)
        checkpoint.save(ckpt_dir, round_num, state, fingerprint=fingerprint)
        with writer.as_default(step=round_num):
            for key, value in row.items():
                if key != "round" and value != "":
                    tf.summary.scalar(key, value)
        mean_round = (time.time() - loop_start) / (round_num - first_round + 1)
        test = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] != "" else "  -   "
        train_text = (f"train_loss {row['train_loss']:.4f}" if row["train_loss"] != ""
                      else "train_loss   -   ")
        eps_text = f"  eps {row['epsilon']:.3g}" if dp else ""
        log(f"round {round_num:>{len(str(config.rounds))}}/{config.rounds}  "
            f"test_acc {test}  {train_text}  "
            f"sparsity {row['global_sparsity']:.4f}{eps_text}  {round_seconds:.2f}s  "
            f"elapsed {_fmt_seconds(row['elapsed_seconds'])}  "
            f"ETA {_fmt_seconds(mean_round * (config.rounds - round_num))}")
        if round_num == shrink_round:
            log(shrink_line)
        if stop_after_round is not None and round_num >= stop_after_round:
            writer.flush()
            return {}
    writer.flush()
    phase("export")
    summary = _summarize(config, rows, start)
    if dp:
        summary.update(privacy_report.summary_fields(config, accounting))
    summary.update(_size_summary(config, rows, output_dir))
    summary.update(_export_model(pp, weights, output_dir))
    atomic_files.atomic_write_json(output_dir / "summary.json", summary)
    reporting.plot_run_curves(rows, output_dir / "curves.png",
                              title=f"{config.dataset} {config.masking} {config.schedule}")
    eps_text = (f"epsilon {rows[-1]['epsilon']:.3g} (delta {config.dp_delta:g})  "
                if dp else "")
    log(f"done: test_accuracy {summary['final_test_accuracy']:.4f}  "
        f"sparsity {summary['final_global_sparsity']:.4f}  {eps_text}"
        f"bytes down/up {summary['total_bytes_down']:,}/{summary['total_bytes_up']:,}  "
        f"wall {summary['wall_seconds']:.1f}s  -> {output_dir}")
    return summary


def _logits(evaluator: _Evaluator, weights) -> np.ndarray:
    evaluator.load(weights)
    return np.concatenate([evaluator.model(x, training=False).numpy()
                           for x, _ in evaluator.test])


def _shrink(config: ExperimentConfig, data, pp, evaluator: _Evaluator, state, weights,
            round_num: int, output_dir: Path):
    """Cuts the removed units out of the global model.

    Writes shrink.json (atomically, before the round's checkpoint holds the
    shrunk state) with the kept units and the check that the shrunk model
    computes what the masked one did on the test set.

    Returns:
      The shrunk run's (pp, evaluator, state, weights) and a line for the log.
    """
    from fedprune import structured, surgery

    start = time.time()
    kept_by_kernel = shrinking.kept_units(pp, weights)
    plain = shrinking.plain_model(pp, weights)
    layout = structured.structured_layout(plain)
    kept = shrinking.by_name(layout, kept_by_kernel)
    small = surgery.shrink(plain, kept)
    new_pp = build_process(config, data, shrunk_model=small)
    new_state = shrinking.transfer_state(state, new_pp.process, layout=layout, kept=kept,
                                         shrunk_model=small)
    new_weights = new_pp.process.get_model_weights(new_state)
    new_evaluator = _Evaluator.create(new_pp.keras_model_fn, data)
    difference = float(np.max(np.abs(_logits(evaluator, weights)
                                     - _logits(new_evaluator, new_weights))))
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
        f"multiply-adds/example {before['flops_per_example']:,} -> "
        f"{after['flops_per_example']:,}, units " + ", ".join(
            f"{info['layers'][i]} {len(k)}/{info['units_before'][i]}"
            for i, k in info["kept_units"].items())
        + f"; max |logit difference| {difference:.2g}")
    return new_pp, new_evaluator, new_state, new_weights, line


def _shrunk_architecture(config: ExperimentConfig, data, pp, output_dir: Path):
    """The shrunk process and evaluator of a run resumed after its shrink (from shrink.json)."""
    from fedprune import pruning, structured, surgery

    info = atomic_files.read_json(output_dir / "shrink.json")
    if info is None or "kept_units" not in info:
        raise checkpoint.CheckpointError(
            f"{output_dir}/checkpoints hold the state after the shrink (round "
            f"{config.shrink_round()}) but {output_dir}/shrink.json is missing or unreadable; "
            "cannot rebuild the shrunk model, use --overwrite to start again")
    plain = pruning.strip(pp.keras_model_fn())
    kept = shrinking.by_name(structured.structured_layout(plain), {
        int(i): np.asarray(k, np.int64) for i, k in info["kept_units"].items()})
    # Only the architecture matters: the weights come from the checkpoint.
    small = surgery.shrink(plain, kept)
    new_pp = build_process(config, data, shrunk_model=small)
    return new_pp, _Evaluator.create(new_pp.keras_model_fn, data)


def _size_summary(config: ExperimentConfig, rows: list[dict], output_dir: Path) -> dict:
    """Final model size, round time after pruning ended, and the shrink's before/after."""
    last = rows[-1]
    seconds = [float(r["round_seconds"]) for r in rows]
    pruned_by = config.last_mask_update_round()
    tail = [float(r["round_seconds"]) for r in rows if int(r["round"]) > pruned_by]
    summary = {"params": int(last["params"]), "model_bytes": int(last["model_bytes"]),
               "flops_per_example": (int(last["flops_per_example"])
                                     if last["flops_per_example"] != "" else None),
               # After the schedule's last mask update (and the shrink): the model's final cost.
               "median_round_seconds_after_pruning": float(np.median(tail or seconds)),
               "shrink": None}
    shrink_round = config.shrink_round()
    info = atomic_files.read_json(output_dir / "shrink.json") if shrink_round else None
    if info is not None and int(last["round"]) >= shrink_round:
        before = [s for r, s in zip(rows, seconds, strict=True) if int(r["round"]) <= shrink_round]
        after = [s for r, s in zip(rows, seconds, strict=True) if int(r["round"]) > shrink_round]
        summary["shrink"] = {
            **{k: v for k, v in info.items() if k != "kept_units"},
            # {kernel index in the trainable weights: units kept}; `layers` names them.
            "kept_units": {i: len(k) for i, k in info["kept_units"].items()},
            "median_round_seconds_before": float(np.median(before)),
            "median_round_seconds_after": float(np.median(after)) if after else None,
        }
    return summary


def _summarize(config: ExperimentConfig, rows: list[dict], start: float) -> dict:
    last = rows[-1]
    totals = {k: int(sum(int(r[k]) for r in rows)) for k in
              ("bytes_down", "bytes_up", "dense_bytes_down", "dense_bytes_up",
               "tff_bytes_down", "tff_bytes_up")}
    ratio = communication.compression_ratio
    return {
        "rounds_completed": int(last["round"]),
        "final_test_accuracy": float(last["test_accuracy"]),
        "final_test_loss": float(last["test_loss"]),
        # None in DP runs (not released) and after a round without clients.
        "final_train_loss": float(last["train_loss"]) if last["train_loss"] != "" else None,
        "final_global_sparsity": float(last["global_sparsity"]),
        "final_nonzero_params": int(last["nonzero_params"]),
        "total_bytes_down": totals["bytes_down"],
        "total_bytes_up": totals["bytes_up"],
        "total_dense_bytes_down": totals["dense_bytes_down"],
        "total_dense_bytes_up": totals["dense_bytes_up"],
        "total_tff_bytes_down": totals["tff_bytes_down"],
        "total_tff_bytes_up": totals["tff_bytes_up"],
        "compression_ratio_down": ratio(totals["dense_bytes_down"], totals["bytes_down"]),
        "compression_ratio_up": ratio(totals["dense_bytes_up"], totals["bytes_up"]),
        "compression_ratio_total": ratio(totals["dense_bytes_down"] + totals["dense_bytes_up"],
                                         totals["bytes_down"] + totals["bytes_up"]),
        "median_round_seconds": float(np.median([float(r["round_seconds"]) for r in rows])),
        "wall_seconds": time.time() - start,
        "fingerprint": config.fingerprint(),
    }


def _write_metrics(output_dir: Path, rows: list[dict]) -> None:
    layer_columns = sorted({k for r in rows for k in r if k.startswith("sparsity/")})
    atomic_files.atomic_write_csv(output_dir / "metrics.csv", rows,
                               list(METRIC_COLUMNS) + layer_columns)


def _read_metrics(output_dir: Path) -> list[dict]:
    import csv

    path = output_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_summary(output_dir) -> dict | None:
    """summary.json of a completed run, or None."""
    path = Path(output_dir) / "summary.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())
