"""The `python -m experiments.run` driver: bad input, --help, and a small smoke run.

Bad input (issue 5 item 6) is rejected before TensorFlow is imported: each case
runs the real CLI under `python -X importtime`, which logs every import to
stderr, so one subprocess shows the exit status, the error line (the stderr
lines that are not import-time lines), that no `tensorflow*` module was
imported, and that nothing was written. No case waits on the clock: what
keeps these fast is that TensorFlow is not imported (`import
tensorflow_federated` alone takes ~6 s), and that is what is checked; the
subprocess timeouts only guard against hangs.

The smoke run (2 rounds, 4 clients, a few non-default flags; `slow`: it
imports TFF) is one module-scoped run into a folder that already holds a stale
run, with `--overwrite`; the tests below check what it left there, and rerun
it from its flags.txt.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from cli_util import (
    CHEAP_FLAGS,
    CHEAP_OUTPUTS,
    EXPERIMENT_TOPICS,
    LAST_TOPICS,
    TIMEOUT_S,
    exit_lines,
    parse_flagfile,
    split_importtime,
    tree,
)
from figure_util import assert_figure

from experiments import common, flagfile
from fedprune.config import ExperimentConfig
from fedprune.outputs import run_files
from fedprune.outputs.provenance import cpu_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def _cli(args, *, cwd: Path, importtime: bool = False) -> subprocess.CompletedProcess:
    """Runs the CLI in `cwd`."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []),
               "-m", "experiments.run", *CHEAP_FLAGS, *args]
    return subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT_S)


# ----------------------------------------------------------------------------
# Bad input: status 2, one line naming the flag, nothing written, no TensorFlow.


# absl's flags that the drivers do not honour (absl.app's debugging and profiling,
# absl.logging's, absl's XML help): not defined, so unknown like any typo.
UNHONOURED_ABSL_FLAGS = [
    ["--verbosity=1"], ["-v=1"], ["--logtostderr"], ["--alsologtostderr"], ["--log_dir={tmp}"],
    ["--stderrthreshold=info"], ["--showprefixforinfo"], ["--logger_levels=absl:INFO"],
    ["--run_with_pdb"], ["--pdb"], ["--pdb_post_mortem"], ["--run_with_profiling"],
    ["--profile_file={tmp}/profile"], ["--use_cprofile_for_profiling"], ["--helpxml"],
]

