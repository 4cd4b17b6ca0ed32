"""Masking modes (`--masking`): which parties of a federated round apply the mask.

A mode is two independent choices, and everything else follows from them:

  client_prunes   clients prune their trained kernels to the round's sparsity
                  before uploading (`client_work.py`);
  server_remasks  the server re-applies the schedule's mask after the optimizer
                  step (`server_masking.py`).

| mode   | client_prunes | server_remasks | wraps_model | dp_compatible | allows_unit_structures |
|--------|---------------|----------------|-------------|---------------|------------------------|
| none   | no            | no             | no          | yes           | no                     |
| client | yes           | no             | yes         | no            | no                     |
| server | no            | yes            | yes         | yes           | yes                    |
| both   | yes           | yes            | yes         | no            | no                     |

The rules that tie `--masking` to other flags are written here once (the
`check_*` functions), and called both by `ExperimentConfig.validate()` (before
TensorFlow is imported) and by the library builders at their boundary
(`process.build_pruning_process`: schedule, mask aggregation, unit structures;
`privacy.build_dp_aggregator`: DP), so the library rejects what the config
rejects, with the same one-line message.

The module lives in `fedprune/federated/`, not `fedprune/pruning/`, because a
mode says who prunes within a federated round (clients, server), while
`pruning/` holds the mask maths that knows nothing of federation.

Importing it is cheap: no TensorFlow, no TFF.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from fedprune.errors import InvalidArgument, check
from fedprune.federated import encodings
from fedprune.pruning import mask_aggregation, schedules

FLAG = "masking"


@dataclasses.dataclass(frozen=True)
class MaskingMode:
    """One value of `--masking` and what it implies.

    Attributes:
      name: the flag value (`none`, `client`, `server`, `both`).
      description: one line for the flag's help (no period, no semicolon).
      client_prunes: clients prune their trained kernels to the schedule's
        sparsity and upload their masks with the delta (combined by
        `--mask_aggregation`).
      server_remasks: the server re-applies the schedule's mask after the
        optimizer step, so the broadcast model is exactly as sparse as the
        schedule says.
    """

    name: str
    description: str
    client_prunes: bool
    server_remasks: bool

    @property
    def wraps_model(self) -> bool:
        """The model carries tfmot wrappers, whose mask variables are in `ModelWeights`.

        Some party applies a mask, and the broadcast mask is how clients train
        inside it; dense training (`none`) uses the plain model and TFF's own parts.
        """
        return self.client_prunes or self.server_remasks

    @property
    def dp_compatible(self) -> bool:
        """Client-level DP (`--dp`) may be used with this mode.

        Not when clients prune: their masks are aggregated without noise, so
        the DP guarantee would not cover them (see `privacy.py`).
        """
        return not self.client_prunes

    @property
    def allows_unit_structures(self) -> bool:
        """`--structure=neuron|filter` may be used with this mode.

        Only the server decides which units survive (`structured.py` via
        `server_masking.py`); client-side unit pruning is not supported.
        """
        return self.server_remasks and not self.client_prunes


MASKING_MODES: dict[str, MaskingMode] = {
    mode.name: mode for mode in (
        MaskingMode("none", "dense FedAvg, no masks", client_prunes=False,
                    server_remasks=False),
        MaskingMode("client", "clients prune their trained kernels, the server only averages",
                    client_prunes=True, server_remasks=False),
        MaskingMode("server", "clients train inside the broadcast mask, the server re-masks "
                    "after each round", client_prunes=False, server_remasks=True),
        MaskingMode("both", "clients prune their trained kernels and the server re-masks",
                    client_prunes=True, server_remasks=True),
    )
}


def names(where: Callable[[MaskingMode], bool] = lambda mode: True) -> tuple[str, ...]:
    """Names of the registered modes for which `where(mode)` holds, in registry order."""
    return tuple(name for name, mode in MASKING_MODES.items() if where(mode))


def masking_mode(mode: str | MaskingMode) -> MaskingMode:
    """The registered mode of a name (a `MaskingMode` is returned as is).

    Raises:
      InvalidArgument: an unknown name, naming the flag `masking` and the accepted values.
    """
    if isinstance(mode, MaskingMode):
        return mode
    if isinstance(mode, str) and mode in MASKING_MODES:
        return MASKING_MODES[mode]
    raise InvalidArgument(FLAG, mode, "one of " + "|".join(MASKING_MODES))


# ----------------------------------------------------------------------------
# Rules between --masking and other flags.


def check_schedule(mode: MaskingMode, schedule: schedules.RoundSchedule) -> None:
    """A mode applies masks exactly when the schedule prunes (not `dense`, e.g. not `none`)."""
    dense = "|".join(names(lambda m: not m.wraps_model))
    dense_schedules = "|".join(e.name for e in schedules.SCHEDULES.entries() if e.target.dense)
    check(mode.wraps_model == (not schedule.dense), FLAG, mode.name,
          f"{dense} exactly when --schedule={dense_schedules} (dense training)")


def check_mask_aggregation(mode: MaskingMode, rule: str) -> None:
    """`--mask_aggregation` is a known rule, and other than `average` only when clients prune."""
    check(rule in mask_aggregation.RULES, "mask_aggregation", rule,
          "one of " + "|".join(mask_aggregation.RULES))
    pruning = "|".join(names(lambda m: m.client_prunes))
    check(rule == "average" or mode.client_prunes, "mask_aggregation", rule,
          f"average unless clients prune (--masking={pruning})")


def check_unit_structure(mode: MaskingMode, structure: str) -> None:
    """A unit structure (`--structure=neuron|filter`) needs a mode that allows it.

    Call it only for unit structures (`MaskSpec.is_unit_structure`).
    """
    allowed = "|".join(names(lambda m: m.allows_unit_structures))
    check(mode.allows_unit_structures, FLAG, mode.name,
          f"{allowed} with --structure={structure} (the server decides which units survive; "
          "client-side unit pruning is not supported)")


def check_step_granularity(mode: MaskingMode) -> None:
    """`--prune_granularity=step` needs a mode whose clients prune (inside local training)."""
    allowed = "|".join(names(lambda m: m.client_prunes))
    check(mode.client_prunes, "prune_granularity", "step",
          f"round unless --masking={allowed} (only pruning clients prune in steps)")


def regrows_at(mode: MaskingMode, at: str) -> bool:
    """Whether `mode` can prune and regrow with `--regrow_at=at` (`check_regrowth`)."""
    if at == "server":
        return mode.server_remasks
    return mode.server_remasks and mode.client_prunes


def check_regrowth(mode: MaskingMode, regrow: str, at: str = "server") -> None:
    """Prune and regrow (`--regrow` other than `none`) needs a mode that fits `--regrow_at`.

    `server`: the server adjusts the topology right after its re-mask
    (`server_masking.py`), so a re-masking mode. `client` (FedDST): clients
    adjust their own masks after pruning (`client_regrowth.py`) and the server
    re-masks their aggregate to the schedule's level, so a mode whose clients
    prune and whose server re-masks (`regrows_at`).
    """
    if regrow == "none":
        return
    allowed = "|".join(names(lambda m: regrows_at(m, at)))
    if at == "server":
        check(regrows_at(mode, at), "regrow", regrow,
              f"none with --masking={mode.name} (the server adjusts the topology when it "
              f"re-masks: --masking={allowed})")
        return
    check(regrows_at(mode, at), "regrow_at", at,
          f"server with --masking={mode.name} (clients adjust the masks they prune and the "
          f"server re-masks their aggregate: --masking={allowed})")


def check_dp(mode: MaskingMode, dp: str) -> None:
    """Client-level DP (`--dp` other than `none`) needs a DP-compatible mode."""
    allowed = "|".join(names(lambda m: m.dp_compatible))
    check(dp == "none" or mode.dp_compatible, "dp", dp,
          f"none with --masking={mode.name} (client-computed masks are aggregated without "
          f"noise, so the DP guarantee would not hold); use --masking={allowed}")


def check_upload_quantization(quantization: str) -> None:
    """`--upload_quantization` is one of `encodings.QUANTIZATIONS`; every `--masking` takes each.

    Plain deltas are quantized tensor by tensor, pruning clients' payloads
    (`mask_aggregation.client_payload`) in their float fields, the masks
    passing as bits (`quantization.py`). `--dp` is refused separately
    (`ExperimentConfig.validate`).
    """
    check(quantization in encodings.QUANTIZATIONS, "upload_quantization", quantization,
          "one of " + "|".join(encodings.QUANTIZATIONS))
