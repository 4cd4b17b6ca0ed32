"""`DataStepSchedule` is tfmot's step schedule, bit for bit, with its parameters as data.

Every case evaluates tfmot's own `PolynomialDecay` / `ConstantSparsity` and the
data schedule at every step from -1 past the end, with the parameters as
constants (`defaults`) and as traced inputs of one `tf.function` (`bound`: how
the client work runs it), and compares the bits of `(should_prune, sparsity)`.
"""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from fedprune.pruning import step_schedule_data
from fedprune.pruning.step_schedule_data import FIELDS, DataStepSchedule

keras = tfmot.sparsity.keras

SCHEDULES = {
    "polynomial 0->0.8 cubic": keras.PolynomialDecay(0.0, 0.8, begin_step=8, end_step=40,
                                                      power=3, frequency=4),
    "polynomial 0.1->0.95 linear, from 0": keras.PolynomialDecay(
        0.1, 0.95, begin_step=0, end_step=21, power=1, frequency=1),
    "polynomial power 2.5, odd span": keras.PolynomialDecay(0.3, 0.7, begin_step=3,
                                                            end_step=110, power=2.5,
                                                            frequency=107),
    "polynomial 0.5->0.9, long": keras.PolynomialDecay(0.5, 0.9, begin_step=31, end_step=931,
                                                       power=3, frequency=3),
    "constant forever": keras.ConstantSparsity(0.5, begin_step=6, end_step=-1, frequency=6),
    "constant, one step (oneshot)": keras.ConstantSparsity(0.9, begin_step=12, end_step=12,
                                                           frequency=1),
    "constant window": keras.ConstantSparsity(0.75, begin_step=0, end_step=30, frequency=5),
}


def _steps(schedule) -> np.ndarray:
    end = schedule.end_step if schedule.end_step >= 0 else schedule.begin_step + 50
    return np.arange(-1, end + 25, dtype=np.int64)


def _bits(should, sparsity) -> tuple[np.ndarray, np.ndarray]:
    return (np.asarray(should, bool),
            np.broadcast_to(np.asarray(sparsity, np.float32), np.shape(should)).view(np.int32))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_equals_tfmot_at_every_step_bit_for_bit(name):
    schedule = SCHEDULES[name]
    steps = _steps(schedule)
    expected = _bits(*zip(*[schedule(tf.constant(s)) for s in steps], strict=True))
    data = step_schedule_data.step_schedule_data(schedule)
    ours = DataStepSchedule(data)

    as_constants = _bits(*zip(*[ours(tf.constant(s)) for s in steps], strict=True))

    @tf.function
    def as_inputs(step, values):  # the parameters as graph inputs: nothing folds them
        with ours.bound(values):
            return ours(step)

    values = {k: tf.constant(v) for k, v in data.items()}
    traced = _bits(*zip(*[as_inputs(tf.constant(s), values) for s in steps], strict=True))
    assert expected[0].any()  # the schedule prunes somewhere in the range
    for got in (as_constants, traced):
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert ours._bound is None  # the binding ends with its block


def test_one_trace_serves_every_schedule():
    """One `tf.function` trace, fed each schedule's data, is each tfmot schedule."""
    ours = DataStepSchedule(step_schedule_data.step_schedule_data(SCHEDULES["constant window"]))

    signature = {k: tf.TensorSpec([], dtype) for k, dtype in FIELDS.items()}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.int64), signature])
    def at_steps(steps, values):
        with ours.bound(values):
            return tf.map_fn(lambda s: ours(s), steps,
                             fn_output_signature=(tf.bool, tf.float32))

    for schedule in SCHEDULES.values():
        steps = _steps(schedule)
        data = step_schedule_data.step_schedule_data(schedule)
        got = _bits(*at_steps(tf.constant(steps), {k: tf.constant(v) for k, v in data.items()}))
        expected = _bits(*zip(*[schedule(tf.constant(s)) for s in steps], strict=True))
        np.testing.assert_array_equal(got[0], expected[0])
        np.testing.assert_array_equal(got[1], expected[1])
    assert at_steps.experimental_get_tracing_count() == 1


def test_data_fields_and_dtypes():
    data = step_schedule_data.step_schedule_data(SCHEDULES["polynomial 0->0.8 cubic"])
    assert list(data) == list(FIELDS)
    assert [v.dtype for v in data.values()] == [np.dtype(d) for d in FIELDS.values()]
    assert (data["begin_step"], data["end_step"], data["frequency"]) == (8, 40, 4)
    assert data["decays"] and data["power"] == np.float32(3.0)
    assert data["initial_minus_final"] == np.float32(0.0 - 0.8)
    constant = step_schedule_data.step_schedule_data(SCHEDULES["constant forever"])
    assert not constant["decays"] and constant["end_step"] == -1
    assert constant["final_sparsity"] == np.float32(0.5)
    assert DataStepSchedule(data).get_config()["config"]["defaults"]["end_step"] == 40


def test_other_schedule_classes_are_refused():
    class Custom(keras.PruningSchedule):
        def __call__(self, step):
            return tf.constant(True), tf.constant(0.5)

        def get_config(self):
            return {}

    with pytest.raises(TypeError, match="Custom"):
        step_schedule_data.step_schedule_data(Custom())
