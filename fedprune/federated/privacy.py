"""Client-level differential privacy: the DP mechanism (TFF aggregator) and the DP options.

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

Adaptive clipping noise (TFF 0.87's `adaptive_clip_noise_params`, in its
differential-privacy aggregators; the events come from tensorflow_privacy's
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

Masking the DP aggregate (`masking.mask_update`, applied by
`server_masking.py`). TFF noises every coordinate of the sum, including the
pruned ones. With server-side masking the mask is public:
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
(modes whose clients prune, `client`/`both`: masks are aggregated without
noise, so `--dp` is rejected with them; `MaskingMode.dp_compatible` in
`masking_modes.py`), nor the per-round client training metrics and uplink-byte
measurements, which TFF sums without noise: treat those as non-private
diagnostics.

Accounting (events, accountants, a run's epsilons) is in
`fedprune/federated/privacy_accounting.py`; what a run reports about privacy in
`fedprune/outputs/privacy_report.py`.

Importing this module is cheap: TensorFlow and TFF are imported by the
functions that need them, so `validate_dp_args` runs before any of them.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedprune.data.sampling import SAMPLING_MODES
from fedprune.errors import InvalidArgument, check
from fedprune.federated import masking_modes

DP_KINDS = ("none", "fixed", "adaptive")
ACCOUNTANTS = ("rdp", "pld")

# TFF's defaults for adaptive clipping (DifferentiallyPrivateFactory.gaussian_adaptive).
DEFAULT_CLIP_LEARNING_RATE = 0.2
DEFAULT_COUNT_STDDEV_FRACTION = 0.05  # clipped_count_stddev = 0.05 * clients_per_round


def is_finite_number(value) -> bool:
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
    check(is_finite_number(noise_multiplier) and noise_multiplier >= 0, "dp_noise_multiplier",
          noise_multiplier, "a finite float >= 0 (0 = clipping only, no privacy)")
    check(is_finite_number(clip) and clip > 0, "dp_clip", clip,
          "a finite float > 0 (L2 norm of a client's whole update)")
    check(is_finite_number(clients_per_round) and clients_per_round > 0, "clients_per_round",
          clients_per_round, "a number > 0")
    if kind == "adaptive":
        check(is_finite_number(target_quantile) and 0 < target_quantile < 1, "dp_target_quantile",
              target_quantile, "a fraction in (0, 1), e.g. 0.5 for the median update norm")
        if clipped_count_stddev is not None:
            check(is_finite_number(clipped_count_stddev) and clipped_count_stddev > 0,
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
    masking: str | masking_modes.MaskingMode | None = None,
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
      masking: the masking mode (`--masking`), if known: DP is rejected unless
        it is `dp_compatible` (see `masking_modes.py`).
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
    check_delta(delta, num_clients)
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
        masking_modes.check_dp(masking_modes.masking_mode(masking), dp)


def check_delta(delta, num_clients: int | None = None) -> None:
    """delta in (0, 1), and below 1/num_clients when the population is known."""
    if num_clients is None:
        check(is_finite_number(delta) and 0 < delta < 1, "dp_delta", delta, "a float in (0, 1)")
        return
    upper = 1.0 / num_clients
    check(is_finite_number(delta) and 0 < delta < upper, "dp_delta", delta,
          f"a float in (0, 1/num_clients = {upper:g}), e.g. 1e-5")


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
    masking: str | masking_modes.MaskingMode | None = None,
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
      masking: the masking mode of the process the aggregator is for, if
        known: rejected unless `dp_compatible` (see `masking_modes.py`).

    Returns:
      A `tff.aggregators.WeightedAggregationFactory`.

    Raises:
      InvalidArgument: a bad value, named by its flag (see `validate_dp_args`),
        e.g. z >= 0.1 * clients_per_round with adaptive clipping.
    """
    check(kind in DP_KINDS[1:], "dp", kind, "fixed|adaptive (none builds no DP aggregator)")
    if masking is not None:
        masking_modes.check_dp(masking_modes.masking_mode(masking), kind)
    _validate_mechanism(kind, noise_multiplier=noise_multiplier, clip=clip,
                        clients_per_round=clients_per_round,
                        target_quantile=target_unclipped_quantile,
                        clipped_count_stddev=clipped_count_stddev)
    check(is_finite_number(clip_learning_rate) and clip_learning_rate >= 0, "dp_clip_learning_rate",
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
