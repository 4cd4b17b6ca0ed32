"""Client-level differential privacy: DP aggregators, accounting, and masking the DP aggregate.

The mechanism is DP-FedAvg (McMahan, Ramage, Talwar, Zhang 2018, "Learning
Differentially Private Recurrent Language Models", arXiv:1710.06963) as TFF 0.87
implements it in `tff.aggregators.DifferentiallyPrivateFactory`: each client's
whole update (all trainable deltas) is clipped to global L2 norm C, the clipped
updates are summed, Gaussian noise of standard deviation z_v * C is added to
every coordinate of the sum, and the sum is divided by the fixed *expected*
number of clients per round m (never by the number that reported, which would
make the denominator depend on the sample). The factory is unweighted; we wrap
it with `tff.aggregators.as_weighted_aggregator`, which ignores the client
weights, so every client counts once (uniform weighting) and the sensitivity
does not depend on how many examples a client holds.

Two clipping modes (`--dp`):

  fixed     C = `--dp_clip`; z_v = `--dp_noise_multiplier` = z.
  adaptive  C starts at `--dp_clip` and follows the `--dp_target_quantile` of
            the clients' update norms (Andrew, Thakkar, McMahan, Ramaswamy 2021,
            "Differentially Private Learning with Adaptive Clipping",
            arXiv:1905.03871, geometric update). The count of unclipped clients
            is itself released with noise, so the privacy cost is split between
            two Gaussian mechanisms on the same clients (see `adaptive_noise`).

Adaptive clipping noise (TFF 0.87,
`tensorflow_federated/python/aggregators/differential_privacy.py`,
`adaptive_clip_noise_params`; the events come from tensorflow_privacy's
`QuantileAdaptiveClipSumQuery` and `QuantileEstimatorQuery`):

  * each client adds b = 1[norm <= C] - 1/2 (so |b| = 1/2, sensitivity 1/2) to a
    count that gets Gaussian noise of stddev sigma_b = `clipped_count_stddev`,
    by default 0.05 * m; that is a Gaussian mechanism with noise multiplier
    z_b = sigma_b / (1/2) = 2 sigma_b;
  * the value noise multiplier is raised so that the two together cost exactly
    z:  z_v = (z^-2 - (2 sigma_b)^-2)^(-1/2);
  * two Gaussian mechanisms on the same records compose to one Gaussian with
    z_eff^-2 = z_v^-2 + z_b^-2 (the rule dp-accounting's RDP accountant applies
    in `_effective_gaussian_noise_multiplier`, citing arXiv:1812.06210 sec. 3),
    so z_eff = z: the accountant uses the requested z, the update gets the
    larger z_v;
  * TFF requires z < 2 sigma_b, i.e. z < 0.1 * m with the default sigma_b
    (z = 1 needs m >= 11; at m = 11, z_v = 2.40).

Accounting (`dp_event`, `epsilon`, `epsilon_per_round`): events are built from
the known parameters, in Python floats. dp-accounting 0.4.3's RDP accountant
collapses a composed event inside a sampled event with
`_effective_gaussian_noise_multiplier`, which stops at the first noise
multiplier that is not a Python `float`; TFF's DP events (in its aggregator
state) carry `np.float32` fields, so the accountant would silently account only
the value noise z_v of an adaptive-clipping round and under-report epsilon.
`as_python_floats` (used by `epsilon` and `event_from_aggregator_state`)
converts every NumPy scalar in an event to a Python number. What each client
sampling mode assumes is in `fedprune/sampling.py`: Poisson sampling is
accounted under add-or-remove-one adjacency; fixed-size sampling without
replacement under replace-one adjacency, where two clipped updates can differ
by 2C, so the Gaussian event gets noise multiplier z/2 (dp-accounting passes
the event's multiplier straight into the replace-one bound of Wang, Balle,
Kasiviswanathan 2019, which is normalised by the L2 sensitivity; see
google/differential-privacy issue #378).

Masking the DP aggregate (`mask_update`). TFF noises every coordinate of the
sum, including the pruned ones. With server-side masking the mask is public:
the server computed it from the previous global model, which is itself the
output of the DP mechanism, and broadcast it. Clients upload `delta * mask`, so
the clipped sum is exactly zero off the mask. Multiplying the noised mean by the
mask therefore gives exactly the distribution one would get by noising only the
unmasked coordinates: sum/m + N(0, (z_v C / m)^2) on the kept coordinates, 0
elsewhere. It keeps the aggregate (and the model) exactly sparse, and the noise
norm drops from sigma sqrt(d) to sigma sqrt(d * density), i.e. by a factor
sqrt(density). It costs no privacy: it is post-processing of the DP output with
public information. (Clipping already benefits too: zero coordinates take none
of a client's norm budget C.) The server re-mask in `server_masking.py` zeroes
the pruned weights after the optimizer step anyway; masking the aggregate
*before* the optimizer additionally keeps the noise out of a stateful server
optimizer's moments (Adam), which would otherwise accumulate noise on pruned
coordinates.

What the guarantee covers: the sequence of broadcast models, for any client's
whole dataset (client-level DP). It does not cover client-computed masks
(masking `client`/`both`: masks are aggregated without noise, so `--dp` is
rejected with them), nor the per-round client training metrics and uplink-byte
measurements, which TFF sums without noise: treat those as non-private
diagnostics.

Importing this module is cheap: dp-accounting, TensorFlow and TFF are imported
by the functions that need them, so `validate_dp_args` runs before any of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from fedprune.errors import InvalidArgument, check
from fedprune.sampling import SAMPLING_MODES

DP_KINDS = ("none", "fixed", "adaptive")
ACCOUNTANTS = ("rdp", "pld")
# Masking modes whose client-computed masks are aggregated without noise.
_NON_PRIVATE_MASKING = ("client", "both")

# TFF's defaults for adaptive clipping (DifferentiallyPrivateFactory.gaussian_adaptive).
DEFAULT_CLIP_LEARNING_RATE = 0.2
DEFAULT_COUNT_STDDEV_FRACTION = 0.05  # clipped_count_stddev = 0.05 * clients_per_round


def _is_real(value) -> bool:
    return (isinstance(value, int | float | np.number) and not isinstance(value, bool)
            and math.isfinite(value))


# ----------------------------------------------------------------------------
# Noise parameters.


@dataclasses.dataclass(frozen=True)
class NoiseParams:
    """Noise multipliers of one DP round, all in units of the clip norm C.

    Attributes:
      noise_multiplier: z, the effective noise multiplier the accountant uses
        (for adaptive clipping: of the value and count mechanisms combined).
      value_noise_multiplier: z_v, the noise added to the clipped sum has
        stddev z_v * C (z_v = z for fixed clipping, z_v >= z for adaptive).
      clipped_count_stddev: sigma_b, stddev of the noise on the sum of the
        clients' +-1/2 clipped indicators (adaptive only; None for fixed).
    """

    noise_multiplier: float
    value_noise_multiplier: float
    clipped_count_stddev: float | None = None

    @property
    def count_noise_multiplier(self) -> float | None:
        """z_b = sigma_b / (1/2): the count mechanism's noise multiplier (sensitivity 1/2)."""
        if self.clipped_count_stddev is None:
            return None
        return 2.0 * self.clipped_count_stddev

    def aggregate_stddev(self, clip: float, clients_per_round: float) -> float:
        """Stddev of the noise on each coordinate of the DP mean: z_v * C / m (same units as C)."""
        return self.value_noise_multiplier * clip / clients_per_round


