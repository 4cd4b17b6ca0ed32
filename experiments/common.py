"""Flags shared by every driver, and the start-up every driver does.

Each `ExperimentConfig` field is one flag with the field's default; choices of
enum flags come from the library's registries, topic and help from `_SPECS`
(`experiments/usage.py` prints them grouped by topic for --help). `--dataset`,
`--schedule` and `--mask_criterion` list their registries' entries, with each
entry's own help (`experiments/registry_flags.py`); `--extensions` imports
users' modules that register more. Nothing here imports TensorFlow: flags are
parsed and validated first, so `--help`, `--only_check_args` and bad input
return fast.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import signal
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

from absl import flags

from experiments import registry_flags, usage
from experiments.usage import (
    DATA,
    MASKING,
    MODEL,
    OUTPUTS,
    PRIVACY,
    SCHEDULE,
    STRUCTURE,
    TRAINING,
)
from fedprune import config as config_lib
from fedprune.data import datasets, partitions, sampling
from fedprune.errors import InvalidArgument
from fedprune.federated import encodings, masking_modes, privacy
from fedprune.model import builders
from fedprune.outputs import deployment
from fedprune.pruning import (
    layer_budgets,
    mask_aggregation,
    masking,
    regrowth,
    schedules,
    step_schedule,
)

FLAGS = flags.FLAGS


class _Spec(NamedTuple):
    topic: str
    help: str


_SPECS = {
    "dataset": _Spec(DATA, "Federated dataset (TFF's are read from --data_dir, never "
                           "downloaded):"),
    "data_dir": _Spec(DATA, "Folder holding TFF's dataset files (e.g. emnist_all.sqlite). "
                            "Nothing is downloaded."),
    "partition": _Spec(DATA, "How digits/synthetic examples are split among clients."),
    "dirichlet_alpha": _Spec(DATA, "--partition=dirichlet: label-skew concentration, > 0 (Hsu "
                                   "et al. 2019); smaller is more skewed."),
    "shards_per_client": _Spec(DATA, "--partition=shards: label-sorted shards per client "
                                     "(McMahan et al. 2017)."),
    "synthetic_alpha": _Spec(DATA, "--dataset=synthetic: model heterogeneity alpha >= 0 of "
                                   "Synthetic(alpha, beta) (Li et al. 2020)."),
    "synthetic_beta": _Spec(DATA, "--dataset=synthetic: data heterogeneity beta >= 0."),
    "num_clients": _Spec(DATA, "Number of clients (for TFF datasets: the first N clients; "
                               "0 = all)."),
    "clients_per_round": _Spec(DATA, "Clients per round: exactly this many "
                                     "(--client_sampling=fixed) or this many in expectation "
                                     "(poisson)."),
    "client_sampling": _Spec(DATA, "How each round's clients are drawn: fixed (uniformly "
                                   "without replacement, exactly --clients_per_round) or "
                                   "poisson (each client independently with probability "
                                   "clients_per_round/num_clients). The DP accountant assumes "
                                   "the matching event (see fedprune/data/sampling.py)."),
    "max_examples_per_client": _Spec(DATA, "Cap on a client's examples per local epoch "
                                           "(examples; 0 = no cap)."),
    "max_test_examples": _Spec(DATA, "Cap on the global test set of TFF datasets (examples; "
                                     "0 = the whole split)."),
    "model": _Spec(MODEL, "Keras model builder: mlp (64-128-10), mlp2 (McMahan et al.'s 2NN), "
                          "cnn (the federated-EMNIST CNN), rnn (character LSTM, "
                          "--dataset=shakespeare)."),
    "rounds": _Spec(TRAINING, "Federated rounds to train."),
    "local_epochs": _Spec(TRAINING, "Passes a client makes over its data in one round "
                                    "(epochs)."),
    "batch_size": _Spec(TRAINING, "Client batch size (examples per client step)."),
    "client_lr": _Spec(TRAINING, "Client SGD learning rate (per client step)."),
    "client_momentum": _Spec(TRAINING, "Client SGD heavy-ball momentum, in [0, 1) (0 = none)."),
    "server_optimizer": _Spec(TRAINING, "Server optimizer applied to the mean client delta "
                                        "once per round: sgd with --server_lr=1 is FedAvg; "
                                        "adam is FedAdam."),
    "server_lr": _Spec(TRAINING, "Server learning rate (per round; multiplies the mean client "
                                 "delta)."),
    "seed": _Spec(TRAINING, "Seed of the partition, model init, client sampling and shuffling "
                            "(each a pure function of seed and round)."),
    "masking": _Spec(MASKING, "Who applies the mask in a round. " + " ".join(
        f"{name}: {mode.description}." for name, mode in masking_modes.MASKING_MODES.items())),
    "schedule": _Spec(SCHEDULE, "Sparsity schedule in rounds (tfmot, one step per round, not "
                                "per client step):"),
    "initial_sparsity": _Spec(SCHEDULE, "Polynomial schedule: sparsity at --begin_round, a "
                                        "fraction in [0, 1)."),
    "final_sparsity": _Spec(SCHEDULE, "Target sparsity (fraction of zero kernel weights), in "
                                      "[0, 1)."),
    "begin_round": _Spec(SCHEDULE, "First round (not client step) whose end recomputes the "
                                   "mask (0 prunes the initial model)."),
    "end_round": _Spec(SCHEDULE, "Last round of the schedule (polynomial: reaches "
                                 "--final_sparsity here; constant: -1 = never stop "
                                 "re-pruning)."),
    "prune_every": _Spec(SCHEDULE, "Recompute the mask every this many rounds."),
    "power": _Spec(SCHEDULE, "Polynomial schedule exponent, > 0 (Zhu & Gupta 2017 use 3)."),
    "prune_granularity": _Spec(SCHEDULE, "When pruning clients (--masking=client|both) "
                                         "prune: round (at the end of local training, one "
                                         "tfmot step per round) or step (tfmot's own mask "
                                         "update inside local training, the schedule in "
                                         "client steps: begin_step = begin_round * "
                                         "steps_per_round; magnitude per layer, "
                                         "unstructured|2:4|block)."),
    "steps_per_round": _Spec(SCHEDULE, "--prune_granularity=step: client steps one round "
                                       "stands for; the server's global step after round r "
                                       "is r * steps_per_round. 0 = the mean client's local "
                                       "steps per round (recorded in config.json)."),
    "prune_every_steps": _Spec(SCHEDULE, "--prune_granularity=step: recompute the clients' "
                                         "masks every this many client steps (tfmot's "
                                         "frequency; --prune_every must stay 1)."),
    "mask_criterion": _Spec(MASKING, "How the mask is chosen:"),
    "mask_scope": _Spec(MASKING, "Rank weights within each layer or globally across layers."),
    "sparsity_distribution": _Spec(MASKING, "How the schedule's sparsity is split among the "
                                            "pruned layers: uniform (every layer at it) or erk "
                                            "(Erdos-Renyi-kernel, Evci et al. 2020: density "
                                            "proportional to (sum of kernel dims)/(product), "
                                            "layers over density 1 kept dense, recomputed at "
                                            "each round's level; magnitude, --mask_scope=layer, "
                                            "unstructured, --prune_granularity=round). The "
                                            "chosen levels are in config.json's "
                                            "layer_budgets."),
    "threshold": _Spec(MASKING, "--mask_criterion=threshold: weight magnitude > 0 (in the "
                                "weights' own units); weights with |w| below it are pruned."),
    "relative_rate": _Spec(MASKING, "--mask_criterion=relative: fraction in (0, 1) of the "
                                    "largest |w| (of the layer; of all layers with "
                                    "--mask_scope=global) at or below which weights are "
                                    "pruned."),
    "structure": _Spec(STRUCTURE, "Sparsity structure: unstructured, 2:4 (N:M), block, or "
                                  "whole units: neuron (units of the hidden Dense layers) or "
                                  "filter (channels of the convolutions; --model=cnn). "
                                  "neuron|filter: the schedule's sparsity is the fraction of "
                                  "units removed per layer (of all units with "
                                  "--mask_scope=global), the output layer is kept "
                                  "(--noprune_output_layer), --masking=server only."),
    "block_size": _Spec(STRUCTURE, "--structure=block: block height,width in weights."),
    "block_pooling": _Spec(STRUCTURE, "--structure=block: how a block's magnitudes are "
                                      "pooled."),
    "unit_norm": _Spec(STRUCTURE, "--structure=neuron|filter: score of a unit/filter, the l2 "
                                  "or l1 norm of its incoming weights (Li et al. 2017 use "
                                  "l1)."),
    "shrink_at_round": _Spec(STRUCTURE, "--structure=neuron|filter: after this round the "
                                        "global model is physically shrunk (removed units cut "
                                        "out) and training continues dense on the smaller "
                                        "model. -1 = after the schedule's last mask update; "
                                        "0 = never (train masked to the end)."),
    "prune_output_layer": _Spec(MASKING, "Prune the last Dense/Conv layer too "
                                         "(--noprune_output_layer keeps it dense)."),
    "mask_aggregation": _Spec(MASKING, "How clients' pruned models combine (masking "
                                       "client|both): average, nonzero (average over the "
                                       "clients that kept a weight), majority (a weight "
                                       "survives when at least half the clients keep it)."),
    "regrow": _Spec(MASKING, "Prune and regrow (dynamic sparse training): none, random "
                             "(SET, Mocanu et al. 2018) or gradient (RigL, Evci et al. 2020): "
                             "after the schedule's re-mask the server drops the smallest kept "
                             "weights of each layer and grows as many pruned ones, at zero, so "
                             "the level stays the schedule's; random grows uniformly at random, "
                             "gradient where the clients' example-weighted mean gradient is "
                             "largest (in adjustment rounds each client uploads its top-k "
                             "pruned coordinates by |gradient| at the broadcast model as "
                             "(int32 index, float32 value) pairs, counted in bytes_up; "
                             "not with --dp). "
                             "--masking=server|both, --structure=unstructured, "
                             "--mask_criterion=magnitude, --prune_granularity=round."),
    "regrow_at": _Spec(MASKING, "--regrow: who adjusts the topology; server (after "
                                "aggregation, in the server's masking step) or client "
                                "(FedDST, Bibikar et al. 2022, --masking=both: in adjustment "
                                "rounds each client, after local training and pruning, drops "
                                "its smallest kept weights and grows as many at zero, randomly "
                                "or by its own dense gradient at its trained model, and uploads "
                                "that mask; the server re-masks the aggregate to the level, "
                                "zeros ranked by the clients' votes)."),
    "regrow_fraction": _Spec(MASKING, "--regrow: fraction in (0, 1) of each layer's kept "
                                      "weights dropped and regrown at the first adjustment "
                                      "(RigL's alpha)."),
    "regrow_decay": _Spec(MASKING, "--regrow: how the fraction decays over rounds: cosine "
                                   "(fraction/2 * (1 + cos(pi r / --regrow_end_round)), RigL) "
                                   "or constant."),
    "regrow_end_round": _Spec(MASKING, "--regrow: no adjustment after rounds >= this round "
                                       "(-1 = three quarters of --rounds)."),
    "regrow_every": _Spec(MASKING, "--regrow: adjust the topology after every this many "
                                   "rounds (RigL's delta T, in rounds)."),
    "dp": _Spec(PRIVACY, "Client-level differential privacy (DP-FedAvg): none, fixed (clip "
                         "every client update to --dp_clip) or adaptive (clip at the "
                         "--dp_target_quantile of update norms, starting at --dp_clip). Needs "
                         "--masking=server or none."),
    "dp_noise_multiplier": _Spec(PRIVACY, "DP noise multiplier z >= 0: noise stddev z * clip "
                                          "on the sum of clipped updates (0 = clipping only, "
                                          "epsilon = inf)."),
    "dp_clip": _Spec(PRIVACY, "DP clip norm > 0: L2 norm of a client's whole update (weight "
                              "units); the initial one for --dp=adaptive."),
    "dp_target_quantile": _Spec(PRIVACY, "--dp=adaptive: fraction in [0, 1) of client updates "
                                         "left unclipped."),
    "dp_delta": _Spec(PRIVACY, "DP delta (a probability) at which epsilon is reported; "
                               "< 1/num_clients."),
    "dp_accountant": _Spec(PRIVACY, "Accountant of the headline epsilon: rdp, or pld (Poisson "
                                    "sampling only). metrics.csv has both where they apply."),
    "upload_quantization": _Spec(TRAINING, "Wire format of the values clients upload: none "
                                           "(float32), fp16 (half floats) or int8 (a float32 "
                                           "scale max|x|/127 per tensor, stochastic rounding); "
                                           "the server dequantizes before the mean. Pruning "
                                           "clients' masks go as bits. bytes_up counts the "
                                           "values at that width. Needs --dp=none."),
    "eval_every": _Spec(OUTPUTS, "Evaluate the global model on the test set every this many "
                                 "rounds (and at the last round); other rows of metrics.csv "
                                 "leave test_loss/test_accuracy blank."),
    "deploy": _Spec(OUTPUTS, "latency: after training, write model/model.tflite (the final "
                             "model as a TFLite flatbuffer, shrunk when structured) and "
                             "summary.json's deployment section: flatbuffer sizes, raw and "
                             "zipped, of the dense initial, pruned and (structured) shrunk "
                             "models and their TFLite interpreter latency at batch 1 and 64 (one "
                             "thread, median of 50 runs); size: the same without latency; none: "
                             "neither. Changes no result and not the fingerprint."),
    "figures": _Spec(OUTPUTS, "Write the run's figures: curves, bytes and label_heatmap, each "
                              ".png and .pdf (about 2-4 s of matplotlib CPU a run); "
                              "--nofigures skips them (e.g. the cells of a large grid, whose "
                              "comparison figures are drawn anyway). Changes no result and not "
                              "the fingerprint."),
}

# Flags whose values are registry entries: their help is the _SPECS text followed by
# every entry's own.
_REGISTRIES = {
    "dataset": datasets.DATASETS,
    "schedule": schedules.SCHEDULES,
    "mask_criterion": masking.CRITERIA,
}

_ENUMS = {
    "partition": partitions.PARTITIONERS,
    "model": builders.MODELS,
    "server_optimizer": config_lib.SERVER_OPTIMIZERS,
    "masking": tuple(masking_modes.MASKING_MODES),
    "prune_granularity": step_schedule.GRANULARITIES,
    "mask_scope": masking.SCOPES,
    "sparsity_distribution": layer_budgets.DISTRIBUTIONS,
    "structure": masking.STRUCTURES,
    "block_pooling": masking.POOLINGS,
    "unit_norm": masking.UNIT_NORMS,
    "mask_aggregation": mask_aggregation.RULES,
    "regrow": regrowth.RULES,
    "regrow_at": regrowth.PLACES,
    "regrow_decay": regrowth.DECAYS,
    "client_sampling": sampling.SAMPLING_MODES,
    "dp": privacy.DP_KINDS,
    "dp_accountant": privacy.ACCOUNTANTS,
    "upload_quantization": encodings.QUANTIZATIONS,
    "deploy": deployment.DEPLOY_MODES,
}

_OPTIONAL_FLOATS = ("threshold", "relative_rate")


def define_experiment_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines one flag per `ExperimentConfig` field, --verbose, --tff_workers and --extensions.

    Idempotent.
    """
    if "dataset" in flag_values:
        return
    for field in dataclasses.fields(config_lib.ExperimentConfig):
        name, default, (topic, help_) = field.name, field.default, _SPECS[field.name]
        kwargs = {"flag_values": flag_values}
        if name in _REGISTRIES:
            registry_flags.define_registry_flag(_REGISTRIES[name], name, default, help_, **kwargs)
        elif name in _ENUMS:
            flags.DEFINE_enum(name, default, _ENUMS[name], help_, **kwargs)
        elif name == "block_size":
            flags.DEFINE_list(name, [str(b) for b in default], help_, **kwargs)
        elif isinstance(default, bool):
            flags.DEFINE_bool(name, default, help_, **kwargs)
        elif isinstance(default, int):
            flags.DEFINE_integer(name, default, help_, **kwargs)
        elif isinstance(default, float) or name in _OPTIONAL_FLOATS:
            flags.DEFINE_float(name, default, help_, **kwargs)
        else:
            flags.DEFINE_string(name, default, help_, **kwargs)
        usage.set_topic(topic, name)
    flags.DEFINE_bool("verbose", False, "Show TensorFlow's and TFF's own logs from INFO up "
                      "(without it: errors only).", flag_values=flag_values)
    flags.DEFINE_list("tff_workers", [], "host:port of TFF worker services to run on "
                      "(several: each round's clients are split across them). Empty: a local "
                      "worker started and stopped by this process.", flag_values=flag_values)
    usage.set_topic(usage.RUNTIME, "verbose", "tff_workers")
    registry_flags.define_extensions_flag(flag_values)
    usage.set_topic(usage.COMMAND_LINE, "extensions")


