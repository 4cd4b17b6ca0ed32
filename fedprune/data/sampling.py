"""Which clients take part in a round, and what the privacy accountant assumes of it.

Two modes (`--client_sampling`), both pure functions of (seed, round_num), so a
run resumed at round k samples exactly as an uninterrupted one:

  fixed    exactly `clients_per_round` distinct clients, uniformly at random
           without replacement, independently in every round
           (`sample_clients`).
           Accountant: `SampledWithoutReplacementDpEvent(num_clients,
           clients_per_round, ...)` under *replace-one* adjacency (neighbouring
           populations have the same size N, one client's data replaced by
           another's). N is public.
  poisson  every client independently with probability
           q = clients_per_round / num_clients; the round's size is
           Binomial(N, q) with mean `clients_per_round`, and may be 0.
           Accountant: `PoissonSampledDpEvent(q, ...)` under *add-or-remove-one*
           adjacency (neighbouring populations differ by one client's presence).

Both analyses assume the sample is drawn afresh and independently each round
(no shuffling passes, no "every client once per epoch") and that nobody but the
server learns who was sampled. For DP runs, also the aggregate's denominator must
not depend on the sample: TFF's DP mean divides by the fixed (expected)
`clients_per_round`, never by the number of clients that actually reported.

A round with 0 clients (possible only with `poisson`): without DP nothing is
learnt, so the round can be skipped. With DP the round must still run with an
empty client list: the DP aggregate is then pure noise (TFF 0.87 runs the DP
aggregator on zero clients and returns N(0, (z C / m)^2) per coordinate), the
model takes that noise step, and the accountant counts the round. This is
exactly the mechanism the Poisson analysis covers; skipping the round instead
would publish that the sample was empty, which it does not cover.

Importing this module is cheap (NumPy only).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedprune.data.partitions import check_positive_int
from fedprune.errors import check

SAMPLING_MODES = ("fixed", "poisson")

# Mixed into the Poisson RNG's entropy so that its stream is independent of the
# fixed-size sampler's, which is seeded with [seed, round_num] alone.
_POISSON_STREAM = 0x706F6973  # "pois"


def sample_clients(
    client_ids: Sequence[str], clients_per_round: int, *, seed: int, round_num: int
) -> list[str]:
    """Clients of round `round_num`, without replacement.

    A pure function of (seed, round_num): a run resumed at round k samples the
    same clients as an uninterrupted one.

    Args:
      client_ids: all client ids.
      clients_per_round: clients to sample (flag `--clients_per_round`).
      seed: client-sampling seed (non-negative).
      round_num: round number (non-negative).

    Returns:
      `clients_per_round` distinct ids, in sampled order.

    Raises:
      fedprune.errors.InvalidArgument: if `clients_per_round` is not in
        [1, len(client_ids)].
    """
    check_positive_int(clients_per_round, "clients_per_round")
    check(
        clients_per_round <= len(client_ids),
        "clients_per_round",
        clients_per_round,
        f"at most the {len(client_ids)} clients",
    )
    rng = np.random.default_rng([seed, round_num])
    chosen = rng.choice(len(client_ids), size=clients_per_round, replace=False)
    return [client_ids[i] for i in chosen]


def poisson_rate(clients_per_round: float, num_clients: int) -> float:
    """The per-client inclusion probability q = clients_per_round / num_clients.

    Args:
      clients_per_round: expected clients per round (flag `--clients_per_round`),
        > 0 and at most `num_clients`.
      num_clients: size of the client population.

    Returns:
      q in (0, 1], a Python float.

    Raises:
      InvalidArgument: `num_clients` is not a positive integer, or
        `clients_per_round` is not in (0, num_clients].
    """
    check_positive_int(num_clients, "num_clients")
    ok = (isinstance(clients_per_round, int | float | np.number)
          and not isinstance(clients_per_round, bool)
          and 0 < clients_per_round <= num_clients)
    check(ok, "clients_per_round", clients_per_round,
          f"an expected count in (0, {num_clients}] (the number of clients)")
    return float(clients_per_round) / float(num_clients)


def poisson_sample(
    client_ids: Sequence[str], rate: float, *, seed: int, round_num: int
) -> list[str]:
    """Clients of round `round_num` under Poisson sampling: each one independently w.p. `rate`.

    A pure function of (client_ids, rate, seed, round_num).

    Args:
      client_ids: all client ids; their order fixes which uniform draw each one gets.
      rate: inclusion probability q in (0, 1] (see `poisson_rate`).
      seed: client-sampling seed (non-negative).
      round_num: round number (non-negative).

    Returns:
      The sampled ids, in the order of `client_ids`; possibly empty (probability
      (1 - q)^N). See the module docstring for what a DP run does then.

    Raises:
      ValueError: `rate` is not in (0, 1].
    """
    if not (isinstance(rate, int | float | np.number) and 0 < rate <= 1):
        raise ValueError(f"Poisson sampling rate must be in (0, 1], got {rate!r}")
    rng = np.random.default_rng([seed, round_num, _POISSON_STREAM])
    chosen = rng.random(len(client_ids)) < rate
    return [cid for cid, keep in zip(client_ids, chosen, strict=True) if keep]


def sample_round(
    mode: str,
    client_ids: Sequence[str],
    *,
    clients_per_round: float,
    seed: int,
    round_num: int,
) -> list[str]:
    """Clients of round `round_num` under sampling `mode` (one of SAMPLING_MODES).

    Args:
      mode: `fixed` (exactly `clients_per_round`, without replacement) or
        `poisson` (each client w.p. clients_per_round / len(client_ids)).
      client_ids: all client ids.
      clients_per_round: exact (`fixed`, an int) or expected (`poisson`) count.
      seed: client-sampling seed.
      round_num: round number.

    Returns:
      The round's client ids (never empty for `fixed`; possibly empty for `poisson`).

    Raises:
      InvalidArgument: unknown `mode` (flag `--client_sampling`) or a bad
        `clients_per_round`.
    """
    check(mode in SAMPLING_MODES, "client_sampling", mode, "one of " + "|".join(SAMPLING_MODES))
    if mode == "fixed":
        return sample_clients(client_ids, clients_per_round, seed=seed,
                              round_num=round_num)
    rate = poisson_rate(clients_per_round, len(client_ids))
    return poisson_sample(client_ids, rate, seed=seed, round_num=round_num)
