"""Masking modes differ by construction; equivalences that hold by construction are equal.

`client`: clients prune (at the end of, or with `--prune_granularity=step`
during, local training) and the server only averages: the global model is the
union of the clients' masks, denser than each client. `server`: clients train
inside the broadcast mask, the server re-masks. `both`: client pruning and the
server re-mask. Same seed, same clients: the three global models differ.
Schedules `constant` (re-prune every round to the final level) and `oneshot`
(prune once) are the same computation at round granularity, where pruned
weights cannot regrow, so a table needs only one of them.
"""

import numpy as np
import pytest
import tensorflow as tf

from fedprune.errors import InvalidArgument
from fedprune.federated import process as fp_process
from fedprune.model import builders
from fedprune.pruning import masking, regrowth, schedules, step_schedule

pytestmark = pytest.mark.usefixtures("tff_local_context")

# Clients of 10, 7, 4 and 2 batches of 16 digits; mean 5.75 -> 6 steps per round.
CLIENT_BATCHES = (10, 7, 4, 2)
SPR = 6
N = 64 * 16 + 16 * 10  # pruned weights of the MLP 64-16-10
# 0.5 -> 0.8 over rounds 1..3 (steps 6..18), cubic: 0.5, 0.7625, 0.8 after rounds 1, 2, 3.
POLY = schedules.PolynomialDecay(0.5, 0.8, begin_round=1, end_round=3, power=3)
ROUNDS = 3


@pytest.fixture(scope="module")
def clients(digits_clients):
    return [ds.take(n) for ds, n in zip(digits_clients(4, 640), CLIENT_BATCHES, strict=True)]


_PROCESSES = {}


def _process(clients, masking_mode, schedule=POLY, granularity="round"):
    """The process for these arguments, traced once per masking mode at round granularity.

    At round granularity the schedule is data in the state: the process built for
    POLY runs any other schedule as `PruningProcess.for_cell` (what every grid does,
    and tested equal to a process built for that schedule in tests/test_one_trace.py).
    At step granularity the clients' tfmot wrappers carry the schedule: one build each.
    """
    key = (masking_mode, granularity, schedule if granularity == "step" else None)
    if key not in _PROCESSES:
        _PROCESSES[key] = _build(clients, masking_mode, schedule, granularity)
    return _PROCESSES[key].for_cell(schedule, seed=0)


def _build(clients, masking_mode, schedule=POLY, granularity="round"):
    mapping = None
    if granularity == "step":
        mapping = step_schedule.step_mapping(schedule, steps_per_round=SPR, prune_every_steps=1)
    return fp_process.build_pruning_process(
        model_builder=lambda: builders.mlp((64,), 10, hidden=(16,)),
        input_spec=clients[0].element_spec, masking=masking_mode, schedule=schedule,
        mask_spec=masking.MaskSpec(), num_rounds=ROUNDS,
        client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0, step_mapping=mapping)


_RUNS = {}


def _run(clients, masking_mode, schedule=POLY, granularity="round"):
    """(pp, global weights after rounds 0..ROUNDS, finalizer diagnostics of rounds 1..)."""
    key = (masking_mode, schedule, granularity)
    if key not in _RUNS:
        pp = _process(clients, masking_mode, schedule, granularity)
        state = pp.process.initialize()
        weights, diagnostics = [pp.process.get_model_weights(state)], []
        for _ in range(ROUNDS):
            output = pp.process.next(state, clients)
            state = output.state
            weights.append(pp.process.get_model_weights(state))
            diagnostics.append({k: float(v) for k, v in output.metrics["finalizer"]["masks"]
                                .items()})
        _RUNS[key] = (pp, weights, diagnostics)
    return _RUNS[key]


def _kernels(pp, weights):
    return [np.asarray(weights.trainable[k.trainable_index]) for k in pp.layout.kernels]


def _sparsity(pp, weights):
    return 1.0 - sum(np.count_nonzero(k) for k in _kernels(pp, weights)) / N


@pytest.mark.parametrize("granularity", ["round", "step"])
def test_client_server_and_both_differ_on_the_same_seed(clients, granularity):
    modes = ("client", "server", "both") if granularity == "round" else ("client", "both")
    runs = {m: _run(clients, m, granularity=granularity if m != "server" else "round")
            for m in (*modes, "server")}
    finals = {m: _kernels(runs[m][0], runs[m][1][-1]) for m in runs}
    for a in runs:
        for b in runs:
            if a < b:
                gap = max(np.max(np.abs(x - y)) for x, y in zip(finals[a], finals[b],
                                                                 strict=True))
                assert gap > 1e-3, (a, b, gap)
    # The server's modes hold the schedule's level exactly: 0.8 (tfmot's counts,
    # 205 + 32 of 1,024 + 160); client mode keeps the union of the clients' masks
    # (0.7931 round, 0.7889 step on this machine).
    for m in ("server", "both"):
        assert _sparsity(runs[m][0], runs[m][1][-1]) == pytest.approx(1 - (205 + 32) / N)
    assert 0.75 < _sparsity(runs["client"][0], runs["client"][1][-1]) < 1 - (205 + 32) / N


