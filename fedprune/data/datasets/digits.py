"""The digits dataset: scikit-learn's copy of the UCI optical digits.

1,797 8x8 images, shipped inside scikit-learn (no download), flattened to 64
features in [0, 1], split among clients by a `fedprune.data.partitions`
partitioner; a fixed stratified test split.

Registered as `--dataset=digits` (`Digits`).

Importing this module is cheap: `load_digits` builds its `FederatedData`
without TensorFlow.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedprune.data import partitions
from fedprune.data.datasets.catalog import DATASETS, DatasetLoader
from fedprune.data.datasets.container import FederatedData, array_data
from fedprune.errors import check

# Seed of the stratified digits train/test split. Fixed, independent of the
# experiment seed, so every run of every configuration is evaluated on the same
# 360 test images.
DIGITS_TEST_SPLIT_SEED = 0
# scikit-learn's 1,797 digits minus the fixed 360-example test split of `load_digits`.
DIGITS_TRAIN_EXAMPLES = 1437


@DATASETS.register("digits", help="scikit-learn's 8x8 digits (1,797 images, embedded), split "
                   "among clients by --partition")
@dataclasses.dataclass(frozen=True)
class Digits(DatasetLoader):
    """`load_digits` with the config's partition; the partition is checked here."""

    num_clients: int
    seed: int
    partition: str
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2

    def __post_init__(self):
        check(self.num_clients >= 1, "num_clients", self.num_clients, "a whole number >= 1")
        partitions.validate_partition_args(
            self.partition, num_clients=self.num_clients, num_examples=DIGITS_TRAIN_EXAMPLES,
            dirichlet_alpha=self.dirichlet_alpha, shards_per_client=self.shards_per_client)

    def load(self) -> FederatedData:
        return load_digits(num_clients=self.num_clients, seed=self.seed,
                           partition=self.partition, dirichlet_alpha=self.dirichlet_alpha,
                           shards_per_client=self.shards_per_client)


def load_digits(
    *,
    num_clients: int,
    partition: str,
    seed: int,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_examples_per_client: int = 1,
    test_fraction: float = 0.2,
) -> FederatedData:
    """scikit-learn's 8x8 digits, partitioned among `num_clients` clients.

    The 1,797 images (pixel counts 0..16, scaled to [0, 1], flattened to 64
    features) are split once into train and test, stratified by label, with the
    FIXED seed `DIGITS_TEST_SPLIT_SEED`: the test set does not depend on `seed`,
    so all runs are evaluated on the same examples (360 test and 1,437 train
    for the default `test_fraction`). Only the partition of the train split
    depends on `seed`. Does not import TensorFlow.

    Args:
      num_clients: number of clients (flag `--num_clients`).
      partition: one of `fedprune.data.partitions.PARTITIONERS`.
      seed: partition seed.
      dirichlet_alpha: Dir(alpha) concentration for `partition="dirichlet"`.
      shards_per_client: shards per client for `partition="shards"`.
      min_examples_per_client: minimum client size for `"dirichlet"`.
      test_fraction: fraction of the 1,797 examples held out, in (0, 1).

    Returns:
      A `FederatedData` with `input_shape=(64,)` and 10 classes.

    Raises:
      fedprune.errors.InvalidArgument: for invalid partition arguments.
    """
    from sklearn import datasets as sk_datasets
    from sklearn import model_selection

    check(0 < test_fraction < 1, "test_fraction", test_fraction, "a fraction in (0, 1)")
    digits = sk_datasets.load_digits()
    x = digits.data / 16.0  # pixel counts are 0..16
    y = digits.target
    train_idx, test_idx = model_selection.train_test_split(
        np.arange(len(y)), test_size=test_fraction, stratify=y, random_state=DIGITS_TEST_SPLIT_SEED
    )
    # Sorted so the partition depends on the split, not on sklearn's row order.
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    parts = partitions.make_partition(
        partition,
        y[train_idx],
        num_clients=num_clients,
        seed=seed,
        dirichlet_alpha=dirichlet_alpha,
        shards_per_client=shards_per_client,
        min_examples_per_client=min_examples_per_client,
    )
    return array_data(
        "digits", x[train_idx], y[train_idx], parts, x[test_idx], y[test_idx], num_classes=10,
        train_ids=train_idx, test_ids=test_idx,
    )
