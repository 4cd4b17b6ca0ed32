"""Per-layer sparsity budgets: how a global sparsity target is split among layers.

`--sparsity_distribution` (`DISTRIBUTIONS`):

  * `uniform` (default): every pruned kernel at the schedule's sparsity s; the
    process then uses the scalar of `ScheduleTable.sparsity` as it always did.
  * `erk`: Erdős–Rényi-kernel (Evci et al. 2020, "Rigging the Lottery", RigL).
    A kernel of shape (k_1, ..., k_m) (Dense: (n_in, n_out); Conv2D:
    (kh, kw, c_in, c_out)) gets the raw score

        raw_l = (k_1 + ... + k_m) / (k_1 * ... * k_m)

    (for a Dense kernel (n_in + n_out) / (n_in * n_out), Erdős–Rényi), and the
    density d_l = eps * raw_l, with eps solved so that the kept weights of all
    pruned kernels together are (1 - s) * N (N: their total size). A kernel
    whose density would exceed 1 is kept dense and eps is solved again over
    the others, until none exceeds 1. As in RigL's reference implementation
    (`get_sparsities_erdos_renyi`), each pass caps the kernels with the
    largest raw score: a capped kernel frees budget, so eps only grows and a
    kernel that exceeded 1 once exceeds it at every later pass.

Kept counts. The densities are real numbers; masks keep integers. `kept_counts`
turns them into one whole count per kernel (largest remainders, Hamilton's
method) whose sum is tfmot's count for the whole target,
max(round(N * (1 - s)), 1) in float32 (`masking.num_kept` over all kernels), so
the global sparsity is exactly what `--mask_scope=global` would keep, within
one weight of the target. `layer_sparsities` gives each kernel a float32
sparsity that `masking.num_kept` maps back to exactly its count.

Rounds. A schedule's level changes from round to round (`ScheduleTable.sparsity`,
0 before pruning starts). ERK is recomputed at each round's level: after round
r every kernel has its ERK sparsity for the global level s_r. (RigL fixes the
final level's distribution; with a ramp from 0 that would not be ERK at the
intermediate levels, because the capped kernels change with s: at s = 0 every
kernel is dense.) `with_layer_budgets` tabulates the levels per round, one row
per round and one column per pruned kernel (`ScheduleTable.layer_sparsity`).

Only the magnitude criterion with `--mask_scope=layer`, unstructured, at
`--prune_granularity=round` and in a mode that prunes takes per-layer levels;
`check_distribution` refuses the rest with one line (global scope already
distributes sparsity across layers; structures have their own units of
sparsity; tfmot's step wrappers would need per-layer schedules whose capping
changes with the level, which a PolynomialDecay per layer cannot express).

Plain numpy; no TensorFlow.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from fedprune.errors import check
from fedprune.pruning.masking import CRITERIA

DISTRIBUTIONS = ("uniform", "erk")


def erk_scores(shapes: Sequence[Sequence[int]]) -> np.ndarray:
    """ERK raw scores, (sum of dims) / (product of dims) per kernel shape (float64)."""
    return np.array([float(np.sum(s)) / float(np.prod(s)) for s in shapes], np.float64)


def erk_densities(shapes: Sequence[Sequence[int]], sparsity: float) -> np.ndarray:
    """ERK densities (fractions kept, float64) of kernels of `shapes` for a global `sparsity`.

    Args:
      shapes: one kernel shape per pruned kernel.
      sparsity: the global fraction of zeros over all kernels, in [0, 1).

    Returns:
      d with 0 < d_l <= 1 and sum_l d_l * N_l == (1 - sparsity) * sum_l N_l
      (to float64 rounding).
    """
    check(0 <= sparsity < 1, "final_sparsity", sparsity, "a fraction in [0, 1)")
    sizes = np.array([float(np.prod(s)) for s in shapes], np.float64)
    raw = erk_scores(shapes)
    dense = np.zeros(len(shapes), bool)
    if sparsity == 0:
        return np.ones(len(shapes), np.float64)
    while True:
        free = ~dense
        # Kept weights left for the kernels not capped, over their raw-weighted size.
        left = (1.0 - sparsity) * sizes.sum() - sizes[dense].sum()
        eps = left / (raw[free] * sizes[free]).sum()
        top = raw[free].max()
        if top * eps <= 1.0:
            break
        dense |= free & (raw == top)
    return np.where(dense, 1.0, eps * raw)


def global_kept(total: int, sparsity: float) -> int:
    """tfmot's kept count for `total` weights at `sparsity`: `masking.num_kept` in numpy."""
    kept = np.round(np.float32(total) * (np.float32(1.0) - np.float32(sparsity)))
    return int(max(kept, np.float32(1.0)))


def kept_counts(shapes: Sequence[Sequence[int]], sparsity: float,
                distribution: str = "erk") -> np.ndarray:
    """Whole kept weights per kernel (int64) for the global `sparsity`.

    `uniform`: each kernel's own `global_kept(N_l, s)`, as the per-layer mask
    keeps today. `erk`: the ERK densities times the sizes, rounded by largest
    remainders to sum to `global_kept(N, s)`; every kernel keeps >= 1 and <= N_l.
    """
    check(distribution in DISTRIBUTIONS, "sparsity_distribution", distribution,
          "one of " + "|".join(DISTRIBUTIONS))
    sizes = np.array([int(np.prod(s)) for s in shapes], np.int64)
    if distribution == "uniform":
        return np.array([global_kept(n, sparsity) for n in sizes], np.int64)
    exact = erk_densities(shapes, sparsity) * sizes
    kept = np.clip(np.floor(exact).astype(np.int64), 1, sizes)
    short = global_kept(int(sizes.sum()), sparsity) - int(kept.sum())
    order = np.argsort(-(exact - np.floor(exact)), kind="stable")  # largest remainders first
    while short != 0:
        step = 1 if short > 0 else -1
        room = kept < sizes if step > 0 else kept > 1
        chosen = [i for i in (order if step > 0 else order[::-1]) if room[i]][:abs(short)]
        if not chosen:  # more kernels than the global count: each keeps its one weight
            break
        kept[chosen] += step
        short -= step * len(chosen)
    return kept


