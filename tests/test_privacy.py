"""DP aggregators (privacy), accounting (privacy_accounting), the per-round
check (privacy_report) and masking of the DP aggregate (masking.mask_update).

Golden epsilons were computed with dp-accounting 0.4.3 on the events named in
each test (RdpAccountant with its default orders; PLDAccountant with the
stated grid step), and cross-checked against the reference z = 1.0, 10 of 100
clients per round, 100 rounds, delta = 1e-5 -> 7.899 (RDP), 7.047 (PLD).
"""

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import rdp_privacy_accountant

from fedprune.errors import InvalidArgument
from fedprune.federated import privacy
from fedprune.federated import privacy_accounting as accounting
from fedprune.outputs import privacy_report
from fedprune.pruning import masking

# TFF warns that adaptive clipping at m = 11 multiplies the update noise by 2.40: expected here.
pytestmark = pytest.mark.filterwarnings("ignore:A significant amount of noise:UserWarning")

DELTA = 1e-5
# The reference run: z = 1, Poisson sampling of 10 of 100 clients (q = 0.1), 100 rounds.
REF = dict(noise_multiplier=1.0, clients_per_round=10, num_clients=100, rounds=100)


def _raw_rdp_epsilon(event, delta=DELTA):
    """dp-accounting's RDP accountant without our float32 guard."""
    acc = rdp_privacy_accountant.RdpAccountant()
    acc.compose(event)
    return acc.get_epsilon(delta)


# ----------------------------------------------------------------------------
# Accounting (no TF).


@pytest.mark.parametrize("accountant, expected", [("rdp", 7.899), ("pld", 7.047)])
def test_reference_epsilon(accountant, expected):
    event = accounting.dp_event("fixed", sampling="poisson", **REF)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(1.0)), 100)
    assert accounting.epsilon(event, DELTA, accountant) == pytest.approx(expected, abs=5e-4)


def test_adaptive_event_accounts_the_combined_noise():
    # z = 1 at m = 11: TFF puts z_v = 2.4004 on the update and 2 sigma_b = 1.1 on
    # the clipped count; 2.4004^-2 + 1.1^-2 = 1^-2, so epsilon is that of z = 1
    # (q = 11/110 = 0.1 as in the reference).
    params = privacy.adaptive_noise(1.0, 11)
    assert params.value_noise_multiplier == pytest.approx(2.4004, abs=1e-4)
    assert params.count_noise_multiplier == pytest.approx(1.1)
    mechanism = accounting.mechanism_event("adaptive", noise_multiplier=1.0, clients_per_round=11)
    assert mechanism == dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(params.value_noise_multiplier),
        dp_accounting.GaussianDpEvent(1.1)])
    assert accounting.effective_gaussian_noise_multiplier(mechanism) == pytest.approx(1.0)
    ours = accounting.dp_event("adaptive", noise_multiplier=1.0, sampling="poisson",
                            clients_per_round=11, num_clients=110, rounds=100)
    # dp-accounting's own RDP treatment of the composed event inside the sampling.
    theirs = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.1, mechanism), 100)
    assert accounting.epsilon(ours, DELTA) == pytest.approx(_raw_rdp_epsilon(theirs), rel=1e-9)
    assert accounting.epsilon(ours, DELTA) == pytest.approx(7.899, abs=5e-4)
    # The collapsed event is also one the PLD accountant accepts.
    assert accounting.epsilon(ours, DELTA, "pld") == pytest.approx(7.047, abs=5e-4)


