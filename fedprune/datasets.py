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

Importing this module is cheap: TensorFlow and TFF are imported inside the
functions that need them, and `load_digits`/`load_synthetic` construct their
`FederatedData` without TensorFlow (only `client_dataset`, `test_dataset` and
`element_spec` import it).

Datasets (`DATASETS`):
  * `digits`: scikit-learn's copy of the UCI optical digits (1,797 8x8 images,
    shipped inside scikit-learn, no download), flattened to 64 features in
    [0, 1], split among clients by a `fedprune.partitions` partitioner.
  * `synthetic`: Synthetic(alpha, beta) of Li et al. 2020, "Federated
    Optimization in Heterogeneous Networks" (FedProx, MLSys), Sec. 5.1 and
    their `generate_synthetic.py`.
  * `emnist_digits`, `emnist`, `cifar100`, `shakespeare`: TFF's federated
    datasets (Caldas et al. 2018, "LEAF: A Benchmark for Federated Settings";
    Reddi et al. 2021, "Adaptive Federated Optimization" for the CIFAR-100
    split), read from the SQLite files that `tff.simulation.datasets` caches.
    This module never downloads: a missing file is an error.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import os
import sqlite3
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedprune import partitions
from fedprune.errors import check
from fedprune.partitions import check_positive_int

if TYPE_CHECKING:
    import tensorflow as tf

DATASETS = ("digits", "synthetic", "emnist_digits", "emnist", "cifar100", "shakespeare")

# Seed of the stratified digits train/test split. Fixed, independent of the
# experiment seed, so every run of every configuration is evaluated on the same
# 360 test images.
DIGITS_TEST_SPLIT_SEED = 0

# Order in which TFF test clients are read when `max_test_examples` caps the
# test set; fixed so the capped test set is the same for every run.
TFF_TEST_CLIENT_ORDER_SEED = 0

# FedProx's generator: client sizes are int(LogNormal(4, 2)) + 50 and each
# client keeps the first 90% of its examples for training.
_SYNTHETIC_SIZE_LOGNORMAL = (4.0, 2.0)
_SYNTHETIC_MIN_CLIENT_SIZE = 50

# Shakespeare sequences per client are not known without a pass over the
# snippets, so their shuffle buffer is a constant instead of the client size.
_SEQUENCE_SHUFFLE_BUFFER = 1000


def _tf():
    """Imports TensorFlow on first use (it takes seconds and most callers never need it)."""
    import tensorflow as tf

    return tf


# --------------------------------------------------------------------------
# The client pipeline and the container.
# --------------------------------------------------------------------------


def preprocess_client_dataset(
    examples: tf.data.Dataset,
    *,
    batch_size: int,
    local_epochs: int,
    shuffle_seed: int | None,
    shuffle_buffer_size: int,
    max_examples: int | None = None,
) -> tf.data.Dataset:
    """The one client pipeline: shuffle, cap, repeat for local epochs, batch.

    The shuffle uses `reshuffle_each_iteration=False`, so the order is a pure
    function of `shuffle_seed` (callers derive it per (seed, round, client) with
    `client_shuffle_seed`) and every local epoch visits the examples in that
    same order. `max_examples` is applied after shuffling and before repeating:
    the client trains on at most `max_examples` distinct examples, each seen
    `local_epochs` times.

    Args:
      examples: unbatched dataset of model-ready `OrderedDict(x=..., y=...)`.
      batch_size: examples per batch (the last batch may be smaller).
      local_epochs: passes over the (capped) examples.
      shuffle_seed: op seed of the shuffle; `None` keeps the stored order.
      shuffle_buffer_size: shuffle buffer in examples; >= the client's size
        gives a uniform shuffle.
      max_examples: optional cap on distinct examples.

    Returns:
      A dataset of batches with batch dimension `None`.

    Raises:
      fedprune.errors.InvalidArgument: for non-positive sizes.
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(local_epochs, "local_epochs")
    if max_examples is not None:
        check_positive_int(max_examples, "max_examples")
    if shuffle_seed is not None:
        examples = examples.shuffle(
            max(shuffle_buffer_size, 1), seed=shuffle_seed, reshuffle_each_iteration=False
        )
    if max_examples is not None:
        examples = examples.take(max_examples)
    return examples.repeat(local_epochs).batch(batch_size)


class ClientSource(Protocol):
    """Where a `FederatedData` gets each client's unbatched examples from."""

    def num_examples(self, client_id: str) -> int: ...

    def shuffle_buffer_size(self, client_id: str) -> int: ...

    def examples(self, client_id: str) -> tf.data.Dataset: ...