BAD_INPUT = [
    # (id, extra args, flags the one-line message must name)
    ("final-sparsity-1", ["--final_sparsity=1.0"], ["--final_sparsity"]),
    ("final-sparsity-negative", ["--final_sparsity=-0.1"], ["--final_sparsity"]),
    ("initial-sparsity-1", ["--initial_sparsity=1.0"], ["--initial_sparsity"]),
    ("begin-after-end", ["--begin_round=5", "--end_round=3"], ["--end_round", "--begin_round"]),
    ("clients-per-round-above-clients", ["--num_clients=4", "--clients_per_round=5"],
     ["--clients_per_round"]),
    ("unknown-dataset", ["--dataset=mnist_fake"], ["--dataset"]),
    ("unknown-model", ["--model=resnet"], ["--model"]),
    ("unknown-schedule", ["--schedule=cosine"], ["--schedule"]),
    ("unknown-masking", ["--masking=everywhere"], ["--masking"]),
    ("threshold-missing", ["--mask_criterion=threshold"], ["--threshold"]),
    ("relative-rate-missing", ["--mask_criterion=relative"], ["--relative_rate"]),
    ("flagfile-missing", ["--flagfile={tmp}/no_such.flags"], ["--flagfile"]),
    ("flagfile-is-a-folder", ["--flagfile={tmp}"], ["--flagfile"]),
    ("bad-value-inside-flagfile", ["--flagfile={tmp}/bad.flags"], ["--final_sparsity"]),
    ("resume-and-overwrite", ["--resume", "--overwrite"], ["--overwrite"]),
    ("unknown-dp", ["--dp=laplace"], ["--dp"]),
    ("dp-with-client-masks", ["--dp=fixed", "--masking=both"], ["--dp"]),
    ("dp-negative-noise", ["--dp=fixed", "--masking=server", "--dp_noise_multiplier=-1"],
     ["--dp_noise_multiplier"]),
    ("dp-zero-clip", ["--dp=fixed", "--masking=server", "--dp_clip=0"], ["--dp_clip"]),
    ("dp-delta-above-1-over-n", ["--dp=fixed", "--masking=server", "--dp_delta=0.2"],
     ["--dp_delta"]),
    ("dp-quantile-1", ["--dp=adaptive", "--masking=server", "--dp_noise_multiplier=0.5",
                       "--dp_target_quantile=1"], ["--dp_target_quantile"]),
    ("dp-adaptive-noise-too-large", ["--dp=adaptive", "--masking=server"],
     ["--dp_noise_multiplier"]),
    ("dp-pld-with-fixed-sampling", ["--dp=fixed", "--masking=server", "--dp_accountant=pld"],
     ["--dp_accountant"]),
    ("unknown-client-sampling", ["--client_sampling=shuffle"], ["--client_sampling"]),
    ("unknown-granularity", ["--prune_granularity=batch"], ["--prune_granularity"]),
    ("step-with-server-masking", ["--prune_granularity=step", "--masking=server"],
     ["--prune_granularity", "--masking"]),
    ("step-with-unit-structure", ["--prune_granularity=step", "--masking=client",
                                  "--structure=neuron", "--noprune_output_layer"],
     ["--structure", "--prune_granularity"]),
    ("step-with-threshold", ["--prune_granularity=step", "--mask_criterion=threshold",
                             "--threshold=0.1"], ["--mask_criterion"]),
    ("steps-per-round-in-round-mode", ["--steps_per_round=8"], ["--steps_per_round"]),
    ("typo", ["--final_sparsty=0.5"], ["--final_sparsty"]),
    # --only_check_args checks the same things, and fails the same way.
    ("only-check-args-bad-value", ["--only_check_args", "--final_sparsity=1.2"],
     ["--final_sparsity"]),
    ("only-check-args-cross-flag-rule", ["--only_check_args", "--dp=fixed", "--masking=both"],
     ["--dp"]),
    ("only-check-args-bad-flagfile", ["--only_check_args", "--flagfile={tmp}/bad.flags"],
     ["--final_sparsity"]),
    *((f"absl-{args[0].lstrip('-').split('=')[0]}", args, [args[0].split("=")[0]])
      for args in UNHONOURED_ABSL_FLAGS),
]