def layer_sparsities(shapes: Sequence[Sequence[int]], sparsity: float,
                     distribution: str = "erk") -> np.ndarray:
    """Per-kernel sparsities (float32) whose `masking.num_kept` are `kept_counts`.

    For each kernel, s_l = 1 - k_l / N_l in float32; `masking.num_kept(N_l, s_l)`,
    max(round(N_l * (1 - s_l)), 1) in float32, returns k_l (checked here).
    """
    kept = kept_counts(shapes, sparsity, distribution)
    sizes = np.array([int(np.prod(s)) for s in shapes], np.int64)
    out = (1.0 - kept / sizes).astype(np.float32)
    back = [global_kept(int(n), s) for n, s in zip(sizes, out, strict=True)]
    assert list(back) == list(kept), (back, kept)  # float32 round trip of the counts
    return out


def with_layer_budgets(table, shapes: Sequence[Sequence[int]], distribution: str):
    """`table` with `layer_sparsity`: one row per round, one float32 column per kernel.

    Row r holds `layer_sparsities(shapes, table.sparsity[r], distribution)`:
    ERK at the level in force after round r (all 0 before pruning starts).
    `uniform` returns `table` unchanged (the process uses the scalar levels).
    """
    check(distribution in DISTRIBUTIONS, "sparsity_distribution", distribution,
          "one of " + "|".join(DISTRIBUTIONS))
    if distribution == "uniform":
        return table
    levels = {float(s): layer_sparsities(shapes, float(s), distribution)
              for s in np.unique(table.sparsity)}
    rows = np.stack([levels[float(s)] for s in table.sparsity]).astype(np.float32)
    return dataclasses.replace(table, layer_sparsity=rows)


def budget_section(table, names: Sequence[str], shapes: Sequence[Sequence[int]],
                   distribution: str) -> dict:
    """config.json's `layer_budgets`: the per-layer sparsity chosen at every distinct level.

    For `erk`: the layers (names, shapes, sizes, ERK raw scores) and, per
    distinct level of the schedule (ascending, with the rounds it is in force
    after), each layer's sparsity and kept count.
    """
    section = {"distribution": distribution}
    if distribution == "uniform":
        section["rule"] = "every pruned kernel at the schedule's sparsity"
        return section
    section["rule"] = ("ERK (Evci et al. 2020) at each round's global level, dense layers "
                       "capped; kept counts sum to the global count (layer_budgets.py)")
    section["layers"] = [{"name": n, "shape": list(map(int, s)), "size": int(np.prod(s)),
                          "erk_score": float(r)}
                         for n, s, r in zip(names, shapes, erk_scores(shapes), strict=True)]
    section["levels"] = []
    for s in np.unique(table.sparsity):
        rounds = [int(r) for r in np.flatnonzero(table.sparsity == s)]
        section["levels"].append({
            "target_sparsity": float(s),
            "after_rounds": [rounds[0], rounds[-1]],
            "layer_sparsity": {n: float(x) for n, x in zip(
                names, layer_sparsities(shapes, float(s), distribution), strict=True)},
            "kept": {n: int(k) for n, k in zip(
                names, kept_counts(shapes, float(s), distribution), strict=True)},
        })
    return section


def check_distribution(distribution: str, *, masking: str, prunes: bool, mask_criterion: str,
                       mask_scope: str, structure: str, prune_granularity: str) -> None:
    """Refuses, with one line naming the flag, what per-layer budgets do not apply to.

    Args:
      distribution: `--sparsity_distribution`.
      masking: `--masking`; prunes: whether that mode prunes (not `none`).
      mask_criterion: `--mask_criterion`; it must take a level per layer
        (`MaskCriterion.per_layer_sparsity`: `magnitude`, not `threshold`/`relative`).
      mask_scope, structure, prune_granularity: the flags of the same names.
    """
    check(distribution in DISTRIBUTIONS, "sparsity_distribution", distribution,
          "one of " + "|".join(DISTRIBUTIONS))
    if distribution == "uniform":
        return
    check(prunes, "masking", masking,
          f"client|server|both with --sparsity_distribution={distribution} (none prunes nothing)")
    per_layer = [e.name for e in CRITERIA.entries() if e.target.per_layer_sparsity]
    check(mask_criterion in per_layer, "mask_criterion", mask_criterion,
          f"{'|'.join(per_layer)} with --sparsity_distribution={distribution} (the budget is a "
          "sparsity per layer)")
    check(mask_scope == "layer", "mask_scope", mask_scope,
          f"layer with --sparsity_distribution={distribution} (global scope already "
          "distributes sparsity across layers)")
    check(structure == "unstructured", "structure", structure,
          f"unstructured with --sparsity_distribution={distribution}")
    check(prune_granularity == "round", "prune_granularity", prune_granularity,
          f"round with --sparsity_distribution={distribution} (tfmot's step wrappers take one "
          "schedule per layer, and ERK's capped layers change with the level)")
