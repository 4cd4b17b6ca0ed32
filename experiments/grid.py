"""Grids of experiments run in one process: cells, their status, the run tree.

Shared by `compare_schedules.py` (any grid from flags) and `reproduce.py` (the
grids of RESULTS.md, from flagfiles). A grid is a base `ExperimentConfig`
(the ordinary experiment flags) crossed with the grid flags:

    --schedules × (--powers for polynomial) × --final_sparsities × --maskings
      [× --prune_granularities for modes whose clients prune]
      × --sparsity_distributions
      × (--regrows [× --regrow_ats for regrow other than none], for modes that fit)
      [× --dp_noise_multipliers] [× --upload_quantizations] × --seeds

Dense training (`none` in --schedules, any schedule that never prunes) is one
cell per seed with `masking=none`, not one per sparsity and masking. Schedules
that read `--power` (polynomial) get one variant per `--powers` value. Only
modes whose clients prune (`MaskingMode.client_prunes`) have a choice of when
they prune, so only their cells are crossed with --prune_granularities; the
other modes' cells are at `round` granularity, once. Dense cells have no layer
budgets and no topology to adjust: they are at `uniform` and `--regrow=none`,
whatever --sparsity_distributions and --regrows list. Pruned cells are crossed
with every --sparsity_distributions value (`erk`: per-layer budgets,
`fedprune/pruning/layer_budgets.py`) and every --regrows value (dynamic sparse
training, `fedprune/pruning/regrowth.py`: `random` is SET, `gradient` RigL);
only cells that regrow are crossed with --regrow_ats, and a (masking, regrow_at)
pair that `masking_modes.check_regrowth` refuses is left out of the grid, as
granularity is for modes whose clients do not prune. --upload_quantizations
(`none|fp16|int8`, the clients' wire format, `fedprune/federated/quantization.py`)
crosses every cell, dense ones included, like --dp_noise_multipliers; left
empty, --upload_quantization applies to every cell. So `--maskings=server,both
--regrows=none,random,gradient --regrow_ats=server,client` is the static
server and both cells, both modes' SET and RigL at the server and the both
mode's at the clients (FedDST), without naming invalid cells one by one. A
grid whose listed regrowth fits none of its --maskings (e.g. only
`--maskings=client` with --regrows=random, or --regrow_ats=client without
`both`) is refused with one line naming --regrows or --regrow_ats. Each cell trains into its
own folder `<root>/<cell name>` with `loop.run_experiment`, beside its
flags.txt (`experiments.run --flagfile=<cell>/flags.txt` reruns it); a cell whose
`summary.json` is present with the cell's config fingerprint is complete and is
skipped, a folder without a summary is resumed. Everything up to
`run_cells` (flags, validation of every cell, the status of the run tree)
imports neither TensorFlow nor TFF, so bad input fails fast and writes
nothing. The finished runs' tables, plots and checks are in
`experiments/grid_results.py`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from absl import flags

from experiments import common, flagfile, usage
from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument, check
from fedprune.federated import encodings, masking_modes
from fedprune.outputs import atomic_files
from fedprune.pruning import layer_budgets, regrowth, step_schedule
from fedprune.pruning.schedules import SCHEDULES

FLAGS = flags.FLAGS

DENSE = "dense"  # the schedule label of `--schedules=none` cells
# The modes that prune; the dense cell's (none) comes with --schedules=none.
GRID_MASKINGS = masking_modes.names(lambda mode: mode.wraps_model)
# The modes whose cells are crossed with --prune_granularities.
_PRUNING_CLIENT_MASKINGS = masking_modes.names(lambda mode: mode.client_prunes)
# Config field -> the grid flag that sets it per cell; setting the field as a base flag
# would be silently overridden, so it is rejected.
CELL_FIELDS = {"schedule": "schedules", "power": "powers", "final_sparsity": "final_sparsities",
               "masking": "maskings", "prune_granularity": "prune_granularities",
               "sparsity_distribution": "sparsity_distributions", "regrow": "regrows",
               "regrow_at": "regrow_ats", "dp_noise_multiplier": "dp_noise_multipliers",
               "upload_quantization": "upload_quantizations", "seed": "seeds"}
# Flags that only --prune_granularity=step reads (and round refuses at other values).
_STEP_ONLY_FIELDS = ("steps_per_round", "prune_every_steps")
# Dimensions a grid may leave out (an empty grid flag): the base flag then applies.
OPTIONAL_CELL_FIELDS = ("dp_noise_multiplier", "upload_quantization")
GRID_FLAGS = tuple(CELL_FIELDS.values())
GRID_TOPIC = "grid (one cell per combination)"  # of the grid flags in --help
KEYS = ("schedule", "final_sparsity", "masking")  # a table row: a cell without its seed
# Added after KEYS to the row keys of grids that list a granularity other than the default.
GRANULARITY_KEY = "granularity"
DEFAULT_GRANULARITY = ExperimentConfig.prune_granularity  # round
DP_KEY = "dp_noise_multiplier"  # added to the row keys of DP grids
# Dynamic-sparse-training row keys (after the granularity, in this order): each is a key of
# the grids that list a value other than its default (`GridSpec.shown_keys`).
DISTRIBUTION_KEY = "sparsity_distribution"
REGROW_KEY = "regrow"
REGROW_AT_KEY = "regrow_at"
DEFAULT_DISTRIBUTION = ExperimentConfig.sparsity_distribution  # uniform
DEFAULT_REGROW = ExperimentConfig.regrow  # none
DEFAULT_REGROW_AT = ExperimentConfig.regrow_at  # server
# Row keys a grid shows only when it lists a value other than the default, in key order:
# key -> (config field, default).
OPTIONAL_KEYS = {GRANULARITY_KEY: ("prune_granularity", DEFAULT_GRANULARITY),
                 DISTRIBUTION_KEY: ("sparsity_distribution", DEFAULT_DISTRIBUTION),
                 REGROW_KEY: ("regrow", DEFAULT_REGROW),
                 REGROW_AT_KEY: ("regrow_at", DEFAULT_REGROW_AT)}
# The row of the dense cells: the baseline of paired differences (`grid_results`). Keys a
# table does not have (e.g. granularity) are ignored.
DENSE_KEY = {"schedule": DENSE, "final_sparsity": 0.0, "masking": "none",
             **{key: default for key, (_, default) in OPTIONAL_KEYS.items()}}
# Also row keys, in front, when they differ between a table's runs (Table 3 mixes models
# and structures, Table 5 upload quantizations).
VARYING_KEYS = ("model", "structure", "upload_quantization")
# --parallel_cells=0 starts at most one child per this much available memory (a child
# with its TFF worker peaks at about 1.5 GiB on the default models).
CHILD_MEMORY_GIB = 2
# FEDPRUNE_REBUILD_PROCESSES=1: build every cell's process afresh, as before one trace per
# grid (`assembly.build_process` reuses them); for measuring what the reuse saves.
REBUILD_ENV = "FEDPRUNE_REBUILD_PROCESSES"
MIN_CELLS_PER_CHILD = 4


# --------------------------------------------------------------------------
# Flags.


def define_grid_flags() -> None:
    """Defines the grid flags (idempotent); `common.define_experiment_flags` defines the rest."""
    if "schedules" in FLAGS:
        return
    flags.DEFINE_list("schedules", ["none", "oneshot", "constant", "polynomial"],
                      "Schedules to compare (" + "|".join(SCHEDULES) + "); none = dense "
                      "training, one cell per seed.")
    flags.DEFINE_list("powers", ["3"], "Exponents of the polynomial schedule; one polynomial "
                      "variant per value (e.g. 1,3).")
    flags.DEFINE_list("final_sparsities", ["0.5", "0.75", "0.9", "0.95"],
                      "Target sparsities, fractions in [0, 1).")
    flags.DEFINE_list("maskings", list(GRID_MASKINGS),
                      "Masking modes of the pruned cells (" + "|".join(GRID_MASKINGS) + ").")
    flags.DEFINE_list("prune_granularities", [DEFAULT_GRANULARITY],
                      "When pruning clients prune (" + "|".join(step_schedule.GRANULARITIES)
                      + "), one cell each for the modes whose clients prune ("
                      + "|".join(_PRUNING_CLIENT_MASKINGS) + "); the other modes' cells are at "
                      f"{DEFAULT_GRANULARITY} granularity, once. --steps_per_round and "
                      "--prune_every_steps apply to the step cells.")
    flags.DEFINE_list("sparsity_distributions", [DEFAULT_DISTRIBUTION],
                      "Per-layer sparsity budgets of the pruned cells ("
                      + "|".join(layer_budgets.DISTRIBUTIONS) + "), one cell each; dense cells "
                      f"are at {DEFAULT_DISTRIBUTION}, once.")
    flags.DEFINE_list("regrows", [DEFAULT_REGROW],
                      "Prune and regrow of the pruned cells (" + "|".join(regrowth.RULES)
                      + "; random = SET, gradient = RigL), one cell each for the --maskings "
                      "that fit (the others are left out); dense cells do not regrow.")
    flags.DEFINE_list("regrow_ats", [DEFAULT_REGROW_AT],
                      "Who adjusts the topology of the regrowing cells ("
                      + "|".join(regrowth.PLACES) + "), one cell each for the --maskings that "
                      f"fit (client: both); cells with --regrows={DEFAULT_REGROW} are at "
                      f"{DEFAULT_REGROW_AT}, once.")
    flags.DEFINE_list("dp_noise_multipliers", [], "DP noise multipliers, one cell each (with "
                      "--dp=fixed|adaptive); empty: --dp_noise_multiplier for every cell.")
    flags.DEFINE_list("upload_quantizations", [], "Wire formats of the clients' uploads ("
                      + "|".join(encodings.QUANTIZATIONS) + "), one cell each, dense cells "
                      "included; empty: --upload_quantization for every cell.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds; tables show mean ± 95% CI over them.")
    usage.set_topic(GRID_TOPIC, *GRID_FLAGS)
    flags.DEFINE_integer("parallel_cells", 0, "Cells trained at a time, each share of the cells "
                         "in a child process with its own TFF worker; 0 = the usable cores, "
                         f"at most one per {CHILD_MEMORY_GIB} GiB of available memory and per "
                         f"{MIN_CELLS_PER_CHILD} cells to train; 1 = one after another in this "
                         "process (always with --tff_workers).")
    flags.DEFINE_string("cell_shard", "", "Internal (--parallel_cells): i/n, train only share "
                        "i of n of the cells to train, then exit.")
    usage.set_topic(usage.RUNTIME, "parallel_cells", "cell_shard")


def parse_flagfiles(paths: Sequence[Path | str]) -> None:
    """Parses flagfiles into the global flags; flags they do not name keep their values.

    Raises:
      InvalidArgument: a file is missing or names an unknown flag or a bad value.
    """
    for path in paths:
        check(Path(path).is_file(), "flagfile", str(path), "an existing flagfile")
    try:
        FLAGS([sys.argv[0], *(f"--flagfile={p}" for p in paths)])
    except flags.Error as e:
        raise InvalidArgument("flagfile", ",".join(map(str, paths)),
                              f"valid flags ({str(e).splitlines()[0]})") from e


def check_no_cell_flags() -> None:
    """Rejects base flags that the grid sets per cell (--schedule, --seed, ...).

    Raises:
      InvalidArgument: naming the flag and the grid flag to use instead.
    """
    for field, grid_flag in CELL_FIELDS.items():
        if field in OPTIONAL_CELL_FIELDS and not FLAGS[grid_flag].value:
            continue
        check(not FLAGS[field].present, field, FLAGS[field].value,
              f"no value: each cell sets it from --{grid_flag}")


def grid_from_flags() -> GridSpec:
    """The validated `GridSpec` of the parsed grid flags."""
    return GridSpec.from_strings(**{name: FLAGS[name].value for name in GRID_FLAGS})


# --------------------------------------------------------------------------
# Cells.


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of a grid.

    Attributes:
      name: its folder under the run root, e.g. `polynomial-p3-s0.9-both-seed0`.
      schedule: the schedule label in tables: `dense`, `oneshot`, `constant`,
        `polynomial-p<power>`.
      config: the run's validated configuration.
      shown_keys: the `OPTIONAL_KEYS` of the cell's row key (granularity,
        sparsity_distribution, regrow, regrow_at): those for which its grid lists
        a value other than the default (`GridSpec.shown_keys`).
    """

    name: str
    schedule: str
    config: ExperimentConfig
    shown_keys: tuple[str, ...] = ()

    @property
    def key(self) -> dict:
        """The table row this cell belongs to: {schedule, final_sparsity, masking[,
        granularity][, sparsity_distribution][, regrow][, regrow_at][,
        dp_noise_multiplier]} (the optional keys when its grid lists a value other
        than the default, the last for DP runs)."""
        key = {"schedule": self.schedule, "final_sparsity": self.config.final_sparsity,
               "masking": self.config.masking}
        for name in self.shown_keys:
            key[name] = getattr(self.config, OPTIONAL_KEYS[name][0])
        if self.config.dp != "none":
            key[DP_KEY] = self.config.dp_noise_multiplier
        return key