class ArraySource:
    """Clients as index arrays into one in-memory training set.

    Holding indices, not datasets, keeps construction O(num_clients) numpy work:
    a client's `tf.data.Dataset` exists only once `examples` is called.

    Args:
      x: float32 [N, *input_shape] training features.
      y: int32 [N, 1] training labels.
      client_indices: client id -> int array of row indices into `x`/`y`.
      row_ids: each row's example id in the dataset before any split (see
        `example_index_digests`); None: the row number.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, client_indices: dict[str, np.ndarray],
                 row_ids: np.ndarray | None = None):
        self.x = x
        self.y = y
        self.client_indices = client_indices
        self.row_ids = np.arange(len(x)) if row_ids is None else np.asarray(row_ids)

    def num_examples(self, client_id: str) -> int:
        return len(self.client_indices[client_id])

    def shuffle_buffer_size(self, client_id: str) -> int:
        return self.num_examples(client_id)

    def examples(self, client_id: str) -> tf.data.Dataset:
        idx = self.client_indices[client_id]
        return _tf().data.Dataset.from_tensor_slices(
            collections.OrderedDict(x=self.x[idx], y=self.y[idx])
        )

    def label_count_matrix(self, client_ids: Sequence[str], num_classes: int) -> np.ndarray:
        labels = self.y[:, 0]
        parts = [self.client_indices[c] for c in client_ids]
        return partitions.partition_stats(labels, parts, num_classes)["count_matrix"]


class TffSource:
    """Clients of a TFF `ClientData`, mapped to model-ready examples on demand.

    Args:
      client_data: a `tff.simulation.datasets.ClientData` (already parsed).
      sizes: client id -> number of stored examples (from the SQLite
        `client_metadata` table, so no pass over the data is needed).
      to_examples: maps a client's parsed dataset to model-ready examples.
      sequence_buffer: shuffle buffer for datasets whose examples are derived
        (Shakespeare sequences); `None` uses the client's size.
    """

    def __init__(
        self,
        client_data,
        sizes: dict[str, int],
        to_examples: Callable[[tf.data.Dataset], tf.data.Dataset],
        sequence_buffer: int | None = None,
    ):
        self.client_data = client_data
        self.sizes = sizes
        self.to_examples = to_examples
        self.sequence_buffer = sequence_buffer

    def num_examples(self, client_id: str) -> int:
        return self.sizes[client_id]

    def shuffle_buffer_size(self, client_id: str) -> int:
        return self.sequence_buffer or self.num_examples(client_id)

    def examples(self, client_id: str) -> tf.data.Dataset:
        return self.to_examples(self.client_data.create_tf_dataset_for_client(client_id))


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
    """A federated training set (per-client, lazy) and a global test set.

    Attributes:
      name: dataset name, one of `DATASETS`.
      client_ids: training client ids; their order is the order
        `sample_clients` indexes.
      num_classes: number of classes (the vocabulary size for Shakespeare).
      input_shape: shape of one example's `x`, e.g. (64,), (28, 28, 1), (80,).
      test_x: [num_test, *input_shape] held-out features (`x_dtype`).
      test_y: int32 [num_test, *label_shape] held-out labels.
      source: where client examples come from (an `ArraySource` or
        `TffSource`); internal.
      label_shape: shape of one example's `y`: (1,), or (sequence_length,).
      x_dtype: dtype name of `x`: "float32", or "int32" for character ids.
      vocab_size: Shakespeare only: number of token ids (pad 0, the
        characters, OOV, BOS, EOS).
      sequence_length: Shakespeare only: characters per example.
      test_ids: digits/synthetic: each test example's id in the dataset before
        any split (see `example_index_digests`); None for TFF data.
    """

    name: str
    client_ids: list[str]
    num_classes: int
    input_shape: tuple[int, ...]
    test_x: np.ndarray
    test_y: np.ndarray
    source: ClientSource = dataclasses.field(repr=False)
    label_shape: tuple[int, ...] = (1,)
    x_dtype: str = "float32"
    vocab_size: int | None = None
    sequence_length: int | None = None
    test_ids: np.ndarray | None = dataclasses.field(default=None, repr=False)

    def num_examples(self, client_id: str) -> int:
        """Stored examples of `client_id` (Shakespeare: snippets, not sequences)."""
        return self.source.num_examples(client_id)

    def client_dataset(
        self,
        client_id: str,
        *,
        batch_size: int,
        local_epochs: int,
        shuffle_seed: int | None,
        max_examples: int | None = None,
    ) -> tf.data.Dataset:
        """Builds `client_id`'s training dataset; see `preprocess_client_dataset`.

        Returns:
          Batches `OrderedDict(x=[B, *input_shape], y=int32 [B, *label_shape])`
          whose `element_spec` equals `self.element_spec`.

        Raises:
          KeyError: for an unknown client id (array-backed data).
          ValueError: for an unknown client id (TFF data) or invalid sizes.
        """
        return preprocess_client_dataset(
            self.source.examples(client_id),
            batch_size=batch_size,
            local_epochs=local_epochs,
            shuffle_seed=shuffle_seed,
            shuffle_buffer_size=self.source.shuffle_buffer_size(client_id),
            max_examples=max_examples,
        )

    @property
    def element_spec(self) -> collections.OrderedDict:
        """The batched element spec (batch dimension `None`) of every dataset here."""
        tf = _tf()
        return collections.OrderedDict(
            x=tf.TensorSpec([None, *self.input_shape], tf.as_dtype(self.x_dtype)),
            y=tf.TensorSpec([None, *self.label_shape], tf.int32),
        )

    def test_dataset(self, batch_size: int) -> tf.data.Dataset:
        """The global test set as batches with `self.element_spec`."""
        check_positive_int(batch_size, "batch_size")
        return (
            _tf()
            .data.Dataset.from_tensor_slices(collections.OrderedDict(x=self.test_x, y=self.test_y))
            .batch(batch_size)
        )

    def label_count_matrix(self) -> np.ndarray | None:
        """int64 [num_clients, num_classes] label counts, or `None` for TFF data.

        Counting labels of TFF data would need a full pass over the files, so
        only the array-backed datasets (digits, synthetic) report it.
        """
        if isinstance(self.source, ArraySource):
            return self.source.label_count_matrix(self.client_ids, self.num_classes)
        return None


def _array_data(
    name: str,
    x_train: np.ndarray,
    y_train: np.ndarray,
    parts: Sequence[np.ndarray],
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int,
    *,
    train_ids: np.ndarray,
    test_ids: np.ndarray,
) -> FederatedData:
    """Packs in-memory arrays and per-client index arrays into `FederatedData`.

    `train_ids`/`test_ids`: the example ids of the rows of `x_train`/`x_test`.
    """
    client_ids = [str(i) for i in range(len(parts))]
    source = ArraySource(
        x_train.astype(np.float32),
        y_train.astype(np.int32).reshape(-1, 1),
        dict(zip(client_ids, parts, strict=True)),
        row_ids=train_ids,
    )
    return FederatedData(
        name=name,
        client_ids=client_ids,
        num_classes=num_classes,
        input_shape=tuple(x_train.shape[1:]),
        test_x=x_test.astype(np.float32),
        test_y=y_test.astype(np.int32).reshape(-1, 1),
        source=source,
        test_ids=np.asarray(test_ids),
    )


def _ids_sha256(ids: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(ids, dtype="<i8").tobytes()).hexdigest()


def example_index_digests(data: FederatedData) -> dict | None:
    """sha256 of the test set's and of each client's example ids (digits, synthetic).

    An example's id is its place in the dataset before any split: digits, the
    row of scikit-learn's 1,797 images; synthetic, its place in generation order
    (client by client). The ids are hashed in the order the run uses them, as
    little-endian int64. They pin down which examples a run trained and
    evaluated on, which the flags fix only together with the code: the digits
    test digest is the same for every run, the client digests change with the
    seed, partition and number of clients. None for TFF data (its clients are
    the file's own).

    Returns:
      {"test": hex digest, "clients": {client id: hex digest}}, or None.
    """
    if not isinstance(data.source, ArraySource) or data.test_ids is None:
        return None
    row_ids = data.source.row_ids
    return {"test": _ids_sha256(data.test_ids),
            "clients": {c: _ids_sha256(row_ids[data.source.client_indices[c]])
                        for c in data.client_ids}}


# --------------------------------------------------------------------------
# Client sampling and seeds.
# --------------------------------------------------------------------------


def sample_clients(
    client_ids: Sequence[str], clients_per_round: int, *, seed: int, round_num: int
) -> list[str]:
    """Clients of round `round_num`, without replacement.

    A pure function of (seed, round_num): a run resumed at round k samples the
    same clients as an uninterrupted one.

    Args:
      client_ids: all client ids.
      clients_per_round: clients to sample (flag `--clients_per_round`).
      seed: client-sampling seed (non-negative).
      round_num: round number (non-negative).

    Returns:
      `clients_per_round` distinct ids, in sampled order.

    Raises:
      fedprune.errors.InvalidArgument: if `clients_per_round` is not in
        [1, len(client_ids)].
    """
    check_positive_int(clients_per_round, "clients_per_round")
    check(
        clients_per_round <= len(client_ids),
        "clients_per_round",
        clients_per_round,
        f"at most the {len(client_ids)} clients",
    )
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), size=clients_per_round, replace=False)
    return [client_ids[i] for i in chosen]


def client_shuffle_seed(seed: int, round_num: int, client_id: str) -> int:
    """A shuffle seed in [0, 2**31) for one (seed, round, client).

    `zlib.crc32` (not `hash`, which is salted per process) maps the id to an
    int, so the seed is the same in every process.
    """
    entropy = [seed, round_num, zlib.crc32(client_id.encode("utf-8"))]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


# --------------------------------------------------------------------------
# Embedded datasets: digits and Synthetic(alpha, beta).
# --------------------------------------------------------------------------


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
      partition: one of `fedprune.partitions.PARTITIONERS`.
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
    return _array_data(
        "digits", x[train_idx], y[train_idx], parts, x[test_idx], y[test_idx], num_classes=10,
        train_ids=train_idx, test_ids=test_idx,
    )


def load_synthetic(
    *,
    num_clients: int,
    alpha: float,
    beta: float,
    seed: int,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    test_fraction: float = 0.1,
) -> FederatedData:
    """Synthetic(alpha, beta) of Li et al. 2020 (FedProx), Sec. 5.1.

    For client k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2); W_k [dim, classes]
    and b_k [classes] have i.i.d. N(u_k, 1) entries; v_k has i.i.d. N(B_k, 1)
    entries; x ~ N(v_k, Sigma) with diagonal Sigma_jj = j^-1.2 (j = 1..dim);
    y = argmax(softmax(W_k^T x + b_k)). Client sizes are
    int(LogNormal(4, 2)) + 50 and each client keeps its first
    `1 - test_fraction` examples for training (FedProx's code: 90%); the other
    examples of all clients are pooled into the global test set. `iid=True`
    gives FedProx's Synthetic-IID: one shared (W, b) ~ N(0, 1) and v_k = B_k.

    As in the reference generator, N(., s) takes s as the standard deviation.
    Note that u_k shifts every logit of client k by the same amount, so the
    label function's heterogeneity comes from the per-client noise of (W_k,
    b_k) and, through x, from beta.

    Args:
      num_clients: number of clients (flag `--num_clients`; FedProx uses 30).
      alpha: model heterogeneity (flag `--synthetic_alpha`), >= 0.
      beta: feature heterogeneity (flag `--synthetic_beta`), >= 0.
      seed: generator seed; the data are a pure function of all arguments.
      dim: features per example (60 in FedProx).
      num_classes: classes (10 in FedProx).
      iid: generate Synthetic-IID instead.
      test_fraction: per-client fraction held out for the pooled test set.

    Returns:
      A `FederatedData` with `input_shape=(dim,)`. Does not import TensorFlow.

    Raises:
      fedprune.errors.InvalidArgument: for invalid arguments.
    """
    check_positive_int(num_clients, "num_clients")
    check(alpha >= 0, "synthetic_alpha", alpha, "a float >= 0")
    check(beta >= 0, "synthetic_beta", beta, "a float >= 0")
    check(0 < test_fraction < 1, "test_fraction", test_fraction, "a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(*_SYNTHETIC_SIZE_LOGNORMAL, num_clients).astype(np.int64)
    sizes += _SYNTHETIC_MIN_CLIENT_SIZE
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    feature_std = np.arange(1, dim + 1) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    shared = (rng.normal(0, 1, (dim, num_classes)), rng.normal(0, 1, num_classes))
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            w, b = shared
            v = np.full(dim, big_b[k])
        else:
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
            v = rng.normal(big_b[k], 1.0, dim)
        x = v + rng.standard_normal((sizes[k], dim)) * feature_std
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1))  # softmax is monotone
    return _split_synthetic(xs, ys, test_fraction, num_classes)


def _split_synthetic(xs, ys, test_fraction, num_classes) -> FederatedData:
    """Keeps each client's first examples for training and pools the rest for test.

    Example ids count the generated examples client by client.
    """
    num_train = [int((1 - test_fraction) * len(y)) for y in ys]
    bounds = np.concatenate([[0], np.cumsum(num_train)])
    parts = [np.arange(bounds[k], bounds[k + 1]) for k in range(len(ys))]
    starts = np.concatenate([[0], np.cumsum([len(y) for y in ys])])
    train_ids = np.concatenate([starts[k] + np.arange(n) for k, n in enumerate(num_train)])
    test_ids = np.concatenate([starts[k] + np.arange(n, len(ys[k]))
                               for k, n in enumerate(num_train)])
    return _array_data(
        "synthetic",
        np.concatenate([x[:n] for x, n in zip(xs, num_train, strict=True)]),
        np.concatenate([y[:n] for y, n in zip(ys, num_train, strict=True)]),
        parts,
        np.concatenate([x[n:] for x, n in zip(xs, num_train, strict=True)]),
        np.concatenate([y[n:] for y, n in zip(ys, num_train, strict=True)]),
        num_classes=num_classes,
        train_ids=train_ids,
        test_ids=test_ids,
    )


# --------------------------------------------------------------------------
# TFF datasets, read from the SQLite files TFF caches.
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _TffFile:
    module: str  # attribute of tff.simulation.datasets
    file_name: str  # what load_data(cache_dir=...) looks for in cache_dir
    train_split: str  # split_name of the training clients in the SQLite file
    load_kwargs: tuple[tuple[str, object], ...] = ()


_TFF_FILES = {
    "emnist_digits": _TffFile(
        "emnist", "emnist_all.sqlite", "digits_only_train", (("only_digits", True),)
    ),
    "emnist": _TffFile("emnist", "emnist_all.sqlite", "all_train", (("only_digits", False),)),
    "cifar100": _TffFile("cifar100", "cifar100.sqlite", "train"),
    "shakespeare": _TffFile("shakespeare", "shakespeare.sqlite", "train"),
}


def tff_data_path(name: str, data_dir: str | None) -> str:
    """Path of the SQLite file TFF's loader for `name` reads from `data_dir`.

    `data_dir=None` means TFF's default cache, `~/.tff`.
    """
    _check_name(name, _TFF_FILES)
    data_dir = os.path.expanduser(data_dir or os.path.join("~", ".tff"))
    return os.path.join(data_dir, _TFF_FILES[name].file_name)


def check_tff_data_file(name: str, data_dir: str | None) -> str:
    """Returns the data file path, or fails fast (no TF import, no download).

    Raises:
      FileNotFoundError: with a one-line message naming the expected file,
        `--data_dir` and how to obtain the file.
    """
    path = tff_data_path(name, data_dir)
    if not os.path.isfile(path):
        spec = _TFF_FILES[name]
        raise FileNotFoundError(
            f"--data_dir={data_dir!r}: dataset {name!r} needs {path}, which does not exist "
            f"(no downloads at run time). Put TFF's {spec.file_name} in the --data_dir folder: "
            f"on a machine with internet, `tff.simulation.datasets.{spec.module}.load_data("
            f"cache_dir=DIR)` downloads {spec.file_name}.lzma and leaves DIR/{spec.file_name}."
        )
    return path


def load_tff_dataset(
    name: str,
    *,
    data_dir: str | None,
    num_clients: int | None = None,
    seed: int = 0,
    max_test_examples: int | None = None,
    cifar_crop_size: int = 32,
    sequence_length: int = 80,
) -> FederatedData:
    """Loads one of TFF's federated datasets from `data_dir`, without downloading.

    The file (`tff_data_path`) is checked before TFF is imported; when present,
    `tff.simulation.datasets.<module>.load_data(cache_dir=data_dir)` finds it
    and does not download. Training clients are TFF's natural clients
    (writers, characters, or the Pachinko split of CIFAR-100), or a subset of
    `num_clients` of them drawn with `seed` (kept in TFF's sorted order). The
    global test
    set pools the test split's examples, reading clients in an order shuffled
    with the fixed `TFF_TEST_CLIENT_ORDER_SEED` and stopping at
    `max_test_examples`.

    Model-ready examples:
      * EMNIST: x = float32 [28, 28, 1] as stored by TFF (1.0 is background),
        y = int32 [1]; 10 classes (`emnist_digits`) or 62 (`emnist`).
      * CIFAR-100: x = float32 [c, c, 3] in [0, 1], center-cropped to
        c = `cifar_crop_size` (32 keeps the full image; 24 is the crop of Reddi
        et al. 2021, whose random training crops are not used so that client
        data stay deterministic); y = int32 [1] fine label, 100 classes.
      * Shakespeare: TFF's character vocabulary (ids: 0 pad, 1..86 characters,
        87 OOV, 88 BOS, 89 EOS; `vocab_size=90`); each snippet becomes
        [BOS, chars..., EOS], zero-padded to a multiple of
        `sequence_length + 1` and cut into sequences; x = int32
        [sequence_length], y = int32 [sequence_length] = x shifted by one
        (TFF's `char_prediction_preprocessing`). `num_examples` counts
        snippets; `max_examples` and the shuffle act on sequences.

    Args:
      name: one of "emnist_digits", "emnist", "cifar100", "shakespeare".
      data_dir: folder holding TFF's SQLite file (flag `--data_dir`); `None`
        is TFF's default `~/.tff`.
      num_clients: optional number of training clients to keep (flag
        `--num_clients`); `None` keeps all.
      seed: seed of the client subset; unused when `num_clients` is `None`.
      max_test_examples: optional cap on the global test set.
      cifar_crop_size: CIFAR-100 crop side in pixels, 1..32.
      sequence_length: Shakespeare characters per example.

    Returns:
      A `FederatedData` over TFF's training clients.

    Raises:
      FileNotFoundError: if the SQLite file is missing.
      fedprune.errors.InvalidArgument: for an unknown name, bad sizes, or
        more `num_clients` than the dataset has.
    """
    path = check_tff_data_file(name, data_dir)
    if max_test_examples is not None:
        check_positive_int(max_test_examples, "max_test_examples")
    check(1 <= cifar_crop_size <= 32, "cifar_crop_size", cifar_crop_size, "an int in [1, 32]")
    check_positive_int(sequence_length, "sequence_length")
    import tensorflow_federated as tff

    spec = _TFF_FILES[name]
    loader = getattr(tff.simulation.datasets, spec.module)
    train, test = loader.load_data(cache_dir=os.path.dirname(path), **dict(spec.load_kwargs))
    if name == "cifar100":
        meta = _cifar_meta(cifar_crop_size)
    elif name == "shakespeare":
        meta = _shakespeare_meta(sequence_length)
    else:
        meta = _emnist_meta(name)
    to_examples = meta.pop("to_examples")
    test_examples = to_examples(test.create_tf_dataset_from_all_clients(TFF_TEST_CLIENT_ORDER_SEED))
    test_x, test_y = _to_arrays(test_examples, max_test_examples)
    source = TffSource(
        train,
        _client_sizes(path, spec.train_split),
        to_examples,
        sequence_buffer=_SEQUENCE_SHUFFLE_BUFFER if name == "shakespeare" else None,
    )
    return FederatedData(
        name=name,
        client_ids=_client_subset(list(train.client_ids), num_clients, seed, name),
        test_x=test_x,
        test_y=test_y,
        source=source,
        **meta,
    )


def _client_subset(
    client_ids: list[str], num_clients: int | None, seed: int, name: str
) -> list[str]:
    """`num_clients` ids drawn without replacement with `seed`, in their original order."""
    if num_clients is None:
        return client_ids
    check_positive_int(num_clients, "num_clients")
    check(
        num_clients <= len(client_ids),
        "num_clients",
        num_clients,
        f"at most the {len(client_ids)} training clients of {name}",
    )
    keep = np.random.default_rng(seed).choice(len(client_ids), size=num_clients, replace=False)
    return [client_ids[i] for i in np.sort(keep)]


def _client_sizes(path: str, split_name: str) -> dict[str, int]:
    """client id -> num_examples from the SQLite `client_metadata` table."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute(
            "SELECT client_id, num_examples FROM client_metadata WHERE split_name = ?",
            (split_name,),
        ).fetchall()
    finally:
        connection.close()
    if not rows:
        raise ValueError(f"{path}: no clients with split_name={split_name!r} in client_metadata")
    return {client_id: int(n) for client_id, n in rows}


