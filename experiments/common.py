"""Flags shared by every driver, and the start-up every driver does the same way.

Each `ExperimentConfig` field is one flag with the field's default; choices of
enum flags come from the library's registries. Nothing here imports TensorFlow:
flags are parsed and validated first, so `--help` and bad input return fast.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import sys
from pathlib import Path

from absl import flags

from fedprune import config as config_lib
from fedprune import (
    datasets,
    mask_aggregation,
    masking,
    models,
    partitions,
    privacy,
    sampling,
    schedules,
)
from fedprune.client_work import MASKING_MODES
from fedprune.errors import InvalidArgument

FLAGS = flags.FLAGS

_HELP = {
    "dataset": "Federated dataset. digits and synthetic are built in; the others read TFF's "
               "SQLite files from --data_dir.",
    "data_dir": "Folder holding TFF's dataset files (e.g. emnist_all.sqlite). Nothing is "
                "downloaded.",
    "partition": "How digits/synthetic examples are split among clients.",
    "dirichlet_alpha": "Dirichlet label-skew concentration (Hsu et al. 2019); smaller is more "
                       "skewed.",
    "shards_per_client": "Label-sorted shards per client (McMahan et al. 2017).",
    "synthetic_alpha": "Synthetic(alpha, beta): model heterogeneity (Li et al. 2020).",
    "synthetic_beta": "Synthetic(alpha, beta): data heterogeneity.",
    "num_clients": "Number of clients (for TFF datasets: the first N clients; 0 = all).",
    "clients_per_round": "Clients per round: exactly this many (--client_sampling=fixed) or "
                         "this many in expectation (poisson).",
    "client_sampling": "How each round's clients are drawn: fixed (uniformly without "
                       "replacement, exactly --clients_per_round) or poisson (each client "
                       "independently with probability clients_per_round/num_clients). The DP "
                       "accountant assumes the matching event (see fedprune/sampling.py).",
    "max_examples_per_client": "Cap on a client's examples per epoch (0 = no cap).",
    "max_test_examples": "Cap on the global test set of TFF datasets (0 = the whole split).",
    "rounds": "Federated rounds to train.",
    "local_epochs": "Passes over its data a client makes in one round.",
    "batch_size": "Client batch size (examples).",
    "model": "Keras model builder.",
    "client_lr": "Client SGD learning rate.",
    "client_momentum": "Client SGD heavy-ball momentum (0 = none).",
    "server_optimizer": "Server optimizer applied to the mean client delta: sgd with "
                        "--server_lr=1 is FedAvg; adam is FedAdam.",
    "server_lr": "Server learning rate.",
    "masking": "Where masks are computed: none (dense), client (tfmot on clients only), "
               "server (server re-mask after FedAvg), both.",
    "schedule": "Sparsity schedule in rounds (tfmot, one step per round).",
    "initial_sparsity": "Polynomial schedule: sparsity at --begin_round, in [0, 1).",
    "final_sparsity": "Target sparsity (fraction of zero kernel weights), in [0, 1).",
    "begin_round": "First round whose end recomputes the mask (0 prunes the initial model).",
    "end_round": "Last round of the schedule (polynomial: reaches --final_sparsity here; "
                 "constant: -1 = never stop re-pruning).",
    "prune_every": "Recompute the mask every this many rounds.",
    "power": "Polynomial schedule exponent (Zhu & Gupta 2017 use 3).",
    "mask_criterion": "How the mask is chosen: magnitude (target sparsity), threshold "
                      "(keep |w| >= --threshold), relative (keep |w| > rate * max|w|).",
    "mask_scope": "Rank weights within each layer or globally across layers.",
    "threshold": "Absolute magnitude for --mask_criterion=threshold.",
    "relative_rate": "Fraction of the largest |w| for --mask_criterion=relative.",
    "structure": "Sparsity structure: unstructured, 2:4 (N:M), block, or whole units: neuron "
                 "(units of the hidden Dense layers) or filter (channels of the convolutions; "
                 "--model=cnn). neuron|filter: the schedule's sparsity is the fraction of units "
                 "removed per layer (of all units with --mask_scope=global), the output layer "
                 "is kept (--noprune_output_layer), --masking=server only.",
    "block_size": "Block height,width for --structure=block.",
    "block_pooling": "How a block's magnitudes are pooled for --structure=block.",
    "unit_norm": "Score of a unit/filter for --structure=neuron|filter: the l2 or l1 norm of "
                 "its incoming weights (Li et al. 2017 use l1).",
    "shrink_at_round": "For --structure=neuron|filter: after this round the global model is "
                       "physically shrunk (removed units cut out) and training continues "
                       "dense on the smaller model. -1 = after the schedule's last mask "
                       "update; 0 = never (train masked to the end).",
    "prune_output_layer": "Prune the last Dense/Conv layer too (--noprune_output_layer keeps "
                          "it dense).",
    "mask_aggregation": "How clients' pruned models combine (masking client|both): average, "
                        "nonzero (average over the clients that kept a weight), majority (a "
                        "weight survives when at least half the clients keep it).",
    "dp": "Client-level differential privacy (DP-FedAvg): none, fixed (clip every client "
          "update to --dp_clip) or adaptive (clip at the --dp_target_quantile of update norms, "
          "starting at --dp_clip). Needs --masking=server or none.",
    "dp_noise_multiplier": "DP noise multiplier z: noise stddev z * clip on the sum of clipped "
                           "updates (0 = clipping only, epsilon = inf).",
    "dp_clip": "DP clip norm (L2 norm of a client's whole update); the initial one for "
               "--dp=adaptive.",
    "dp_target_quantile": "--dp=adaptive: fraction of client updates left unclipped.",
    "dp_delta": "DP delta at which epsilon is reported; < 1/num_clients.",
    "dp_accountant": "Accountant of the headline epsilon: rdp, or pld (Poisson sampling "
                     "only). metrics.csv has both where they apply.",
    "seed": "Seed for partition, model init, client sampling and shuffling.",
    "eval_every": "Evaluate the global model on the test set every this many rounds (and "
                  "at the last round).",
}

_ENUMS = {
    "dataset": datasets.DATASETS,
    "partition": partitions.PARTITIONERS,
    "model": models.MODELS,
    "server_optimizer": config_lib.SERVER_OPTIMIZERS,
    "masking": MASKING_MODES,
    "schedule": schedules.SCHEDULES,
    "mask_criterion": masking.CRITERIA,
    "mask_scope": masking.SCOPES,
    "structure": masking.STRUCTURES,
    "block_pooling": masking.POOLINGS,
    "unit_norm": masking.UNIT_NORMS,
    "mask_aggregation": mask_aggregation.RULES,
    "client_sampling": sampling.SAMPLING_MODES,
    "dp": privacy.DP_KINDS,
    "dp_accountant": privacy.ACCOUNTANTS,
}

_OPTIONAL_FLOATS = ("threshold", "relative_rate")


def define_experiment_flags() -> None:
    """Defines one flag per `ExperimentConfig` field (idempotent)."""
    if "dataset" in FLAGS:
        return
    for field in dataclasses.fields(config_lib.ExperimentConfig):
        name, default, help_ = field.name, field.default, _HELP[field.name]
        if name in _ENUMS:
            flags.DEFINE_enum(name, default, _ENUMS[name], help_)
        elif name == "block_size":
            flags.DEFINE_list(name, [str(b) for b in default], help_)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_)
        elif isinstance(default, float) or name in _OPTIONAL_FLOATS:
            flags.DEFINE_float(name, default, help_)
        else:
            flags.DEFINE_string(name, default, help_)
    flags.DEFINE_bool("verbose", False, "Show TensorFlow's and TFF's own logs.")
    flags.DEFINE_list("tff_workers", [], "host:port of TFF worker services to run on "
                      "(several: each round's clients are split across them). Empty: a local "
                      "worker started and stopped by this process.")


def config_from_flags(**overrides) -> config_lib.ExperimentConfig:
    """An unvalidated `ExperimentConfig` from the parsed flags, with `overrides`."""
    values = {}
    for field in dataclasses.fields(config_lib.ExperimentConfig):
        values[field.name] = FLAGS[field.name].value
    block = values["block_size"]
    try:
        values["block_size"] = tuple(int(b) for b in block)
    except ValueError:
        raise InvalidArgument(
            "block_size", ",".join(block), "two positive integers, e.g. 1,4") from None
    values.update(overrides)
    return config_lib.ExperimentConfig(**values)


def fail(message: str, code: int = 2):
    """Prints a one-line error to stderr and exits with `code`."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def parse_flags(argv):
    """Parses flags; errors are one line (flag, value, accepted) and exit 2."""
    try:
        return FLAGS(argv)
    except flags.CantOpenFlagFileError as e:  # absl's text does not name the flag
        reason = str(e).split("Unable to open flagfile:", 1)[-1].strip()
        fail(f"--flagfile: cannot read it ({reason})")
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except OSError as e:  # an unreadable --flagfile
        fail(f"--flagfile: {e}")


