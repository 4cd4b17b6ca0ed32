"""--extensions: a user's module registers a schedule, a criterion, a dataset, a table.

`tests/toy_extension.py` is such a module; nothing in fedprune names it. The
drivers import it while parsing flags, so `toy` becomes a value of
--schedule, --mask_criterion and --dataset. The flag cases run the real
drivers under `python -X importtime` (no TensorFlow before the checks); the
end-to-end case trains 2 rounds with the toy schedule and criterion and
checks the numbers they imply: metrics.csv's per-round sparsity is the
schedule's, and every exported kernel is nonzero exactly on its first k
entries, the criterion's pattern.
"""

from __future__ import annotations

import csv
import importlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from cli_util import CHEAP_FLAGS, TIMEOUT_S, exit_lines

REPO_ROOT = Path(__file__).resolve().parents[1]
TOY = Path(__file__).resolve().parent / "toy_extension.py"
TOY_RUN = ["--schedule=toy", "--mask_criterion=toy", "--masking=server", "--rounds=2",
           "--end_round=2", "--final_sparsity=0.5", "--num_clients=2", "--clients_per_round=2"]


def _driver(module: str, *args: str, cwd: Path, env: dict | None = None,
            importtime: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *(["-X", "importtime"] if importtime else []),
                           "-m", f"experiments.{module}", *CHEAP_FLAGS, *args], cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, **(env or {})})


# --------------------------------------------------------------------------
# Flags: before TensorFlow, one line on error.


def test_help_lists_the_extensions_names_with_their_help(tmp_path):
    result = _driver("run", f"--extensions={TOY}", "--help", cwd=tmp_path)
    assert exit_lines(result, 0) == []
    lines = result.stdout.splitlines()
    assert "  --schedule=none|constant|polynomial|oneshot|toy  (default: polynomial)" in lines
    assert "  --mask_criterion=magnitude|threshold|relative|toy  (default: magnitude)" in lines
    assert any(line.startswith("  --dataset=digits|") and "|toy  " in line for line in lines)
    assert "toy: equal steps to --final_sparsity" in " ".join(result.stdout.split())


@pytest.mark.parametrize("how", ["path", "module", "environment"])
def test_extension_names_are_valid_flag_values_before_tensorflow(how, tmp_path):
    args, env = {
        "path": ([f"--extensions={TOY}"], {}),
        "module": (["--extensions=toy_extension"], {"PYTHONPATH": str(TOY.parent)}),
        "environment": ([], {"FEDPRUNE_EXTENSIONS": str(TOY)}),
    }[how]
    result = _driver("run", "--only_check_args", *args, *TOY_RUN, "--dataset=toy",
                     f"--output_dir={tmp_path}/run", cwd=tmp_path, env=env)
    assert exit_lines(result, 0) == [] and result.stdout == ""
    assert not any(tmp_path.iterdir())


def test_grid_accepts_an_extensions_schedule(tmp_path):
    result = _driver("compare_schedules", "--only_check_args", f"--extensions={TOY}",
                     "--schedules=none,toy", "--final_sparsities=0.5", "--maskings=server",
                     "--seeds=0", "--rounds=2", "--end_round=2", "--mask_criterion=toy",
                     f"--output_dir={tmp_path}/grid", cwd=tmp_path)
    assert exit_lines(result, 0) == []


BAD = [
    # (args, the flag the one line names)
    (["--schedule=toy"], "--schedule"),  # not registered without the extension
    ([f"--extensions={TOY}", "--schedule=toy", "--end_round=0", "--begin_round=0"],
     "--end_round"),  # the toy schedule's own check
    ([f"--extensions={TOY}", "--mask_criterion=toy", "--mask_scope=global"], "--mask_scope"),
    (["--extensions=no_such_module_xyz"], "--extensions"),
    ([f"--extensions={TOY.parent}/no_such_file.py"], "--extensions"),
]


@pytest.mark.parametrize(("args", "flag"), BAD, ids=[f"{a[-1]}" for a, _ in BAD])
def test_bad_extension_input_is_one_line_exit_2(args, flag, tmp_path):
    result = _driver("run", "--only_check_args", *args, cwd=tmp_path)
    lines = exit_lines(result, 2)
    assert len(lines) == 1 and lines[0].startswith(f"error: {flag}="), lines