def _to_arrays(examples: tf.data.Dataset, max_examples: int | None):
    """Reads a dataset of `OrderedDict(x, y)` examples into numpy arrays."""
    if max_examples is not None:
        examples = examples.take(max_examples)
    xs, ys = [], []
    for batch in examples.batch(1024):
        xs.append(batch["x"].numpy())
        ys.append(batch["y"].numpy())
    if not xs:
        raise ValueError("the test split has no examples")
    return np.concatenate(xs), np.concatenate(ys)


def _emnist_meta(name: str) -> dict:
    tf = _tf()

    def to_examples(dataset):
        return dataset.map(
            lambda e: collections.OrderedDict(
                x=tf.expand_dims(e["pixels"], -1),
                y=tf.reshape(tf.cast(e["label"], tf.int32), [1]),
            )
        )

    num_classes = 10 if name == "emnist_digits" else 62
    return dict(to_examples=to_examples, num_classes=num_classes, input_shape=(28, 28, 1))


def _cifar_meta(crop_size: int) -> dict:
    tf = _tf()

    def to_examples(dataset):
        def one(e):
            image = tf.cast(e["image"], tf.float32) / 255.0
            image = tf.image.resize_with_crop_or_pad(image, crop_size, crop_size)
            return collections.OrderedDict(
                x=image, y=tf.reshape(tf.cast(e["label"], tf.int32), [1])
            )

        return dataset.map(one)

    return dict(to_examples=to_examples, num_classes=100, input_shape=(crop_size, crop_size, 3))