def adaptive_noise(
    noise_multiplier: float,
    clients_per_round: float,
    clipped_count_stddev: float | None = None,
) -> NoiseParams:
    """TFF's split of z between the update noise and the clipped-count noise (adaptive clipping).

    Same arithmetic as TFF 0.87's `differential_privacy.adaptive_clip_noise_params`:
    sigma_b defaults to 0.05 * m; z_v = (z^-2 - (2 sigma_b)^-2)^(-1/2), so that
    z_v^-2 + (2 sigma_b)^-2 = z^-2; z = 0 gives z_v = sigma_b = 0 (no privacy).

    Args:
      noise_multiplier: z >= 0, the effective (accounting) noise multiplier
        (flag `--dp_noise_multiplier`).
      clients_per_round: expected clients per round m > 0.
      clipped_count_stddev: sigma_b > 0, or None for 0.05 * m.

    Returns:
      `NoiseParams` with z, z_v and sigma_b.

    Raises:
      InvalidArgument: z >= 2 sigma_b (TFF raises then: the count noise alone
        would already cost more than z), named `dp_noise_multiplier`.
    """
    z = float(noise_multiplier)
    m = float(clients_per_round)
    if z == 0.0:
        return NoiseParams(0.0, 0.0, 0.0 if clipped_count_stddev is None
                           else float(clipped_count_stddev))
    default_stddev = clipped_count_stddev is None
    sigma_b = DEFAULT_COUNT_STDDEV_FRACTION * m if default_stddev else float(clipped_count_stddev)
    if not z < 2.0 * sigma_b:
        if default_stddev:
            accepted = (
                f"< 0.1 * clients_per_round = {0.1 * m:g} with --dp=adaptive (TFF noises the "
                f"clipped count with stddev 0.05 * clients_per_round = {sigma_b:g}, and needs "
                "noise_multiplier < 2 * that stddev); raise --clients_per_round, lower the noise "
                "multiplier, or use --dp=fixed"
            )
        else:
            accepted = (f"< 2 * clipped_count_stddev = {2 * sigma_b:g} with --dp=adaptive; "
                        "raise clipped_count_stddev or lower the noise multiplier")
        raise InvalidArgument("dp_noise_multiplier", noise_multiplier, accepted)
    z_v = (z**-2 - (2.0 * sigma_b) ** -2) ** -0.5
    return NoiseParams(z, z_v, sigma_b)