def test_a_table_registered_by_an_extension_is_checked_by_reproduce(tmp_path):
    """A table of one's own: its spec in a module, its flagfiles beside it (docs/extending.md)."""
    (tmp_path / "my_table.py").write_text(textwrap.dedent("""
        from pathlib import Path

        from experiments import tables

        tables.register_table(tables.TableSpec(
            number=9, title="Table 9: the toy schedule against polynomial",
            description="Toy.", metrics=("accuracy", "sparsity"),
            tolerances={"accuracy": 0.02, "sparsity": 1e-6}, configs=Path(__file__).parent))
    """))
    (tmp_path / "table9.flags").write_text(
        f"--extensions={TOY}\n--schedules=none,polynomial,toy\n--final_sparsities=0.5\n"
        "--maskings=server\n--seeds=0\n--rounds=4\n--end_round=4\n")
    (tmp_path / "table9_ci.flags").write_text("--rounds=2\n--end_round=2\n--num_clients=2\n"
                                              "--clients_per_round=2\n")
    args = [f"--extensions={tmp_path}/my_table.py", "--table=9", "--size=ci", "--write_results",
            f"--output_dir={tmp_path}/runs"]
    help_ = _driver("reproduce", args[0], "--help", cwd=tmp_path)
    assert "9: the toy schedule against polynomial." in " ".join(help_.stdout.split())
    result = _driver("reproduce", "--only_check_args", *args, cwd=tmp_path)
    assert exit_lines(result, 0) == []
    assert not (tmp_path / "runs").exists()


# --------------------------------------------------------------------------
# The toy dataset, in this process.


@pytest.fixture
def toy_module(monkeypatch):
    """tests/toy_extension.py imported in this process, so `toy` is registered until the
    test ends; then the registries are as they were (tests/test_datasets.py lists the
    built-in datasets, and may run later in the same pytest worker)."""
    from fedprune.data import datasets
    from fedprune.pruning import masking, schedules

    for registry in (schedules.SCHEDULES, masking.CRITERIA, datasets.DATASETS):
        monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.syspath_prepend(str(TOY.parent))
    sys.modules.pop("toy_extension", None)  # imported afresh: it registers `toy` again
    yield importlib.import_module("toy_extension")
    sys.modules.pop("toy_extension", None)


@pytest.mark.usefixtures("toy_module")
def test_toy_dataset_loads_through_the_registry():
    from fedprune.config import ExperimentConfig
    from fedprune.data import datasets

    config = ExperimentConfig(dataset="toy", num_clients=3, clients_per_round=3).validate()
    data = config.dataset_loader().load()
    assert data.input_shape == (8,) and data.num_classes == 4
    assert [data.num_examples(c) for c in data.client_ids] == [40, 40, 40]
    assert len(data.test_y) == 100
    again = datasets.load_dataset("toy", num_clients=3, seed=0)
    np.testing.assert_array_equal(again.test_x, data.test_x)


# --------------------------------------------------------------------------
# End to end: two rounds with the toy schedule and criterion.


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("toy") / "run"
    result = _driver("run", f"--extensions={TOY}", *TOY_RUN, f"--output_dir={output_dir}",
                     cwd=REPO_ROOT, importtime=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


@pytest.mark.slow
def test_metrics_sparsity_is_the_toy_schedules(toy_run, toy_module):
    with open(toy_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # EqualSteps(0.5, end_round=2): 0.5 * r / 2 after round r. Both kernels (64x128 and
    # 128x10) keep exactly num_kept(N, s) weights, N * (1 - s) here, so the global
    # sparsity is s itself.
    schedule = toy_module.EqualSteps(final_sparsity=0.5, end_round=2)
    expected = [schedule(r)[1] for r in (1, 2)]
    assert expected == [0.25, 0.5]
    assert [int(r["round"]) for r in rows] == [1, 2]
    np.testing.assert_allclose([float(r["global_sparsity"]) for r in rows], expected, atol=1e-9)


@pytest.mark.slow
def test_exported_kernels_follow_the_toy_criterion(toy_run):
    import h5py

    kernels = {}

    def keep_kernel(name, obj):  # returns None: visititems stops at the first other value
        if name.endswith("kernel:0"):
            kernels[name] = np.asarray(obj)

    with h5py.File(toy_run / "model" / "model.h5", "r") as f:
        f["model_weights"].visititems(keep_kernel)
    assert sorted(k.shape for k in kernels.values()) == [(64, 128), (128, 10)]
    for name, kernel in kernels.items():
        flat = kernel.ravel()  # row-major, as the criterion counts
        k = flat.size // 2  # round(N * (1 - 0.5)) after round 2
        assert np.count_nonzero(flat[:k]) == k, name  # trained weights are never exactly 0
        assert not flat[k:].any(), name


@pytest.mark.slow
def test_run_files_record_the_extension(toy_run):
    flag_lines = [line for line in (toy_run / "flags.txt").read_text().splitlines()
                  if line.startswith("--")]
    assert flag_lines[0] == f"--extensions={TOY}"  # first: it registers the names below
    assert "--schedule=toy" in flag_lines and "--mask_criterion=toy" in flag_lines
    config = json.loads((toy_run / "config.json").read_text())
    assert config["provenance"]["extensions"] == [str(TOY)]
    assert config["config"]["schedule"] == "toy"
