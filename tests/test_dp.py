"""Differential privacy wired into the pruning process and the experiment loop.

The accounting maths and the bare DP aggregator are tested in test_privacy.py;
here: the released model is exactly sparse although TFF noises every
coordinate, the noise is really there, the epsilon a run reports is the
accountant's for the run's mechanism and sampling, and what a DP run writes.
"""

import csv
import dataclasses
import json
import math

import numpy as np
import pytest
from cli_util import CHEAP_OUTPUTS

from fedprune.config import ExperimentConfig
from fedprune.data import sampling
from fedprune.federated import privacy, privacy_accounting
from fedprune.federated import process as fp_process
from fedprune.model import builders
from fedprune.program import assembly, loop
from fedprune.pruning import masking, schedules

pytestmark = pytest.mark.usefixtures("tff_local_context")

NUM_CLIENTS = 4
CLIP = 0.5


@pytest.fixture(scope="module")
def client_data(digits_clients):
    return digits_clients(NUM_CLIENTS, 256)


def _dp_process(client_data, noise_multiplier, schedule=None):
    # MLP 64-50-10, server Adam: its moments would carry noise onto pruned
    # coordinates if the DP aggregate were not masked.
    return fp_process.build_pruning_process(
        model_builder=lambda: builders.mlp((64,), 10, hidden=(50,)),
        input_spec=client_data[0].element_spec,
        masking="server",
        schedule=schedule or schedules.make_schedule(
            "polynomial", initial_sparsity=0.5, final_sparsity=0.8, begin_round=1, end_round=2,
            prune_every=1, power=1.0),
        mask_spec=masking.MaskSpec(),
        num_rounds=3,
        client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer("adam", 0.01),
        seed=0,
        model_aggregator=privacy.build_dp_aggregator(
            "fixed", noise_multiplier=noise_multiplier, clip=CLIP,
            clients_per_round=NUM_CLIENTS),
    )


def _train(pp, client_data, rounds=3):
    state = pp.process.initialize()
    history = []
    for _ in range(rounds):
        state = pp.process.next(state, client_data).state
        history.append(pp.process.get_model_weights(state))
    return history


@pytest.fixture(scope="module")
def noisy_runs(client_data):
    pp = _dp_process(client_data, noise_multiplier=1.0)
    return pp, [_train(pp, client_data) for _ in range(2)]


def test_released_model_is_exactly_zero_off_the_mask(noisy_runs):
    pp, runs = noisy_runs
    # Sparsity 0.5 -> 0.8 linearly over rounds 1-2 (then kept), per layer; kept
    # counts are tfmot's max(round(N (1 - s)), 1): 3,200 -> 1600, 640; 500 -> 250, 100.
    kept = [[1600, 640, 640], [250, 100, 100]]
    for weights in runs[0]:
        for k in pp.layout.kernels:
            kernel = np.asarray(weights.trainable[k.trainable_index])
            mask = np.asarray(weights.non_trainable[k.mask_index])
            assert np.all(kernel[mask == 0] == 0.0)
    for r, weights in enumerate(runs[0]):
        nonzero = [int(np.count_nonzero(weights.non_trainable[k.mask_index]))
                   for k in pp.layout.kernels]
        assert nonzero == [kept[0][r], kept[1][r]]
        # And the kernels are nonzero exactly on the mask (noise makes every kept one move).
        assert [int(np.count_nonzero(weights.trainable[k.trainable_index]))
                for k in pp.layout.kernels] == nonzero


def test_server_adam_never_sees_noise_off_the_mask(client_data):
    # The initial model is pruned to 80 % (one-shot at round 0) and the mask is
    # kept, so a pruned coordinate never had a nonzero update: Adam's first and
    # second moments stay exactly 0 there only because the noised aggregate is
    # masked before the optimizer (TFF noises every coordinate; stddev 0.125).
    pp = _dp_process(client_data, 1.0, schedules.make_schedule(
        "oneshot", final_sparsity=0.8, begin_round=0))
    state = pp.process.initialize()
    for _ in range(2):
        state = pp.process.next(state, client_data).state
    adam = state.finalizer["optimizer"]
    weights = pp.process.get_model_weights(state)
    for k in pp.layout.kernels:
        off = np.asarray(weights.non_trainable[k.mask_index]) == 0
        assert off.mean() == pytest.approx(0.8, abs=1e-3)
        for moments in (adam["accumulator"], adam["preconditioner"]):
            moment = np.asarray(moments[k.trainable_index])
            assert np.all(moment[off] == 0.0) and np.all(moment[~off] != 0.0)


