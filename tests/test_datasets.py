"""Federated datasets: sizes, element specs, client pipelines, laziness, TFF files.

TFF loaders are exercised on tiny SQLite files written in TFF's on-disk schema
(`sql_client_data_utils.save_to_sql_client_data`) under the exact file names
`tff.simulation.datasets.*.load_data` looks for, and loaded through the same
`load_tff_dataset` code path as the real files, with every download entry
point patched to fail.
"""

import collections
import hashlib
import sqlite3
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from sklearn.datasets import load_digits as sk_load_digits

from fedprune.data import datasets, partitions
from fedprune.errors import InvalidArgument

NUM_DIGITS = 1797
# sklearn's train_test_split rounds the test share up: ceil(0.2 * 1797) = 360.
NUM_DIGITS_TEST = 360
NUM_DIGITS_TRAIN = NUM_DIGITS - NUM_DIGITS_TEST
# Only against a hang: no test here checks how long anything takes. Loading
# speed at scale (1,000 clients) is measured by `experiments/benchmark.py
# --sections=scale`, not asserted.
HANG_GUARD_S = 600


@pytest.fixture(scope="module")
def digits():
    return datasets.load_digits(num_clients=10, partition="iid", seed=0)


def _ys(dataset):
    """All labels of a batched dataset, flattened, in order."""
    return np.concatenate([b["y"].numpy()[:, 0] for b in dataset])


def _batch_sizes(dataset):
    return [int(b["x"].shape[0]) for b in dataset]


# --------------------------------------------------------------------------
# Cheap import, registry, dispatch.
# --------------------------------------------------------------------------


