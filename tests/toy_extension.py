"""A user's extension, as docs/extending.md writes it: a toy schedule, criterion and dataset.

Nothing in fedprune names this module: `python -m experiments.run
--extensions=tests/toy_extension.py --schedule=toy --mask_criterion=toy ...`
imports it while the flags are parsed, and the registrations below make `toy`
a valid value of --schedule, --mask_criterion and --dataset
(tests/test_extensions.py runs exactly that).
Importing it does not import TensorFlow.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from fedprune.data import datasets
from fedprune.errors import check
from fedprune.pruning import masking, schedules


@schedules.SCHEDULES.register("toy", help="equal steps to --final_sparsity: after round r <= "
                              "--end_round, --final_sparsity * r / --end_round (a toy)")
@dataclasses.dataclass(frozen=True)
class EqualSteps(schedules.RoundSchedule):
    """Sparsity `final_sparsity * r / end_round` after each round r = 1..end_round.

    Plain Python (`__call__`), no tfmot schedule: the mask is recomputed after
    every round up to `end_round`, then kept.
    """

    final_sparsity: float
    end_round: int

    name: ClassVar[str] = "toy"

    def __post_init__(self):
        check(0 <= self.final_sparsity < 1, "final_sparsity", self.final_sparsity,
              "a sparsity fraction in [0, 1)")
        check(self.end_round >= 1, "end_round", self.end_round,
              "a round >= 1 with --schedule=toy")

    def __call__(self, round_num: int) -> tuple[bool, float]:
        if 1 <= round_num <= self.end_round:
            return True, self.final_sparsity * round_num / self.end_round
        return False, self.final_sparsity

    @property
    def last_update_round(self) -> int:
        return self.end_round


@masking.CRITERIA.register("toy", help="keep the first weights of each kernel in row-major "
                           "order, as many as the schedule's sparsity leaves (a toy)")
@dataclasses.dataclass(frozen=True)
class KeepFirst(masking.MaskCriterion):
    """Keeps the first k = `num_kept(N, sparsity)` entries of each kernel, whatever their values.

    A fixed pattern, visible in the exported model: every kernel is nonzero
    exactly on its first k entries (flattened row-major).
    """

    mask_scope: str = "layer"

    def __post_init__(self):
        check(self.mask_scope == "layer", "mask_scope", self.mask_scope,
              "layer with --mask_criterion=toy (it masks each kernel on its own)")

    def masks(self, scores, sparsity):
        import tensorflow as tf

        masks = []
        for s in scores:
            k = masking.num_kept(tf.size(s), sparsity)
            first = tf.cast(tf.range(tf.size(s)) < k, s.dtype)
            masks.append(tf.reshape(first, tf.shape(s)))
        return masks


@datasets.DATASETS.register("toy", help="Gaussian blobs in 8 dimensions, 4 classes, 40 "
                            "training examples per client (a toy)")
@dataclasses.dataclass(frozen=True)
class Blobs(datasets.DatasetLoader):
    """4 Gaussian blobs (one per class) in R^8; 40 examples per client, 100 test examples.

    Clients get contiguous slices of the shuffled examples (IID). Examples
    and centers are a pure function of `seed`.
    """

    num_clients: int
    seed: int

    def __post_init__(self):
        check(1 <= self.num_clients <= 1000, "num_clients", self.num_clients,
              "a whole number in [1, 1000] with --dataset=toy")

    def load(self) -> datasets.FederatedData:
        import numpy as np

        rng = np.random.default_rng(self.seed)
        num_train, num_test = 40 * self.num_clients, 100
        centers = rng.normal(0.0, 3.0, (4, 8))
        y = rng.integers(0, 4, num_train + num_test)
        x = centers[y] + rng.normal(0.0, 1.0, (len(y), 8))
        ids = np.arange(len(y))
        parts = np.array_split(np.arange(num_train), self.num_clients)
        return datasets.array_data("toy", x[:num_train], y[:num_train], parts, x[num_train:],
                                   y[num_train:], num_classes=4, train_ids=ids[:num_train],
                                   test_ids=ids[num_train:])