def _parse_list(name: str, values: Iterable[str], convert, accepted: str) -> tuple:
    parsed = []
    for text in values:
        try:
            value = convert(text)
        except ValueError:
            raise InvalidArgument(name, ",".join(values), accepted) from None
        check(value not in parsed, name, ",".join(values), accepted + ", without repeats")
        parsed.append(value)
    return tuple(parsed)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


@dataclasses.dataclass(frozen=True)
class GridSpec:
    """The grid flags, parsed and checked.

    Attributes:
      schedules: names from `fedprune.pruning.schedules.SCHEDULES`; `none` is dense.
      powers: polynomial exponents (> 0), one polynomial variant each.
      final_sparsities: target sparsities in [0, 1) of the pruned cells.
      maskings: masking modes of the pruned cells (not `none`).
      seeds: seeds (>= 0); every cell is run once per seed.
      dp_noise_multipliers: DP noise multipliers (>= 0), one cell each; empty:
        the base config's.
      prune_granularities: `--prune_granularity` values, one cell each for the
        masking modes whose clients prune (`MaskingMode.client_prunes`); the
        other modes' cells are at the default granularity (`round`), once.
      sparsity_distributions: `--sparsity_distribution` values, one cell each of
        the pruned cells; dense cells are at `uniform`.
      regrows: `--regrow` values, one cell each of the pruned cells whose masking
        mode fits (`masking_modes.check_regrowth`); dense cells are at `none`.
      regrow_ats: `--regrow_at` values, one cell each of the cells whose regrow is
        not `none` and whose masking mode fits; the others are at `server`.
      upload_quantizations: `--upload_quantization` values (`none|fp16|int8`), one
        cell each of every cell, dense ones included; empty: the base config's.
    """

    schedules: tuple[str, ...]
    powers: tuple[float, ...]
    final_sparsities: tuple[float, ...]
    maskings: tuple[str, ...]
    seeds: tuple[int, ...]
    dp_noise_multipliers: tuple[float, ...] = ()
    prune_granularities: tuple[str, ...] = (DEFAULT_GRANULARITY,)
    sparsity_distributions: tuple[str, ...] = (DEFAULT_DISTRIBUTION,)
    regrows: tuple[str, ...] = (DEFAULT_REGROW,)
    regrow_ats: tuple[str, ...] = (DEFAULT_REGROW_AT,)
    upload_quantizations: tuple[str, ...] = ()

    def __post_init__(self):
        check(bool(self.schedules), "schedules", "", "one or more of " + "|".join(SCHEDULES))
        for s in self.schedules:
            check(s in SCHEDULES, "schedules", s, "one or more of " + "|".join(SCHEDULES))
        if any(s != "none" for s in self.schedules):
            check(bool(self.maskings), "maskings", "", "one or more of " + "|".join(GRID_MASKINGS))
            check(bool(self.final_sparsities), "final_sparsities", "",
                  "one or more sparsity fractions in [0, 1)")
        for m in self.maskings:
            check(m in GRID_MASKINGS, "maskings", m, "one or more of " + "|".join(GRID_MASKINGS))
        for s in self.final_sparsities:
            check(0.0 <= s < 1.0, "final_sparsities", s, "sparsity fractions in [0, 1)")
        with_power = [s for s in self.schedules if _reads_power(s)]
        if with_power:
            check(bool(self.powers), "powers", "",
                  f"one or more exponents > 0 for {'|'.join(with_power)}")
        for p in self.powers:
            check(p > 0, "powers", p, "exponents > 0 (1 = linear, 3 = cubic)")
        check(bool(self.seeds), "seeds", "", "one or more seeds >= 0")
        for s in self.seeds:
            check(s >= 0, "seeds", s, "whole numbers >= 0")
        for z in self.dp_noise_multipliers:
            check(z >= 0, "dp_noise_multipliers", z, "noise multipliers >= 0")
        for q in self.upload_quantizations:
            check(q in encodings.QUANTIZATIONS, "upload_quantizations", q,
                  "one or more of " + "|".join(encodings.QUANTIZATIONS))
        accepted = "one or more of " + "|".join(step_schedule.GRANULARITIES)
        check(bool(self.prune_granularities), "prune_granularities", "", accepted)
        for g in self.prune_granularities:
            check(g in step_schedule.GRANULARITIES, "prune_granularities", g, accepted)
        if self.varies_granularity and any(s != "none" for s in self.schedules):
            pruning = "|".join(_PRUNING_CLIENT_MASKINGS)
            check(any(masking_modes.masking_mode(m).client_prunes for m in self.maskings),
                  "prune_granularities", ",".join(self.prune_granularities),
                  f"{DEFAULT_GRANULARITY} unless --maskings lists a mode whose clients prune "
                  f"({pruning}); the others have no granularity to vary")
        for name, values, accepted in (
                ("sparsity_distributions", self.sparsity_distributions,
                 layer_budgets.DISTRIBUTIONS),
                ("regrows", self.regrows, regrowth.RULES),
                ("regrow_ats", self.regrow_ats, regrowth.PLACES)):
            text = "one or more of " + "|".join(accepted)
            check(bool(values), name, "", text)
            for value in values:
                check(value in accepted, name, value, text)
        if any(s != "none" for s in self.schedules):
            self._check_regrowth_fits()

    def _check_regrowth_fits(self) -> None:
        """Every listed regrow_at has cells: a mode of --maskings regrows there.

        Raises:
          InvalidArgument: naming --regrows when the grid lists only the default
            place (`server`), else --regrow_ats.
        """
        if all(r == DEFAULT_REGROW for r in self.regrows):
            return
        for at in self.regrow_ats:
            allowed = masking_modes.names(lambda m, at=at: masking_modes.regrows_at(m, at))
            if self.regrow_ats == (DEFAULT_REGROW_AT,):
                check(any(m in allowed for m in self.maskings), "regrows", ",".join(self.regrows),
                      f"{DEFAULT_REGROW} unless --maskings lists a mode whose server re-masks "
                      f"({'|'.join(allowed)}); the others have no topology to adjust")
            check(any(m in allowed for m in self.maskings), "regrow_ats",
                  ",".join(self.regrow_ats), f"places where a mode of --maskings regrows "
                  f"({at} needs --maskings to list {'|'.join(allowed)})")

    def shown_keys(self) -> tuple[str, ...]:
        """The `OPTIONAL_KEYS` of this grid's row keys: those it lists a non-default value of."""
        listed = {GRANULARITY_KEY: self.prune_granularities,
                  DISTRIBUTION_KEY: self.sparsity_distributions, REGROW_KEY: self.regrows,
                  REGROW_AT_KEY: self.regrow_ats if any(r != DEFAULT_REGROW for r in self.regrows)
                  else (DEFAULT_REGROW_AT,)}
        return tuple(key for key, (_, default) in OPTIONAL_KEYS.items()
                     if listed[key] != (default,))

    def regrowths(self, masking: str) -> list[tuple[str, str]]:
        """The (regrow, regrow_at) pairs of a masking mode's cells: `none` at `server` if
        listed, then each listed rule at each listed place the mode fits, in list order."""
        pairs = []
        for regrow in self.regrows:
            if regrow == DEFAULT_REGROW:
                pairs.append((regrow, DEFAULT_REGROW_AT))
            else:
                pairs += [(regrow, at) for at in self.regrow_ats if _regrowth_fits(masking, at)]
        return pairs

    @property
    def varies_granularity(self) -> bool:
        """The grid lists a granularity other than the default: its rows show the granularity."""
        return self.prune_granularities != (DEFAULT_GRANULARITY,)

    def granularities(self, masking: str) -> tuple[str, ...]:
        """The granularities of a masking mode's cells: the grid's if its clients prune."""
        if masking_modes.masking_mode(masking).client_prunes:
            return self.prune_granularities
        return (DEFAULT_GRANULARITY,)

    @classmethod
    def from_strings(cls, *, schedules, powers, final_sparsities, maskings, seeds,
                     dp_noise_multipliers=(), prune_granularities=(DEFAULT_GRANULARITY,),
                     sparsity_distributions=(DEFAULT_DISTRIBUTION,),
                     regrows=(DEFAULT_REGROW,), regrow_ats=(DEFAULT_REGROW_AT,),
                     upload_quantizations=()) -> GridSpec:
        """Parses the comma-separated grid flags (lists of strings).

        Raises:
          InvalidArgument: naming the grid flag, its value and what is accepted.
        """
        return cls(
            schedules=_parse_list("schedules", schedules, str, "|".join(SCHEDULES)),
            powers=_parse_list("powers", powers, _finite_float, "numbers, e.g. 1,3"),
            final_sparsities=_parse_list("final_sparsities", final_sparsities, _finite_float,
                                         "sparsity fractions in [0, 1), e.g. 0.5,0.9"),
            maskings=_parse_list("maskings", maskings, str, "|".join(GRID_MASKINGS)),
            seeds=_parse_list("seeds", seeds, int, "whole numbers >= 0, e.g. 0,1,2"),
            dp_noise_multipliers=_parse_list("dp_noise_multipliers", dp_noise_multipliers,
                                             _finite_float, "noise multipliers, e.g. 0,0.5,1"),
            prune_granularities=_parse_list("prune_granularities", prune_granularities, str,
                                            "|".join(step_schedule.GRANULARITIES)),
            sparsity_distributions=_parse_list("sparsity_distributions", sparsity_distributions,
                                               str, "|".join(layer_budgets.DISTRIBUTIONS)),
            regrows=_parse_list("regrows", regrows, str, "|".join(regrowth.RULES)),
            regrow_ats=_parse_list("regrow_ats", regrow_ats, str, "|".join(regrowth.PLACES)),
            upload_quantizations=_parse_list("upload_quantizations", upload_quantizations, str,
                                             "|".join(encodings.QUANTIZATIONS)),
        )

    def cells(self, base: ExperimentConfig) -> list[Cell]:
        """Every cell of the grid over `base`, each config validated.

        Order: schedules as listed (dense first if listed first), then power,
        sparsity, masking, granularity, sparsity distribution, regrow, regrow_at,
        noise multiplier, upload quantization and seed; tables keep this order.
        A cell's name carries the values other than the defaults, in that order:
        `...-both-step-erk-gradient-client-z1-int8-seed0` (granularity `step`,
        distribution `erk`, regrow `gradient`, regrow_at `client`, noise
        multiplier 1, uploads in int8); a cell at every default keeps the name
        (and config, so fingerprint) of a grid without these flags.

        Raises:
          InvalidArgument: a cell's config is invalid; the message names the cell.
        """
        noise = [(f"-z{z:g}", {"dp_noise_multiplier": z}) for z in self.dp_noise_multipliers]
        quantized = [("" if q == encodings.NO_QUANTIZATION else f"-{q}",
                      {"upload_quantization": q}) for q in self.upload_quantizations]
        # (name tag, overrides) per cell of one row and seed: a noise multiplier and an
        # upload quantization.
        crossed = [(z_tag + q_tag, {**z, **q})
                 for z_tag, z in noise or [("", {})] for q_tag, q in quantized or [("", {})]]
        shown = self.shown_keys()
        # The step-only flags of the base apply to the step cells; the others keep the
        # defaults, which is all --prune_granularity=round accepts.
        round_args = ({f: getattr(ExperimentConfig, f) for f in _STEP_ONLY_FIELDS}
                      if GRANULARITY_KEY in shown else {})
        # Dense cells prune nowhere, budget no layers, regrow nothing: every optional field
        # at its default.
        static = dict(OPTIONAL_KEYS.values())
        cells = []
        for schedule in self.schedules:
            if SCHEDULES[schedule].dense:
                for tag, extra in crossed:
                    for seed in self.seeds:
                        cells.append(_cell(base, DENSE, f"{DENSE}{tag}-seed{seed}", shown,
                                           schedule=schedule, masking="none",
                                           final_sparsity=0.0, seed=seed,
                                           **round_args, **static, **extra))
                continue
            variants = ([(f"{schedule}-p{p:g}", p) for p in self.powers]
                        if _reads_power(schedule) else [(schedule, base.power)])
            for label, power in variants:
                for sparsity in self.final_sparsities:
                    for masking in self.maskings:
                        for variant in self._dst_variants(masking):
                            step = variant["prune_granularity"] != DEFAULT_GRANULARITY
                            args = {**variant, **({} if step else round_args)}
                            suffix = "".join(f"-{variant[field]}"
                                             for field, default in OPTIONAL_KEYS.values()
                                             if variant[field] != default)
                            for tag, extra in crossed:
                                for seed in self.seeds:
                                    cells.append(_cell(
                                        base, label,
                                        f"{label}-s{sparsity:g}-{masking}{suffix}{tag}-seed{seed}",
                                        shown, schedule=schedule, power=power, masking=masking,
                                        final_sparsity=sparsity, seed=seed, **args, **extra))
        return cells

    def _dst_variants(self, masking: str) -> list[dict[str, str]]:
        """The optional fields (`OPTIONAL_KEYS`: prune_granularity, sparsity_distribution,
        regrow, regrow_at) of a mode's pruned cells, one dict per cell."""
        fields = [field for field, _ in OPTIONAL_KEYS.values()]
        return [dict(zip(fields, (g, d, r, at), strict=True))
                for g in self.granularities(masking) for d in self.sparsity_distributions
                for r, at in self.regrowths(masking)]


