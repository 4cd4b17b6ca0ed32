"""Helpers of the driver tests: read `-X importtime` output, snapshot folders, phase logs,
flagfiles."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

TIMEOUT_S = 600  # a hang guard only: a loaded 2-core box is slow, never this slow
# The outputs no test reads unless it asks: the TFLite export and its latency
# (`deploy`, ~2-4 s a run) only where tests/test_deployment.py asks for them, a run's
# figures (`figures`, ~2-4 s of matplotlib a run) only where a test reads them
# (tests/test_run_driver.py's smoke run). Output-only fields: they change no number
# and no fingerprint (tests/test_config.py). In-process configs take CHEAP_OUTPUTS;
# every driver the tests start gets CHEAP_FLAGS, the same fields as flags.
CHEAP_OUTPUTS = {"deploy": "none", "figures": False}
CHEAP_FLAGS = tuple(f"--{'' if value else 'no'}{name}" if isinstance(value, bool)
                    else f"--{name}={value}" for name, value in CHEAP_OUTPUTS.items())
# Topic headers of --help: the experiment's, then (after a driver's own) the last three.
EXPERIMENT_TOPICS = ["data:", "model:", "training and optimizers:", "schedule:",
                     "masking and criteria:", "structure:", "privacy:"]
LAST_TOPICS = ["runtime:", "outputs:", "help, checks and flagfiles:"]


def split_importtime(stderr: str) -> tuple[list[str], list[str]]:
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


def tensorflow_modules(modules: list[str]) -> list[str]:
    return [m for m in modules
            if m.split(".")[0] in ("tensorflow", "tensorflow_federated", "keras",
                                   "tensorflow_model_optimization")]


def tree(directory: Path) -> dict[str, bytes]:
    """Every file below `directory` and its bytes (folders show through their files)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def exit_lines(result, status: int) -> list[str]:
    """Checks a `-X importtime` run exited with `status` and imported no TensorFlow.

    Returns:
      Its stderr lines other than the import times.
    """
    modules, stderr_lines = split_importtime(result.stderr)
    assert result.returncode == status, stderr_lines[-20:]
    assert not tensorflow_modules(modules)
    return stderr_lines


def phases(phase_log: Path) -> list[tuple[int, str]]:
    """(CLOCK_MONOTONIC ns, phase) a run has entered, from its `FEDPRUNE_PHASE_LOG` file."""
    lines = phase_log.read_text().splitlines()
    return [(int(t), name) for t, _, name in (line.partition(" ") for line in lines)
            if name]  # a line being written has no name yet


def wait_for_phase(phase_log: Path, phase: str, process: subprocess.Popen,
                   timeout_s: float = TIMEOUT_S) -> None:
    """Returns as soon as the run has entered `phase`.

    Raises:
      AssertionError: the process exited first, or the hang guard ran out.
    """
    deadline = time.monotonic() + timeout_s
    while not any(name == phase for _, name in phases(phase_log)):
        assert process.poll() is None, (
            f"the run exited ({process.returncode}) before phase {phase!r}")
        assert time.monotonic() < deadline, f"no phase {phase!r} within {timeout_s} s"
        time.sleep(0.001)


def parse_flagfile(path: Path):
    """The `ExperimentConfig` a flagfile gives, parsed by absl into fresh flags.

    The global `flags.FLAGS` are left untouched.
    """
    from absl import flags

    from experiments import common

    flag_values = flags.FlagValues()
    common.define_experiment_flags(flag_values)
    flag_values(["prog", f"--flagfile={path}"])
    return common.config_from_flags(flag_values)
