"""`fedprune.program.checkpoint`: save, load_latest, check_latest, refusals.

TensorFlow's `tf.nest` only (no TFF, no subprocess).
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from fedprune.program import checkpoint

# ----------------------------------------------------------------------------
# checkpoint.save / load_latest (TensorFlow's tf.nest, no TFF, no subprocess).


def _state(scale: float = 1.0):
    return {
        "model": ([scale * np.arange(6, dtype=np.float32).reshape(2, 3),
                   np.ones(3, np.float32)],
                  (np.zeros((2, 3), np.float32), np.int64(7))),
        "optimizer": {"step": np.int32(3), "lr": np.float32(0.5 * scale)},
        "round": np.int32(2),
    }


def _assert_equal_structures(a, b) -> None:
    import tensorflow as tf

    tf.nest.assert_same_structure(a, b)
    for x, y in zip(tf.nest.flatten(a), tf.nest.flatten(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)


def test_checkpoint_round_trip_of_a_nested_state(tmp_path):
    state = _state(2.0)
    path = checkpoint.save(tmp_path, 5, state, fingerprint="abc")
    assert path.name == "round_000005.npz"
    loaded, round_num = checkpoint.load_latest(tmp_path, _state(), fingerprint="abc")
    assert round_num == 5
    _assert_equal_structures(loaded, state)
    assert checkpoint.check_latest(tmp_path, fingerprint="abc") == 5  # the numpy-only check
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


def test_checkpoint_without_files_loads_nothing(tmp_path):
    assert checkpoint.load_latest(tmp_path / "missing", _state(), fingerprint="abc") == (None, 0)
    assert checkpoint.load_latest(tmp_path, _state(), fingerprint="abc") == (None, 0)
    assert checkpoint.check_latest(tmp_path, fingerprint="abc") == 0


def test_checkpoint_keeps_the_newest_two(tmp_path):
    for r in range(5):
        checkpoint.save(tmp_path, r, _state(float(r)), fingerprint="abc", keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "round_000003.npz", "round_000004.npz"]
    loaded, round_num = checkpoint.load_latest(tmp_path, _state(), fingerprint="abc")
    assert round_num == 4
    _assert_equal_structures(loaded, _state(4.0))


def test_checkpoint_from_other_flags_is_refused(tmp_path):
    checkpoint.save(tmp_path, 1, _state(), fingerprint="abc")
    with pytest.raises(checkpoint.CheckpointError, match="different flags"):
        checkpoint.load_latest(tmp_path, _state(), fingerprint="xyz")
    with pytest.raises(checkpoint.CheckpointError, match="different flags"):
        checkpoint.check_latest(tmp_path, fingerprint="xyz")


@pytest.mark.parametrize("template", [
    {"model": ([np.zeros((3, 3), np.float32), np.ones(3, np.float32)],
               (np.zeros((2, 3), np.float32), np.int64(7))),
     "optimizer": {"step": np.int32(3), "lr": np.float32(0.5)}, "round": np.int32(2)},
    {"model": ([np.zeros((2, 3), np.float32), np.ones(3, np.float32)],
               (np.zeros((2, 3), np.float32), np.int32(7))),
     "optimizer": {"step": np.int32(3), "lr": np.float32(0.5)}, "round": np.int32(2)},
    {"model": ([np.zeros((2, 3), np.float32)], (np.zeros((2, 3), np.float32), np.int64(7))),
     "optimizer": {"step": np.int32(3), "lr": np.float32(0.5)}, "round": np.int32(2)},
], ids=["other-shape", "other-dtype", "fewer-tensors"])
def test_checkpoint_of_another_structure_is_refused(tmp_path, template):
    checkpoint.save(tmp_path, 1, _state(), fingerprint="abc")
    with pytest.raises(checkpoint.CheckpointError, match="another model or process structure"):
        checkpoint.load_latest(tmp_path, template, fingerprint="abc")


@pytest.mark.parametrize("damage", ["truncate", "empty", "garbage"])
def test_corrupt_newest_checkpoint_is_an_error_not_a_fallback(tmp_path, damage):
    checkpoint.save(tmp_path, 1, _state(), fingerprint="abc")
    newest = checkpoint.save(tmp_path, 2, _state(), fingerprint="abc")
    data = newest.read_bytes()
    newest.write_bytes({"truncate": data[: len(data) // 2], "empty": b"",
                        "garbage": os.urandom(len(data))}[damage])
    with pytest.raises(checkpoint.CheckpointError, match=r"round_000002\.npz is unreadable"):
        checkpoint.load_latest(tmp_path, _state(), fingerprint="abc")
    with pytest.raises(checkpoint.CheckpointError, match=r"round_000002\.npz is unreadable"):
        checkpoint.check_latest(tmp_path, fingerprint="abc")


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies mid-write leaves the old newest checkpoint and no temp file."""
    checkpoint.save(tmp_path, 1, _state(), fingerprint="abc")

    def savez_then_die(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, _state(3.0), fingerprint="abc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["round_000001.npz"]
    loaded, round_num = checkpoint.load_latest(tmp_path, _state(), fingerprint="abc")
    assert round_num == 1
    _assert_equal_structures(loaded, _state())
