"""Tests for fedprune.program.assembly: each round's inputs."""

import pytest

from fedprune.config import ExperimentConfig
from fedprune.data import datasets, sampling
from fedprune.program import assembly


@pytest.mark.parametrize("mode", ["fixed", "poisson"])
def test_round_inputs_follow_the_configs_client_sampling(mode):
    # The benchmark used to sample with the fixed-size sampler whatever the flag said.
    data = datasets.load_digits(num_clients=20, partition="iid", seed=0)
    config = ExperimentConfig(num_clients=20, clients_per_round=5, client_sampling=mode)
    inputs = assembly.round_inputs(config, data, 3)
    assert inputs.round_num == 3
    assert inputs.clients == sampling.sample_round(
        mode, data.client_ids, clients_per_round=5, seed=config.seed, round_num=3)
    assert len(inputs.datasets) == len(inputs.clients)
    assert all(d.element_spec == data.element_spec for d in inputs.datasets)
    # A pure function of (config, round): a resumed run gets the same inputs.
    assert assembly.round_inputs(config, data, 3).clients == inputs.clients