def _regrowth_fits(masking: str, at: str) -> bool:
    """Whether `--masking=masking` regrows at `--regrow_at=at` (`masking_modes.regrows_at`)."""
    return masking_modes.regrows_at(masking_modes.masking_mode(masking), at)


def _reads_power(schedule: str) -> bool:
    """Whether a registered schedule reads --power (then --powers makes its variants)."""
    return "power" in SCHEDULES.entry(schedule).params


def _cell(base: ExperimentConfig, label: str, name: str, shown_keys: tuple[str, ...],
          **overrides) -> Cell:
    config = dataclasses.replace(base, **overrides)
    try:
        config.validate()
    except InvalidArgument as e:
        raise InvalidArgument(e.name, e.value, f"{e.accepted} (in grid cell {name})") from None
    return Cell(name=name, schedule=label, config=config, shown_keys=shown_keys)


# --------------------------------------------------------------------------
# The run tree.


class Status(enum.Enum):
    NEW = "new"  # no folder yet
    RESUME = "resume"  # a folder without summary.json: continue from its checkpoints
    DONE = "done"  # summary.json with this cell's fingerprint


def cell_status(cell: Cell, root: Path) -> Status:
    """Whether a cell still has to run, without importing TensorFlow.

    Raises:
      InvalidArgument: the cell's folder holds a run of another configuration
        (its summary.json or config.json has a different fingerprint).
    """
    folder = root / cell.name
    if not folder.exists():
        return Status.NEW
    fingerprint = cell.config.fingerprint()
    for name in ("summary.json", "config.json"):
        found = (atomic_files.read_json(folder / name) or {}).get("fingerprint")
        check(found in (None, fingerprint), "output_dir", str(root),
              f"a new folder or one holding this grid: {cell.name}/{name} is a run of another "
              f"configuration (fingerprint {found}, this cell {fingerprint})")
    if (folder / "summary.json").exists():
        return Status.DONE
    return Status.RESUME