@pytest.mark.parametrize("granularity", ["round", "step"])
def test_client_mode_global_model_is_the_union_and_denser_than_its_clients(clients,
                                                                           granularity):
    pp, weights, diagnostics = _run(clients, "client", granularity=granularity)
    for r in range(1, ROUNDS + 1):
        d = diagnostics[r - 1]
        assert d["client_mask_jaccard"] < 1.0  # the clients' masks differ
        # The union of different masks is denser than their mean (round: 0.4831 <
        # 0.5, 0.7492 < 0.7627, 0.7931 < 0.7998; step: 0 < 0.3201, where the
        # clients of 4 and 2 batches never reach step 6 in round 1 and stay dense).
        global_sparsity = _sparsity(pp, weights[r])
        assert global_sparsity < d["client_sparsity"], (r, global_sparsity, d)
        assert global_sparsity < pp.table.sparsity[r]  # below the schedule's level
        # The broadcast mask is the union: exactly the global kernels' support.
        for k in pp.layout.kernels:
            np.testing.assert_array_equal(weights[r].non_trainable[k.mask_index],
                                          weights[r].trainable[k.trainable_index] != 0)
        # The server's global step: r * 6 (step) or r (round), whatever the clients ran.
        step = r * (SPR if granularity == "step" else 1)
        assert {int(weights[r].non_trainable[i]) for i in pp.layout.step_indices} == {step}
    if granularity == "round":  # each client pruned to the level exactly: 0.5, 0.7625, 0.8
        for r, level in zip(range(1, ROUNDS + 1), (0.5, 0.7625, 0.8), strict=True):
            kept = 512 + 80 if r == 1 else (243 + 38 if r == 2 else 205 + 32)
            assert diagnostics[r - 1]["client_sparsity"] == pytest.approx(1 - kept / N), level


def _tfmot_level(step):
    """POLY in steps (6..18, cubic) at `step`: tfmot's sparsity, evaluated by tfmot."""
    in_steps = step_schedule.tfmot_step_schedule(
        POLY, step_schedule.step_mapping(POLY, steps_per_round=SPR, prune_every_steps=1))
    return float(in_steps(tf.constant(step, tf.int64))[1])


def test_step_clients_with_more_batches_advance_further(clients):
    # Round 2 from the same state, each client alone: client c runs steps 7 ... 6 + n_c
    # and prunes at each, so its last mask is at tfmot's level for step 6 + n_c;
    # the server's step after the round is 12 whoever trained.
    pp = _process(clients, "client", granularity="step")
    state = pp.process.next(pp.process.initialize(), clients).state
    levels = []
    for client, n in zip(clients, CLIENT_BATCHES, strict=True):
        weights = pp.process.get_model_weights(pp.process.next(state, [client]).state)
        level = _tfmot_level(SPR + n)
        levels.append(level)
        for k in pp.layout.kernels:
            kept = int(weights.non_trainable[k.mask_index].sum())
            expected = max(int(np.round(np.float32(k.size) * (1 - np.float32(level)))), 1)
            assert kept == expected, (n, k.name, kept, expected)
        assert {int(weights.non_trainable[i]) for i in pp.layout.step_indices} == {2 * SPR}
    # 10 batches reach s(16) = 0.7997 > the round's target s(12) = 0.7625 > s(8) = 0.6111.
    assert levels[0] > _tfmot_level(2 * SPR) > levels[-1]
    assert levels == sorted(levels, reverse=True)


@pytest.mark.parametrize("masking_mode", ["client", "server", "both"])
def test_constant_equals_oneshot_at_round_granularity(clients, masking_mode):
    # Re-pruning to the same level finds the same k weights: the others are exact
    # zeros that cannot regrow (clients train inside the mask, uploads are masked).
    constant = schedules.ConstantSparsity(0.7, begin_round=1, end_round=-1)
    oneshot = schedules.OneShot(0.7, begin_round=1)
    _, a, _ = _run(clients, masking_mode, constant)
    pp, b, _ = _run(clients, masking_mode, oneshot)
    for wa, wb in zip(a, b, strict=True):
        for x, y in zip([*wa.trainable, *wa.non_trainable], [*wb.trainable, *wb.non_trainable],
                        strict=True):
            np.testing.assert_array_equal(x, y)
    # Pruned in all modes: the server's exactly (307 + 48 kept at 0.7), client's union less.
    if masking_mode == "client":
        assert 0.3 < _sparsity(pp, b[-1]) < 0.7
    else:
        assert _sparsity(pp, b[-1]) == pytest.approx(1 - (307 + 48) / N)


def test_constant_and_oneshot_differ_at_step_granularity(clients):
    # Step clients re-select the top k every step with `constant`, and tfmot's
    # update ranks the weights the last step moved off the mask too.
    constant = schedules.ConstantSparsity(0.7, begin_round=1, end_round=-1)
    oneshot = schedules.OneShot(0.7, begin_round=1)
    pp, a, _ = _run(clients, "client", constant, "step")
    _, b, _ = _run(clients, "client", oneshot, "step")
    assert max(np.max(np.abs(x - y)) for x, y in zip(_kernels(pp, a[-1]), _kernels(pp, b[-1]),
                                                     strict=True)) > 1e-3


@pytest.mark.parametrize("rule", ["random", "gradient"])
def test_a_process_traced_without_regrowth_refuses_a_regrowing_cell(clients, rule):
    """`for_cell` of a process built without a regrowth spec runs cells without one (or
    with rule none) and refuses one that regrows, which its trace cannot do."""
    built = _process(clients, "server")  # traced without regrowth
    assert built.for_cell(POLY, seed=1, regrow=regrowth.RegrowSpec(end_round=3)) is not None
    with pytest.raises(InvalidArgument, match=f"^--regrow='?{rule}'?: expected none, the "):
        built.for_cell(POLY, seed=0, regrow=regrowth.RegrowSpec(rule=rule, end_round=3))