def test_no_tensorflow_until_a_dataset_is_built():
    # A fresh interpreter: validating flags, loading digits and checking a TFF
    # file must not import TensorFlow (drivers do these before importing it).
    code = textwrap.dedent(
        """
        import sys
        from fedprune.data import datasets, partitions
        assert datasets.DATASETS.names()[0] == "digits"
        partitions.validate_partition_args("dirichlet", num_clients=5, dirichlet_alpha=0.1)
        data = datasets.load_digits(num_clients=5, partition="shards", seed=0)
        assert data.num_examples(data.client_ids[0]) > 0
        try:
            datasets.check_tff_data_file("emnist", "/nonexistent")
        except FileNotFoundError:
            pass
        assert "tensorflow" not in sys.modules, "tensorflow was imported"
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=HANG_GUARD_S)


def test_registry():
    assert datasets.DATASETS.names() == (
        "digits",
        "synthetic",
        "emnist_digits",
        "emnist",
        "cifar100",
        "shakespeare",
    )


def test_unknown_dataset_names_the_flag():
    with pytest.raises(InvalidArgument) as info:
        datasets.load_dataset("mnist")
    message = str(info.value)
    assert message.startswith("--dataset='mnist': expected one of digits|synthetic|emnist_digits")
    assert "\n" not in message


def test_load_dataset_dispatches_to_digits():
    data = datasets.load_dataset("digits", num_clients=3, partition="iid", seed=0)
    assert data.name == "digits" and len(data.client_ids) == 3


# --------------------------------------------------------------------------
# Digits.
# --------------------------------------------------------------------------


def test_digits_sizes_and_fixed_test_split(digits):
    assert digits.test_x.shape == (NUM_DIGITS_TEST, 64)
    assert digits.test_y.shape == (NUM_DIGITS_TEST, 1)
    assert sum(digits.num_examples(c) for c in digits.client_ids) == NUM_DIGITS_TRAIN
    assert digits.input_shape == (64,) and digits.num_classes == 10
    assert 0.0 <= digits.test_x.min() and digits.test_x.max() == 1.0
    # Stratified: each class gets its share of the 360 test images, n_c * 360 / 1797
    # rounded down or up (sklearn's train_test_split): 178 images of class 0 ->
    # 35.66 -> 35 or 36; 174 of class 8 -> 34.86 -> 34 or 35.
    share = np.bincount(sk_load_digits().target) * NUM_DIGITS_TEST / NUM_DIGITS
    test_counts = np.bincount(digits.test_y[:, 0])
    assert (np.floor(share) <= test_counts).all() and (test_counts <= np.ceil(share)).all()
    other = datasets.load_digits(num_clients=7, partition="dirichlet", seed=5)
    np.testing.assert_array_equal(other.test_x, digits.test_x)
    np.testing.assert_array_equal(other.test_y, digits.test_y)


@pytest.mark.parametrize("partition", partitions.PARTITIONERS)
def test_digits_every_partition_covers_the_train_split(partition):
    data = datasets.load_digits(num_clients=10, partition=partition, seed=1)
    counts = data.label_count_matrix()
    assert counts.shape == (10, 10)
    assert counts.sum() == NUM_DIGITS_TRAIN
    assert [data.num_examples(c) for c in data.client_ids] == list(counts.sum(axis=1))


def test_digits_bad_partition_argument_names_flag():
    with pytest.raises(ValueError, match=r"^--dirichlet_alpha=-0.5: expected"):
        datasets.load_digits(num_clients=10, partition="dirichlet", seed=0, dirichlet_alpha=-0.5)


def test_element_spec_and_batches(digits):
    client = digits.client_ids[0]
    n = digits.num_examples(client)  # 144 (1,437 / 10, sizes 143 or 144)
    ds = digits.client_dataset(client, batch_size=32, local_epochs=1, shuffle_seed=0)
    assert ds.element_spec == digits.element_spec
    assert digits.element_spec["x"] == tf.TensorSpec([None, 64], tf.float32)
    assert digits.element_spec["y"] == tf.TensorSpec([None, 1], tf.int32)
    sizes = _batch_sizes(ds)
    assert sizes == [32] * (n // 32) + [n % 32]
    assert digits.test_dataset(100).element_spec == digits.element_spec


@pytest.mark.parametrize("shuffle_seed,max_examples", [(0, None), (None, 7), (3, 7)])
def test_client_datasets_are_neither_autotuned_nor_rewritten(digits, shuffle_seed, max_examples):
    # Every traced variant of the pipeline carries `client_dataset_options`
    # (tests/test_process.py: the same weights as under tf.data's defaults).
    ds = digits.client_dataset(digits.client_ids[0], batch_size=32, local_epochs=2,
                               shuffle_seed=shuffle_seed, max_examples=max_examples)
    assert ds.options().autotune.enabled is False
    assert ds.options().experimental_optimization.apply_default_optimizations is False
    assert tf.data.Options().autotune.enabled is None  # tf.data's default: on


def test_shuffle_is_deterministic_per_seed(digits):
    client = digits.client_ids[1]

    def order(seed):
        return _ys(digits.client_dataset(client, batch_size=16, local_epochs=1, shuffle_seed=seed))

    np.testing.assert_array_equal(order(11), order(11))
    assert not np.array_equal(order(11), order(12))
    np.testing.assert_array_equal(np.sort(order(11)), np.sort(order(None)))
    stored = digits.source.y[digits.source.client_indices[client], 0]
    np.testing.assert_array_equal(order(None), stored)


def test_local_epochs_repeat_the_same_order(digits):
    client = digits.client_ids[2]
    n = digits.num_examples(client)
    ys = _ys(digits.client_dataset(client, batch_size=10, local_epochs=2, shuffle_seed=3))
    assert len(ys) == 2 * n
    np.testing.assert_array_equal(ys[:n], ys[n:])


@pytest.mark.parametrize(
    "max_examples,epochs,expected", [(20, 1, 20), (20, 3, 60), (10_000, 1, None)]
)
def test_max_examples_caps_distinct_examples(digits, max_examples, epochs, expected):
    client = digits.client_ids[3]
    expected = expected or digits.num_examples(client)
    ds = digits.client_dataset(
        client, batch_size=8, local_epochs=epochs, shuffle_seed=0, max_examples=max_examples
    )
    assert sum(_batch_sizes(ds)) == expected


@pytest.mark.parametrize(
    "kwargs,flag",
    [
        (dict(batch_size=0, local_epochs=1), "--batch_size=0"),
        (dict(batch_size=8, local_epochs=0), "--local_epochs=0"),
        (dict(batch_size=8, local_epochs=1, max_examples=0), "--max_examples=0"),
    ],
)
def test_pipeline_rejects_bad_sizes(digits, kwargs, flag):
    with pytest.raises(InvalidArgument, match=f"^{flag}: expected"):
        digits.client_dataset(digits.client_ids[0], shuffle_seed=0, **kwargs)


# --------------------------------------------------------------------------
# Client shuffle seeds.
# --------------------------------------------------------------------------


def test_client_shuffle_seed():
    seed = datasets.client_shuffle_seed(1, 2, "client_a")
    assert seed == datasets.client_shuffle_seed(1, 2, "client_a")
    assert 0 <= seed < 2**31
    others = {
        datasets.client_shuffle_seed(1, 2, "client_b"),
        datasets.client_shuffle_seed(1, 3, "client_a"),
        datasets.client_shuffle_seed(2, 2, "client_a"),
    }
    assert seed not in others and len(others) == 3


# --------------------------------------------------------------------------
# Synthetic(alpha, beta).
# --------------------------------------------------------------------------


def _synthetic(**kwargs):
    args = dict(num_clients=30, alpha=1.0, beta=1.0, seed=0) | kwargs
    return datasets.load_synthetic(**args)


def _client_feature_mean_std(data):
    """Std over clients of each client's mean feature value."""
    means = [data.source.x[idx].mean() for idx in data.source.client_indices.values()]
    return float(np.std(means))


def _label_tv(data):
    parts = [data.source.client_indices[c] for c in data.client_ids]
    return partitions.partition_stats(data.source.y[:, 0], parts, data.num_classes)["label_tv_mean"]


def test_synthetic_shapes_and_sizes():
    data = _synthetic()
    assert data.input_shape == (60,) and data.num_classes == 10
    sizes = np.array([data.num_examples(c) for c in data.client_ids])
    # FedProx sizes: int(LogNormal(4, 2)) + 50 >= 50, 90% kept: >= int(0.9 * 50) = 45.
    assert sizes.min() >= 45
    total = sizes.sum() + len(data.test_y)
    assert len(data.test_y) == pytest.approx(0.1 * total, rel=0.05)
    assert data.test_x.shape == (len(data.test_y), 60) and data.test_y.shape[1] == 1
    ds = data.client_dataset(data.client_ids[0], batch_size=4, local_epochs=1, shuffle_seed=0)
    assert ds.element_spec == data.element_spec


def test_synthetic_is_deterministic_from_seed():
    a, b, c = _synthetic(seed=4), _synthetic(seed=4), _synthetic(seed=5)
    np.testing.assert_array_equal(a.source.x, b.source.x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert a.source.x.shape != c.source.x.shape or not np.array_equal(a.source.x, c.source.x)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_synthetic_beta_spreads_client_feature_means(seed):
    # v_k ~ N(B_k, 1) per coordinate with B_k ~ N(0, beta): the std over clients
    # of the mean of 60 coordinates is ~sqrt(beta^2 + 1/60) -> ~0.13 at beta=0.
    flat = _client_feature_mean_std(_synthetic(alpha=0.0, beta=0.0, seed=seed))
    spread = _client_feature_mean_std(_synthetic(alpha=1.0, beta=1.0, seed=seed))
    assert flat < 0.3 < 0.6 < spread


def test_synthetic_alpha_does_not_change_labels():
    # u_k adds u_k * (sum(x) + 1) to every logit of client k, so argmax (and
    # thus y) is the same for any alpha given the other draws (same seed).
    a, b = _synthetic(alpha=0.0, seed=3), _synthetic(alpha=2.0, seed=3)
    np.testing.assert_array_equal(a.source.y, b.source.y)


def test_synthetic_iid_has_far_less_label_skew():
    # Per-client (W_k, b_k) make labels strongly client-specific; Synthetic-IID
    # shares one (W, b); FedProx generates it with alpha = beta = 0 (v_k = 0).
    # Seed 0: TV 0.10 vs 0.79.
    iid = _synthetic(alpha=0.0, beta=0.0, seed=0, iid=True)
    assert _label_tv(iid) < 0.2 < 0.6 < _label_tv(_synthetic(alpha=0.0, beta=0.0, seed=0))


def test_synthetic_rejects_negative_beta():
    with pytest.raises(InvalidArgument, match=r"^--synthetic_beta=-1.0"):
        _synthetic(beta=-1.0)


# --------------------------------------------------------------------------
# Example-id digests (config.json's provenance).
# --------------------------------------------------------------------------


def _digits_digests(**kwargs):
    args = {"num_clients": 5, "partition": "dirichlet", "seed": 0, **kwargs}
    return datasets.example_index_digests(datasets.load_digits(**args))


def test_digits_ids_are_the_rows_of_sklearns_digits_split_once():
    data = datasets.load_digits(num_clients=5, partition="dirichlet", seed=0)
    clients = [data.source.row_ids[data.source.client_indices[c]] for c in data.client_ids]
    assert sorted(np.concatenate([*clients, data.test_ids]).tolist()) == list(range(1797))
    digests = datasets.example_index_digests(data)
    assert digests["test"] == hashlib.sha256(
        np.asarray(data.test_ids, dtype="<i8").tobytes()).hexdigest()
    assert digests["clients"]["2"] == hashlib.sha256(
        np.asarray(clients[2], dtype="<i8").tobytes()).hexdigest()


def test_digits_digests_change_with_the_seed_and_partition_only():
    base = _digits_digests()
    assert _digits_digests() == base
    assert _digits_digests(shards_per_client=5) == base  # not a setting of this partition
    for changed in ({"seed": 1}, {"partition": "iid"}, {"dirichlet_alpha": 0.1},
                    {"num_clients": 6}):
        other = _digits_digests(**changed)
        assert other["test"] == base["test"], changed  # the fixed test split
        assert other["clients"] != base["clients"], changed


def test_synthetic_digests_change_with_the_seed_only():
    def digests(**kwargs):
        return datasets.example_index_digests(_synthetic(**kwargs))

    base = digests(seed=4)
    assert digests(seed=4) == base
    assert digests(seed=4, beta=0.5) == base  # beta moves the features, not which examples
    other = digests(seed=5)
    assert other["test"] != base["test"] and other["clients"] != base["clients"]


def test_tff_data_has_no_index_digests(no_network, data_dir):
    assert datasets.example_index_digests(
        datasets.load_tff_dataset("cifar100", data_dir=data_dir)) is None


# --------------------------------------------------------------------------
# Laziness.
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "load",
    [
        lambda: datasets.load_digits(num_clients=1000, partition="iid", seed=0),
        lambda: datasets.load_synthetic(num_clients=1000, alpha=0.5, beta=0.5, seed=0, dim=10),
    ],
    ids=["digits", "synthetic"],
)
def test_thousand_clients_build_no_pipelines_until_asked(monkeypatch, load):
    calls = []
    original = datasets.ArraySource.examples

    def counting(self, client_id):
        calls.append(client_id)
        return original(self, client_id)

    monkeypatch.setattr(datasets.ArraySource, "examples", counting)
    # Loading builds no client's examples (the event that would make it slow at
    # scale; how fast loading is, is the benchmark's scale section's business).
    data = load()
    assert len(data.client_ids) == 1000 and calls == [] and data.cached_client_bytes() == 0
    for client in data.client_ids[:3]:
        data.client_dataset(client, batch_size=2, local_epochs=1, shuffle_seed=0)
    assert calls == data.client_ids[:3]
    # The cache counts each sampled client's rows once: float32 x and int32 y, 4 bytes a value.
    row_bytes = 4 * (int(np.prod(data.input_shape)) + 1)
    first_three = sum(data.num_examples(c) for c in data.client_ids[:3]) * row_bytes
    assert data.cached_client_bytes() == first_three
    data.client_dataset(data.client_ids[0], batch_size=5, local_epochs=2, shuffle_seed=1)
    assert data.cached_client_bytes() == first_three


@pytest.mark.parametrize(
    "load",
    [
        lambda: datasets.load_digits(num_clients=10, partition="dirichlet", seed=0),
        lambda: datasets.load_synthetic(num_clients=10, alpha=1.0, beta=1.0, seed=0, dim=10),
    ],
    ids=["digits", "synthetic"],
)
@pytest.mark.parametrize("max_examples,epochs", [(None, 1), (None, 2), (7, 2)])
def test_cached_examples_give_the_batches_of_a_fresh_pipeline(load, max_examples, epochs):
    # `ArraySource.examples` builds a client's tensors once and reuses them, and
    # the shuffle seed goes in as a numpy int64 (issue 18: both grew memory every
    # round). The batches must be exactly those of the construction they
    # replaced, call after call and seed after seed, a seed seen before and a
    # seed above 2**31 (TensorFlow reduces op seeds modulo 2**31 - 1) included.
    data = load()
    source = data.source

    def fresh(client, seed):
        # The construction before issue 18's changes, spelled out: new tensors
        # and a Python int seed every call.
        idx = source.client_indices[client]
        examples = tf.data.Dataset.from_tensor_slices(
            collections.OrderedDict(x=source.x[idx], y=source.y[idx]))
        if seed is not None:
            examples = examples.shuffle(len(idx), seed=int(seed), reshuffle_each_iteration=False)
        if max_examples is not None:
            examples = examples.take(max_examples)
        return examples.repeat(epochs).batch(4)

    compared = 0
    for client in data.client_ids[:3]:
        for seed in [5, 2**62 + 3, None, 5]:
            cached = data.client_dataset(client, batch_size=4, local_epochs=epochs,
                                         shuffle_seed=seed, max_examples=max_examples)
            got, want = list(cached), list(fresh(client, seed))
            assert len(got) == len(want) > 0
            for g, w in zip(got, want, strict=True):
                np.testing.assert_array_equal(g["x"].numpy(), w["x"].numpy())
                np.testing.assert_array_equal(g["y"].numpy(), w["y"].numpy())
            compared += 1
        assert source.examples(client) is source.examples(client)
    assert compared == 12


@pytest.fixture
def global_seed():
    """Sets TensorFlow's global seed for a test; no global seed afterwards."""
    yield tf.random.set_seed
    tf.random.set_seed(None)


@pytest.mark.parametrize("seed", [None, 0, 7, 2**31 - 1, 2**40 + 3])
def test_client_pipeline_shuffles_as_dataset_shuffle_under_the_global_seed(global_seed, seed):
    # The traced pipeline makes the op of `Dataset.shuffle` with the seeds it
    # derives from the global seed at each call; 0 and 2**31 - 1 both truncate to a
    # global seed of 0, where `Dataset.shuffle` cannot take a traced seed.
    from fedprune.data.datasets.container import preprocess_client_dataset

    examples = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(
        x=np.arange(40, dtype=np.float32).reshape(20, 2), y=np.arange(20, dtype=np.int64)))

    def batches(dataset):
        return [b["y"].numpy().tolist() for b in dataset]

    orders = []
    for op_seed in (0, 12345, 2**31 - 2, -5):
        for buffer, cap in ((20, None), (6, 9)):
            global_seed(seed)
            expected = examples.shuffle(buffer, seed=op_seed,
                                        reshuffle_each_iteration=False)
            if cap is not None:
                expected = expected.take(cap)
            expected = batches(expected.repeat(2).batch(8))
            global_seed(seed)
            got = batches(preprocess_client_dataset(
                examples, batch_size=8, local_epochs=2, shuffle_seed=op_seed,
                shuffle_buffer_size=buffer, max_examples=cap))
            assert got == expected
            orders.append(got)
    # The seeds matter: the four op seeds give four orders of each (buffer, cap).
    assert len({str(order) for order in orders}) == len(orders)


