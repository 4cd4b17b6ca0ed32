"""Evaluation of global weights: test loss and accuracy, logits, sparsity.

`Evaluator` runs the held-out test set through a Keras model (no TFF);
`sparsity_metrics` measures the pruned kernels; `kernel_masks` gives the
broadcast masks the downlink byte count needs.

Importing this module is cheap: TensorFlow is imported by the functions that
need it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fedprune.data import datasets
from fedprune.pruning import layer_budgets


@dataclasses.dataclass
class Evaluator:
    """Test loss and accuracy of global weights on the held-out set (Keras, no TFF)."""

    model: object
    test: object

    @classmethod
    def create(cls, keras_model_fn: Callable, data: datasets.FederatedData):
        import tensorflow as tf

        model = keras_model_fn()
        model.compile(loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])
        test = data.test_dataset(batch_size=512).map(lambda b: (b["x"], b["y"])).cache()
        return cls(model, test)

    def load(self, weights) -> None:
        for var, value in zip(self.model.trainable_weights, weights.trainable, strict=True):
            var.assign(value)
        for var, value in zip(self.model.non_trainable_weights, weights.non_trainable,
                              strict=True):
            var.assign(value)

    def __call__(self, weights) -> tuple[float, float]:
        self.load(weights)
        loss, accuracy = self.model.evaluate(self.test, verbose=0)
        return float(loss), float(accuracy)


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
