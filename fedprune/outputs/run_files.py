"""A run's output files: config, partition, metrics, summary, exported model.

What `loop.run_experiment` writes into its folder (every file atomically,
through `atomic_files`):

  config.json          every setting, package versions, git commit, seeds, and what
                       the numbers depend on beyond the settings (`provenance`)
  metrics.csv          one row per round (rewritten every round; `METRIC_COLUMNS`, with
                       --regrow also `REGROW_COLUMNS`)
  summary.json         final numbers
  partition.json, label_heatmap.{png,pdf}   client sizes and label skew
  curves.{png,pdf}, bytes.{png,pdf}   accuracy, loss, sparsity and bytes per round
                       (the figures not with `figures=False`, --nofigures)
  model/model.h5, model/model.zip    the final model after tfmot `strip_pruning`
  model/model.tflite   with --deploy: written by `deployment.py` (called by the loop)

Importing this module is cheap: TensorFlow is imported by `export_model` only.
"""

from __future__ import annotations

import csv
import json
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

from fedprune import extensions
from fedprune.config import ExperimentConfig
from fedprune.data import datasets
from fedprune.federated import communication
from fedprune.outputs import atomic_files, grid_plots, plots
from fedprune.outputs.provenance import cpu_model, git_commit, package_versions, uv_lock_sha256
from fedprune.program.evaluation import Evaluator

METRIC_COLUMNS = (
    "round", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "global_sparsity",
    "target_sparsity", "client_sparsity", "nonzero_params", "params", "model_bytes",
    "macs_per_example",
    "mask_drift", "regrowth", "client_mask_jaccard", "bytes_down", "bytes_up",
    "dense_bytes_down", "dense_bytes_up", "mask_entropy_bits",
    "tff_bytes_down", "tff_bytes_up", "clients", "epsilon", "epsilon_rdp", "epsilon_pld",
    "dp_clip", "round_seconds", "elapsed_seconds",
)
TIME_COLUMNS = ("round_seconds", "elapsed_seconds")
# Runs with --regrow only (after METRIC_COLUMNS, so other runs' metrics.csv is unchanged):
# the fraction of mask entries changed, the fraction of the previous adjustment's grown
# weights kept by this one (blank without an adjustment), in-time over-parameterization.
REGROW_COLUMNS = ("mask_change", "regrown_survival", "itop")

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
        uv.lock hash, the CPU model, the data digests and, when any were
        loaded, the `extensions` (`fedprune/extensions.py`) whose code the run used.
    """
    loaded = extensions.loaded()
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
            **({"extensions": loaded} if loaded else {}),
            **(provenance or {}),
        },
        "seeds": {"partition": config.seed, "model_init": config.seed,
                  "client_sampling": config.seed, "client_shuffle": config.seed},
        "client_sampling": _SAMPLING_DESCRIPTIONS[config.client_sampling],
        **(extra or {}),
    }
    atomic_files.atomic_write_json(output_dir / "config.json", payload)


def partition_title(config: ExperimentConfig) -> str:
    """The label heat map's title: dataset, clients, partition (with its α or shards)."""
    detail = {"dirichlet": f" (α = {config.dirichlet_alpha:g})",
              "shards": f" ({config.shards_per_client} shards per client)"}
    return (f"{config.dataset}: {config.num_clients} clients, {config.partition}"
            + detail.get(config.partition, ""))


def write_partition(data: datasets.FederatedData, output_dir: Path,
                    title: str | None = None, *, heatmap: bool = True) -> None:
    """partition.json and, for labelled data with `heatmap`, label_heatmap.{png,pdf}
    titled `title`."""
    sizes = [data.num_examples(c) for c in data.client_ids]
    info = {"num_clients": len(sizes), "examples_per_client": sizes,
            "min": int(min(sizes)), "max": int(max(sizes)), "mean": float(np.mean(sizes))}
    counts = data.label_count_matrix()
    if counts is not None:
        info["distinct_labels_per_client"] = [int((row > 0).sum()) for row in counts]
        info["label_counts"] = counts.tolist()
        if heatmap:
            plots.plot_label_heatmap(counts, output_dir / "label_heatmap.png", title=title)
    atomic_files.atomic_write_json(output_dir / "partition.json", info)