@pytest.mark.parametrize(("args", "named"), [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_before_tensorflow(tmp_path, args, named):
    (tmp_path / "bad.flags").write_text("--rounds=3\n--final_sparsity=2\n")
    output_dir = tmp_path / "out"
    workdir = tmp_path / "cwd"  # the default --output_dir would land here (runs/...)
    workdir.mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    before = tree(tmp_path)
    result = _cli([*args, f"--output_dir={output_dir}"], cwd=workdir, importtime=True)
    stderr_lines = exit_lines(result, 2)
    assert len(stderr_lines) == 1, stderr_lines
    assert stderr_lines[0].startswith("error: "), stderr_lines[0]
    for flag in named:
        assert flag in stderr_lines[0], stderr_lines[0]
    assert result.stdout == ""
    assert not output_dir.exists()
    assert not any(workdir.iterdir())
    assert tree(tmp_path) == before


def test_existing_output_dir_needs_resume_or_overwrite(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "metrics.csv").write_text("round\n1\n")
    before = tree(output_dir)
    for extra in ([], ["--only_check_args"]):
        result = _cli(["--rounds=2", "--end_round=2", f"--output_dir={output_dir}", *extra],
                      cwd=tmp_path, importtime=True)
        stderr_lines = exit_lines(result, 2)
        assert len(stderr_lines) == 1 and "--output_dir" in stderr_lines[0], stderr_lines
        assert "--resume" in stderr_lines[0] and "--overwrite" in stderr_lines[0]
        assert tree(output_dir) == before


def test_validate_does_not_import_tensorflow():
    """`ExperimentConfig.validate()` on its own, in a fresh interpreter."""
    code = textwrap.dedent("""
        import sys
        from fedprune.config import ExperimentConfig
        ExperimentConfig().validate()
        ExperimentConfig(masking="server", schedule="oneshot", final_sparsity=0.9).validate()
        try:
            ExperimentConfig(final_sparsity=1.0).validate()
        except ValueError:
            pass
        heavy = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras",
                 "tensorflow_federated", "tensorflow_model_optimization")]
        print(len(heavy), sorted(heavy)[:5])
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0 "), result.stdout


# ----------------------------------------------------------------------------
# --help and --only_check_args.

TOPICS_IN_ORDER = EXPERIMENT_TOPICS + LAST_TOPICS


@pytest.mark.parametrize("flag", ["--help", "-h", "--helpshort"])
def test_help_groups_every_flag_by_topic_exits_0_without_tensorflow(tmp_path, flag):
    result = _cli([flag, "--final_sparsity=0.5"], cwd=tmp_path, importtime=True)
    assert exit_lines(result, 0) == []
    assert not any(tmp_path.iterdir())
    lines = result.stdout.splitlines()
    assert lines[0] == "Runs one federated pruning experiment."
    headers = [line for line in lines if line in TOPICS_IN_ORDER]
    assert headers == TOPICS_IN_ORDER
    # Each flag once, with its values and its default (not the value given above).
    assert "  --final_sparsity=<float>  (default: 0.8)" in lines
    assert "  --masking=none|client|server|both  (default: both)" in lines
    assert "  --[no]prune_output_layer  (default: true)" in lines
    assert "  --threshold=<float>  (default: unset)" in lines
    assert "  --block_size=<a,b,...>  (default: 1,4)" in lines
    for name in [f.name for f in dataclasses.fields(ExperimentConfig)] + [
            "output_dir", "resume", "overwrite", "tff_workers", "verbose", "flagfile",
            "only_check_args", "helpfull"]:
        heads = [line for line in lines
                 if re.match(rf"  (-\w, )?--(\[no\])?{name}[= ]", line)]
        assert len(heads) == 1, (name, heads)
    for name in ("verbosity", "logtostderr", "run_with_pdb", "pdb_post_mortem", "helpxml"):
        assert f"--{name}" not in result.stdout and f"--[no]{name}" not in result.stdout


def test_readme_shows_the_real_help_output(tmp_path):
    """The README's excerpts of `--help` are lines of the output, in its order."""
    section = (REPO_ROOT / "README.md").read_text().split("\n## Flags\n", 1)[1].split("\n## ")[0]
    blocks = section.split("```\n")[1::2][:2]  # the start and the end of the output
    output = _cli(["--help"], cwd=tmp_path).stdout
    for block in blocks:
        shown = [line for line in block.splitlines() if line != "  ..."]
        assert len(shown) > 20
        assert "\n".join(shown) in output, block


def test_helpfull_is_absl_listing_and_exits_0(tmp_path):
    result = _cli(["--helpfull"], cwd=tmp_path, importtime=True)
    assert exit_lines(result, 0) == []
    assert "experiments.common:" in result.stdout and "--final_sparsity:" in result.stdout
    assert "absl.logging:" not in result.stdout and "absl.app:" not in result.stdout
    assert not any(tmp_path.iterdir())


def test_only_check_args_passes_valid_input_writing_nothing(tmp_path):
    """Valid flags (a flagfile, an empty output folder to resume) exit 0; nothing is written."""
    (tmp_path / "run.flags").write_text("--rounds=3\n--end_round=3\n--masking=server\n")
    (tmp_path / "resumed").mkdir()
    workdir = tmp_path / "cwd"  # the default --output_dir would land here (runs/...)
    workdir.mkdir()
    before = tree(tmp_path)
    for args in ([], [f"--flagfile={tmp_path}/run.flags", f"--output_dir={tmp_path}/new"],
                 ["--resume", f"--output_dir={tmp_path}/resumed"]):
        result = _cli(["--only_check_args", *args], cwd=workdir, importtime=True)
        assert exit_lines(result, 0) == [] and result.stdout == ""
        assert tree(tmp_path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "resumed", "run.flags"]
        assert not any(workdir.iterdir())


# ----------------------------------------------------------------------------
# config.json's provenance.


def test_config_json_records_what_no_flag_shows(tmp_path):
    from fedprune.data import datasets

    config = ExperimentConfig(num_clients=3, clients_per_round=3)
    data = datasets.load_digits(num_clients=3, partition="dirichlet", seed=0)
    run_files.write_config(config, tmp_path, {"num_train_clients": 3}, data=data,
                         provenance={"tff_workers": ["10.0.0.5:8000", "10.0.0.6:8000"]})
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["num_train_clients"] == 3 and saved["fingerprint"] == config.fingerprint()
    provenance = saved["provenance"]
    assert provenance["tff_workers"] == ["10.0.0.5:8000", "10.0.0.6:8000"]
    assert provenance["uv_lock_sha256"] == hashlib.sha256(
        (REPO_ROOT / "uv.lock").read_bytes()).hexdigest()
    assert provenance["cpu_model"] == cpu_model() and provenance["cpu_model"]
    assert provenance["example_indices_sha256"] == datasets.example_index_digests(data)
    versions = saved["versions"]
    for package in ("tensorflow", "tensorflow-federated", "tensorflow-model-optimization",
                    "keras", "dp-accounting", "tensorflow-privacy", "tensorflow-probability",
                    "numpy", "scipy", "scikit-learn", "ml-dtypes", "h5py", "jax", "jaxlib"):
        assert versions[package], package
    assert versions["dp-accounting"] == "0.4.3"


# ----------------------------------------------------------------------------
# One small run, end to end.


SMOKE_ROUNDS = 2
# A few flags off their defaults, so that rerunning from flags.txt shows they were kept.
SMOKE_FLAGS = {"rounds": SMOKE_ROUNDS, "end_round": SMOKE_ROUNDS, "num_clients": 4,
               "clients_per_round": 4, "seed": 3, "client_lr": 0.05, "dirichlet_alpha": 1.0,
               "power": 2.0, "mask_scope": "global", "deploy": "none",
               "figures": True}  # after CHEAP_FLAGS' --nofigures: its figures are checked
METRIC_COLUMNS = ("round", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                  "global_sparsity", "nonzero_params", "bytes_down", "bytes_up",
                  "mask_entropy_bits", "round_seconds")
SUMMARY_KEYS = ("final_test_accuracy", "final_global_sparsity", "total_bytes_down",
                "total_bytes_up", "mask_coding", "wall_seconds")


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """A 2-round run with --overwrite into a folder that holds a stale run.

    Returns (output_dir, CompletedProcess).
    """
    output_dir = tmp_path_factory.mktemp("smoke") / "run"
    (output_dir / "checkpoints").mkdir(parents=True)
    (output_dir / "stale.txt").write_text("from an older run")
    (output_dir / "metrics.csv").write_text("round,train_loss\n1,9\n2,9\n3,9\n")
    (output_dir / "checkpoints" / "round_000099.npz").write_bytes(b"stale")
    args = [f"--{k}={v}" for k, v in SMOKE_FLAGS.items()]
    result = _cli([*args, f"--output_dir={output_dir}", "--overwrite"], cwd=REPO_ROOT,
                  importtime=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


def _metrics_without_time(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in run_files.TIME_COLUMNS}
                for row in csv.DictReader(f)]


@pytest.mark.slow
def test_tff_is_imported_without_tensorflow_probability(smoke_run):
    """`fedprune.runtime.deferred_imports`: TFF imports tensorflow_privacy, whose
    tensorflow_probability a run never uses: it stays a stand-in, never executed."""
    _, result = smoke_run
    modules, _ = split_importtime(result.stderr)
    assert {"tensorflow_federated", "tensorflow_privacy"} <= set(modules)
    assert [m for m in modules if m.startswith("tensorflow_probability")] == []


@pytest.mark.slow
def test_flags_txt_parses_to_the_runs_config(smoke_run):
    """flags.txt keeps every flag off its default; that a run started from a flagfile
    alone reproduces the run is tests/test_reliability.py's same-seed test."""
    output_dir, _ = smoke_run
    assert parse_flagfile(output_dir / flagfile.FLAGFILE_NAME) == ExperimentConfig(**SMOKE_FLAGS)


@pytest.mark.slow
def test_overwrite_replaces_the_stale_run(smoke_run):
    output_dir, _ = smoke_run
    assert not (output_dir / "stale.txt").exists()
    assert not (output_dir / "checkpoints" / "round_000099.npz").exists()
    with open(output_dir / "metrics.csv", newline="") as f:
        assert [r["round"] for r in csv.DictReader(f)] == ["1", "2"]


@pytest.mark.slow
def test_prints_one_line_per_round_and_a_summary(smoke_run):
    _, result = smoke_run
    lines = result.stdout.splitlines()
    assert len(lines) == SMOKE_ROUNDS + 1, lines
    for r, line in enumerate(lines[:-1], start=1):
        assert line.startswith(f"round {r}/{SMOKE_ROUNDS} ") and "test_acc" in line, line
    assert lines[-1].startswith("done: test_accuracy ") and "sparsity" in lines[-1]


@pytest.mark.slow
def test_config_json_records_every_flag_versions_and_commit(smoke_run):
    output_dir, _ = smoke_run
    common.define_experiment_flags()
    saved = json.loads((output_dir / "config.json").read_text())
    expected = ExperimentConfig(**SMOKE_FLAGS).to_dict()
    assert saved["config"] == expected
    for field in dataclasses.fields(ExperimentConfig):  # each setting is a CLI flag
        assert field.name in flags.FLAGS
    versions = saved["versions"]
    for package in ("tensorflow", "tensorflow-federated", "tensorflow-model-optimization",
                    "numpy", "python"):
        assert versions[package], package
    assert versions["tensorflow-federated"] == "0.87.0"
    assert len(saved["git_commit"].removesuffix("-dirty")) == 40
    assert saved["seeds"]["model_init"] == expected["seed"]
    provenance = saved["provenance"]
    assert provenance["tff_workers"] == []  # a local worker
    assert provenance["uv_lock_sha256"] == hashlib.sha256(
        (REPO_ROOT / "uv.lock").read_bytes()).hexdigest()
    assert provenance["cpu_model"]
    digests = provenance["example_indices_sha256"]
    assert sorted(digests["clients"]) == ["0", "1", "2", "3"]
    assert len({digests["test"], *digests["clients"].values()}) == 5


def _tensorboard_scalars(log_dir: Path) -> dict[tuple[int, str], np.float32]:
    """(step, tag) -> value of every scalar in the event files under `log_dir`."""
    import tensorflow as tf

    values = {}
    for path in sorted(log_dir.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                values[(event.step, value.tag)] = np.float32(
                    tf.make_ndarray(value.tensor))
    return values


@pytest.mark.slow
def test_metrics_summary_tensorboard_and_plots(smoke_run):
    output_dir, _ = smoke_run
    with open(output_dir / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert set(METRIC_COLUMNS) <= set(reader.fieldnames), reader.fieldnames
    assert [int(r["round"]) for r in rows] == list(range(1, SMOKE_ROUNDS + 1))
    summary = json.loads((output_dir / "summary.json").read_text())
    assert set(SUMMARY_KEYS) <= set(summary)
    assert summary["final_global_sparsity"] == float(rows[-1]["global_sparsity"])
    assert summary["final_test_accuracy"] == float(rows[-1]["test_accuracy"])
    assert summary["total_bytes_down"] == sum(int(r["bytes_down"]) for r in rows)
    assert summary["total_bytes_up"] == sum(int(r["bytes_up"]) for r in rows)
    # TensorBoard holds every non-blank metrics.csv value but the round, as float32.
    logged = _tensorboard_scalars(output_dir / "tensorboard")
    for row in rows:
        step = int(row["round"])
        want = {k: np.float32(v) for k, v in row.items() if k != "round" and v != ""}
        assert {k: v for (s, k), v in logged.items() if s == step} == want, step
    assert sorted(p.name for p in output_dir.glob("*.png")) == [
        "bytes.png", "curves.png", "label_heatmap.png"]
    for png in output_dir.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png.name
        assert png.with_suffix(".pdf").read_bytes()[:4] == b"%PDF", png.name
    # Not blank, at inches x DPI: 3 panels of 6.4 x 2.6 in; 4 clients x 10 classes.
    assert_figure(output_dir / "curves.png", (6.4, 3 * 2.6 + 0.5))
    assert_figure(output_dir / "label_heatmap.png", (3.5 + 0.35 * 10, 1.6 + 0.22 * 4))
    # The per-layer table: the exported MLP's 4 weight tensors, adding up to its size.
    layers = summary["layers"]
    assert [row["shape"] for row in layers] == [[64, 128], [128], [128, 10], [10]]
    assert sum(row["parameters"] for row in layers) == summary["model_params"]
    assert sum(row["kept"] for row in layers) == summary["final_nonzero_params"]
    for row in layers:
        assert row["sparsity"] == pytest.approx(1 - row["kept"] / row["parameters"])
        assert row["bytes_stored"] <= row["bytes_dense"] == 4 * row["parameters"]


@pytest.mark.slow
def test_exported_model_loads_with_plain_keras_at_the_reported_sparsity(smoke_run, tmp_path):
    """model/model.h5 loads with `tf.keras.models.load_model` in a process without fedprune."""
    output_dir, _ = smoke_run
    code = textwrap.dedent("""
        import json, sys
        import numpy as np
        import tensorflow as tf
        model = tf.keras.models.load_model(sys.argv[1], compile=False)
        kernels = [w.numpy() for layer in model.layers for w in layer.weights
                   if w.name.endswith("kernel:0")]
        print(json.dumps({
            "layers": [type(layer).__name__ for layer in model.layers],
            "weights": [w.name for w in model.weights],
            "zeros": int(sum(k.size - np.count_nonzero(k) for k in kernels)),
            "kernel_size": int(sum(k.size for k in kernels)),
            "fedprune_imported": any(m.startswith("fedprune") for m in sys.modules),
        }))
    """)
    # Run outside the repo, so nothing but the installed packages is importable from cwd.
    result = subprocess.run([sys.executable, "-c", code, str(output_dir / "model" / "model.h5")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads(result.stdout.splitlines()[-1])
    assert not info["fedprune_imported"]
    assert info["layers"] == ["Flatten", "Dense", "Dense"], info["layers"]
    assert not [w for w in info["weights"] if any(
        s in w for s in ("prune_low_magnitude", "mask", "threshold", "pruning_step"))]
    summary = json.loads((output_dir / "summary.json").read_text())
    assert info["zeros"] / info["kernel_size"] == summary["final_global_sparsity"]
    assert summary["final_global_sparsity"] > 0.5  # the schedule really pruned


# ----------------------------------------------------------------------------
# --prune_granularity=step, end to end: the mapping in config.json, the columns.


@pytest.mark.slow
def test_step_run_records_its_round_to_step_mapping(tmp_path, tff_local_context):
    """In-process (`loop.run_experiment`, what the CLI calls after its flags)."""
    from fedprune.program import loop

    # 4 clients of 172, 384, 500 and 381 digits (Dirichlet 0.5, seed 0): 11, 24, 32
    # and 24 steps of 16, mean 22.75 -> 23 steps per round (tests/test_step_pruning.py).
    output_dir = tmp_path / "run"
    config = ExperimentConfig(prune_granularity="step", masking="client", rounds=2,
                              end_round=2, num_clients=4, clients_per_round=4,
                              **CHEAP_OUTPUTS).validate()
    loop.run_experiment(config, output_dir, log=lambda line: None)
    saved = json.loads((output_dir / "config.json").read_text())
    assert saved["config"]["prune_granularity"] == "step"
    assert saved["config"]["steps_per_round"] == 0  # the flag; the resolved value:
    steps = saved["pruning_steps"]
    assert {k: steps[k] for k in ("prune_granularity", "steps_per_round", "begin_step",
                                  "end_step", "frequency", "schedule_class")} == dict(
        prune_granularity="step", steps_per_round=23, begin_step=23, end_step=46,
        frequency=1, schedule_class="PolynomialDecay")
    assert "mean over the training clients" in steps["source"]
    # figures=False (--nofigures): partition.json and the rest, but no figure.
    assert (output_dir / "partition.json").is_file()
    assert (output_dir / "summary.json").is_file()
    assert not sorted(output_dir.rglob("*.png")) + sorted(output_dir.rglob("*.pdf"))
    with open(output_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    # 0 -> 0.8 over steps 23..46, cubic: 0 after round 1 (step 23), 0.8 after round 2.
    assert [float(r["target_sparsity"]) for r in rows] == pytest.approx([0.0, 0.8])
    # The last round: every client ends past step 46 except the one of 11 steps
    # (34), so the clients' mean is below 0.8 and their union below that.
    last = rows[-1]
    assert 0.5 < float(last["client_sparsity"]) < 0.8
    assert float(last["global_sparsity"]) < float(last["client_sparsity"])

