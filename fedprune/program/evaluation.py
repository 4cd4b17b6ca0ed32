"""Evaluation of global weights: test loss and accuracy, logits, sparsity.

`Evaluator` runs the held-out test set through a Keras model in one compiled
function (no TFF);
`sparsity_metrics` measures the pruned kernels; `kernel_masks` gives the
broadcast masks the downlink byte count needs.

Importing this module is cheap: TensorFlow is imported by the functions that
need it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import weakref
from collections.abc import Callable

import numpy as np

from fedprune.data import datasets
from fedprune.pruning import layer_budgets
from fedprune.runtime import autograph


@dataclasses.dataclass
class Evaluator:
    """Test loss and accuracy of global weights on the held-out set (no TFF).

    The test set is cached as batches of `EVAL_BATCH_SIZE` examples; one
    compiled `tf.function` (traced at the first call) runs the model over them
    with `training=False` and returns float64 sums. The loss is the mean over
    examples of the sparse categorical cross-entropy of the logits, the
    accuracy the fraction of examples whose argmax logit is the label: what
    Keras' `evaluate` reports for the same model compiled with
    `SparseCategoricalCrossentropy(from_logits=True)` and
    `SparseCategoricalAccuracy` (equal to ~1e-7, float32 sums there;
    tests/test_evaluation.py), without its per-call data adapter, callbacks
    and progress machinery.
    """

    model: object
    test: object  # tf.data.Dataset of (x, y) batches; None for a model only loaded
    _compiled: Callable | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def create(cls, keras_model_fn: Callable, data: datasets.FederatedData):
        import tensorflow as tf

        model = keras_model_fn()
        test = data.test_dataset(batch_size=EVAL_BATCH_SIZE).map(
            tf.autograph.experimental.do_not_convert(lambda b: (b["x"], b["y"]))).cache()
        return cls(model, test)

    @classmethod
    def shared(cls, keras_model_fn: Callable, data: datasets.FederatedData):
        """`create`'s evaluator, reused by later calls with the same `keras_model_fn` and
        the same test set (equal arrays, compared by digest).

        The cells of a grid that share a traced process (`assembly.build_process`)
        share its `keras_model_fn`, so they also share one Keras model and one
        compiled function (~0.3 s of building and tracing per run otherwise).
        Every call loads all the model's weights first, so a shared evaluator
        returns what a fresh one does (tests/test_evaluation.py); calls must not
        overlap (the round loop evaluates in its own thread only). Entries go
        with their `keras_model_fn` (weak keys).
        """
        by_test = _SHARED.setdefault(keras_model_fn, {})
        key = test_set_digest(data)
        if key not in by_test:
            by_test[key] = cls.create(keras_model_fn, data)
        return by_test[key]

    def load(self, weights) -> None:
        for var, value in zip(self.model.trainable_weights, weights.trainable, strict=True):
            var.assign(value)
        for var, value in zip(self.model.non_trainable_weights, weights.non_trainable,
                              strict=True):
            var.assign(value)

    def __call__(self, weights) -> tuple[float, float]:
        """(mean test loss, test accuracy) of `weights` (a `ModelWeights`)."""
        self.load(weights)
        if self._compiled is None:
            self._compiled = _compiled_sums(self.model, self.test)
        loss_sum, hits, count = (float(v) for v in self._compiled())
        return loss_sum / count, hits / count


EVAL_BATCH_SIZE = 512
# keras_model_fn -> {test_set_digest: Evaluator} (`Evaluator.shared`).
_SHARED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def test_set_digest(data: datasets.FederatedData) -> str:
    """A digest of the test set's arrays: their dtypes, shapes and bytes."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (data.test_x, data.test_y):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array)
    return digest.hexdigest()