def test_float32_guard():
    # TFF's aggregator state carries np.float32 noise multipliers (see the TFF
    # test below). Wrapped in Poisson sampling, dp-accounting 0.4.3 then stops at
    # the first non-`float` multiplier and accounts z_v = 2.4 alone: epsilon 2.024.
    z_v = np.float32(privacy.adaptive_noise(1.0, 11).value_noise_multiplier)
    float32_round = dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.ComposedDpEvent(
        [dp_accounting.GaussianDpEvent(z_v), dp_accounting.GaussianDpEvent(np.float32(1.1))]))
    float32_event = dp_accounting.SelfComposedDpEvent(float32_round, 100)
    raw = _raw_rdp_epsilon(float32_event)
    assert raw == pytest.approx(2.024, abs=1e-3)
    assert raw == pytest.approx(accounting.epsilon(
        dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
            0.1, dp_accounting.GaussianDpEvent(float(z_v))), 100), DELTA), rel=1e-6)
    # Guarded: every field a Python number, and epsilon matches the event built
    # from known parameters (7.899) up to float32 rounding of z_v and 1.1.
    guarded = accounting.as_python_floats(float32_event)
    multipliers = [e.noise_multiplier for e in guarded.event.event.events]
    assert all(type(m) is float for m in multipliers)
    from_params = accounting.epsilon(accounting.dp_event("adaptive", sampling="poisson",
                                                   noise_multiplier=1.0, clients_per_round=11,
                                                   num_clients=110, rounds=100), DELTA)
    assert _raw_rdp_epsilon(guarded) == pytest.approx(from_params, rel=1e-4)
    assert accounting.epsilon(float32_event, DELTA) == pytest.approx(from_params, rel=1e-4)


def test_fixed_size_sampling_event():
    # Fixed-size sampling without replacement: replace-one adjacency, where two
    # clipped updates differ by up to 2C, so the Gaussian enters with z / 2.
    event = accounting.dp_event("fixed", sampling="fixed", **REF)
    assert event == dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            100, 10, dp_accounting.GaussianDpEvent(0.5)), 100)
    eps_fixed = accounting.epsilon(event, DELTA)
    # RdpAccountant(REPLACE_ONE) on that event: 83.94. With dp-accounting's
    # uncorrected z = 1 it would be 14.05; Poisson (add-or-remove) gives 7.899.
    assert eps_fixed == pytest.approx(83.94, abs=0.01)
    uncorrected = dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0)),
        100)
    assert accounting.epsilon(uncorrected, DELTA) == pytest.approx(14.05, abs=0.01)
    poisson = accounting.dp_event("fixed", sampling="poisson", **REF)
    assert eps_fixed > 10 * accounting.epsilon(poisson, DELTA)
    with pytest.raises(InvalidArgument, match="--dp_accountant='pld'"):
        accounting.epsilon(event, DELTA, "pld")


def test_epsilon_per_round_rdp_matches_composition():
    round_event = accounting.dp_event("fixed", sampling="poisson", **{**REF, "rounds": 1})
    eps = accounting.epsilon_per_round(round_event, DELTA, rounds=100)
    assert len(eps) == 100 and all(a < b for a, b in zip(eps, eps[1:], strict=False))
    assert eps[-1] == pytest.approx(7.899, abs=5e-4)
    for k in (1, 10):
        composed = dp_accounting.SelfComposedDpEvent(round_event, k)
        assert eps[k - 1] == pytest.approx(accounting.epsilon(composed, DELTA), rel=1e-12)


def test_epsilon_per_round_pld():
    round_event = accounting.dp_event("fixed", sampling="poisson", **{**REF, "rounds": 1})
    eps = accounting.epsilon_per_round(round_event, DELTA, rounds=100, accountant="pld")
    # Grid step 1e-3 (default here) vs 1e-4: 7.04663 vs 7.04660; the coarser grid
    # is pessimistic, so never below.
    assert eps[-1] == pytest.approx(7.047, abs=5e-4) and eps[-1] >= 7.04660
    assert eps[0] == pytest.approx(1.6845, abs=1e-3)
    assert all(a <= b for a, b in zip(eps, eps[1:], strict=False))


def test_no_noise_is_infinite_epsilon():
    event = accounting.dp_event("fixed", sampling="poisson", **{**REF, "noise_multiplier": 0.0})
    assert event.event == dp_accounting.NonPrivateDpEvent()
    assert accounting.epsilon(event, DELTA) == math.inf
    assert accounting.epsilon_per_round(event.event, DELTA, rounds=3) == [math.inf] * 3


# ----------------------------------------------------------------------------
# Validation (no TF).

VALID = dict(noise_multiplier=1.0, clip=0.1, clients_per_round=11, num_clients=100)


