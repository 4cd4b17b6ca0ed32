"""Partitioners: coverage, sizes, label skew, determinism and argument errors.

Pure numpy: nothing here imports TensorFlow (test_datasets checks that in a
fresh interpreter).
"""

import numpy as np
import pytest
from sklearn import datasets as sk_datasets

from fedprune.data import partitions
from fedprune.errors import InvalidArgument

DIGITS_Y = sk_datasets.load_digits().target  # 1,797 labels, 10 classes
# 10 classes x 20 examples, shuffled: with 20 shards of 10 every shard is one class.
BALANCED_Y = np.random.default_rng(7).permutation(np.repeat(np.arange(10), 20))

# (partition name, extra kwargs) for every implementation of the interface.
CASES = [
    ("iid", {}),
    ("shards", {"shards_per_client": 2}),
    ("dirichlet", {"dirichlet_alpha": 0.5}),
    ("dirichlet", {"dirichlet_alpha": 0.01, "min_examples_per_client": 5}),
]
CASE_IDS = ["iid", "shards", "dirichlet-0.5", "dirichlet-0.01"]


def _run(name, kwargs, labels=DIGITS_Y, num_clients=20, seed=0):
    return partitions.make_partition(name, labels, num_clients=num_clients, seed=seed, **kwargs)


def test_registry_lists_every_partitioner():
    assert partitions.PARTITIONERS == ("iid", "shards", "dirichlet")


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_every_index_exactly_once(name, kwargs):
    parts = _run(name, kwargs)
    assert len(parts) == 20
    joined = np.concatenate(parts)
    assert joined.dtype == np.int64
    np.testing.assert_array_equal(np.sort(joined), np.arange(len(DIGITS_Y)))
    for p in parts:
        np.testing.assert_array_equal(p, np.sort(p))


@pytest.mark.parametrize("name,kwargs", CASES, ids=CASE_IDS)
def test_same_seed_same_partition_other_seed_differs(name, kwargs):
    a, b, c = _run(name, kwargs, seed=3), _run(name, kwargs, seed=3), _run(name, kwargs, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize("num_examples,num_clients", [(1797, 20), (10, 3), (7, 7), (100, 1)])
def test_iid_sizes_differ_by_at_most_one(num_examples, num_clients):
    sizes = [len(p) for p in partitions.iid(num_examples, num_clients, seed=0)]
    assert sum(sizes) == num_examples
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("k", [1, 2, 5])
def test_shards_give_at_most_k_labels_when_shards_are_pure(k):
    # 200 examples, 20 clients * k shards; pure shards need 20 % (20 * k / 10) == 0:
    # k=1 -> 20 shards of 10, k=2 -> 40 of 5, k=5 -> 100 of 2. All divide 20.
    parts = partitions.shards(BALANCED_Y, 20, k, seed=0)
    stats = partitions.partition_stats(BALANCED_Y, parts, 10)
    assert stats["labels_max"] <= k
    assert stats["examples_min"] == stats["examples_max"] == 200 // 20


def test_shards_on_digits_at_most_two_k_labels():
    # Shards can straddle a class boundary, so 2 shards give <= 4 labels; the
    # mean stays close to 2 (McMahan et al.'s "most clients have 2 digits").
    parts = partitions.shards(DIGITS_Y, 100, 2, seed=0)
    stats = partitions.partition_stats(DIGITS_Y, parts, 10)
    assert stats["labels_max"] <= 4
    assert stats["labels_mean"] < 2.5
    assert stats["examples_max"] - stats["examples_min"] <= 2  # 200 shards of 8 or 9


def test_dirichlet_smaller_alpha_fewer_labels():
    skewed = partitions.partition_stats(
        DIGITS_Y, partitions.dirichlet(DIGITS_Y, 20, 0.1, seed=0), 10
    )
    flat = partitions.partition_stats(
        DIGITS_Y, partitions.dirichlet(DIGITS_Y, 20, 100.0, seed=0), 10
    )
    assert skewed["labels_mean"] < 5 < flat["labels_mean"] == 10
    assert skewed["label_tv_mean"] > 0.5 > 0.2 > flat["label_tv_mean"]


def test_dirichlet_tiny_alpha_terminates_and_respects_min_size(monkeypatch):
    # Bounded work, counted rather than timed: at most _DIRICHLET_MAX_DRAWS draws,
    # then one deterministic repair. (At alpha 0.01 no draw gives 100 clients >= 10
    # examples each, so this case takes the repair.)
    calls = {"draw": 0, "repair": 0}
    draw, repair = partitions._dirichlet_draw, partitions._repair_min_size

    def counting_draw(*args, **kwargs):
        calls["draw"] += 1
        return draw(*args, **kwargs)

    def counting_repair(*args, **kwargs):
        calls["repair"] += 1
        return repair(*args, **kwargs)

    monkeypatch.setattr(partitions, "_dirichlet_draw", counting_draw)
    monkeypatch.setattr(partitions, "_repair_min_size", counting_repair)
    parts = partitions.dirichlet(DIGITS_Y, 100, 0.01, seed=0, min_examples_per_client=10)
    assert calls == {"draw": partitions._DIRICHLET_MAX_DRAWS, "repair": 1}
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 10
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(len(DIGITS_Y)))