def config_from_flags(flag_values: flags.FlagValues = FLAGS,
                      **overrides) -> config_lib.ExperimentConfig:
    """An unvalidated `ExperimentConfig` from the parsed flags, with `overrides`."""
    values = {}
    for field in dataclasses.fields(config_lib.ExperimentConfig):
        values[field.name] = flag_values[field.name].value
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
    except flags.UnrecognizedFlagError as e:  # absl's text names it without the dashes
        dashes = "-" if len(e.flagname) == 1 else "--"
        fail(f"{dashes}{e.flagname}: not a flag of this command (--help lists them)")
    except flags.IllegalFlagValueError as e:
        if isinstance(e.__context__, InvalidArgument):  # our parsers' (e.g. --extensions)
            fail(str(e.__context__))
        fail(str(e).splitlines()[0])
    except flags.Error as e:
        fail(str(e).splitlines()[0])
    except OSError as e:  # an unreadable --flagfile
        fail(f"--flagfile: {e}")


def run(main) -> None:
    """Parses flags and calls `main(argv)`; a driver's `if __name__ == "__main__"` body.

    Not `absl.app.run`: TensorFlow imported lazily inside `app.run`'s main
    builds Keras models from graph placeholders instead of KerasTensors (Keras
    2.14), which breaks `Flatten`; plain parsing keeps `--help` fast and Keras
    intact. `--help`, `-h`, `--helpshort` and `--helpfull` print and exit 0
    while parsing (`experiments/usage.py`); `main` honours `--only_check_args`.

    SIGINT and SIGTERM, at any moment from here on (flag parsing, the TF import,
    tracing, a round, a checkpoint), end the driver through `_exit_interrupted`:
    one line on stderr, no worker left, status 130 (by SIGINT) or 143; also
    when the error that reaches this function is another one (native code
    converts exceptions), as long as a signal was recorded.
    """
    from fedprune.runtime import interrupts

    interrupts.install_worker_cleanup()  # the interrupt handlers; cheap, no TensorFlow
    # Runs before the worker cleanup (atexit is last in, first out).
    atexit.register(_report_interrupt_at_exit)
    try:
        usage.define_command_line_flags()
        try:  # before parsing: their names are --help's and the flags' choices too
            registry_flags.load_environment_extensions()
        except InvalidArgument as e:
            fail(str(e))
        argv = parse_flags(sys.argv)
        code = main(argv)
    except KeyboardInterrupt:
        _exit_interrupted(signal.SIGINT)
    except interrupts.Terminated as e:
        _exit_interrupted(e.signum)
    except SystemExit as e:  # `fail`, --help: their status
        code = e.code
    except Exception:  # noqa: BLE001 -- reported as the interpreter would, status 1
        signum = interrupts.interrupt_signal()
        if signum is not None:
            # The interrupt, turned into another error by native code on its way
            # here: pybind11 reports any exception raised while a module initializes
            # as `ImportError: initialization failed` (seen when SIGTERM landed in
            # `import tensorflow`, tests/test_interrupts_random.py).
            _exit_interrupted(signum)
        traceback.print_exc()
        code = 1
    _exit_without_teardown(code)