@pytest.mark.parametrize(
    "dp, changes, flag",
    [
        ("gauss", {}, "dp"),
        ("fixed", {"noise_multiplier": -1.0}, "dp_noise_multiplier"),
        ("fixed", {"noise_multiplier": math.nan}, "dp_noise_multiplier"),
        ("fixed", {"clip": 0.0}, "dp_clip"),
        ("adaptive", {"target_quantile": 1.0}, "dp_target_quantile"),
        ("fixed", {"delta": 0.0}, "dp_delta"),
        ("fixed", {"delta": 0.02}, "dp_delta"),  # >= 1/num_clients
        ("fixed", {"client_sampling": "shuffle"}, "client_sampling"),
        ("fixed", {"clients_per_round": 10.5}, "clients_per_round"),
        ("fixed", {"clients_per_round": 101}, "clients_per_round"),
        ("fixed", {"accountant": "pld"}, "dp_accountant"),  # PLD cannot do fixed-size sampling
        ("fixed", {"masking": "client"}, "dp"),
        ("adaptive", {"clients_per_round": 10}, "dp_noise_multiplier"),  # z = 1 needs m > 10
    ],
)
def test_validation_names_the_flag(dp, changes, flag):
    with pytest.raises(InvalidArgument) as info:
        privacy.validate_dp_args(dp, **{**VALID, **changes})
    assert info.value.name == flag
    assert str(info.value).startswith(f"--{flag}=")


def test_validation_accepts():
    privacy.validate_dp_args("adaptive", **VALID, client_sampling="poisson", accountant="pld",
                             masking="server")
    privacy.validate_dp_args("fixed", **{**VALID, "clients_per_round": 2, "noise_multiplier": 0.0})
    privacy.validate_dp_args("none", noise_multiplier=-5, clip=-1, clients_per_round=0,
                             masking="client")


def test_adaptive_constraint_message():
    with pytest.raises(InvalidArgument) as info:
        privacy.adaptive_noise(1.0, 10)
    assert "< 0.1 * clients_per_round = 1 with --dp=adaptive" in str(info.value)
    assert "--dp=fixed" in str(info.value)


# ----------------------------------------------------------------------------
# Against TFF: the noise split, and the aggregator in a tiny computation.


@pytest.mark.parametrize("z, m", [(0.5, 10.0), (1.0, 11.0), (1.0, 100.0), (3.0, 31.0)])
def test_adaptive_noise_equals_tff(z, m):
    from tensorflow_federated.python.aggregators import differential_privacy

    value, stddev = differential_privacy.adaptive_clip_noise_params(z, m)
    ours = privacy.adaptive_noise(z, m)
    assert ours.value_noise_multiplier == pytest.approx(value, rel=1e-12)
    assert ours.clipped_count_stddev == pytest.approx(stddev, rel=1e-12)


def test_adaptive_constraint_is_tff_constraint():
    from tensorflow_federated.python.aggregators import differential_privacy

    with pytest.raises(ValueError, match="clipped_count_stddev"):
        differential_privacy.adaptive_clip_noise_params(1.0, 10.0)
    with pytest.raises(InvalidArgument):
        privacy.adaptive_noise(1.0, 10.0)


@pytest.fixture(scope="module")
def tff_context():
    from fedprune.runtime import contexts, workers

    contexts.set_local_context()
    yield
    workers.stop_workers()


DIM = 2000  # coordinates of the test update; enough for a 10% check of a stddev


def _create(factory, dim=DIM):
    import tensorflow_federated as tff

    assert isinstance(factory, tff.aggregators.WeightedAggregationFactory)
    return factory.create(tff.TensorType(np.float32, [dim]), tff.TensorType(np.float32))


def _run(process, values, state=None):
    state = process.initialize() if state is None else state
    return process.next(state, list(values), [1.0] * len(values))