def test_dirichlet_min_size_at_the_feasibility_limit():
    # 1,797 examples, 179 clients of >= 10: only 7 examples to spare.
    parts = partitions.dirichlet(DIGITS_Y, 179, 0.01, seed=1, min_examples_per_client=10)
    assert min(len(p) for p in parts) >= 10


def test_repair_moves_from_largest_client():
    parts = [np.arange(0, 10), np.arange(10, 11), np.arange(11, 12)]
    repaired = partitions._repair_min_size(parts, 3)
    assert [len(p) for p in repaired] == [6, 3, 3]
    np.testing.assert_array_equal(np.sort(np.concatenate(repaired)), np.arange(12))


def test_partition_stats_golden():
    labels = np.array([0, 0, 1, 2, 2, 2])
    stats = partitions.partition_stats(labels, [np.array([0, 1]), np.array([2, 3, 4, 5])], 4)
    np.testing.assert_array_equal(stats["count_matrix"], [[2, 0, 0, 0], [0, 1, 3, 0]])
    np.testing.assert_array_equal(stats["examples_per_client"], [2, 4])
    np.testing.assert_array_equal(stats["labels_per_client"], [1, 2])
    assert stats["num_examples"] == 6 and stats["labels_mean"] == 1.5
    # pooled = (2, 1, 3, 0) / 6; client 0 = (1, 0, 0, 0): TV = 0.5 * (4/6 + 1/6 + 3/6) = 2/3;
    # client 1 = (0, 1/4, 3/4, 0): TV = 0.5 * (2/6 + 1/12 + 1/4) = 1/3. Mean 1/2.
    assert stats["label_tv_mean"] == pytest.approx(0.5)


BAD_ARGS = [
    (dict(partition="dirichlet", num_clients=5, dirichlet_alpha=0.0), "--dirichlet_alpha=0.0"),
    (dict(partition="dirichlet", num_clients=5, dirichlet_alpha=-1.0), "--dirichlet_alpha=-1.0"),
    (dict(partition="iid", num_clients=11, num_examples=10), "--num_clients=11"),
    (dict(partition="iid", num_clients=0), "--num_clients=0"),
    (
        dict(partition="shards", num_clients=10, shards_per_client=2, num_examples=15),
        "--shards_per_client=2",
    ),
    (dict(partition="shards", num_clients=10, shards_per_client=0), "--shards_per_client=0"),
    (dict(partition="pathological", num_clients=10), "--partition='pathological'"),
    (
        dict(
            partition="dirichlet",
            num_clients=10,
            num_examples=50,
            dirichlet_alpha=1.0,
            min_examples_per_client=6,
        ),
        "--num_clients=10",
    ),
]


@pytest.mark.parametrize("kwargs,flag", BAD_ARGS, ids=[f for _, f in BAD_ARGS])
def test_bad_arguments_name_the_flag_on_one_line(kwargs, flag):
    partition = kwargs.pop("partition")
    with pytest.raises(ValueError) as info:
        partitions.validate_partition_args(partition, **kwargs)
    message = str(info.value)
    assert isinstance(info.value, InvalidArgument)
    assert message.startswith(flag + ": expected ")
    assert "\n" not in message


@pytest.mark.parametrize(
    "call,flag",
    [
        (lambda: partitions.iid(5, 6, seed=0), "--num_clients"),
        (lambda: partitions.shards(DIGITS_Y, 1000, 2, seed=0), "--shards_per_client"),
        (lambda: partitions.dirichlet(DIGITS_Y, 10, 0.0, seed=0), "--dirichlet_alpha"),
        (lambda: partitions.dirichlet(DIGITS_Y[:5], 10, 1.0, seed=0), "--num_clients"),
    ],
    ids=["iid", "shards", "dirichlet-alpha", "dirichlet-clients"],
)
def test_partitioners_validate_their_arguments(call, flag):
    with pytest.raises(ValueError, match=flag):
        call()


def test_validation_accepts_good_arguments():
    for name in partitions.PARTITIONERS:
        partitions.validate_partition_args(
            name, num_clients=10, num_examples=100, dirichlet_alpha=0.1, shards_per_client=2
        )