def noise_params(kind: str, noise_multiplier: float, clients_per_round: float,
                 clipped_count_stddev: float | None = None) -> NoiseParams:
    """`NoiseParams` for `kind` in (`fixed`, `adaptive`); see `adaptive_noise`."""
    check(kind in DP_KINDS[1:], "dp", kind, "fixed|adaptive")
    if kind == "fixed":
        return NoiseParams(float(noise_multiplier), float(noise_multiplier))
    return adaptive_noise(noise_multiplier, clients_per_round, clipped_count_stddev)


# ----------------------------------------------------------------------------
# Validation (pure Python, before TF is imported).


def _validate_mechanism(kind, *, noise_multiplier, clip, clients_per_round, target_quantile,
                        clipped_count_stddev) -> None:
    """The checks of `validate_dp_args` that concern the aggregator alone."""
    check(_is_real(noise_multiplier) and noise_multiplier >= 0, "dp_noise_multiplier",
          noise_multiplier, "a finite float >= 0 (0 = clipping only, no privacy)")
    check(_is_real(clip) and clip > 0, "dp_clip", clip,
          "a finite float > 0 (L2 norm of a client's whole update)")
    check(_is_real(clients_per_round) and clients_per_round > 0, "clients_per_round",
          clients_per_round, "a number > 0")
    if kind == "adaptive":
        check(_is_real(target_quantile) and 0 < target_quantile < 1, "dp_target_quantile",
              target_quantile, "a fraction in (0, 1), e.g. 0.5 for the median update norm")
        if clipped_count_stddev is not None:
            check(_is_real(clipped_count_stddev) and clipped_count_stddev > 0,
                  "dp_clipped_count_stddev", clipped_count_stddev, "a finite float > 0")
        adaptive_noise(noise_multiplier, clients_per_round, clipped_count_stddev)


def validate_dp_args(
    dp: str,
    *,
    noise_multiplier: float,
    clip: float,
    clients_per_round: float,
    target_quantile: float = 0.5,
    delta: float = 1e-5,
    num_clients: int | None = None,
    client_sampling: str = "fixed",
    accountant: str = "rdp",
    masking: str | None = None,
    clipped_count_stddev: float | None = None,
) -> None:
    """Checks the DP settings; raises `InvalidArgument` naming the flag. Imports no TF.

    With `dp == "none"` only `dp` itself is checked.

    Args:
      dp: `none`, `fixed` or `adaptive` (flag `--dp`).
      noise_multiplier: z >= 0 (`--dp_noise_multiplier`); 0 means clipping
        without noise (epsilon = inf).
      clip: fixed clip norm, or the initial one for `adaptive` (`--dp_clip`), > 0,
        in the units of the model update (L2 norm of all trainable deltas).
      clients_per_round: exact (`fixed` sampling) or expected (`poisson`)
        clients per round m > 0 (`--clients_per_round`).
      target_quantile: fraction of clients whose updates `adaptive` clipping
        leaves unclipped, in (0, 1) (`--dp_target_quantile`).
      delta: target delta in (0, 1), and < 1/num_clients when that is known
        (`--dp_delta`): a larger delta allows publishing one client's data outright.
      num_clients: size of the client population, if known.
      client_sampling: `fixed` or `poisson` (`--client_sampling`).
      accountant: `rdp` or `pld` (`--dp_accountant`); dp-accounting 0.4.3's PLD
        accountant has no event for fixed-size sampling.
      masking: the masking mode (`--masking`), if known: `client` and `both`
        aggregate client-computed masks without noise, so DP is rejected.
      clipped_count_stddev: sigma_b for `adaptive` (None: 0.05 * m).

    Raises:
      InvalidArgument: the first bad value, naming its flag.
    """
    check(dp in DP_KINDS, "dp", dp, "one of " + "|".join(DP_KINDS))
    if dp == "none":
        return
    _validate_mechanism(dp, noise_multiplier=noise_multiplier, clip=clip,
                        clients_per_round=clients_per_round, target_quantile=target_quantile,
                        clipped_count_stddev=clipped_count_stddev)
    _check_delta(delta, num_clients)
    check(client_sampling in SAMPLING_MODES, "client_sampling", client_sampling,
          "one of " + "|".join(SAMPLING_MODES))
    check(accountant in ACCOUNTANTS, "dp_accountant", accountant,
          "one of " + "|".join(ACCOUNTANTS))
    check(not (accountant == "pld" and client_sampling == "fixed"), "dp_accountant",
          accountant, "rdp with --client_sampling=fixed (dp-accounting 0.4.3's PLD accountant "
          "cannot account sampling without replacement), or use --client_sampling=poisson")
    if client_sampling == "fixed":
        check(float(clients_per_round).is_integer(), "clients_per_round", clients_per_round,
              "an integer with --client_sampling=fixed")
    if num_clients is not None:
        check(clients_per_round <= num_clients, "clients_per_round", clients_per_round,
              f"at most the {num_clients} clients")
    if masking is not None:
        check(masking not in _NON_PRIVATE_MASKING, "dp", dp,
              f"none with --masking={masking} (client-computed masks are aggregated without "
              "noise, so the DP guarantee would not hold); use --masking=server or none")


