"""What every driver's command line shares: topics, --help, --only_check_args.

Each case runs the real driver in a subprocess (the drivers define clashing
flags, so they cannot share one process) under `python -X importtime`, which
shows that TensorFlow was not imported. Nothing waits on the clock; the
timeouts are hang guards. `experiments.run`'s own cases are in
test_run_driver.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_util import CHEAP_FLAGS, EXPERIMENT_TOPICS, LAST_TOPICS, TIMEOUT_S, exit_lines, tree

REPO_ROOT = Path(__file__).resolve().parents[1]
DRIVERS = ("run", "compare_schedules", "reproduce", "benchmark")
# Topic headers --help shows, in order.
TOPICS = {
    "run": EXPERIMENT_TOPICS + LAST_TOPICS,
    "compare_schedules": EXPERIMENT_TOPICS + ["grid (one cell per combination):"] + LAST_TOPICS,
    "reproduce": ["table:"] + LAST_TOPICS,
    "benchmark": EXPERIMENT_TOPICS + ["sections:", "speed section:", "scale section:",
                                      "quality section:"] + LAST_TOPICS,
}
# Flags each driver defines but refuses on the command line: --help names them as such.
REFUSED = {"run": [], "compare_schedules": ["--schedule", "--seed", "--regrow",
                                            "--sparsity_distribution"],
           "reproduce": ["--flagfile", "the experiment flags"],
           "benchmark": ["--masking", "--schedule"]}


def _driver(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", f"experiments.{module}",
                           *CHEAP_FLAGS, *args], cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.mark.parametrize("module", DRIVERS)
def test_every_flag_of_every_driver_has_a_topic(module):
    code = textwrap.dedent(f"""
        import json
        from absl import flags
        import experiments.{module}
        from experiments import usage
        usage.define_command_line_flags()
        print(json.dumps({{"without_topic": usage.flags_without_topic(),
                          "defined": sorted({{flags.FLAGS[n].name for n in flags.FLAGS}})}}))
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True,
                            text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout)
    assert found["without_topic"] == []
    assert {"help", "helpfull", "only_check_args", "verbose", "tff_workers"} <= set(
        found["defined"])
    # absl's flags that no driver honours are not defined at all.
    assert not {"verbosity", "logtostderr", "log_dir", "run_with_pdb", "pdb_post_mortem",
                "run_with_profiling", "profile_file", "helpxml"} & set(found["defined"])


@pytest.mark.parametrize("module", DRIVERS)
def test_help_exits_0_with_the_drivers_topics_and_no_tensorflow(module, tmp_path):
    result = _driver(module, "--help", cwd=tmp_path)
    assert exit_lines(result, 0) == []
    assert not any(tmp_path.iterdir())
    lines = result.stdout.splitlines()
    assert [line for line in lines if line in TOPICS[module]] == TOPICS[module]
    assert "without a topic (a bug):" not in lines
    refused = result.stdout.split("\nnot accepted here:\n")
    assert (len(refused) == 2) == bool(REFUSED[module])
    for text in REFUSED[module]:
        assert text in refused[1] and f"  {text}=" not in refused[0]


def test_compare_schedules_help_lists_the_grid_flags_in_order(tmp_path):
    lines = _driver("compare_schedules", "--help", cwd=tmp_path).stdout.splitlines()
    topic = lines[lines.index("grid (one cell per combination):") + 1:]
    topic = topic[:topic.index("")]
    assert [line.split("=")[0].strip() for line in topic if line.startswith("  --")] == [
        "--schedules", "--powers", "--final_sparsities", "--maskings", "--prune_granularities",
        "--sparsity_distributions", "--regrows", "--regrow_ats", "--dp_noise_multipliers",
        "--upload_quantizations", "--seeds"]


def _valid_args(module: str, tmp_path: Path) -> list[str]:
    return {
        "run": [f"--output_dir={tmp_path}/run"],
        "compare_schedules": ["--schedules=none,oneshot", "--final_sparsities=0.5",
                              "--maskings=server", "--seeds=0,1", "--rounds=2",
                              "--num_clients=4", "--clients_per_round=4", "--end_round=2",
                              f"--output_dir={tmp_path}/grid"],
        "reproduce": ["--table=1", "--size=ci", f"--output_dir={tmp_path}/table1"],
        "benchmark": ["--sections=speed,scale,quality", "--write",
                      f"--output={tmp_path}/BENCHMARKS.md"],
    }[module]


@pytest.mark.parametrize("module", DRIVERS)
def test_only_check_args_exits_0_on_valid_input_and_writes_nothing(module, tmp_path):
    workdir = tmp_path / "cwd"  # default output folders are relative to it
    workdir.mkdir()
    before = tree(REPO_ROOT / "runs") if (REPO_ROOT / "runs").is_dir() else None
    result = _driver(module, "--only_check_args", *_valid_args(module, tmp_path), cwd=workdir)
    assert exit_lines(result, 0) == [] and result.stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["cwd"] and not any(workdir.iterdir())
    after = tree(REPO_ROOT / "runs") if (REPO_ROOT / "runs").is_dir() else None
    assert after == before


BAD = [
    # (driver, args, the flag the line names)
    ("run", ["--dp=fixed", "--masking=both"], "dp"),
    ("compare_schedules", ["--seed=3", "--output_dir={tmp}/grid"], "seed"),
    ("compare_schedules", ["--final_sparsities=0.5,1.5", "--output_dir={tmp}/grid"],
     "final_sparsities"),
    ("compare_schedules", ["--maskings=server", "--regrows=random", "--regrow_ats=client",
                           "--output_dir={tmp}/grid"], "regrow_ats"),
    ("compare_schedules", ["--regrow=random", "--output_dir={tmp}/grid"], "regrow"),
    ("reproduce", ["--table=1", "--rounds=5"], "rounds"),
    ("reproduce", ["--table=9"], "table"),
    ("benchmark", ["--sections=speed,bogus"], "sections"),
    ("benchmark", ["--masking=none"], "masking"),
    ("benchmark", ["--write", "--output={tmp}/no/such/folder/B.md"], "output"),
    ("benchmark", ["--verbosity=1"], "verbosity"),
]


@pytest.mark.parametrize(("module", "args", "flag"), BAD,
                         ids=[f"{m}-{f}" for m, _, f in BAD])
def test_only_check_args_exits_2_with_one_line_on_bad_input(module, args, flag, tmp_path):
    args = [a.format(tmp=tmp_path) for a in args]
    result = _driver(module, "--only_check_args", *args, cwd=tmp_path)
    stderr_lines = exit_lines(result, 2)
    assert len(stderr_lines) == 1 and stderr_lines[0].startswith(f"error: --{flag}"), (
        stderr_lines)
    assert not any(tmp_path.iterdir())
