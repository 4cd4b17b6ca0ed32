"""The compiled evaluator (`fedprune/program/evaluation.py`) against Keras' `evaluate`."""

from __future__ import annotations

import dataclasses

import pytest

from fedprune.config import ExperimentConfig
from fedprune.program import evaluation


@pytest.fixture(scope="module")
def digits():
    return ExperimentConfig().dataset_loader().load()


class _Weights:
    def __init__(self, model):
        self.trainable = [w.numpy() for w in model.trainable_weights]
        self.non_trainable = [w.numpy() for w in model.non_trainable_weights]


# 512: the digits test set (360 examples) in one partial batch; 100: three full
# batches and a partial one of 60.
@pytest.mark.parametrize("batch_size", [512, 100])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_compiled_evaluation_equals_keras_evaluate(digits, monkeypatch, name, batch_size):
    import tensorflow as tf

    from fedprune.model import builders

    monkeypatch.setattr(evaluation, "EVAL_BATCH_SIZE", batch_size)
    input_shape, classes = digits.test_x.shape[1:], int(digits.test_y.max()) + 1

    def keras_model_fn():
        return builders.build_model(name, input_shape, classes)

    evaluator = evaluation.Evaluator.create(keras_model_fn, digits)
    reference = keras_model_fn()
    reference.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
    results = []
    for seed in (0, 1, 2):  # three weight sets through one trace
        source = builders.build_model(name, input_shape, classes, seed=seed)
        weights = _Weights(source)
        loss, accuracy = evaluator(weights)
        evaluation.Evaluator(reference, None).load(weights)
        want_loss, want_accuracy = reference.evaluate(digits.test_x, digits.test_y,
                                                      batch_size=batch_size, verbose=0)
        assert loss == pytest.approx(want_loss, rel=1e-6, abs=1e-6)
        assert accuracy == pytest.approx(want_accuracy, abs=1e-6)
        # The accuracy is a count of hits over the 360 test examples.
        assert accuracy * len(digits.test_y) == pytest.approx(
            round(accuracy * len(digits.test_y)), abs=1e-6)
        results.append((loss, accuracy))
    assert len(set(results)) == 3  # the weights, not a cached first answer


def test_shared_evaluator_is_reused_per_model_fn_and_test_set_and_answers_as_a_fresh_one(digits):
    """`Evaluator.shared`: one evaluator per (keras_model_fn, test set); another model
    function or other test arrays get their own; after other weights went through the
    shared one, it gives a fresh evaluator's numbers exactly."""
    from fedprune.model import builders

    input_shape, classes = digits.test_x.shape[1:], int(digits.test_y.max()) + 1

    def keras_model_fn():
        return builders.build_model("mlp", input_shape, classes)

    def other_fn():
        return builders.build_model("mlp", input_shape, classes)

    shared = evaluation.Evaluator.shared(keras_model_fn, digits)
    reloaded = ExperimentConfig().dataset_loader().load()  # equal arrays, other objects
    assert reloaded.test_x is not digits.test_x
    assert evaluation.Evaluator.shared(keras_model_fn, reloaded) is shared
    assert evaluation.Evaluator.shared(other_fn, digits) is not shared
    fewer = dataclasses.replace(digits, test_x=digits.test_x[:100], test_y=digits.test_y[:100])
    assert evaluation.test_set_digest(fewer) != evaluation.test_set_digest(digits)
    assert evaluation.Evaluator.shared(keras_model_fn, fewer) is not shared
    first, second = (_Weights(builders.build_model("mlp", input_shape, classes, seed=s))
                     for s in (3, 4))
    shared(first)
    fresh = evaluation.Evaluator.create(keras_model_fn, digits)
    assert shared(second) == fresh(second)
    assert shared(first) == fresh(first) != fresh(second)


@pytest.mark.parametrize("masking,schedule", [("none", "none"), ("both", "polynomial")])
def test_process_model_size_is_the_plain_models_size_once_per_model_fn(
        digits, tff_local_context, monkeypatch, masking, schedule):
    from fedprune.program import assembly, shrinking

    config = ExperimentConfig(masking=masking, schedule=schedule, rounds=2, end_round=2)
    pp = assembly.build_process(config, digits)
    weights = pp.model_weights(pp.process.initialize())
    want = shrinking.model_size(shrinking.plain_model(pp, weights))
    assert shrinking.process_model_size(pp) == want
    built = []
    monkeypatch.setattr(shrinking, "model_size", lambda model: built.append(model) or {})
    assert shrinking.process_model_size(pp) == want and built == []  # computed once


def test_cells_sharing_a_seed_share_read_only_initial_weights(digits, tff_local_context):
    """`for_cell`: the initial weights a seed gives are built once per traced process,
    handed out read-only (cells share them), and are the weights a process built for
    that seed starts from."""
    import numpy as np

    from fedprune.program import assembly

    config = ExperimentConfig(masking="server", rounds=2, end_round=2)
    a = assembly.build_process(config, digits)
    b = assembly.build_process(dataclasses.replace(config, final_sparsity=0.9), digits)
    c = assembly.build_process(dataclasses.replace(config, seed=1), digits)
    a_arrays, b_arrays = a.process._arrays, b.process._arrays
    assert all(x is y for x, y in zip(a_arrays[0], b_arrays[0], strict=True))
    assert not any(x.flags.writeable for x in a_arrays[0] + a_arrays[1])
    with pytest.raises(ValueError, match="read-only"):
        a_arrays[0][0][0] = 1.0
    assert not all(np.array_equal(x, y)
                   for x, y in zip(a_arrays[0], c.process._arrays[0], strict=True))
    assembly.clear_process_cache()
    own = assembly.build_process(dataclasses.replace(config, seed=1), digits)
    for x, y in zip(c.process._arrays[0], own.process._arrays[0], strict=True):
        np.testing.assert_array_equal(x, y)