def _compiled_sums(model, test) -> Callable:
    """A `tf.function` returning (sum of losses, hits, examples) over `test`, float64."""
    import tensorflow as tf

    # The whole test set as two eager tensors, captured by the trace; the loop
    # slices them (a graph while-loop: no dataset iterator per call, and the
    # trace does not grow with the test set).
    parts = list(test)
    x_all = tf.concat([x for x, _ in parts], axis=0)
    y_all = tf.reshape(tf.concat([y for _, y in parts], axis=0), [-1])
    batch = max(int(parts[0][1].shape[0]), 1) if parts else 1
    total = int(y_all.shape[0])

    @tf.function
    def sums():
        loss_sum = hits = tf.constant(0.0, tf.float64)
        for start in tf.range(0, total, batch):
            x, labels = x_all[start:start + batch], y_all[start:start + batch]
            logits = model(x, training=False)
            losses = tf.keras.losses.sparse_categorical_crossentropy(labels, logits,
                                                                    from_logits=True)
            predicted = tf.cast(tf.argmax(logits, axis=-1), labels.dtype)
            loss_sum += tf.reduce_sum(tf.cast(losses, tf.float64))
            hits += tf.reduce_sum(tf.cast(tf.equal(predicted, labels), tf.float64))
        return loss_sum, hits, tf.constant(float(total), tf.float64)

    with autograph.plain_modules():  # traced now, with the pruning wrappers left as written
        sums.get_concrete_function()
    return sums


def kernel_masks(pp, weights) -> list:
    """Per trainable tensor: its broadcast 0/1 mask (pruned kernels) or None."""
    masks = [None] * len(weights.trainable)
    if pp.layout is not None and pp.masking_mode.wraps_model:
        for k in pp.layout.kernels:
            masks[k.trainable_index] = np.asarray(weights.non_trainable[k.mask_index])
    return masks


def sparsity_metrics(pp, weights) -> dict:
    """Global and per-layer sparsity (fraction of zeros) of the pruned kernels, and nonzeros.

    `global_sparsity` is over the kernels fedprune prunes (Dense/Conv, see
    `wrappers.py`; for masking `none` the same kernels of the dense model);
    `nonzero_params` counts every trainable parameter, biases included.
    """
    metrics = {}
    zeros = total = 0
    for k in pp.layout.kernels:
        kernel = np.asarray(weights.trainable[k.trainable_index])
        z = int(kernel.size - np.count_nonzero(kernel))
        metrics[f"sparsity/{k.name}"] = z / kernel.size
        zeros, total = zeros + z, total + kernel.size
    metrics["global_sparsity"] = zeros / total
    metrics["nonzero_params"] = int(sum(np.count_nonzero(w) for w in weights.trainable))
    return metrics


def target_sparsity(config, table, round_num: int):
    """The schedule's sparsity in force after `round_num` (metrics.csv `target_sparsity`).

    What the server's mask holds in `server`/`both` modes, and what each
    pruning client prunes to in `client` mode (whose global model is the union
    of the clients' masks, so `global_sparsity` falls below it). Blank when the
    criterion does not use the schedule's level (`threshold`, `relative`).
    """
    if config.mask_criterion != "magnitude":
        return ""
    return float(table.sparsity[min(round_num, len(table.sparsity) - 1)])


def step_section(pp) -> dict:
    """config.json's `pruning_steps`: the granularity and the round -> step mapping."""
    if pp.step_mapping is None:
        return {"prune_granularity": "round", "steps_per_round": 1,
                "source": "one tfmot step is one round (schedules.py)"}
    return {"prune_granularity": "step", **pp.step_mapping.to_dict(),
            "server_step_after_round": "round * steps_per_round"}


def budget_section(config, pp) -> dict:
    """config.json's `layer_budgets`: each pruned layer's sparsity per level (layer_budgets.py)."""
    kernels = pp.layout.kernels if pp.layout is not None else ()
    distribution = config.sparsity_distribution if pp.masking_mode.wraps_model else "uniform"
    return layer_budgets.budget_section(pp.table, [k.name for k in kernels],
                                        [k.shape for k in kernels], distribution)


def all_finite(weights) -> bool:
    """True if every trainable tensor is free of NaN and Inf."""
    return all(np.isfinite(np.asarray(w)).all() for w in weights.trainable)


def logits(evaluator: Evaluator, weights) -> np.ndarray:
    """The model's logits on the whole test set for `weights`."""
    evaluator.load(weights)
    return np.concatenate([evaluator.model(x, training=False).numpy()
                           for x, _ in evaluator.test])