def test_clipping_bounds_a_clients_contribution(tff_context):
    # z = 0: no noise, so the aggregate is exact: sum of clipped updates / m.
    process = _create(privacy.build_dp_aggregator(
        "fixed", noise_multiplier=0.0, clip=1.0, clients_per_round=3), dim=4)
    huge = np.array([1e6, 0, 0, 0], np.float32)  # norm 1e6 -> clipped to norm 1
    others = [np.array([0, 0.3, 0, 0], np.float32), np.array([0, 0, 0.4, 0], np.float32)]
    with_huge = np.asarray(_run(process, [huge, *others]).result)
    np.testing.assert_allclose(with_huge, [1 / 3, 0.1, 0.4 / 3, 0], rtol=1e-6)
    without = np.asarray(_run(process, [np.zeros(4, np.float32), *others]).result)
    # The huge client moves the mean by exactly clip / clients_per_round.
    assert np.linalg.norm(with_huge - without) == pytest.approx(1 / 3, rel=1e-6)


def test_fixed_noise_is_present_and_has_the_right_scale(tff_context):
    process = _create(privacy.build_dp_aggregator(
        "fixed", noise_multiplier=1.0, clip=1.0, clients_per_round=3))
    state = process.initialize()
    zeros = [np.zeros(DIM, np.float32)] * 3
    # TFF's noise is unseeded: the same state and inputs give different outputs.
    first = np.asarray(_run(process, zeros, state).result)
    second = np.asarray(_run(process, zeros, state).result)
    assert not np.array_equal(first, second)
    # Stddev z C / m = 1/3 per coordinate (2000 draws: ~1.6% standard error).
    assert first.std() == pytest.approx(1 / 3, rel=0.1)
    # A Poisson round with no clients still runs: the aggregate is pure noise.
    empty = np.asarray(_run(process, [], state).result)
    assert empty.std() == pytest.approx(1 / 3, rel=0.1)


def test_mask_after_aggregation(tff_context):
    process = _create(privacy.build_dp_aggregator(
        "fixed", noise_multiplier=1.0, clip=1.0, clients_per_round=3))
    mask = (np.arange(DIM) % 4 == 0).astype(np.float32)  # density 0.25
    # Clients upload masked deltas (server masking): zero off the mask.
    rng = np.random.default_rng(0)
    values = [(rng.normal(size=DIM) * 0.01 * mask).astype(np.float32) for _ in range(3)]
    noised = np.asarray(_run(process, values).result)
    (masked,) = masking.mask_update([noised], [mask])
    masked = np.asarray(masked)
    assert np.all(masked[mask == 0] == 0.0)
    np.testing.assert_array_equal(masked[mask == 1], noised[mask == 1])
    # Noise norm falls by sqrt(density) = 0.5.
    assert np.linalg.norm(masked) / np.linalg.norm(noised) == pytest.approx(0.5, rel=0.1)
    # Tensors without a mask pass through.
    passed, _ = masking.mask_update([noised, masked], [None, mask])
    np.testing.assert_array_equal(np.asarray(passed), noised)


def test_adaptive_aggregator_state_event(tff_context):
    process = _create(privacy.build_dp_aggregator(
        "adaptive", noise_multiplier=1.0, clip=1.0, clients_per_round=11))
    output = _run(process, [np.zeros(DIM, np.float32)] * 3)
    params = privacy.adaptive_noise(1.0, 11)
    # The update's noise: stddev z_v C / m = 2.4004 / 11 with the initial clip 1.
    assert np.asarray(output.result).std() == pytest.approx(
        params.aggregate_stddev(1.0, 11), rel=0.1)
    raw = output.state.dp_event.events[0].noise_multiplier
    assert isinstance(raw, np.float32)  # why the float32 guard exists
    event = accounting.event_from_aggregator_state(output.state)
    assert all(type(e.noise_multiplier) is float for e in event.events)
    expected = accounting.mechanism_event("adaptive", noise_multiplier=1.0, clients_per_round=11)
    for got, want in zip(event.events, expected.events, strict=True):
        assert got.noise_multiplier == pytest.approx(want.noise_multiplier, rel=1e-6)
    sampled = dp_accounting.SelfComposedDpEvent(accounting.sample_event(
        event, sampling="poisson", clients_per_round=11, num_clients=110), 100)
    assert accounting.epsilon(sampled, DELTA) == pytest.approx(7.899, abs=1e-3)
    with pytest.raises(ValueError):
        accounting.event_from_aggregator_state(process.initialize())