@pytest.mark.parametrize("shuffled,max_examples", [(True, None), (True, 7), (False, None)])
def test_a_client_dataset_is_one_traced_call(digits, shuffled, max_examples):
    # TensorFlow 2.14 keeps 16 bytes of Python heap for every eager op call
    # (BUILD_NOTES.md, "The Python process's +0.028 MiB a round"): built op by op,
    # a client's dataset made 17 such calls, every round. One traced call with
    # one numpy argument keeps ~2 blocks, and a new seed does not retrace.
    import gc

    from fedprune.data.datasets import container

    client = digits.client_ids[0]

    def build(round_num):
        seed = datasets.client_shuffle_seed(0, round_num, client) if shuffled else None
        return digits.client_dataset(client, batch_size=8, local_epochs=2,
                                     shuffle_seed=seed, max_examples=max_examples)

    for round_num in range(1, 21):
        build(round_num)
    pipeline = container._client_pipelines(shuffle=shuffled, take=max_examples is not None,
                                           count=1)
    traces = pipeline.experimental_get_tracing_count()
    gc.collect()
    before = sys.getallocatedblocks()
    count = 400
    for round_num in range(21, 21 + count):
        build(round_num)
    gc.collect()
    assert (sys.getallocatedblocks() - before) / count < 4  # 17 when built op by op
    assert pipeline.experimental_get_tracing_count() == traces