def run(main) -> None:
    """Parses flags and calls `main(argv)`; a driver's `if __name__ == "__main__"` body.

    Not `absl.app.run`: TensorFlow imported lazily inside `app.run`'s main
    builds Keras models from graph placeholders instead of KerasTensors (Keras
    2.14), which breaks `Flatten`; plain parsing keeps `--help` fast and Keras
    intact. `--help`/`--helpfull` behave as with absl.

    SIGINT and SIGTERM, at any moment from here on (flag parsing, the TF import,
    tracing, a round, a checkpoint), end the driver through `_exit_interrupted`:
    one line on stderr, no worker left, status 130 (by SIGINT) or 143.
    """
    from absl import app

    from fedprune import runtime

    runtime.install_worker_cleanup()  # the interrupt handlers; cheap, no TensorFlow
    try:
        app.define_help_flags()
        argv = parse_flags(sys.argv)
        code = main(argv)
    except KeyboardInterrupt:
        _exit_interrupted(signal.SIGINT)
    except runtime.Terminated as e:
        _exit_interrupted(e.signum)
    sys.exit(code)


def _exit_interrupted(signum: int) -> None:
    """Ends the process after SIGINT/SIGTERM: one line, workers stopped, no teardown.

    Status: death by SIGINT (shell 130) for SIGINT, as an uncaught
    KeyboardInterrupt would give; exit status 143 for SIGTERM. Without the
    interpreter's teardown, which finalizes TF's and gRPC's native threads
    mid-call and was seen to abort under load ("free(): invalid next size",
    status -6). Nothing is lost: every output file is written atomically, so the
    last completed round is on disk. After the message, stderr goes to
    /dev/null: the in-flight call to the worker fails when the worker stops, and
    native threads may log that on their way down.
    """
    from fedprune import runtime

    runtime.begin_shutdown()  # first: no worker restarts, further signals ignored
    print(f"interrupted ({signal.Signals(signum).name}); completed rounds are kept: rerun "
          "with --resume to continue", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    runtime.stop_workers()
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(128 + signum)


def phase_logger():
    """`on_phase` for `program.run_experiment` when `FEDPRUNE_PHASE_LOG` names a file.

    Appends `<CLOCK_MONOTONIC ns> <phase>` per phase a run enters (`import`,
    then `program.PHASES`), flushed at once: a diagnostic of where a run spends
    its time or was stopped; tests aim signals at phases with it. None when the
    variable is unset.
    """
    path = os.environ.get("FEDPRUNE_PHASE_LOG")
    if not path:
        return None
    import time

    stream = open(path, "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def on_phase(name: str) -> None:
        stream.write(f"{time.monotonic_ns()} {name}\n")

    return on_phase


def check_output_dir(path: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuses an existing non-empty output folder unless --resume or --overwrite."""
    if resume and overwrite:
        raise InvalidArgument("overwrite", True, "not together with --resume")
    if path.exists() and not path.is_dir():
        raise InvalidArgument("output_dir", str(path), "a folder path (this is a file)")
    if path.is_dir() and any(path.iterdir()) and not (resume or overwrite):
        raise InvalidArgument("output_dir", str(path),
                              "a new or empty folder; it holds a run already (pass --resume "
                              "to continue it or --overwrite to replace it)")


def clear_output_dir(path: Path) -> None:
    """Deletes an existing output folder (for --overwrite)."""
    if path.is_dir():
        shutil.rmtree(path)


def check_tff_workers(tff_workers: list[str]) -> None:
    """Fails fast (before TFF is imported) when a --tff_workers address is malformed or down."""
    if not tff_workers:
        return
    from fedprune import runtime

    for address in tff_workers:
        runtime.parse_worker_address(address)
    try:
        runtime.check_workers_reachable(list(tff_workers), timeout_s=10.0)
    except runtime.WorkerUnreachableError as e:
        raise InvalidArgument("tff_workers", ",".join(tff_workers),
                              f"reachable TFF workers ({e})") from None


def start_runtime(*, verbose: bool, tff_workers: list[str]) -> None:
    """Quiets TF logs, installs the worker cleanup, and sets TFF's execution context.

    Imports TensorFlow/TFF: call after validation.
    """
    from fedprune import runtime

    runtime.quiet_tensorflow_logging(verbose)
    runtime.install_worker_cleanup()
    if tff_workers:
        runtime.set_remote_context(list(tff_workers))
    else:
        log_path = os.environ.get("FEDPRUNE_WORKER_LOG") or None
        runtime.set_local_context(log_path=log_path)
