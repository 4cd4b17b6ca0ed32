"""What a DP run reports about privacy, and the per-round check behind it.

* `config_section`: config.json's `privacy` section (mechanism, sampling
  assumption, accountants, what is and is not released).
* `check_aggregator_event`: every round, the event TFF's DP aggregator reports
  must be the one accounted for, or the epsilon would be false.
* `round_row` / `summary_fields`: a round's epsilons in metrics.csv, the final
  ones in summary.json.
* `NON_PRIVATE_COLUMNS` are left blank in a DP run; `NON_PRIVATE_DIAGNOSTICS`
  are written but not covered by the guarantee.

Importing this module is cheap: dp-accounting is imported by the functions
that need it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from fedprune.federated import privacy
from fedprune.federated.privacy_accounting import (
    RunAccounting,
    effective_gaussian_noise_multiplier,
    event_from_aggregator_state,
    mechanism_event,
)

if TYPE_CHECKING:
    from fedprune.config import ExperimentConfig

# What a DP run leaves blank: TFF sums client training metrics without noise.
NON_PRIVATE_COLUMNS = ("train_loss", "train_accuracy")
# What a DP run still writes that the DP guarantee does not cover (diagnostics):
# they depend on the secret number of sampled clients or on the clients' data.
NON_PRIVATE_DIAGNOSTICS = ("clients", "bytes_down", "bytes_up", "dense_bytes_down",
                           "dense_bytes_up", "tff_bytes_down", "tff_bytes_up")


def config_section(config: ExperimentConfig, num_clients: int) -> dict:
    """The `dp` section of config.json: mechanism, sampling assumption, what is released."""
    if config.dp == "none":
        return {"dp": "none"}
    params = privacy.noise_params(config.dp, config.dp_noise_multiplier,
                                  config.clients_per_round)
    fixed = config.client_sampling == "fixed"
    return {
        "dp": config.dp,
        "mechanism": "DP-FedAvg (McMahan et al. 2018) with TFF's DifferentiallyPrivateFactory: "
                     "each client's whole update clipped to L2 norm dp_clip"
                     + (" (adaptive, tracking the dp_target_quantile of update norms)"
                        if config.dp == "adaptive" else "")
                     + ", Gaussian noise on the sum, divided by clients_per_round; uniform "
                       "client weights; the noised mean is multiplied by the public broadcast "
                       "mask (post-processing)",
        "noise_multiplier": params.noise_multiplier,
        "value_noise_multiplier": params.value_noise_multiplier,
        "clipped_count_stddev": params.clipped_count_stddev,
        "clip": config.dp_clip,
        "delta": config.dp_delta,
        "num_clients": num_clients,
        "client_sampling": config.client_sampling,
        "accountant_assumption": (
            f"SampledWithoutReplacementDpEvent(N={num_clients}, m={config.clients_per_round}), "
            "replace-one adjacency" if fixed else
            f"PoissonSampledDpEvent(q={config.clients_per_round / num_clients:g}), "
            "add-or-remove-one adjacency"),
        "accountants": ["rdp"] if fixed else ["rdp", "pld"],
        "headline_accountant": config.dp_accountant,
        "guarantee": "client-level (epsilon, delta)-DP of the sequence of global models",
        "not_released": list(NON_PRIVATE_COLUMNS),
        "non_private_diagnostics": list(NON_PRIVATE_DIAGNOSTICS),
        "noise_seed": "none: TFF draws the DP noise from OS entropy, so DP runs are not "
                      "bit-reproducible (a seed stored beside the results would let anyone "
                      "subtract the noise)",
    }


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


def round_row(config: ExperimentConfig, accounting: RunAccounting, output,
              round_num: int) -> dict:
    """A DP round's epsilons (and the adaptive clip), after checking what TFF ran."""
    check_aggregator_event(output.state, config.dp,
                           noise_multiplier=config.dp_noise_multiplier,
                           clients_per_round=config.clients_per_round)
    clip = output.metrics["aggregator"].get("dp_query_metrics", {}).get("clip", config.dp_clip)
    pld = accounting.epsilons.get("pld")
    return {"epsilon": accounting.epsilon_after(round_num),
            "epsilon_rdp": accounting.epsilon_after(round_num, "rdp"),
            "epsilon_pld": pld[round_num - 1] if pld else "",
            "dp_clip": float(clip)}


def summary_fields(config: ExperimentConfig, accounting: RunAccounting) -> dict:
    """summary.json's DP fields; an infinite epsilon (no noise) is JSON null."""
    def finite_or_none(value):
        return None if value is None or math.isinf(value) else value

    last = config.rounds
    pld = accounting.epsilons.get("pld")
    return {"dp": config.dp, "dp_delta": config.dp_delta,
            "dp_noise_multiplier": config.dp_noise_multiplier,
            "dp_accountant": accounting.accountant,
            "final_epsilon": finite_or_none(accounting.epsilon_after(last)),
            "final_epsilon_rdp": finite_or_none(accounting.epsilon_after(last, "rdp")),
            "final_epsilon_pld": finite_or_none(pld[-1] if pld else None),
            "client_sampling": config.client_sampling}
