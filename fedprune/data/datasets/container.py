"""The federated-data container and the one client pipeline.

`FederatedData` holds the training clients (lazily, through a `ClientSource`:
index arrays into one in-memory set, `ArraySource`, or TFF's `ClientData`,
`TffSource`) and a global test set. Every client dataset goes through
`preprocess_client_dataset` (shuffle with a seed, cap, repeat for local
epochs, batch), with tf.data's autotuning and static rewrites off
(`client_dataset_options`). Elements are `OrderedDict(x=[B, *input_shape], y=[B,
*label_shape] int32)`; `y` keeps a trailing axis ([B, 1] for classification)
so that the batched element spec can serve as the input spec of TFF's Keras
wrapper with `SparseCategoricalCrossentropy`.

Importing this module is cheap: TensorFlow is imported only by
`client_dataset`, `test_dataset`, `element_spec` and the sources' `examples`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import zlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

import numpy as np

from fedprune.data import partitions
from fedprune.data.partitions import check_positive_int
from fedprune.errors import check

if TYPE_CHECKING:
    import tensorflow as tf


def _tf():
    """Imports TensorFlow on first use (it takes seconds and most callers never need it)."""
    import tensorflow as tf

    return tf


def client_dataset_options() -> tf.data.Options:
    """The options of every client dataset: tf.data neither autotunes nor rewrites it.

    Every `iter()` of a dataset finalizes it; with autotuning on (tf.data's
    default) that runs Grappler's tf.data rewrites over the dataset's graph
    (inject_prefetch, autotune_buffer_sizes and, with the default
    optimizations, noop_elimination, parallel_batch, ...) and inserts the
    autotuning model. An in-memory client's pipeline (slices, shuffle, take,
    repeat, batch) gains nothing from either, and TFF's client loop iterates
    every client's dataset once a round: in TFF's worker the rewrite took ~18 %
    of its CPU, and rounds were ~30 % slower (BUILD_NOTES.md, "Client datasets
    are neither autotuned nor rewritten"). TFF's file-backed clients (`TffSource`)
    get the same options; their file reads and per-example map run unparallelized,
    which was not measured. The batches, and so every result, are the same bit
    for bit (tests/test_process.py).
    """
    options = _tf().data.Options()
    options.autotune.enabled = False
    options.experimental_optimization.apply_default_optimizations = False
    return options


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

    The dataset carries `client_dataset_options()`: tf.data neither autotunes
    nor rewrites it when it is iterated.

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
      shuffle_seed: op seed of the shuffle, in [-2**63, 2**63) (what
        `client_shuffle_seed` returns is); `None` keeps the stored order.
      shuffle_buffer_size: shuffle buffer in examples; >= the client's size
        gives a uniform shuffle.
      max_examples: optional cap on distinct examples.

    Returns:
      A dataset of batches with batch dimension `None`.

    Raises:
      fedprune.errors.InvalidArgument: for non-positive sizes.
    """
    return preprocess_client_datasets(
        [examples], batch_size=batch_size, local_epochs=local_epochs,
        shuffle_seeds=[shuffle_seed], shuffle_buffer_sizes=[shuffle_buffer_size],
        max_examples=max_examples)[0]


def preprocess_client_datasets(
    examples: Sequence[tf.data.Dataset],
    *,
    batch_size: int,
    local_epochs: int,
    shuffle_seeds: Sequence[int | None],
    shuffle_buffer_sizes: Sequence[int],
    max_examples: int | None = None,
) -> list[tf.data.Dataset]:
    """`preprocess_client_dataset` for several clients (a round's), in a few calls.

    Calling a traced function costs ~0.45 ms of Python whatever it builds, so
    the clients are built by one call per one in the binary form of their
    number (10 clients: 8 + 2), each of a function traced once per such count
    (`_client_pipelines`). 10 clients cost 0.9 instead of 4.5 ms of CPU. Each
    dataset is the one `preprocess_client_dataset` gives its client alone
    (tests/test_datasets.py).

    Args:
      examples: each client's unbatched examples.
      batch_size, local_epochs, max_examples: as in `preprocess_client_dataset`.
      shuffle_seeds: each client's shuffle seed; all None (stored order) or none.
      shuffle_buffer_sizes: each client's shuffle buffer, in examples.

    Returns:
      The clients' datasets, in the order of `examples`.

    Raises:
      fedprune.errors.InvalidArgument: for non-positive sizes.
      ValueError: lists of different lengths, or seeds some of which are None.
    """
    check_positive_int(batch_size, "batch_size")
    check_positive_int(local_epochs, "local_epochs")
    if max_examples is not None:
        check_positive_int(max_examples, "max_examples")
    if not len(examples) == len(shuffle_seeds) == len(shuffle_buffer_sizes):
        raise ValueError("one shuffle seed and buffer size per client's examples")
    shuffle = any(seed is not None for seed in shuffle_seeds)
    if shuffle and None in shuffle_seeds:
        raise ValueError("shuffle seeds must be all None or all ints")
    # The pipeline as traced calls, not the ~17 eager ops of building it op by
    # op: TensorFlow 2.14 keeps 16 bytes for every eager op call and every
    # argument it converts, 0.027 MiB a round at 100 clients a round (issue 18;
    # BUILD_NOTES.md, "The Python process's +0.028 MiB a round"). The sizes and
    # seeds go in as one numpy int64 matrix per call: one conversion, never a
    # Python int, which TensorFlow would keep in its scalar cache for good
    # (BUILD_NOTES.md, "TensorFlow 2.14 keeps every Python int"), and a tensor
    # in the trace, so a new seed does not retrace.
    from tensorflow.python.framework import random_seed

    rows = []
    for shuffle_seed, buffer_size in zip(shuffle_seeds, shuffle_buffer_sizes, strict=True):
        seed = seed2 = 0
        if shuffle_seed is not None:
            # The shuffle's two kernel seeds exactly as `Dataset.shuffle(seed=...)`
            # derives them at this call, from TensorFlow's global seed (which
            # `tf.random.set_seed` changes) and the op seed: plain Python, no op.
            seed, seed2 = random_seed.get_seed(np.int64(shuffle_seed))
        rows.append([seed, seed2, max(buffer_size, 1), max_examples or 0, local_epochs,
                     batch_size])
    sizes = np.array(rows, dtype=np.int64).reshape(len(rows), 6)
    datasets, start = [], 0
    for bit in reversed(range(len(examples).bit_length())):
        count = 1 << bit
        if len(examples) & count:
            pipelines = _client_pipelines(shuffle=shuffle, take=max_examples is not None,
                                          count=count)
            datasets += pipelines(tuple(examples[start:start + count]),
                                  sizes[start:start + count])
            start += count
    return datasets


@functools.cache
def _client_pipelines(*, shuffle: bool, take: bool, count: int):
    """The traced pipelines of `count` clients, one function per (shuffle?, cap?, count).

    Its arguments: a tuple of `count` unbatched examples, and an int64 matrix
    [count, 6], a row per client: the shuffle's two kernel seeds, its buffer
    (examples), the cap on distinct examples (unused without `take`), the local
    epochs and the batch size.

    The shuffle is the op `Dataset.shuffle(..., reshuffle_each_iteration=False)`
    makes, given its two seeds: inside a trace, `Dataset.shuffle` would take the
    global seed of the trace, not of the call, and cannot take a tensor seed
    when that global seed is 0.
    """
    tf = _tf()

    def pipeline(examples, sizes):
        seed, seed2, buffer_size, max_examples, local_epochs, batch_size = tf.unstack(sizes)
        if shuffle:
            specs = tf.nest.flatten(examples.element_spec)
            shuffled = tf.raw_ops.ShuffleDatasetV3(
                input_dataset=tf.data.experimental.to_variant(examples),
                buffer_size=buffer_size, seed=seed, seed2=seed2,
                seed_generator=tf.raw_ops.DummySeedGenerator(),
                output_types=[spec.dtype for spec in specs],
                output_shapes=[spec.shape for spec in specs],
                reshuffle_each_iteration=False)
            examples = tf.data.experimental.from_variant(shuffled, examples.element_spec)
        if take:
            examples = examples.take(max_examples)
        return examples.repeat(local_epochs).batch(batch_size).with_options(options)

    @tf.function(autograph=False)
    def pipelines(examples, sizes):
        return [pipeline(e, row) for e, row in zip(examples, tf.unstack(sizes, num=count),
                                                   strict=True)]

    options = client_dataset_options()
    return pipelines


class ClientSource(Protocol):
    """Where a `FederatedData` gets each client's unbatched examples from."""

    def num_examples(self, client_id: str) -> int: ...

    def shuffle_buffer_size(self, client_id: str) -> int: ...

    def examples(self, client_id: str) -> tf.data.Dataset: ...

    def cached_bytes(self) -> int: ...


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
        self._examples: dict[str, tf.data.Dataset] = {}
        self._cached_bytes = 0

    def num_examples(self, client_id: str) -> int:
        return len(self.client_indices[client_id])

    def shuffle_buffer_size(self, client_id: str) -> int:
        return self.num_examples(client_id)

    def examples(self, client_id: str) -> tf.data.Dataset:
        """`client_id`'s unbatched examples, built once and then reused.

        The first call copies the client's rows into tensors; later calls
        return that same dataset, so a run holds at most one copy of the
        training set (float32 `x`, int32 `y`: 4 bytes a value) in these
        datasets. Rebuilding it every round costs TensorFlow 2.14 memory it
        never frees (about 16 bytes a `tf.constant`, plus native memory), a
        per-round growth at 100 clients a round (issue 18).
        """
        cached = self._examples.get(client_id)
        if cached is None:
            idx = self.client_indices[client_id]
            x, y = self.x[idx], self.y[idx]
            cached = _tf().data.Dataset.from_tensor_slices(collections.OrderedDict(x=x, y=y))
            self._examples[client_id] = cached
            self._cached_bytes += x.nbytes + y.nbytes
        return cached

    def cached_bytes(self) -> int:
        """Bytes of the client rows `examples` has copied so far (x and y; 0 to start).

        It grows as clients are first sampled, up to the training set's size.
        """
        return self._cached_bytes

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

    def cached_bytes(self) -> int:
        """0: TFF's client datasets read their files on demand; nothing is kept."""
        return 0


@dataclasses.dataclass(frozen=True, eq=False)
class FederatedData:
    """A federated training set (per-client, lazy) and a global test set.

    Attributes:
      name: dataset name, one of `DATASETS`.
      client_ids: training client ids; their order is the order
        `sampling.sample_round` indexes.
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

    def cached_client_bytes(self) -> int:
        """Bytes of client data kept for reuse across rounds (`ArraySource.examples`)."""
        return self.source.cached_bytes()

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
        return self.client_datasets([client_id], batch_size=batch_size,
                                    local_epochs=local_epochs, shuffle_seeds=[shuffle_seed],
                                    max_examples=max_examples)[0]

    def client_datasets(
        self,
        client_ids: Sequence[str],
        *,
        batch_size: int,
        local_epochs: int,
        shuffle_seeds: Sequence[int | None],
        max_examples: int | None = None,
    ) -> list[tf.data.Dataset]:
        """`client_dataset` of each client, built together (`preprocess_client_datasets`)."""
        return preprocess_client_datasets(
            [self.source.examples(c) for c in client_ids],
            batch_size=batch_size,
            local_epochs=local_epochs,
            shuffle_seeds=shuffle_seeds,
            shuffle_buffer_sizes=[self.source.shuffle_buffer_size(c) for c in client_ids],
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


def array_data(
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


def client_shuffle_seed(seed: int, round_num: int, client_id: str) -> int:
    """A shuffle seed in [0, 2**31) for one (seed, round, client).

    `zlib.crc32` (not `hash`, which is salted per process) maps the id to an
    int, so the seed is the same in every process.
    """
    entropy = [seed, round_num, zlib.crc32(client_id.encode("utf-8"))]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] >> 1)


def check_dataset_name(name: str, accepted) -> None:
    """Raises `InvalidArgument` (flag `--dataset`) unless `name` is one of `accepted`."""
    check(name in accepted, "dataset", name, f"one of {', '.join(accepted)}")