def statuses(cells: Sequence[Cell], root: Path) -> list[Status]:
    """`cell_status` of every cell; checks the root is a folder (or absent) first."""
    check(not root.exists() or root.is_dir(), "output_dir", str(root),
          "a folder path (this is a file)")
    return [cell_status(c, root) for c in cells]


def _fmt_minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.0f} s"


def run_cells(cells: Sequence[Cell], root: Path, *, log: Callable[[str], None] = print,
              round_logs: bool = False, tff_workers: Sequence[str] = ()) -> list[str]:
    """Trains every cell that is not complete, in this process, one after another.

    In `process_order`: cells that share a traced process
    (`assembly.build_process`) train one after another, so a grid of more
    process groups than `assembly`'s cache keeps builds each group once.
    Needs the TFF runtime (`common.start_runtime`) when any cell is not done.

    Args:
      cells: from `GridSpec.cells`.
      root: the run tree; cell `c` writes into `root / c.name`.
      log: receives one line per cell (skipped / resumed / done) and the grid ETA.
      round_logs: also pass on `run_experiment`'s per-round lines.
      tff_workers: the workers the runtime runs on, recorded in flags.txt and
        config.json (`experiments.run` reruns a cell from its flags.txt).

    Returns:
      The names of cells that failed (non-finite training or a bad checkpoint);
      the others are complete.
    """
    todo = [(c, s) for c, s in zip(cells, statuses(cells, root), strict=True)
            if s is not Status.DONE]
    todo.sort(key=lambda cell_status: process_order(cell_status[0]))
    skipped = len(cells) - len(todo)
    if skipped:
        log(f"skipped {skipped} complete cell(s) of {len(cells)} in {root}")
    if not todo:
        return []
    from fedprune.program import assembly, checkpoint, loop

    # The benchmark's reference path (`experiments/benchmark_grid.py`): a process per cell.
    rebuild = os.environ.get(REBUILD_ENV) == "1"
    failed = []
    start = time.time()
    for i, (cell, status) in enumerate(todo, 1):
        prefix = f"[{i}/{len(todo)}] {cell.name}"
        if rebuild:
            assembly.clear_process_cache()

        def cell_log(line, prefix=prefix):
            if round_logs or not line.startswith("round "):
                log(f"{prefix}: {line}")

        resume = status is Status.RESUME
        if resume:
            log(f"{prefix}: resuming the incomplete run in its folder")
        flagfile.write_flagfile(root / cell.name, cell.config, resume=resume,
                                tff_workers=tff_workers)
        try:
            loop.run_experiment(cell.config, root / cell.name, resume=resume, log=cell_log,
                                   provenance={"tff_workers": list(tff_workers)})
        except (loop.NonFiniteError, checkpoint.CheckpointError) as e:
            log(f"{prefix}: FAILED: {e}")
            failed.append(cell.name)
        elapsed = time.time() - start
        log(f"{prefix}: grid {_fmt_minutes(elapsed)} elapsed, "
            f"ETA {_fmt_minutes(elapsed / i * (len(todo) - i))}")
    return failed