# ----------------------------------------------------------------------------
# The TFF aggregator.


def build_dp_aggregator(
    kind: str,
    *,
    noise_multiplier: float,
    clip: float,
    clients_per_round: float,
    target_unclipped_quantile: float = 0.5,
    clip_learning_rate: float = DEFAULT_CLIP_LEARNING_RATE,
    clipped_count_stddev: float | None = None,
):
    """A weighted TFF aggregation factory for DP-FedAvg, ready for `compose_learning_process`.

    TFF's `DifferentiallyPrivateFactory.gaussian_fixed` / `.gaussian_adaptive`
    (unweighted: global L2 clip per client, Gaussian noise on the sum, division
    by the fixed `clients_per_round`), wrapped by
    `tff.aggregators.as_weighted_aggregator`, which ignores the client weights:
    every client counts once. Pass it as the process's model aggregator
    (`process.build_pruning_process(model_aggregator=...)`).

    The created process has type
    `(<S>@SERVER, {U}@CLIENTS, {float32}@CLIENTS -> <state=S@SERVER,
    result=U@SERVER, measurements=<dp_query_metrics=<...>, dp=<>>@SERVER>)`
    for update type U, where S is TFF's `DPAggregatorState` (its `dp_event` is
    read by `event_from_aggregator_state`) and `dp_query_metrics` holds the
    current `clip` for adaptive clipping. TFF's noise is not seedable (it
    uses an unseeded `tf.random_normal_initializer`).

    Args:
      kind: `fixed` or `adaptive` (flag `--dp`).
      noise_multiplier: effective noise multiplier z >= 0 (`--dp_noise_multiplier`);
        for `adaptive` the update gets the larger z_v of `adaptive_noise`.
      clip: the L2 clip norm C (`fixed`) or its initial value (`adaptive`),
        in units of the model update (`--dp_clip`).
      clients_per_round: m, exact or expected clients per round; the noised sum
        is divided by m.
      target_unclipped_quantile: quantile of update norms that adaptive clipping
        tracks (`--dp_target_quantile`).
      clip_learning_rate: adaptive clipping's geometric learning rate (TFF's default 0.2).
      clipped_count_stddev: sigma_b for adaptive clipping (None: 0.05 * m).

    Returns:
      A `tff.aggregators.WeightedAggregationFactory`.

    Raises:
      InvalidArgument: a bad value, named by its flag (see `validate_dp_args`),
        e.g. z >= 0.1 * clients_per_round with adaptive clipping.
    """
    check(kind in DP_KINDS[1:], "dp", kind, "fixed|adaptive (none builds no DP aggregator)")
    _validate_mechanism(kind, noise_multiplier=noise_multiplier, clip=clip,
                        clients_per_round=clients_per_round,
                        target_quantile=target_unclipped_quantile,
                        clipped_count_stddev=clipped_count_stddev)
    check(_is_real(clip_learning_rate) and clip_learning_rate >= 0, "dp_clip_learning_rate",
          clip_learning_rate, "a finite float >= 0")
    import tensorflow_federated as tff

    dp_factory = tff.aggregators.DifferentiallyPrivateFactory
    # TFF type-checks for Python floats.
    if kind == "fixed":
        factory = dp_factory.gaussian_fixed(
            noise_multiplier=float(noise_multiplier),
            clients_per_round=float(clients_per_round),
            clip=float(clip),
        )
    else:
        factory = dp_factory.gaussian_adaptive(
            noise_multiplier=float(noise_multiplier),
            clients_per_round=float(clients_per_round),
            initial_l2_norm_clip=float(clip),
            target_unclipped_quantile=float(target_unclipped_quantile),
            learning_rate=float(clip_learning_rate),
            clipped_count_stddev=(None if clipped_count_stddev is None
                                  else float(clipped_count_stddev)),
        )
    return tff.aggregators.as_weighted_aggregator(factory)


def mask_update(update: Sequence, masks: Sequence) -> tuple:
    """Multiplies each tensor of a (DP-noised) aggregate by its public 0/1 mask (TF ops).

    Post-processing of the DP output with the broadcast mask: exactly zero off
    the mask, noise only on kept coordinates, no privacy cost (module docstring).

    Args:
      update: the aggregate, a sequence of tensors (e.g. the trainable deltas).
      masks: one entry per tensor of `update`: a 0/1 tensor of the same shape,
        or None for tensors that are not pruned (passed through).

    Returns:
      A tuple of tensors, `update[i] * masks[i]` where a mask is given.

    Raises:
      ValueError: `masks` has a different length than `update`.
    """
    import tensorflow as tf

    update, masks = list(update), list(masks)
    if len(update) != len(masks):
        raise ValueError(f"{len(masks)} masks for {len(update)} update tensors")
    return tuple(
        u if m is None else u * tf.cast(m, tf.convert_to_tensor(u).dtype)
        for u, m in zip(update, masks, strict=True)
    )


