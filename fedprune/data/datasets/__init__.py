"""Federated datasets: per-client `tf.data` pipelines plus a global test set.

Every loader returns a `FederatedData`. Client datasets are built lazily, one
client at a time, from stored index arrays (digits, synthetic) or from TFF's
`ClientData` (EMNIST, CIFAR-100, Shakespeare), and all of them go through the
one client pipeline `preprocess_client_dataset` (shuffle with a seed, cap,
repeat for local epochs, batch). Elements are
`OrderedDict(x=[B, *input_shape], y=[B, *label_shape] int32)`; `y` keeps a
trailing axis ([B, 1] for classification) so that the batched element spec can
serve as the input spec of TFF's Keras wrapper with
`SparseCategoricalCrossentropy`.

One module per source (`digits`, `synthetic`, `tff_files`), each registering
its datasets in `DATASETS` (`catalog`: a `DatasetLoader` subclass per
dataset), plus the container and client pipeline (`container`). This
package's namespace is the datasets API: the registry `DATASETS`,
`load_dataset`, and the names of those modules that callers use. A new
dataset is one registered `DatasetLoader` in its own module
(docs/extending.md).

Importing this package is cheap: TensorFlow and TFF are imported inside the
functions that need them, and `load_digits`/`load_synthetic` construct their
`FederatedData` without TensorFlow (only `client_dataset`, `test_dataset` and
`element_spec` import it).

Datasets (`DATASETS`):
  * `digits`: scikit-learn's copy of the UCI optical digits (1,797 8x8 images,
    shipped inside scikit-learn, no download), flattened to 64 features in
    [0, 1], split among clients by a `fedprune.data.partitions` partitioner.
  * `synthetic`: Synthetic(alpha, beta) of Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks" (FedProx, MLSys), Sec. 5.1 and
    the data generator of their code release.
  * `emnist_digits`, `emnist`, `cifar100`, `shakespeare`: TFF's federated
    datasets (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings";
    Reddi et al. 2021, "Adaptive Federated Optimization" for the CIFAR-100
    split), read from the SQLite files that `tff.simulation.datasets` caches.
    This package never downloads: a missing file is an error.
"""

from __future__ import annotations

from fedprune.data.datasets.catalog import DATASETS, DatasetLoader
from fedprune.data.datasets.container import (
    ArraySource,
    ClientSource,
    FederatedData,
    TffSource,
    array_data,
    client_shuffle_seed,
    example_index_digests,
    preprocess_client_dataset,
)
from fedprune.data.datasets.digits import (
    DIGITS_TEST_SPLIT_SEED,
    DIGITS_TRAIN_EXAMPLES,
    load_digits,
)
from fedprune.data.datasets.synthetic import load_synthetic
from fedprune.data.datasets.tff_files import (
    TFF_TEST_CLIENT_ORDER_SEED,
    check_tff_data_file,
    load_tff_dataset,
    shakespeare_byte_table,
    tff_data_path,
)

__all__ = [
    "DATASETS", "DIGITS_TEST_SPLIT_SEED", "DIGITS_TRAIN_EXAMPLES", "TFF_TEST_CLIENT_ORDER_SEED",
    "ArraySource", "ClientSource", "DatasetLoader", "FederatedData", "TffSource", "array_data",
    "check_tff_data_file", "client_shuffle_seed", "example_index_digests", "load_dataset",
    "load_digits", "load_synthetic", "load_tff_dataset", "preprocess_client_dataset",
    "shakespeare_byte_table", "tff_data_path", "validate_dataset_name",
]


def validate_dataset_name(name: str) -> None:
    """Raises `InvalidArgument` (flag `--dataset`) unless `name` is registered in `DATASETS`."""
    DATASETS.check(name)


def load_dataset(name: str, **values) -> FederatedData:
    """Loads registered dataset `name` from config-style values (names equal the driver flags).

    E.g. `load_dataset("digits", num_clients=3, partition="iid", seed=0)`;
    values left out take the loader's defaults (the flags' defaults).

    Raises:
      fedprune.errors.InvalidArgument: for an unknown name (flag `--dataset`) or
        a value the dataset rejects.
      TypeError: a value the dataset does not read.
    """
    entry = DATASETS.entry(name)
    unknown = sorted(set(values) - set(entry.params))
    if unknown:
        raise TypeError(f"dataset {name!r} reads {', '.join(entry.params)}; not {unknown}")
    return entry.build(values).load()