def run_grid(cells: Sequence[Cell], root: Path, *, verbose: bool, tff_workers: Sequence[str],
             log: Callable[[str], None] = print, round_logs: bool = False,
             parallel_cells: int = 1, shard: str = "") -> list[str]:
    """Trains the cells that are not complete: here, or in `parallel_cells` children.

    Starts the TFF runtime only if some cell has to run here. With
    `parallel_cells` > 1 the cells to train are split into that many shares
    (`shares`: a share keeps cells that share a traced process together) and
    each share trains in a child process, this driver's own command with
    `--cell_shard=i/n --parallel_cells=1`; their lines are passed on as they
    come. A child's failed cells are found from the run tree afterwards.

    Args:
      parallel_cells: children to train in (`check_parallel_cells`); 0: as many as
        `auto_parallel_cells`; 1: here.
      shard: `--cell_shard` (a child): train only that share of the cells.

    Returns:
      The names of failed cells.
    """
    todo = [c for c, s in zip(cells, statuses(cells, root), strict=True) if s is not Status.DONE]
    if not todo:
        log(f"skipped all {len(cells)} cell(s): complete in {root}; nothing to train")
        return []
    if shard:
        index, count = parse_shard(shard)
        cells = shares(todo, count)[index]
        if not cells:
            return []
    else:
        children = min(parallel_cells or auto_parallel_cells(len(todo)), len(todo))
        if children > 1:
            from experiments import grid_children

            log(f"training {len(todo)} cell(s) in {children} child processes (--parallel_cells)")
            try:
                grid_children.run_children(children, log=log)
            except RuntimeError as e:
                common.fail(str(e), code=1)
            return [c.name for c, s in zip(todo, statuses(todo, root), strict=True)
                    if s is not Status.DONE]
    common.start_runtime(verbose=verbose, tff_workers=list(tff_workers))
    return run_cells(cells, root, log=log, round_logs=round_logs, tff_workers=tff_workers)


