"""Provenance of a run: what its numbers depend on beyond its settings.

Package versions (every installed package that can change a number a run
writes), the checkout's git commit, the uv.lock hash and the CPU model; the
example-index digests come from `datasets.example_index_digests`. config.json
records them (`run_files.write_config`); `environment_description`
(`machine_description`; `software_description`) is the one line BENCHMARKS.md
and RESULTS.md give of where their numbers were measured.

Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import hashlib
import platform
import subprocess
from pathlib import Path

# Every installed package whose version can change a number a run writes: the
# training stack (TF, Keras, TFF and what TFF computes with: jax, TF Privacy's DP
# queries, TF Probability), tfmot, the accountant, the data (scikit-learn's digits
# and split, numpy's generators, scipy), float types, and h5py (model.h5's bytes).
_RESULT_PACKAGES = ("tensorflow", "tensorflow-federated", "tensorflow-model-optimization",
                    "keras", "tensorflow-privacy", "tensorflow-probability", "dp-accounting",
                    "numpy", "scipy", "scikit-learn", "ml-dtypes", "h5py", "absl-py", "jax",
                    "jaxlib")
_REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout holding fedprune/outputs/


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


def machine_description() -> str:
    """CPU model, usable and online cores, RAM and OS of this machine, one line."""
    import os

    import psutil

    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{cpu_model() or 'unknown CPU'}, {usable} usable cores ({os.cpu_count()} online), "
            f"{psutil.virtual_memory().total / 1024**3:.1f} GiB RAM, {platform.system()} "
            f"{platform.release()}")


def software_description() -> str:
    """The versions that decide speed and results, one line: Python, TF, TFF, tfmot, numpy."""
    v = package_versions()
    return (f"Python {v['python']}, TensorFlow {v['tensorflow']}, "
            f"TFF {v['tensorflow-federated']}, tfmot {v['tensorflow-model-optimization']}, "
            f"numpy {v['numpy']}")


def environment_description() -> str:
    """Where numbers were measured, one line: `machine_description`; `software_description`."""
    return f"{machine_description()}; {software_description()}"