def test_mass_off_the_mask_cannot_move_the_masked_aggregate_beyond_the_clip(tff_context):
    # z = 0 (exact), C = 1, m = 3. An attacker puts 1e6 off the mask and a little
    # on it: clipping scales its whole update to norm C *before* the mask, so the
    # masked aggregate moves by (on-mask part) * C / ||update|| / m <= C / m.
    process = _create(privacy.build_dp_aggregator(
        "fixed", noise_multiplier=0.0, clip=1.0, clients_per_round=3), dim=4)
    mask = np.array([1, 1, 0, 0], np.float32)
    honest = [np.array([0, 0.3, 0, 0], np.float32), np.array([0, 0.4, 0, 0], np.float32)]
    (base,) = masking.mask_update([_run(process, [np.zeros(4, np.float32), *honest]).result],
                                  [mask])
    for bad in ([0.5, 0, 1e6, 0], [3.0, 0, 1e6, 1e6], [1e6, 0, 1.0, 0]):
        bad = np.array(bad, np.float32)
        (moved,) = masking.mask_update([_run(process, [bad, *honest]).result], [mask])
        moved = np.asarray(moved)
        assert np.all(moved[mask == 0] == 0.0)
        shift = np.linalg.norm(moved - np.asarray(base))
        assert shift <= 1.0 / 3 * (1 + 1e-6)
        assert shift == pytest.approx(bad[0] / np.linalg.norm(bad.astype(np.float64)) / 3,
                                      rel=1e-5)


@pytest.mark.parametrize("kind, z, m", [("fixed", 0.7, 3), ("adaptive", 1.0, 11),
                                        ("fixed", 0.0, 3)])
def test_check_aggregator_event(tff_context, kind, z, m):
    process = _create(privacy.build_dp_aggregator(kind, noise_multiplier=z, clip=1.0,
                                                  clients_per_round=m), dim=4)
    state = _run(process, [np.zeros(4, np.float32)] * 2).state
    assert privacy_report.check_aggregator_event(state, kind, noise_multiplier=z,
                                          clients_per_round=m) == pytest.approx(z, rel=1e-6)
    # An accountant told another noise multiplier (or clipping mode) is caught.
    with pytest.raises(RuntimeError, match="accountant assumes"):
        privacy_report.check_aggregator_event(state, kind, noise_multiplier=0.7 * z or 0.5,
                                       clients_per_round=m)
    with pytest.raises(RuntimeError, match="accountant assumes"):
        privacy_report.check_aggregator_event(state, "adaptive" if kind == "fixed" else "fixed",
                                       noise_multiplier=0.2 if kind == "fixed" else z,
                                       clients_per_round=m)


def test_run_accounting_matches_the_reference():
    acc = accounting.run_accounting("fixed", noise_multiplier=1.0, sampling="poisson",
                                 clients_per_round=10, num_clients=100, rounds=100, delta=DELTA)
    assert acc.epsilon_after(100) == pytest.approx(7.899, abs=5e-4)
    assert acc.epsilon_after(100, "pld") == pytest.approx(7.047, abs=2e-3)  # grid step 1e-3
    assert len(acc.epsilons["rdp"]) == 100
    fixed = accounting.run_accounting("fixed", noise_multiplier=1.0, sampling="fixed",
                                   clients_per_round=10, num_clients=100, rounds=5, delta=DELTA)
    assert list(fixed.epsilons) == ["rdp"]
    with pytest.raises(InvalidArgument, match="dp_accountant"):
        accounting.run_accounting("fixed", noise_multiplier=1.0, sampling="fixed",
                               clients_per_round=10, num_clients=100, rounds=5, delta=DELTA,
                               accountant="pld")
    with pytest.raises(InvalidArgument, match="dp_delta"):
        accounting.run_accounting("fixed", noise_multiplier=1.0, sampling="poisson",
                               clients_per_round=10, num_clients=100, rounds=5, delta=0.05)