# ----------------------------------------------------------------------------
# DP events.


def as_python_floats(event):
    """A copy of a `dp_accounting.DpEvent` with every NumPy scalar field made a Python number.

    The float32 guard: dp-accounting 0.4.3's RDP accountant silently accounts
    only the first noise multiplier of a composed event inside a sampled event
    when the multipliers are `np.float32` (module docstring). Lists and tuples
    of events are converted recursively; `bytes` fields are left alone.
    """
    import attr

    def convert(value):
        if attr.has(type(value)):
            return as_python_floats(value)
        if isinstance(value, list | tuple):
            return type(value)(convert(v) for v in value)
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.integer):
            return int(value)
        if isinstance(value, np.floating):
            return float(value)
        if isinstance(value, np.ndarray) and value.ndim == 0:
            return convert(value[()])
        return value

    fields = attr.fields(type(event))
    return type(event)(**{f.name: convert(getattr(event, f.name)) for f in fields})


def event_from_aggregator_state(state):
    """The DP event of the round that produced `state`, with Python-float fields.

    TFF's `differential_privacy.extract_dp_event_from_state`, then
    `as_python_floats`. The event is the per-round mechanism *without*
    sampling (`GaussianDpEvent(z)` for fixed clipping,
    `ComposedDpEvent([GaussianDpEvent(z_v), GaussianDpEvent(2 sigma_b)])` for
    adaptive); wrap it with `sample_event` before accounting.

    Args:
      state: a DP aggregation process's state after `next` (TFF's
        `DPAggregatorState`), or a learning process state whose `aggregator`
        field is one.

    Raises:
      tff's ExtractingDpEventFromInitialStateError (a ValueError): `state` comes
        from `initialize()`, whose event is a placeholder.
    """
    from tensorflow_federated.python.aggregators import differential_privacy

    if not hasattr(state, "dp_event") and hasattr(state, "aggregator"):
        state = state.aggregator
    return as_python_floats(differential_privacy.extract_dp_event_from_state(state))


def mechanism_event(kind: str, *, noise_multiplier: float, clients_per_round: float,
                    clipped_count_stddev: float | None = None):
    """One round's DP mechanism before sampling, as TFF's aggregator reports it.

    `fixed`: `GaussianDpEvent(z)`. `adaptive`: `ComposedDpEvent([GaussianDpEvent(z_v),
    GaussianDpEvent(2 sigma_b)])` (value noise, then clipped-count noise), with
    z_v and sigma_b from `adaptive_noise`. z = 0: `NonPrivateDpEvent()`.
    All fields are Python floats.
    """
    import dp_accounting

    params = noise_params(kind, noise_multiplier, clients_per_round, clipped_count_stddev)
    if params.noise_multiplier == 0.0:
        return dp_accounting.NonPrivateDpEvent()
    if kind == "fixed":
        return dp_accounting.GaussianDpEvent(params.value_noise_multiplier)
    return dp_accounting.ComposedDpEvent([
        dp_accounting.GaussianDpEvent(params.value_noise_multiplier),
        dp_accounting.GaussianDpEvent(params.count_noise_multiplier),
    ])


def effective_gaussian_noise_multiplier(event) -> float | None:
    """z of the single Gaussian equivalent to a composition of Gaussians on the same records.

    z^-2 = sum_i z_i^-2 over the `GaussianDpEvent`s of a nested structure of
    `ComposedDpEvent`/`SelfComposedDpEvent` (a k-fold self-composition counts
    k times). None if the event contains anything else.
    """
    import dp_accounting

    if isinstance(event, dp_accounting.GaussianDpEvent):
        return float(event.noise_multiplier)
    if isinstance(event, dp_accounting.SelfComposedDpEvent):
        inner = effective_gaussian_noise_multiplier(event.event)
        return None if inner is None else inner / math.sqrt(event.count)
    if isinstance(event, dp_accounting.ComposedDpEvent):
        inverse_squares = 0.0
        for e in event.events:
            z = effective_gaussian_noise_multiplier(e)
            if z is None:
                return None
            if z == 0.0:
                return 0.0
            inverse_squares += z**-2
        return inverse_squares**-0.5 if inverse_squares else math.inf
    return None