def schedule_window(config: ExperimentConfig) -> tuple[int, int] | None:
    """(first, last) round whose end updates the mask, or None for a dense run."""
    last = config.last_mask_update_round()
    if config.masking == "none" or config.make_schedule().dense:
        return None
    return getattr(config.make_schedule(), "begin_round", 0), last


def run_title(config: ExperimentConfig) -> str:
    """A run's figure title: dataset, model, schedule (power), masking, target, seed."""
    if schedule_window(config) is None:
        return f"{config.dataset}, {config.model}: dense; seed {config.seed}"
    schedule = config.make_schedule()
    label = grid_plots.series_label(config.schedule, masking=config.masking,
                                    power=getattr(schedule, "power", None))
    return (f"{config.dataset}, {config.model}: {label}; "
            f"target {schedule.final_sparsity_value:g}, seed {config.seed}")


def schedule_target(config: ExperimentConfig) -> float | None:
    """The schedule's final sparsity, or None for a dense run."""
    return None if schedule_window(config) is None else config.make_schedule().final_sparsity_value


def curve_events(config: ExperimentConfig) -> dict[str, int]:
    """{label: round} marked on a run's curves: the shrink of a structured run, if any."""
    shrink = config.shrink_round()
    return {f"shrink after round {shrink}": shrink} if shrink else {}


def write_figures(config: ExperimentConfig, rows: list[dict], output_dir: Path) -> list[Path]:
    """curves.{png,pdf} and bytes.{png,pdf} of a run's metrics rows; returns the PNGs.

    A structured run's shrink is marked on the curves (`curve_events`).
    """
    title = run_title(config)
    return [
        plots.plot_run_curves(rows, output_dir / "curves.png", title=title,
                              window=schedule_window(config), target=schedule_target(config),
                              events=curve_events(config)),
        plots.plot_bytes_per_round(rows, output_dir / "bytes.png", title=title),
    ]


def layer_table(weights) -> list[dict]:
    """summary.json's per-layer table: one row per weight tensor of the exported model.

    Args:
      weights: (name, array) per weight tensor, e.g. a Keras model's
        `(w.name, w.numpy())`.

    Returns:
      Rows {name, shape, parameters, kept (nonzero entries), sparsity
      (1 - kept / parameters), bytes_dense (float32), bytes_stored and encoding
      (the smallest of `encodings.py`'s encodings that holds the tensor alone:
      dense, bitmap + values, or coordinate list)}.
    """
    from fedprune.federated import encodings

    rows = []
    for name, array in weights:
        array = np.asarray(array, np.float32)
        kept = int(np.count_nonzero(array))
        encoding, stored = encodings.smallest_encoding(array)
        rows.append({"name": name, "shape": list(array.shape), "parameters": int(array.size),
                     "kept": kept, "sparsity": 1.0 - kept / array.size if array.size else 0.0,
                     "bytes_dense": 4 * int(array.size), "bytes_stored": int(stored),
                     "encoding": encoding})
    return rows


def export_model(pp, weights, output_dir: Path, *, model=None) -> dict:
    """Saves the stripped final model as HDF5 and a deflate zip.

    Args:
      model: a Keras model of `pp`'s architecture to load `weights` into (e.g. the
        run's evaluator's) instead of a new one from `pp.keras_model_fn`.

    Returns:
      {model_bytes_h5, model_bytes_zipped, model_params, layers (`layer_table`)}.
    """
    from fedprune.pruning import wrappers

    model_dir = output_dir / "model"
    model_dir.mkdir(exist_ok=True)
    model = pp.keras_model_fn() if model is None else model
    evaluator = Evaluator(model, None)
    evaluator.load(weights)
    if pp.masking_mode.wraps_model:
        model = wrappers.strip(model)
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
            "model_params": int(sum(np.size(w) for w in model.get_weights())),
            "layers": layer_table(_stable_weight_names(model))}


def _stable_weight_names(model) -> list[tuple[str, np.ndarray]]:
    """(name, array) per weight of `model`, named `<layer>/<weight>` with the layer's
    `wrappers.stable_names` (Keras' own names count models process-wide)."""
    from fedprune.pruning import wrappers

    names = {}
    for layer, name in zip(model.layers, wrappers.stable_names(model.layers), strict=True):
        for w in layer.weights:
            names[w.ref()] = f"{name}/{w.name.split('/')[-1]}"
    return [(names.get(w.ref(), w.name), w.numpy()) for w in model.weights]


