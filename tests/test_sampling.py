"""Client sampling: Poisson and fixed-size, as pure functions of (seed, round)."""

import numpy as np
import pytest

from fedprune.data import sampling
from fedprune.errors import InvalidArgument

IDS = [f"c{i:03d}" for i in range(100)]


def test_poisson_is_a_pure_function_of_seed_and_round():
    a = sampling.poisson_sample(IDS, 0.1, seed=7, round_num=3)
    assert a == sampling.poisson_sample(IDS, 0.1, seed=7, round_num=3)
    assert a != sampling.poisson_sample(IDS, 0.1, seed=7, round_num=4)
    assert a != sampling.poisson_sample(IDS, 0.1, seed=8, round_num=3)
    # Sampled ids keep the population's order.
    assert a == sorted(a, key=IDS.index)


def test_poisson_size_is_binomial():
    sizes = np.array([len(sampling.poisson_sample(IDS, 0.1, seed=0, round_num=r))
                      for r in range(2000)])
    # Binomial(100, 0.1): mean 10, variance 9; the mean of 2000 rounds has stddev 0.067.
    assert sizes.mean() == pytest.approx(10.0, abs=0.3)
    assert sizes.var() == pytest.approx(9.0, rel=0.15)
    # Every client is included with probability q, independently of its position.
    counts = np.zeros(len(IDS))
    for r in range(2000):
        for cid in sampling.poisson_sample(IDS, 0.1, seed=0, round_num=r):
            counts[IDS.index(cid)] += 1
    assert counts.mean() / 2000 == pytest.approx(0.1, abs=0.003)


def test_poisson_round_can_be_empty():
    # P(empty) = (1 - 0.01)^100 = 0.366.
    sizes = [len(sampling.poisson_sample(IDS, 0.01, seed=1, round_num=r)) for r in range(500)]
    assert np.mean(np.array(sizes) == 0) == pytest.approx(0.366, abs=0.07)
    assert sampling.poisson_sample(IDS, 1.0, seed=1, round_num=0) == IDS


def test_sample_round_modes():
    fixed = sampling.sample_round("fixed", IDS, clients_per_round=10, seed=3, round_num=2)
    assert fixed == sampling.sample_clients(IDS, 10, seed=3, round_num=2)
    poisson = sampling.sample_round("poisson", IDS, clients_per_round=10, seed=3, round_num=2)
    assert poisson == sampling.poisson_sample(IDS, 0.1, seed=3, round_num=2)
    assert sampling.poisson_rate(10, 100) == 0.1


@pytest.mark.parametrize(
    "mode, clients_per_round, flag",
    [("shuffle", 10, "client_sampling"), ("poisson", 0, "clients_per_round"),
     ("poisson", 101, "clients_per_round"), ("fixed", 101, "clients_per_round")],
)
def test_sample_round_rejects(mode, clients_per_round, flag):
    with pytest.raises(InvalidArgument) as info:
        sampling.sample_round(mode, IDS, clients_per_round=clients_per_round, seed=0, round_num=0)
    assert info.value.name == flag


@pytest.mark.parametrize("rate", [0.0, 1.5, -0.1])
def test_poisson_rejects_rate(rate):
    with pytest.raises(ValueError, match="rate"):
        sampling.poisson_sample(IDS, rate, seed=0, round_num=0)


def test_sample_clients_is_a_function_of_seed_and_round():
    ids = [str(i) for i in range(100)]
    rounds = [sampling.sample_clients(ids, 10, seed=1, round_num=r) for r in range(5)]
    # "Resuming" at round 3 gives the same sample as the uninterrupted sequence.
    assert sampling.sample_clients(ids, 10, seed=1, round_num=3) == rounds[3]
    assert all(len(set(s)) == 10 and set(s) <= set(ids) for s in rounds)
    assert rounds[0] != rounds[1]
    assert sampling.sample_clients(ids, 10, seed=2, round_num=0) != rounds[0]


@pytest.mark.parametrize("k", [0, 101])
def test_sample_clients_rejects_bad_count(k):
    with pytest.raises(InvalidArgument, match=f"^--clients_per_round={k}"):
        sampling.sample_clients([str(i) for i in range(100)], k, seed=0, round_num=0)