def sample_event(event, *, sampling: str, clients_per_round: float, num_clients: int):
    """Wraps one round's mechanism in the client sampling that amplifies it.

    The mechanism is first collapsed to its single equivalent Gaussian
    (`effective_gaussian_noise_multiplier`), exact for RDP and PLD alike, so
    that the PLD accountant (which in 0.4.3 takes only a bare Gaussian under
    Poisson sampling) handles adaptive clipping too.

      poisson: `PoissonSampledDpEvent(q, GaussianDpEvent(z))`, q = m / N, for
        add-or-remove-one adjacency.
      fixed:   `SampledWithoutReplacementDpEvent(N, m, GaussianDpEvent(z / 2))`
        for replace-one adjacency: replacing a client's clipped update by another
        moves the sum by up to 2C, and dp-accounting normalises the replace-one
        bound by that L2 sensitivity (google/differential-privacy issue #378).

    Args:
      event: the per-round mechanism (`mechanism_event` or
        `event_from_aggregator_state`); NumPy scalars are converted first.
      sampling: `fixed` or `poisson` (flag `--client_sampling`).
      clients_per_round: m, exact (`fixed`) or expected (`poisson`).
      num_clients: N, the population size.

    Returns:
      The sampled event (`NonPrivateDpEvent` if the mechanism adds no noise).

    Raises:
      InvalidArgument: bad `sampling` or counts.
      ValueError: `event` is not a composition of Gaussians.
    """
    import dp_accounting

    check(sampling in SAMPLING_MODES, "client_sampling", sampling,
          "one of " + "|".join(SAMPLING_MODES))
    check(isinstance(num_clients, int | np.integer) and not isinstance(num_clients, bool)
          and num_clients >= 1, "num_clients", num_clients, "a positive integer")
    check(_is_real(clients_per_round) and 0 < clients_per_round <= num_clients,
          "clients_per_round", clients_per_round, f"a number in (0, {num_clients}]")
    event = as_python_floats(event)
    if isinstance(event, dp_accounting.NonPrivateDpEvent):
        return event
    z = effective_gaussian_noise_multiplier(event)
    if z is None:
        raise ValueError(f"expected a composition of Gaussian DP events, got {event}")
    if z == 0.0:
        return dp_accounting.NonPrivateDpEvent()
    if sampling == "poisson":
        return dp_accounting.PoissonSampledDpEvent(
            float(clients_per_round) / float(num_clients), dp_accounting.GaussianDpEvent(z))
    check(float(clients_per_round).is_integer(), "clients_per_round", clients_per_round,
          "an integer with --client_sampling=fixed")
    return dp_accounting.SampledWithoutReplacementDpEvent(
        int(num_clients), int(clients_per_round), dp_accounting.GaussianDpEvent(z / 2.0))


def dp_event(
    kind: str,
    *,
    noise_multiplier: float,
    sampling: str,
    clients_per_round: float,
    num_clients: int,
    rounds: int,
    clipped_count_stddev: float | None = None,
):
    """The DP event of `rounds` rounds of DP-FedAvg, from known parameters.

    `SelfComposedDpEvent(sample_event(mechanism_event(...)), rounds)`. Rounds
    with no sampled clients (Poisson) count like any other (see `sampling.py`).
    With `rounds=1` it is one round's event, as `epsilon_per_round` takes.

    Args:
      kind: `fixed` or `adaptive` (flag `--dp`).
      noise_multiplier: effective z (`--dp_noise_multiplier`).
      sampling: `fixed` or `poisson` (`--client_sampling`).
      clients_per_round: m, exact or expected (`--clients_per_round`).
      num_clients: N, the population size.
      rounds: number of rounds, >= 1.
      clipped_count_stddev: sigma_b for `adaptive` (None: 0.05 * m).

    Returns:
      A `dp_accounting.DpEvent` with Python-float fields.
    """
    import dp_accounting

    check(isinstance(rounds, int | np.integer) and not isinstance(rounds, bool) and rounds >= 1,
          "num_rounds", rounds, "a positive integer")
    mechanism = mechanism_event(kind, noise_multiplier=noise_multiplier,
                                clients_per_round=clients_per_round,
                                clipped_count_stddev=clipped_count_stddev)
    sampled = sample_event(mechanism, sampling=sampling, clients_per_round=clients_per_round,
                           num_clients=num_clients)
    return dp_accounting.SelfComposedDpEvent(sampled, int(rounds))


# ----------------------------------------------------------------------------
# Accounting.


def _neighboring_relation(event):
    """REPLACE_ONE if the event samples without replacement, else ADD_OR_REMOVE_ONE."""
    import attr
    import dp_accounting

    def contains_wor(e) -> bool:
        if isinstance(e, dp_accounting.SampledWithoutReplacementDpEvent):
            return True
        for f in attr.fields(type(e)):
            value = getattr(e, f.name)
            children = value if isinstance(value, list | tuple) else [value]
            if any(attr.has(type(c)) and contains_wor(c) for c in children):
                return True
        return False

    rel = dp_accounting.NeighboringRelation
    return rel.REPLACE_ONE if contains_wor(event) else rel.ADD_OR_REMOVE_ONE


