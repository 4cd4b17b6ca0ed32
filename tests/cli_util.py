"""Helpers of the driver tests: read `-X importtime` output, snapshot folders."""

from __future__ import annotations

from pathlib import Path

TIMEOUT_S = 600  # a hang guard only: a loaded 2-core box is slow, never this slow
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
