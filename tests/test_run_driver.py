"""The `python -m experiments.run` driver: bad input, --help, and a small smoke run.

Bad input (issue 5 item 6) is rejected before TensorFlow is imported: each case
runs the real CLI under `python -X importtime`, which logs every import to
stderr, so one subprocess shows the exit status, the error line (the stderr
lines that are not import-time lines), that no `tensorflow*` module was
imported, and that nothing was written. The < 5 s bound is 2-3x above what a
loaded 2-core box needs (~0.5 s idle); `import tensorflow_federated` alone
takes ~10 s.

The smoke run (2 rounds, 4 clients, `slow`: it imports TFF) is one
module-scoped run into a folder that already holds a stale run, with
`--overwrite`; the tests below check what it left there.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from absl import flags

from experiments import common
from fedprune.config import ExperimentConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
BAD_INPUT_BOUND_S = 5.0
HELP_BOUND_S = 2.0
RUN_TIMEOUT_S = 180


def _cli(args, *, cwd: Path, importtime: bool = False, timeout_s: float = RUN_TIMEOUT_S):
    """Runs the CLI; returns (CompletedProcess, seconds). `cwd` is where it runs."""
    command = [sys.executable, *(["-X", "importtime"] if importtime else []),
               "-m", "experiments.run", *args]
    start = time.monotonic()
    result = subprocess.run(command, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, timeout=timeout_s)
    return result, time.monotonic() - start


def _split_importtime(stderr: str) -> tuple[list[str], list[str]]:
    """(modules imported, other stderr lines) from `-X importtime` output."""
    modules, other = [], []
    for line in stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":  # the header line
                modules.append(name)
        else:
            other.append(line)
    return modules, other


def _tensorflow_modules(modules: list[str]) -> list[str]:
    return [m for m in modules
            if m.split(".")[0] in ("tensorflow", "tensorflow_federated", "keras",
                                   "tensorflow_model_optimization")]


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------
# Bad input: status 2, one line naming the flag, nothing written, no TensorFlow.


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
]


@pytest.mark.parametrize(("args", "named"), [case[1:] for case in BAD_INPUT],
                         ids=[case[0] for case in BAD_INPUT])
def test_bad_input_exits_2_with_one_line_before_tensorflow(tmp_path, args, named):
    (tmp_path / "bad.flags").write_text("--rounds=3\n--final_sparsity=2\n")
    output_dir = tmp_path / "out"
    workdir = tmp_path / "cwd"  # the default --output_dir would land here (runs/...)
    workdir.mkdir()
    args = [a.format(tmp=tmp_path) for a in args]
    result, seconds = _cli([*args, f"--output_dir={output_dir}"], cwd=workdir, importtime=True)
    modules, stderr_lines = _split_importtime(result.stderr)
    assert result.returncode == 2, result.stderr[-2000:]
    assert len(stderr_lines) == 1, stderr_lines
    for flag in named:
        assert flag in stderr_lines[0], stderr_lines[0]
    assert result.stdout == ""
    assert not output_dir.exists()
    assert not any(workdir.iterdir())
    assert not _tensorflow_modules(modules)
    assert seconds < BAD_INPUT_BOUND_S


def test_existing_output_dir_needs_resume_or_overwrite(tmp_path):
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "metrics.csv").write_text("round\n1\n")
    before = _tree(output_dir)
    result, seconds = _cli(["--rounds=2", "--end_round=2", f"--output_dir={output_dir}"],
                           cwd=tmp_path, importtime=True)
    modules, stderr_lines = _split_importtime(result.stderr)
    assert result.returncode == 2
    assert len(stderr_lines) == 1 and "--output_dir" in stderr_lines[0], stderr_lines
    assert "--resume" in stderr_lines[0] and "--overwrite" in stderr_lines[0]
    assert _tree(output_dir) == before
    assert not _tensorflow_modules(modules)
    assert seconds < BAD_INPUT_BOUND_S


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
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("0 "), result.stdout


def test_help_is_fast_and_imports_no_tensorflow(tmp_path):
    result, seconds = _cli(["--help"], cwd=tmp_path, importtime=True)
    modules, _ = _split_importtime(result.stderr)
    # absl's --help prints usage to stdout and exits 1 (its HelpFlag calls sys.exit(1)).
    assert result.returncode == 1
    assert "python -m experiments.run" in result.stdout and "--output_dir" in result.stdout
    assert not _tensorflow_modules(modules)
    assert seconds < HELP_BOUND_S
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------
# One small run, end to end.


SMOKE_ROUNDS = 2
SMOKE_FLAGS = {"rounds": SMOKE_ROUNDS, "end_round": SMOKE_ROUNDS, "num_clients": 4,
               "clients_per_round": 4}
METRIC_COLUMNS = ("round", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                  "global_sparsity", "nonzero_params", "bytes_down", "bytes_up", "round_seconds")
SUMMARY_KEYS = ("final_test_accuracy", "final_global_sparsity", "total_bytes_down",
                "total_bytes_up", "wall_seconds")


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
    result, _ = _cli([*args, f"--output_dir={output_dir}", "--overwrite"], cwd=REPO_ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir, result


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
    assert list((output_dir / "tensorboard").glob("events.out.tfevents.*"))
    pngs = sorted(p.name for p in output_dir.glob("*.png"))
    assert "curves.png" in pngs and "label_heatmap.png" in pngs
    for name in pngs:
        assert (output_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


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