def make_accountant(event, accountant: str = "rdp", *,
                    value_discretization_interval: float = 1e-4):
    """A fresh dp-accounting accountant that supports `event`, with the matching adjacency.

    Args:
      event: the event to be composed (used to pick add-or-remove-one or
        replace-one adjacency and to check support).
      accountant: `rdp` (dp-accounting's default orders) or `pld`.
      value_discretization_interval: PLD grid step (pessimistic: a coarser grid
        gives a slightly larger, still valid, epsilon).

    Raises:
      InvalidArgument: unknown `accountant` (`--dp_accountant`), or `pld` for
        an event it cannot account (fixed-size sampling).
    """
    from dp_accounting import pld, rdp

    check(accountant in ACCOUNTANTS, "dp_accountant", accountant,
          "one of " + "|".join(ACCOUNTANTS))
    relation = _neighboring_relation(event)
    if accountant == "rdp":
        acc = rdp.RdpAccountant(neighboring_relation=relation)
    else:
        acc = pld.PLDAccountant(neighboring_relation=relation,
                                value_discretization_interval=value_discretization_interval)
    if not acc.supports(event):
        raise InvalidArgument("dp_accountant", accountant,
                              f"an accountant that supports {event} (use rdp with "
                              "--client_sampling=fixed)")
    return acc


def _check_delta(delta, num_clients: int | None = None) -> None:
    """delta in (0, 1), and below 1/num_clients when the population is known."""
    if num_clients is None:
        check(_is_real(delta) and 0 < delta < 1, "dp_delta", delta, "a float in (0, 1)")
        return
    upper = 1.0 / num_clients
    check(_is_real(delta) and 0 < delta < upper, "dp_delta", delta,
          f"a float in (0, 1/num_clients = {upper:g}), e.g. 1e-5")


def epsilon(event, delta: float, accountant: str = "rdp", *,
            value_discretization_interval: float = 1e-4) -> float:
    """Epsilon of `event` at `delta`, after the float32 guard.

    Args:
      event: a `dp_accounting.DpEvent`, e.g. from `dp_event`.
      delta: target delta in (0, 1) (`--dp_delta`).
      accountant: `rdp` or `pld` (`--dp_accountant`). Reference, z = 1,
        q = 10/100 Poisson, 100 rounds, delta = 1e-5: rdp 7.899 (0.3 s),
        pld 7.047 (1.5 s).
      value_discretization_interval: PLD grid step.

    Returns:
      epsilon, a Python float (inf for a mechanism without noise).
    """
    _check_delta(delta)
    event = as_python_floats(event)
    acc = make_accountant(event, accountant,
                          value_discretization_interval=value_discretization_interval)
    acc.compose(event)
    return float(acc.get_epsilon(delta))


def epsilon_per_round(round_event, delta: float, *, rounds: int, accountant: str = "rdp",
                      value_discretization_interval: float = 1e-3) -> list[float]:
    """Epsilon after each of rounds 1..`rounds` of the same per-round event (for metrics.csv).

    RDP: the per-round RDP curve is computed once (one `compose`, ~0.25 s) and
    epsilon after k rounds is `compute_epsilon(orders, k * rdp_1, delta)`:
    milliseconds per round, identical to `epsilon` on the k-fold composition.
    Composing round by round instead costs ~0.18 s per round.

    PLD: the k-round distribution is composed incrementally from the k - 1 one.
    Measured (z = 1, q = 0.1): 1.1 s for 100 rounds and 3.2 s for 300 at the
    default grid step 1e-3 (epsilon 7.04663 at round 100 vs 7.04660 at 1e-4,
    where the same loop takes ~12 s; a coarser grid is pessimistic, never
    below). RDP takes 0.3 s for 1000 rounds.

    Args:
      round_event: ONE round's event (e.g. `dp_event(..., rounds=1)`).
      delta: target delta in (0, 1).
      rounds: number of rounds R >= 1.
      accountant: `rdp` or `pld`.
      value_discretization_interval: PLD grid step.

    Returns:
      [epsilon after round 1, ..., epsilon after round R] (Python floats,
      non-decreasing; inf throughout for a mechanism without noise).
    """
    from dp_accounting.rdp import rdp_privacy_accountant

    _check_delta(delta)
    check(isinstance(rounds, int | np.integer) and not isinstance(rounds, bool) and rounds >= 1,
          "num_rounds", rounds, "a positive integer")
    round_event = as_python_floats(round_event)
    acc = make_accountant(round_event, accountant,
                          value_discretization_interval=value_discretization_interval)
    acc.compose(round_event)
    first = float(acc.get_epsilon(delta))
    if math.isinf(first):
        return [math.inf] * rounds
    # dp-accounting 0.4.3 (pinned) has no public getter for the composed RDP
    # curve or PLD; `_orders`/`_rdp` and `_pld` are its attributes since 0.4.
    # The tests compare against `epsilon` on the R-fold composition.
    if accountant == "rdp":
        orders, rdp_1 = np.asarray(acc._orders), np.asarray(acc._rdp)
        return [float(rdp_privacy_accountant.compute_epsilon(orders, k * rdp_1, delta)[0])
                for k in range(1, rounds + 1)]
    pld_1 = acc._pld
    pld_k, result = pld_1, [first]
    for _ in range(rounds - 1):
        pld_k = pld_k.compose(pld_1)
        result.append(float(pld_k.get_epsilon_for_delta(delta)))
    return result


