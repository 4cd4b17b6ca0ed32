"""A client-step schedule whose parameters are data: one traced process per step grid.

With `--prune_granularity=step` the clients' tfmot wrappers prune with a
schedule in client steps (`step_schedule.py`). tfmot's `PolynomialDecay` and
`ConstantSparsity` hold their parameters as Python numbers, which a traced
computation bakes in as constants: every schedule, final sparsity and step
mapping (which follows the data's partition) would need its own trace.
`DataStepSchedule` is both classes in one `tfmot` `PruningSchedule` whose
parameters are tensors the client work passes in from its state
(`step_pruning.py`), so a grid's step cells share one built process
(`process.PruningProcess.for_cell` writes each cell's parameters into it).

It computes what tfmot computes, with the same TensorFlow ops in the same
order and dtypes: bit for bit the same `(should_prune, sparsity)` at every step
(tests/test_step_schedule_data.py compares them at every step of a range of
schedules). The data (`step_schedule_data`, numpy scalars):

    begin_step, end_step, frequency   int64, tfmot's step arguments
    decays                            bool: PolynomialDecay (True) or ConstantSparsity
    initial_minus_final               float32(initial - final), as tfmot's Python
                                      subtraction rounds it (0 for ConstantSparsity)
    final_sparsity                    float32 (ConstantSparsity: its target)
    power                             float32 (1 for ConstantSparsity, unused)

This module imports TensorFlow and tfmot: import it only where they are loaded.
"""

from __future__ import annotations

import collections
import contextlib

import numpy as np
import tensorflow as tf
import tensorflow_model_optimization as tfmot

# The fields of `step_schedule_data`, in order, with their numpy dtypes.
FIELDS = collections.OrderedDict(
    begin_step=np.int64, end_step=np.int64, frequency=np.int64, decays=np.bool_,
    initial_minus_final=np.float32, final_sparsity=np.float32, power=np.float32)


def step_schedule_data(schedule) -> collections.OrderedDict:
    """The data of a tfmot `PolynomialDecay` or `ConstantSparsity` (see the module docstring).

    Raises:
      TypeError: for another schedule class.
    """
    keras = tfmot.sparsity.keras
    if isinstance(schedule, keras.PolynomialDecay):
        values = dict(begin_step=schedule.begin_step, end_step=schedule.end_step,
                      frequency=schedule.frequency, decays=True,
                      initial_minus_final=schedule.initial_sparsity - schedule.final_sparsity,
                      final_sparsity=schedule.final_sparsity, power=schedule.power)
    elif isinstance(schedule, keras.ConstantSparsity):
        values = dict(begin_step=schedule.begin_step, end_step=schedule.end_step,
                      frequency=schedule.frequency, decays=False, initial_minus_final=0.0,
                      final_sparsity=schedule.target_sparsity, power=1.0)
    else:
        raise TypeError(f"no step schedule data for {type(schedule).__name__}: "
                        "PolynomialDecay or ConstantSparsity")
    return collections.OrderedDict((k, dtype(values[k])) for k, dtype in FIELDS.items())


class DataStepSchedule(tfmot.sparsity.keras.PruningSchedule):
    """tfmot's `PolynomialDecay` / `ConstantSparsity` with its parameters as tensors.

    Called by tfmot's wrapper (`pruning_impl.Pruning`) with the wrapper's
    `pruning_step` (int64). It reads the tensors `bound` gives while a
    computation is traced, else its `defaults` as constants (then it is the
    tfmot schedule they came from).
    """

    def __init__(self, defaults: collections.OrderedDict):
        """`defaults`: `step_schedule_data` of the schedule used outside `bound`."""
        self.defaults = collections.OrderedDict((k, FIELDS[k](defaults[k])) for k in FIELDS)
        self._bound = None

    @contextlib.contextmanager
    def bound(self, data):
        """Within the block, the schedule reads `data` (tensors of `FIELDS`' dtypes).

        Wrap everything that builds and traces the wrapped model's training in it.
        """
        previous, self._bound = self._bound, data
        try:
            yield self
        finally:
            self._bound = previous

    def _data(self) -> dict:
        if self._bound is not None:
            return {k: tf.convert_to_tensor(self._bound[k], dtype) for k, dtype in FIELDS.items()}
        return {k: tf.constant(v) for k, v in self.defaults.items()}

    def __call__(self, step):
        p = self._data()
        begin, end = p["begin_step"], p["end_step"]
        should = self._should_prune_in_step(step, begin, end, p["frequency"])
        # tfmot's PolynomialDecay.__call__, op for op (its Python numbers become float32
        # constants where these are float32 tensors); a ConstantSparsity's end_step may be
        # -1 or equal begin_step, so its span is replaced by 1 where it does not decay.
        span = tf.where(p["decays"], end - begin, tf.ones_like(end))
        with tf.name_scope("polynomial_decay_pruning_schedule"):
            progress = tf.math.minimum(1.0, tf.math.maximum(
                0.0, tf.math.divide(tf.cast(step - begin, tf.float32),
                                    tf.cast(span, tf.float32))))
            decayed = tf.math.add(
                tf.math.multiply(p["initial_minus_final"],
                                 tf.math.pow(1 - progress, p["power"])),
                p["final_sparsity"], name="sparsity")
        return should, tf.where(p["decays"], decayed, p["final_sparsity"])

    def get_config(self):
        return {"class_name": type(self).__name__,
                "config": {"defaults": {k: v.item() for k, v in self.defaults.items()}}}