@pytest.mark.parametrize("count", [0, 1, 3, 10])
@pytest.mark.parametrize("shuffled,max_examples", [(True, None), (True, 7), (False, None)])
def test_a_rounds_datasets_built_together_equal_each_built_alone(digits, count, shuffled,
                                                                 max_examples):
    clients = digits.client_ids[:count]
    seeds = [datasets.client_shuffle_seed(0, 5, c) if shuffled else None for c in clients]
    together = digits.client_datasets(clients, batch_size=8, local_epochs=2,
                                      shuffle_seeds=seeds, max_examples=max_examples)
    assert len(together) == count
    for client, seed, dataset in zip(clients, seeds, together, strict=True):
        alone = digits.client_dataset(client, batch_size=8, local_epochs=2, shuffle_seed=seed,
                                      max_examples=max_examples)
        assert dataset.element_spec == alone.element_spec
        got, want = list(dataset), list(alone)
        assert len(got) == len(want) > 0
        for a, b in zip(got, want, strict=True):
            np.testing.assert_array_equal(a["x"].numpy(), b["x"].numpy())
            np.testing.assert_array_equal(a["y"].numpy(), b["y"].numpy())


def test_rounds_of_any_size_use_one_trace_per_power_of_two(digits, monkeypatch):
    """A round of n clients makes one call per one in n's binary form (10 = 8 + 2), of
    functions traced once each: rounds of 1..10 clients need those of 1, 2, 4 and 8."""
    from fedprune.data.datasets import container

    pipelines, calls = container._client_pipelines, []

    def recording(**kwargs):
        calls.append(kwargs["count"])
        return pipelines(**kwargs)

    monkeypatch.setattr(container, "_client_pipelines", recording)

    def build(count):
        calls.clear()
        clients = digits.client_ids[:count]
        built = digits.client_datasets(
            clients, batch_size=8, local_epochs=1, max_examples=5,
            shuffle_seeds=[datasets.client_shuffle_seed(0, count, c) for c in clients])
        assert len(built) == count
        return list(calls)

    assert build(10) == [8, 2] and build(7) == [4, 2, 1] and build(1) == [1]
    for count in range(1, 11):
        build(count)
    traced = [pipelines(shuffle=True, take=True, count=c) for c in (1, 2, 4, 8)]
    traces = [f.experimental_get_tracing_count() for f in traced]
    for count in range(10, 0, -1):
        build(count)
    assert [f.experimental_get_tracing_count() for f in traced] == traces


