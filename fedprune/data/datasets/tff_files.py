"""TFF's federated datasets, read from the SQLite files TFF caches.

`emnist_digits`, `emnist`, `cifar100`, `shakespeare` (Caldas et al. 2018,
"LEAF: A Benchmark for Federated Settings"; Reddi et al. 2021, "Adaptive
Federated Optimization" for the CIFAR-100 split), read from the files that
`tff.simulation.datasets` caches. This module never downloads: a missing file
is an error.

Each is registered in `DATASETS` (`EmnistDigits`, `Emnist`, `Cifar100`,
`Shakespeare`).

Importing this module is cheap: TensorFlow and TFF are imported by
`load_tff_dataset` and the per-dataset mappings.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import sqlite3
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from fedprune.data.datasets.catalog import DATASETS, DatasetLoader
from fedprune.data.datasets.container import FederatedData, TffSource, _tf, check_dataset_name
from fedprune.data.partitions import check_positive_int
from fedprune.errors import check

if TYPE_CHECKING:
    import tensorflow as tf

# Order in which TFF test clients are read when `max_test_examples` caps the
# test set; fixed so the capped test set is the same for every run.
TFF_TEST_CLIENT_ORDER_SEED = 0

# Shakespeare sequences per client are not known without a pass over the
# snippets, so their shuffle buffer is a constant instead of the client size.
_SEQUENCE_SHUFFLE_BUFFER = 1000


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
    check_dataset_name(name, _TFF_FILES)
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


@dataclasses.dataclass(frozen=True)
class _TffDataset(DatasetLoader):
    """`load_tff_dataset(tff_name, ...)` with the config's values; the file is checked here.

    `data_dir` "" is TFF's default cache; `num_clients` and `max_test_examples`
    0 keep every client and every test example.
    """

    data_dir: str = ""
    num_clients: int = 0
    seed: int = 0
    max_test_examples: int = 0

    tff_name: ClassVar[str]

    def __post_init__(self):
        check_tff_data_file(self.tff_name, self.data_dir or None)
        check(self.num_clients >= 0, "num_clients", self.num_clients,
              "a whole number >= 0 (0 = all clients of the file)")

    def load(self) -> FederatedData:
        return load_tff_dataset(self.tff_name, data_dir=self.data_dir or None,
                                num_clients=self.num_clients or None, seed=self.seed,
                                max_test_examples=self.max_test_examples or None)


@DATASETS.register("emnist_digits", help="TFF's federated EMNIST, digits only (3,383 writers, "
                   "10 classes)")
class EmnistDigits(_TffDataset):
    tff_name = "emnist_digits"


@DATASETS.register("emnist", help="TFF's federated EMNIST (3,400 writers, 62 classes)")
class Emnist(_TffDataset):
    tff_name = "emnist"


@DATASETS.register("cifar100", help="TFF's federated CIFAR-100 (500 clients)")
class Cifar100(_TffDataset):
    tff_name = "cifar100"


@DATASETS.register("shakespeare", help="TFF's Shakespeare (715 characters, next-character "
                   "prediction, --model=rnn)")
class Shakespeare(_TffDataset):
    tff_name = "shakespeare"
    sequence = True


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