def check_parallel_cells(value: int, *, tff_workers: Sequence[str]) -> int:
    """`--parallel_cells`, checked; 1 with --tff_workers (the remote workers serve one process).

    Raises:
      InvalidArgument: a negative value, or > 1 with --tff_workers.
    """
    check(value >= 0, "parallel_cells", value, "a whole number >= 0 (0 = the usable cores)")
    if tff_workers:
        check(value <= 1, "parallel_cells", value,
              "0 or 1 with --tff_workers (the remote workers serve one process)")
        return 1
    return value


def auto_parallel_cells(todo: int) -> int:
    """`--parallel_cells=0` for `todo` cells to train: the usable cores, at most one child
    per `CHILD_MEMORY_GIB` GiB of available memory and per `MIN_CELLS_PER_CHILD` cells (a
    child pays its own TensorFlow import and tracing, ~10 s)."""
    import os

    import psutil

    memory = psutil.virtual_memory().available // (CHILD_MEMORY_GIB * 2**30)
    return max(1, min(len(os.sched_getaffinity(0)), memory, todo // MIN_CELLS_PER_CHILD))


def parse_shard(text: str) -> tuple[int, int]:
    """`--cell_shard=i/n` -> (i, n), 0 <= i < n.

    Raises:
      InvalidArgument: another form.
    """
    index, _, count = text.partition("/")
    ok = index.isdigit() and count.isdigit() and int(index) < int(count)
    check(ok, "cell_shard", text, "i/n with whole numbers 0 <= i < n (set by --parallel_cells)")
    return int(index), int(count)


def process_order(cell: Cell) -> str:
    """The key cells are trained in (stably): `assembly.process_group`.

    Cells that share a traced process (`assembly.build_process`) sit next to
    each other, so each group is built once (the cache keeps only the last
    few) and, split into shares, mostly in one share.
    """
    from fedprune.program import assembly

    return assembly.process_group(cell.config)


def shares(cells: Sequence[Cell], count: int) -> list[list[Cell]]:
    """`cells` split into `count` shares of sizes differing by at most one.

    Cells are ordered by `process_order` first, so each share traces about
    its process groups once.
    """
    ordered = sorted(cells, key=process_order)
    size, extra = divmod(len(ordered), count)
    out, start = [], 0
    for i in range(count):
        end = start + size + (i < extra)
        out.append(ordered[start:end])
        start = end
    return out
