"""The compiled evaluator (`fedprune/program/evaluation.py`) against Keras' `evaluate`."""

from __future__ import annotations

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