def test_client_datasets_refuses_mixed_seeds_and_lengths(digits):
    clients = digits.client_ids[:2]
    with pytest.raises(ValueError, match="all None or all ints"):
        digits.client_datasets(clients, batch_size=8, local_epochs=1, shuffle_seeds=[None, 3])
    with pytest.raises(ValueError, match="one shuffle seed"):
        digits.client_datasets(clients, batch_size=8, local_epochs=1, shuffle_seeds=[3])


# --------------------------------------------------------------------------
# TFF datasets from tiny SQLite files.
# --------------------------------------------------------------------------


def _feature(values):
    values = np.asarray(values)
    if values.dtype.kind == "S" or values.dtype.kind == "O":
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values.ravel())))
    if values.dtype.kind == "f":
        return tf.train.Feature(float_list=tf.train.FloatList(value=values.ravel()))
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values.ravel()))


def _example(**features):
    return tf.train.Example(
        features=tf.train.Features(feature={k: _feature(v) for k, v in features.items()})
    ).SerializeToString()


def _write_sqlite(path, rows):
    """Writes TFF's schema; `rows` maps (split_name, client_id) -> serialized examples."""
    with sqlite3.connect(path) as con:
        # The schema of tff.simulation.datasets.sql_client_data_utils.
        con.execute(
            "CREATE TABLE examples (split_name TEXT NOT NULL, client_id TEXT NOT NULL, "
            "serialized_example_proto BLOB NOT NULL);"
        )
        con.execute(
            "CREATE TABLE client_metadata (client_id TEXT NOT NULL, split_name TEXT NOT NULL, "
            "num_examples INTEGER NOT NULL);"
        )
        for (split, client), examples in rows.items():
            con.executemany(
                "INSERT INTO examples VALUES (?, ?, ?);", [(split, client, e) for e in examples]
            )
            con.execute(
                "INSERT INTO client_metadata VALUES (?, ?, ?);", (client, split, len(examples))
            )
    con.close()