def _exit_without_teardown(code) -> None:
    """Ends the driver with `code` after the atexit hooks, skipping the interpreter's teardown.

    The teardown finalizes TensorFlow's and gRPC's native threads and objects
    in no fixed order; after a complete run (its last line printed, every
    file written) it was seen to crash with SIGSEGV (status -11), once, in a
    full run of the test suite. The atexit hooks (the workers'
    cleanup, logging's flush) run as at a normal exit; every output file is
    already closed (written atomically), so nothing is lost. `code` is a
    `sys.exit` argument: None is 0, a message is printed and gives 1.
    """
    if code is None:
        code = 0
    elif not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    atexit._run_exitfuncs()  # what `sys.exit` runs first; CPython's own entry point
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except OSError:  # a closed pipe (`| head`): the output is the reader's business
            pass
    os._exit(code)


def interrupted_message(signum: int) -> str:
    return (f"interrupted ({signal.Signals(signum).name}); completed rounds are kept: rerun "
            "with --resume to continue")


def _report_interrupt_at_exit() -> None:
    """At the interpreter's exit: the interrupt line, if a recorded SIGTERM skipped `run`.

    `Terminated` is a `SystemExit`. Native code that reports a pending Python
    error with `PyErr_Print` (a C/C++ extension calling back into Python, e.g.
    while TensorFlow is imported) exits the interpreter at once on a
    `SystemExit`, with its status (143) but without unwinding to `run`'s
    handler: seen once in the random-signal tests, status 143 and an empty
    stderr. The atexit hooks still run, so the line is printed here (and
    `workers.stop_workers`, registered earlier, runs after this hook). After
    `_exit_interrupted` the process leaves with `os._exit`, which skips atexit.
    """
    from fedprune.runtime import interrupts

    signum = interrupts.interrupt_signal()
    if signum is not None and not interrupts.shutting_down():
        interrupts.begin_shutdown()
        print(interrupted_message(signum), file=sys.stderr, flush=True)


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
    from fedprune.runtime import interrupts, workers

    interrupts.begin_shutdown()  # first: no worker restarts, further signals ignored
    print(interrupted_message(signum), file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stderr.fileno())
    workers.stop_workers()
    if signum == signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(128 + signum)


def phase_logger():
    """`on_phase` for `loop.run_experiment` when `FEDPRUNE_PHASE_LOG` names a file.

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
    from fedprune.runtime import contexts

    for address in tff_workers:
        contexts.parse_worker_address(address)
    try:
        contexts.check_workers_reachable(list(tff_workers), timeout_s=10.0)
    except contexts.WorkerUnreachableError as e:
        raise InvalidArgument("tff_workers", ",".join(tff_workers),
                              f"reachable TFF workers ({e})") from None


def start_runtime(*, verbose: bool, tff_workers: list[str]) -> None:
    """Quiets TF logs, installs the worker cleanup, and sets TFF's execution context.

    Imports TensorFlow/TFF: call after validation.
    """
    from fedprune.runtime import contexts, interrupts, tf_logging

    tf_logging.quiet_tensorflow_logging(verbose)
    interrupts.install_worker_cleanup()
    if tff_workers:
        contexts.set_remote_context(list(tff_workers))
    else:
        log_path = os.environ.get("FEDPRUNE_WORKER_LOG") or None
        contexts.set_local_context(log_path=log_path)