def shakespeare_byte_table() -> np.ndarray:
    """int32 [256]: token id of each byte under TFF's Shakespeare vocabulary.

    TFF's vocabulary is 86 single-byte ASCII characters and its tokenizer
    splits snippets into bytes (`tf.strings.bytes_split`), so a 256-entry table
    reproduces its ids (character i -> i + 1, anything else -> OOV) with a
    stateless `tf.gather` instead of a lookup-table resource, which keeps the
    datasets serializable by TFF.
    """
    from tensorflow_federated.python.simulation.baselines.shakespeare import (
        char_prediction_preprocessing as tff_chars,
    )

    _, oov, _, _ = tff_chars.get_special_tokens()
    table = np.full(256, oov, np.int32)
    for i, char in enumerate(tff_chars.CHAR_VOCAB):
        table[ord(char)] = i + 1
    return table


def _shakespeare_meta(sequence_length: int) -> dict:
    from tensorflow_federated.python.simulation.baselines.shakespeare import (
        char_prediction_preprocessing as tff_chars,
    )

    tf = _tf()
    table = tf.constant(shakespeare_byte_table())
    pad, _, bos, eos = tff_chars.get_special_tokens()
    split = sequence_length + 1

    def to_sequences(e):
        tokens = tf.gather(table, tf.cast(tf.io.decode_raw(e["snippets"], tf.uint8), tf.int32))
        tokens = tf.concat([[bos], tokens, [eos]], 0)
        tokens = tf.pad(tokens, [[0, (-tf.size(tokens)) % split]], constant_values=pad)
        return tf.data.Dataset.from_tensor_slices(tf.reshape(tokens, [-1, split]))

    def to_examples(dataset):
        return dataset.flat_map(to_sequences).map(
            lambda s: collections.OrderedDict(x=s[:-1], y=s[1:])
        )

    vocab_size = len(tff_chars.CHAR_VOCAB) + 4  # pad, OOV, BOS, EOS
    return dict(
        to_examples=to_examples,
        num_classes=vocab_size,
        input_shape=(sequence_length,),
        label_shape=(sequence_length,),
        x_dtype="int32",
        vocab_size=vocab_size,
        sequence_length=sequence_length,
    )


# --------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------


def _check_name(name: str, accepted) -> None:
    check(name in accepted, "dataset", name, f"one of {', '.join(accepted)}")


def validate_dataset_name(name: str) -> None:
    """Raises `InvalidArgument` (flag `--dataset`) unless `name` is in `DATASETS`."""
    _check_name(name, DATASETS)


def load_dataset(name: str, **kwargs) -> FederatedData:
    """Loads dataset `name` (one of `DATASETS`) with its loader's keyword arguments.

    `digits` -> `load_digits`, `synthetic` -> `load_synthetic`, the others ->
    `load_tff_dataset(name, ...)`.

    Raises:
      fedprune.errors.InvalidArgument: for an unknown name (flag `--dataset`).
    """
    validate_dataset_name(name)
    if name == "digits":
        return load_digits(**kwargs)
    if name == "synthetic":
        return load_synthetic(**kwargs)
    return load_tff_dataset(name, **kwargs)