def _emnist_examples(n, label):
    return [
        _example(pixels=np.full((28, 28), i / 10, np.float32), label=np.array([label]))
        for i in range(n)
    ]


def _cifar_examples(n, label):
    image = np.arange(32 * 32 * 3).reshape(32, 32, 3) % 256
    return [
        _example(image=image, label=np.array([label + i]), coarse_label=np.array([label % 20]))
        for i in range(n)
    ]


SNIPPETS = {
    "train": {
        "ROMEO": [b"But soft, what light", b"through yonder window breaks?"],
        "JULIET": [b"O Romeo, Romeo! wherefore art thou Romeo? " * 3],
    },
    "test": {"ROMEO": [b"It is the east"], "JULIET": [b"and Juliet is the sun\xc3\xa9."]},
}


def _shakespeare_rows():
    return {
        (split, client): [_example(snippets=np.array([s], object)) for s in snippets]
        for split, clients in SNIPPETS.items()
        for client, snippets in clients.items()
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tff_data")
    emnist_rows = {}
    for split in ("digits_only", "all"):
        emnist_rows[(f"{split}_train", "f0000_00")] = _emnist_examples(5, 3)
        emnist_rows[(f"{split}_train", "f0001_01")] = _emnist_examples(3, 7)
        emnist_rows[(f"{split}_test", "f0000_00")] = _emnist_examples(2, 3)
        emnist_rows[(f"{split}_test", "f0001_01")] = _emnist_examples(2, 7)
    emnist_rows[("all_train", "f0002_02")] = _emnist_examples(4, 40)
    _write_sqlite(root / "emnist_all.sqlite", emnist_rows)
    _write_sqlite(
        root / "cifar100.sqlite",
        {
            ("train", "0"): _cifar_examples(4, 10),
            ("train", "1"): _cifar_examples(2, 50),
            ("test", "0"): _cifar_examples(3, 90),
        },
    )
    _write_sqlite(root / "shakespeare.sqlite", _shakespeare_rows())
    return str(root)


@pytest.fixture(autouse=False)
def no_network(monkeypatch):
    """Makes every download entry point TFF and Keras use fail loudly."""
    import urllib.request

    from tensorflow_federated.python.simulation.datasets import download

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(download, "_fetch_lzma_file", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setattr(tf.keras.utils, "get_file", refuse)


@pytest.mark.parametrize(
    "name,num_clients,sizes,num_classes,input_shape,num_test",
    [
        ("emnist_digits", 2, [5, 3], 10, (28, 28, 1), 4),
        ("emnist", 3, [5, 3, 4], 62, (28, 28, 1), 4),
        ("cifar100", 2, [4, 2], 100, (32, 32, 3), 3),
    ],
)
def test_tff_image_datasets_load_from_present_files(
    no_network, data_dir, name, num_clients, sizes, num_classes, input_shape, num_test
):
    data = datasets.load_tff_dataset(name, data_dir=data_dir)
    assert len(data.client_ids) == num_clients
    assert [data.num_examples(c) for c in data.client_ids] == sizes
    assert data.num_classes == num_classes and data.input_shape == input_shape
    assert data.test_x.shape == (num_test, *input_shape) and data.test_x.dtype == np.float32
    assert data.test_y.shape == (num_test, 1) and data.test_y.dtype == np.int32
    ds = data.client_dataset(data.client_ids[0], batch_size=2, local_epochs=2, shuffle_seed=1)
    assert ds.element_spec == data.element_spec
    assert sum(_batch_sizes(ds)) == 2 * sizes[0]
    assert float(data.test_x.max()) <= 1.0


def test_emnist_values_and_labels(no_network, data_dir):
    data = datasets.load_tff_dataset("emnist_digits", data_dir=data_dir)
    ds = data.client_dataset("f0000_00", batch_size=5, local_epochs=1, shuffle_seed=None)
    batch = next(iter(ds))
    # Example i has every pixel = i / 10 and label 3.
    np.testing.assert_allclose(batch["x"].numpy()[:, 0, 0, 0], [0.0, 0.1, 0.2, 0.3, 0.4])
    np.testing.assert_array_equal(batch["y"].numpy(), [[3]] * 5)


def test_cifar_crop_and_scale(no_network, data_dir):
    data = datasets.load_tff_dataset("cifar100", data_dir=data_dir, cifar_crop_size=24)
    assert data.input_shape == (24, 24, 3) and data.test_x.shape == (3, 24, 24, 3)
    # Center crop starts at pixel (4, 4): value index ((4 * 32 + 4) * 3) % 256 = 140.
    assert data.test_x[0, 0, 0, 0] == pytest.approx(140 / 255)
    np.testing.assert_array_equal(np.sort(data.test_y[:, 0]), [90, 91, 92])


def test_max_test_examples_caps(no_network, data_dir):
    data = datasets.load_tff_dataset("emnist", data_dir=data_dir, max_test_examples=3)
    assert data.test_x.shape == (3, 28, 28, 1)


def test_shakespeare_sequences(no_network, data_dir):
    data = datasets.load_tff_dataset("shakespeare", data_dir=data_dir, sequence_length=10)
    assert data.client_ids == ["JULIET", "ROMEO"]
    assert data.vocab_size == data.num_classes == 90 and data.sequence_length == 10
    assert data.element_spec["x"] == tf.TensorSpec([None, 10], tf.int32)
    assert data.element_spec["y"] == tf.TensorSpec([None, 10], tf.int32)
    assert data.num_examples("ROMEO") == 2  # snippets
    ds = data.client_dataset("ROMEO", batch_size=100, local_epochs=1, shuffle_seed=None)
    batch = next(iter(ds))
    x, y = batch["x"].numpy(), batch["y"].numpy()
    # (20 + 2) tokens -> 2 sequences of 11; (29 + 2) -> 3: 5 sequences.
    assert x.shape == (5, 10)
    np.testing.assert_array_equal(x[0, 1:], y[0, :-1])
    assert x[0, 0] == 88 and 89 in y[1]  # BOS starts a snippet, EOS ends it
    assert data.test_x.dtype == np.int32 and data.test_x.shape[1] == 10


def test_shakespeare_ids_match_tff_preprocessing(no_network, data_dir):
    from tensorflow_federated.python.simulation.baselines import client_spec
    from tensorflow_federated.python.simulation.baselines.shakespeare import (
        char_prediction_preprocessing,
    )

    data = datasets.load_tff_dataset("shakespeare", data_dir=data_dir, sequence_length=12)
    # The JULIET snippet has a non-ASCII character (2 bytes, both OOV).
    snippets = SNIPPETS["test"]["JULIET"] + SNIPPETS["train"]["ROMEO"]
    raw = tf.data.Dataset.from_tensor_slices(collections.OrderedDict(snippets=snippets))
    spec = client_spec.ClientSpec(num_epochs=1, batch_size=1000, shuffle_buffer_size=1)
    tff_x, tff_y = next(iter(char_prediction_preprocessing.create_preprocess_fn(spec, 12)(raw)))
    ours = next(iter(data.source.to_examples(raw).batch(1000)))
    np.testing.assert_array_equal(ours["x"].numpy(), tff_x.numpy())
    np.testing.assert_array_equal(ours["y"].numpy(), tff_y.numpy())


@pytest.mark.parametrize("name", ["emnist_digits", "emnist", "cifar100", "shakespeare"])
def test_missing_file_fails_fast_with_one_line(no_network, tmp_path, name):
    # "Fast": without any download attempt (`no_network` fails the test on one)
    # and without writing anything into the data directory (checked below).
    with pytest.raises(FileNotFoundError) as info:
        datasets.load_dataset(name, data_dir=str(tmp_path))
    message = str(info.value)
    assert "\n" not in message
    assert "--data_dir" in message
    assert datasets.tff_data_path(name, str(tmp_path)) in message
    assert "tff.simulation.datasets." in message and "load_data(cache_dir=" in message
    assert list(tmp_path.iterdir()) == []


def test_tff_num_clients_keeps_a_seeded_subset(no_network, data_dir):
    a = datasets.load_dataset("emnist", data_dir=data_dir, num_clients=2, seed=0)
    b = datasets.load_dataset("emnist", data_dir=data_dir, num_clients=2, seed=0)
    assert a.client_ids == b.client_ids and len(a.client_ids) == 2
    assert set(a.client_ids) <= {"f0000_00", "f0001_01", "f0002_02"}
    assert a.client_ids == sorted(a.client_ids)
    with pytest.raises(InvalidArgument, match=r"^--num_clients=4: expected at most the 3"):
        datasets.load_dataset("emnist", data_dir=data_dir, num_clients=4, seed=0)
