"""Atomic checkpoints of a learning process's state (no pickle).

A checkpoint is one `.npz` file holding every leaf of the state (global
weights with masks, server optimizer state, round counters) plus a JSON header
(round, config fingerprint, leaf shapes and dtypes). It is written to a
temporary file in the same directory, fsynced and renamed into place
(`fedprune.outputs.atomic_files`), so a kill
at any moment leaves either the previous checkpoint or the new one, never a
truncated file. Loading checks the header against the expected structure and
refuses a checkpoint from other flags or another model with a clear error.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from fedprune.outputs import atomic_files

_NAME = re.compile(r"^round_(\d{6})\.npz$")


class CheckpointError(RuntimeError):
    """A checkpoint is unreadable or does not match this experiment."""


def _leaves(structure) -> list:
    import tensorflow as tf

    return [np.asarray(leaf) for leaf in tf.nest.flatten(structure)]


def save(directory, round_num: int, state, *, fingerprint: str, keep: int = 2) -> Path:
    """Writes `round_<round_num>.npz` atomically; keeps the newest `keep` checkpoints.

    Args:
      directory: the checkpoint folder (created if missing).
      round_num: completed rounds in `state`.
      state: the process state (any `tf.nest` structure of arrays).
      fingerprint: `ExperimentConfig.fingerprint()`, checked on load.
      keep: how many checkpoints to keep (>= 1).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    leaves = _leaves(state)
    header = {
        "round": round_num,
        "fingerprint": fingerprint,
        "leaves": [[list(a.shape), a.dtype.str] for a in leaves],
    }
    arrays = {f"leaf_{i:05d}": a for i, a in enumerate(leaves)}
    arrays["header"] = np.array(json.dumps(header))
    path = directory / f"round_{round_num:06d}.npz"
    with atomic_files.atomic_writer(path) as f:
        np.savez(f, **arrays)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink()
    return path


def list_checkpoints(directory) -> list[Path]:
    """Checkpoint files in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if _NAME.match(p.name))


def _read_newest(directory, fingerprint: str):
    """The newest checkpoint as (path, round, leaves) after the file and fingerprint checks.

    None when there is no checkpoint. Reads with numpy only.
    """
    paths = list_checkpoints(directory)
    if not paths:
        return None
    path = paths[-1]
    try:
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header"]))
            leaves = [data[f"leaf_{i:05d}"] for i in range(len(header["leaves"]))]
            written_by, round_num = str(header["fingerprint"]), int(header["round"])
    except Exception as e:  # zipfile, KeyError, ValueError, JSON...: all mean corrupt
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                              "delete it to resume from the one before, or use --overwrite") from e
    if written_by != fingerprint:
        raise CheckpointError(
            f"checkpoint {path} was written by a run with different flags "
            f"(fingerprint {written_by} != {fingerprint}); use another --output_dir "
            "or --overwrite")
    return path, round_num, leaves


def check_latest(directory, *, fingerprint: str) -> int:
    """Checks the newest checkpoint without TensorFlow, so `--resume` fails before the import.

    Returns:
      Its round, or 0 when there is no checkpoint.

    Raises:
      CheckpointError: when the file is corrupt or was written with another
        configuration (the structure is checked by `load_latest`).
    """
    newest = _read_newest(directory, fingerprint)
    return 0 if newest is None else newest[1]


def load_latest(directory, template, *, fingerprint: str):
    """Loads the newest checkpoint into the structure of `template`.

    Returns:
      (state, round_num), or (None, 0) when there is no checkpoint.

    Raises:
      CheckpointError: when the file is corrupt, was written with another
        configuration (fingerprint) or has another structure (model).
    """
    import tensorflow as tf

    newest = _read_newest(directory, fingerprint)
    if newest is None:
        return None, 0
    path, round_num, leaves = newest
    expected = _leaves(template)
    found = [(list(a.shape), a.dtype.str) for a in leaves]
    wanted = [(list(a.shape), a.dtype.str) for a in expected]
    if found != wanted:
        raise CheckpointError(f"checkpoint {path} holds another model or process structure "
                              f"({len(found)} tensors, expected {len(wanted)} of other shapes)")
    return tf.nest.pack_sequence_as(template, leaves), round_num