def size_summary(config: ExperimentConfig, rows: list[dict], output_dir: Path) -> dict:
    """Final model size, round time after pruning ended, and the shrink's before/after."""
    last = rows[-1]
    seconds = [float(r["round_seconds"]) for r in rows]
    pruned_by = config.last_mask_update_round()
    tail = [float(r["round_seconds"]) for r in rows if int(r["round"]) > pruned_by]
    summary = {"params": int(last["params"]), "model_bytes": int(last["model_bytes"]),
               "macs_per_example": (int(last["macs_per_example"])
                                     if last["macs_per_example"] != "" else None),
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


def mask_coding_summary(masks) -> dict:
    """summary.json's `mask_coding`: one copy of the final model's masks under each coding.

    `bitmap_bytes` and `coo_index_bytes` are what the downlink's mask part costs
    as a bitmap or as int32 coordinates; `entropy_bytes` is the entropy bound
    (`communication.mask_coding`), a bound that no payload count includes.
    """
    coding = communication.mask_coding(masks)
    return {"params": coding.params, "kept": coding.kept,
            "bitmap_bytes": coding.bitmap_bits / 8, "coo_index_bytes": coding.coo_bits / 8,
            "entropy_bytes": coding.entropy_bits / 8,
            "entropy_bits_per_param": (coding.entropy_bits / coding.params
                                       if coding.params else 0.0)}


def summarize(config: ExperimentConfig, rows: list[dict], start: float) -> dict:
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


class MetricsFile:
    """A run's metrics.csv, rewritten whole and atomically after every round.

    Columns: `METRIC_COLUMNS`, then the regrowth and the per-layer sparsity
    columns some row has.

    Keeps the text of the rows it has written, so a round formats only its own
    row: a write cost 0.94 ms of CPU at 100 rows and 7.0 ms at 1,000 when it
    formatted the whole file, 0.32 and 0.89 ms now. The bytes are always those
    of one `csv.DictWriter` pass over `rows` with the header of their columns
    (tests/test_run_files.py).
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / "metrics.csv"
        self._rows: list[dict] = []  # the rows written, the caller's own objects
        self._columns: list[str] = []
        self._text: list[str] = []  # header, then the rows' lines in chunks

    def write(self, rows: list[dict]) -> None:
        """Atomically writes `rows`. Rows must not change once written; a list
        that does not start with the rows written before is written from scratch.

        Raises:
          ValueError: a row has a column metrics.csv does not know; the file is
            left untouched.
        """
        kept = 0
        while kept < min(len(rows), len(self._rows)) and rows[kept] is self._rows[kept]:
            kept += 1
        if kept < len(self._rows):
            self._rows, self._columns, self._text = [], [], []
            kept = 0
        new = rows[kept:]
        keys = set(self._columns).union(*new)  # the columns so far hold every key that counts
        columns = [*METRIC_COLUMNS, *(k for k in REGROW_COLUMNS if k in keys),
                   *sorted(k for k in keys if k.startswith("sparsity/"))]
        if columns != self._columns:  # every line has a cell per column: all again
            text, new = [atomic_files.csv_text([], columns)], rows
        else:
            text = self._text
        text = [*text, atomic_files.csv_text(new, columns, header=False)]
        atomic_files.atomic_write_text(self.path, "".join(text))
        self._rows, self._columns, self._text = list(rows), columns, text


def read_metrics(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.csv"
    if not path.exists():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:  # a run written before the rename (resumed now)
        if "flops_per_example" in row:
            row["macs_per_example"] = row.pop("flops_per_example")
    return rows


def metric_values(output_dir: Path) -> list[dict]:
    """metrics.csv rows as numbers (a blank cell: None), without `TIME_COLUMNS`: what two
    runs of the same configuration must agree on."""
    return [{k: float(v) if v else None for k, v in row.items() if k not in TIME_COLUMNS}
            for row in read_metrics(Path(output_dir))]


def read_summary(output_dir) -> dict | None:
    """summary.json of a completed run, or None."""
    path = Path(output_dir) / "summary.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())