def test_noise_is_present(client_data, noisy_runs):
    _, (first, second) = noisy_runs
    # TFF's noise is drawn afresh: the same seed, data and state give other models.
    assert not np.array_equal(first[-1].trainable[0], second[-1].trainable[0])
    # Without noise (clipping only) the process is deterministic.
    quiet = _dp_process(client_data, noise_multiplier=0.0)
    a, b = _train(quiet, client_data, rounds=2), _train(quiet, client_data, rounds=2)
    for x, y in zip(a[-1].trainable, b[-1].trainable, strict=True):
        np.testing.assert_array_equal(x, y)
    # The noisy models are far from the noiseless one: per coordinate the noise has
    # stddev z C / m = 0.125 before Adam normalises it, far above the update itself.
    gap = np.abs(np.asarray(first[1].trainable[1]) - np.asarray(a[1].trainable[1]))
    assert gap.mean() > 1e-3


def _poisson_seed_with_empty_round(client_ids, rate, rounds):
    for seed in range(100):
        sizes = [len(sampling.poisson_sample(client_ids, rate, seed=seed, round_num=r))
                 for r in range(1, rounds + 1)]
        if sizes[0] > 0 and 0 in sizes:
            return seed, sizes
    raise AssertionError("no seed with an empty round")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_dp_run_reports_the_accountants_epsilon(tmp_path):
    base = ExperimentConfig(num_clients=6, clients_per_round=2, client_sampling="poisson",
                            rounds=3, end_round=2, max_examples_per_client=32,
                            masking="server", dp="fixed", dp_noise_multiplier=1.0, dp_clip=CLIP,
                            dp_accountant="pld", eval_every=1, **CHEAP_OUTPUTS)
    data = assembly.load_data(base.validate())
    seed, sizes = _poisson_seed_with_empty_round(data.client_ids, 2 / 6, base.rounds)
    config = dataclasses.replace(base, seed=seed).validate()
    summary = loop.run_experiment(config, tmp_path, log=lambda line: None)
    rows = _read_csv(tmp_path / "metrics.csv")

    # Poisson sampling, q = 2/6, z = 1, delta = 1e-5, add-or-remove adjacency.
    expected = privacy_accounting.run_accounting("fixed", noise_multiplier=1.0, sampling="poisson",
                                      clients_per_round=2, num_clients=6, rounds=3, delta=1e-5,
                                      accountant="pld")
    for r, row in enumerate(rows, 1):
        assert float(row["epsilon_rdp"]) == expected.epsilon_after(r, "rdp")
        assert float(row["epsilon_pld"]) == expected.epsilon_after(r, "pld")
        assert float(row["epsilon"]) == float(row["epsilon_pld"])
        assert float(row["dp_clip"]) == CLIP
        # TFF sums the clients' training metrics without noise: not released.
        assert row["train_loss"] == row["train_accuracy"] == ""
        assert math.isfinite(float(row["test_loss"]))
    epsilons = [float(r["epsilon"]) for r in rows]
    assert epsilons == sorted(epsilons) and epsilons[0] > 0
    # Three rounds of z = 1 at q = 1/3: epsilon well above 1 and PLD below RDP.
    assert expected.epsilon_after(3, "pld") < expected.epsilon_after(3, "rdp")
    assert summary["final_epsilon"] == expected.epsilon_after(3)
    assert summary["final_epsilon_rdp"] == expected.epsilon_after(3, "rdp")
    assert summary["final_train_loss"] is None
    # The round without clients ran (pure noise, counted by the accountant).
    assert [int(r["clients"]) for r in rows] == sizes
    info = json.loads((tmp_path / "config.json").read_text())["privacy"]
    assert info["accountant_assumption"].startswith("PoissonSampledDpEvent(q=0.333333)")
    assert info["accountants"] == ["rdp", "pld"]
    assert "train_loss" in info["not_released"]


@pytest.mark.slow
def test_poisson_without_dp_survives_an_empty_round(tmp_path):
    base = ExperimentConfig(num_clients=6, clients_per_round=2, client_sampling="poisson",
                            rounds=3, end_round=2, max_examples_per_client=32,
                            **CHEAP_OUTPUTS)
    data = assembly.load_data(base.validate())
    seed, sizes = _poisson_seed_with_empty_round(data.client_ids, 2 / 6, base.rounds)
    loop.run_experiment(dataclasses.replace(base, seed=seed).validate(), tmp_path,
                           log=lambda line: None)
    rows = _read_csv(tmp_path / "metrics.csv")
    assert [int(r["clients"]) for r in rows] == sizes
    for row, size in zip(rows, sizes, strict=True):
        assert (row["train_loss"] == "") == (size == 0)
        assert row["epsilon"] == ""
    # The schedule still advances in the empty round: the final sparsity is reached.
    assert float(rows[-1]["global_sparsity"]) == pytest.approx(0.8, abs=1e-3)