# ----------------------------------------------------------------------------
# A run's accounting.


@dataclasses.dataclass(frozen=True)
class RunAccounting:
    """Epsilon after every round of one DP run, computed from the known mechanism.

    Attributes:
      delta: the target delta.
      accountant: the headline accountant (`--dp_accountant`), a key of `epsilons`.
      epsilons: accountant name -> [epsilon after round 1, ..., after round R];
        `rdp` always, `pld` too where dp-accounting supports the sampling
        (Poisson). Each list is a valid bound; `epsilon_after` reports the
        headline one.
      sampled_event: one round's sampled event (what is composed R times).
    """

    delta: float
    accountant: str
    epsilons: dict
    sampled_event: object

    def epsilon_after(self, round_num: int, accountant: str | None = None) -> float:
        """Epsilon after rounds 1..`round_num` (1-based) by `accountant` (default: the headline)."""
        return self.epsilons[accountant or self.accountant][round_num - 1]


def run_accounting(kind: str, *, noise_multiplier: float, sampling: str,
                   clients_per_round: float, num_clients: int, rounds: int, delta: float,
                   accountant: str = "rdp") -> RunAccounting:
    """Per-round epsilons of a DP-FedAvg run of `rounds` rounds (see `epsilon_per_round`).

    Args:
      kind: `fixed` or `adaptive` (`--dp`).
      noise_multiplier: effective z (`--dp_noise_multiplier`).
      sampling: `fixed` or `poisson` (`--client_sampling`).
      clients_per_round: m, exact or expected.
      num_clients: N, the population the clients are sampled from.
      rounds: R >= 1.
      delta: target delta (`--dp_delta`), < 1 / N.
      accountant: the headline accountant (`--dp_accountant`).

    Raises:
      InvalidArgument: a bad value (e.g. delta >= 1/N once N is known).
    """
    _check_delta(delta, num_clients)
    round_event = sample_event(
        mechanism_event(kind, noise_multiplier=noise_multiplier,
                        clients_per_round=clients_per_round),
        sampling=sampling, clients_per_round=clients_per_round, num_clients=num_clients)
    names = ["rdp"] + (["pld"] if sampling == "poisson" else [])
    check(accountant in names, "dp_accountant", accountant,
          "|".join(names) + f" with --client_sampling={sampling}")
    epsilons = {name: epsilon_per_round(round_event, delta, rounds=rounds, accountant=name)
                for name in names}
    return RunAccounting(float(delta), accountant, epsilons, round_event)


def check_aggregator_event(state, kind: str, *, noise_multiplier: float,
                           clients_per_round: float, rel_tol: float = 1e-4) -> float:
    """Checks that the mechanism TFF ran is the one accounted for; returns its z.

    Reads the event of the last round from the DP aggregator's state (with the
    float32 guard) and compares each Gaussian's noise multiplier, and the
    effective one, with `mechanism_event` of the configured parameters (TFF
    stores float32: `rel_tol`). A mismatch means the epsilon reported would be
    false, so it raises.

    Args:
      state: the learning process state after `next` (or its aggregator state).
      kind, noise_multiplier, clients_per_round: as given to `build_dp_aggregator`.

    Raises:
      RuntimeError: TFF's event differs from the accounted one.
    """
    import dp_accounting

    ran = event_from_aggregator_state(state)
    expected = mechanism_event(kind, noise_multiplier=noise_multiplier,
                               clients_per_round=clients_per_round)

    def multipliers(event) -> list[float]:
        if isinstance(event, dp_accounting.NonPrivateDpEvent):
            return [0.0]
        if isinstance(event, dp_accounting.ComposedDpEvent):
            return [m for e in event.events for m in multipliers(e)]
        return [float(getattr(event, "noise_multiplier", math.nan))]

    got, want = multipliers(ran), multipliers(expected)
    if want == [0.0]:  # no noise: TFF may report one zero-noise Gaussian per mechanism
        same = all(g == 0.0 for g in got)
    else:
        same = len(got) == len(want) and all(
            math.isclose(g, w, rel_tol=rel_tol) for g, w in zip(got, want, strict=True))
    if not same:
        raise RuntimeError(f"the DP aggregator ran {ran}, but the accountant assumes "
                           f"{expected}: the reported epsilon would be wrong")
    return effective_gaussian_noise_multiplier(ran) or 0.0
