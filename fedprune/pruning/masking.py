"""Mask maths: which weights of a kernel survive.

Pure functions of tensors (they run eagerly on numpy arrays and inside TFF's
TensorFlow computations alike). Both the server's re-masking step and the
clients' end-of-round pruning call `compute_masks`, so one rule decides
everywhere.

Criteria (`MaskSpec.mask_criterion`, registered in `CRITERIA`; each is a
`MaskCriterion` subclass whose `masks` hook turns score tensors into 0/1 masks):
  * `magnitude`: keep the k = max(round(N * (1 - s)), 1) largest |w| (tfmot's
    count, float32 arithmetic as in `pruning_impl.Pruning._update_mask`), per
    layer or globally across layers (`scope`). Ties are broken by index
    (`tf.math.top_k` order), so a mask always keeps exactly k; tfmot keeps every
    weight tied with the k-th (more than k when there are ties, e.g. all of an
    already-sparse tensor when k exceeds its nonzeros).
  * `threshold`: keep |w| >= theta (absolute).
  * `relative`: keep |w| > rate * max|w| of the layer (of all layers with
    `scope="global"`).

Structures (`MaskSpec.structure`):
  * `unstructured`: scores are |w|.
  * `block`: scores are |w| pooled over (h, w) blocks of the 2-D kernel
    (rank-4 conv kernels are viewed as [kh * kw * c_in, c_out]); the criterion
    picks blocks. Pooling is tfmot's `pruning_utils.factorized_pool`, so the
    mask equals tfmot's block mask on rank-2 kernels.
  * `2:4`: tfmot's N:M mask (2 zeros in every 4 consecutive input weights,
    `pruning_utils.generate_m_by_n_mask`); the sparsity is 0.5 by construction.
    A threshold/relative criterion is intersected with it.
  * `neuron` / `filter`: whole output units of Dense layers / filters of
    convolutions (`UNIT_STRUCTURES`). Their masks are not computed here but by
    `structured.structured_masks` (scores: the `unit_norm` of a unit's incoming
    weights), and they also zero the units' biases and dependent BatchNorm
    parameters; see `server_masking.remask_weights`.

A new criterion is one registered `MaskCriterion` subclass (docs/extending.md);
`--mask_criterion`'s choices and help come from `CRITERIA`.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Sequence
from typing import ClassVar

from fedprune.errors import check
from fedprune.registry import Registry

SCOPES = ("layer", "global")
STRUCTURES = ("unstructured", "2:4", "block", "neuron", "filter")
# Structures that remove whole units, and the layer classes whose units each prunes.
UNIT_STRUCTURES = {"neuron": ("Dense",), "filter": ("Conv1D", "Conv2D", "Conv3D")}
UNIT_NORMS = ("l2", "l1")
POOLINGS = ("AVG", "MAX")


CRITERIA: Registry[type[MaskCriterion]] = Registry("mask_criterion", "mask criterion")


class MaskCriterion(abc.ABC):
    """Which entries of score tensors survive: the hook every criterion overrides.

    A subclass is a frozen dataclass whose fields are the `MaskSpec` fields
    (= driver flags) it reads, validated in `__post_init__` (raising
    `InvalidArgument`), registered in `CRITERIA`.

    Class attributes:
      uses_sparsity: whether the schedule's sparsity decides the mask (with
        `--structure=2:4` such a criterion gives way to the N:M mask, whose
        sparsity is fixed; one that does not is intersected with it).
      for_units: whether `--structure=neuron|filter` accepts it: unit masks rank
        whole units by `--unit_norm` at the schedule's sparsity, and do not call
        the criterion.
      per_layer_sparsity: whether `masks` also takes a vector of levels, one per
        score tensor (`--sparsity_distribution=erk`, `layer_budgets.py`).
    """

    uses_sparsity: ClassVar[bool] = True
    for_units: ClassVar[bool] = False
    per_layer_sparsity: ClassVar[bool] = False

    @abc.abstractmethod
    def masks(self, scores: list, sparsity) -> list:
        """One 0/1 mask per score tensor (same shape and dtype), as TF ops.

        Args:
          scores: float tensors >= 0: |w|, or pooled |w| of blocks.
          sparsity: the schedule's fraction of zeros in [0, 1): a scalar tensor,
            or, for a criterion with `per_layer_sparsity`, a vector with one
            level per score tensor (per-layer budgets, `layer_budgets.py`).
        """


@CRITERIA.register("magnitude", help="keep the largest |w| at the schedule's sparsity, per "
                   "layer or --mask_scope=global")
@dataclasses.dataclass(frozen=True)
class Magnitude(MaskCriterion):
    """Keep the k = `num_kept(N, sparsity)` largest scores (per layer, or of all layers)."""

    mask_scope: str = "layer"
    for_units: ClassVar[bool] = True
    per_layer_sparsity: ClassVar[bool] = True

    def masks(self, scores, sparsity):
        import tensorflow as tf

        if self.mask_scope == "layer":
            sparsity = tf.convert_to_tensor(sparsity)
            if sparsity.shape.rank == 1:  # one level per layer (layer_budgets.py)
                return [keep_top_k(s, num_kept(tf.size(s), sparsity[i]))
                        for i, s in enumerate(scores)]
            return [keep_top_k(s, num_kept(tf.size(s), sparsity)) for s in scores]
        check(tf.convert_to_tensor(sparsity).shape.rank == 0, "mask_scope", self.mask_scope,
              "layer with per-layer sparsities (--sparsity_distribution)")
        flat = tf.concat([tf.reshape(s, [-1]) for s in scores], axis=0)
        kept = keep_top_k(flat, num_kept(tf.size(flat), sparsity))
        sizes = [s.shape.num_elements() for s in scores]
        return [tf.reshape(m, tf.shape(s))
                for m, s in zip(tf.split(kept, sizes), scores, strict=True)]


@CRITERIA.register("threshold", help="keep |w| >= --threshold")
@dataclasses.dataclass(frozen=True)
class Threshold(MaskCriterion):
    """Keep scores >= `threshold` (absolute, in the weights' units)."""

    threshold: float | None = None
    uses_sparsity: ClassVar[bool] = False

    def __post_init__(self):
        check(self.threshold is not None and self.threshold > 0, "threshold",
              self.threshold, "a magnitude > 0 with --mask_criterion=threshold")

    def masks(self, scores, sparsity):
        import tensorflow as tf

        return [tf.cast(s >= self.threshold, s.dtype) for s in scores]


@CRITERIA.register("relative", help="keep |w| > --relative_rate * max|w| (of the layer, or of "
                   "all layers with --mask_scope=global)")
@dataclasses.dataclass(frozen=True)
class Relative(MaskCriterion):
    """Keep scores > `relative_rate` * the largest score (per layer, or of all layers)."""

    relative_rate: float | None = None
    mask_scope: str = "layer"
    uses_sparsity: ClassVar[bool] = False

    def __post_init__(self):
        check(self.relative_rate is not None and 0 < self.relative_rate < 1,
              "relative_rate", self.relative_rate,
              "a fraction in (0, 1) with --mask_criterion=relative")

    def masks(self, scores, sparsity):
        import tensorflow as tf

        if self.mask_scope == "global":
            top = tf.reduce_max([tf.reduce_max(s) for s in scores])
            return [tf.cast(s > self.relative_rate * top, s.dtype) for s in scores]
        return [tf.cast(s > self.relative_rate * tf.reduce_max(s), s.dtype) for s in scores]


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """How a mask is computed. Field names equal the driver flags.

    Attributes:
      mask_criterion: a name in CRITERIA; the criterion reads the fields it names.
      mask_scope: one of SCOPES: rank weights within each layer or across all.
      threshold: theta for `threshold` (keep |w| >= theta).
      relative_rate: rate for `relative` (keep |w| > rate * max|w|), in (0, 1).
      structure: one of STRUCTURES.
      block_size: (height, width) of a block for `structure="block"`.
      block_pooling: how a block's |w| are pooled, 'AVG' or 'MAX'.
      unit_norm: the score of a unit for `neuron`/`filter`: 'l2' or 'l1' norm of
        its incoming weights.
    """

    mask_criterion: str = "magnitude"
    mask_scope: str = "layer"
    threshold: float | None = None
    relative_rate: float | None = None
    structure: str = "unstructured"
    block_size: tuple[int, int] = (1, 4)
    block_pooling: str = "AVG"
    unit_norm: str = "l2"

    def __post_init__(self):
        CRITERIA.check(self.mask_criterion)
        check(self.mask_scope in SCOPES, "mask_scope", self.mask_scope,
              "one of " + "|".join(SCOPES))
        check(self.structure in STRUCTURES, "structure", self.structure,
              "one of " + "|".join(STRUCTURES))
        check(self.block_pooling in POOLINGS, "block_pooling", self.block_pooling,
              "one of " + "|".join(POOLINGS))
        criterion = self.criterion  # validates the fields the criterion reads
        check(self.unit_norm in UNIT_NORMS, "unit_norm", self.unit_norm,
              "one of " + "|".join(UNIT_NORMS))
        if self.is_unit_structure:
            for_units = [e.name for e in CRITERIA.entries() if e.target.for_units]
            check(criterion.for_units, "mask_criterion", self.mask_criterion,
                  f"{'|'.join(for_units)} with --structure={self.structure} (units are ranked "
                  "by --unit_norm and the schedule's sparsity is the fraction of units removed)")
        check(len(self.block_size) == 2 and all(int(b) >= 1 for b in self.block_size),
              "block_size", self.block_size, "two positive integers, e.g. 1,4")

    @property
    def criterion(self) -> MaskCriterion:
        """The `mask_criterion`'s instance, built from the fields it reads."""
        return CRITERIA.build(self.mask_criterion, dataclasses.asdict(self))

    @property
    def is_unit_structure(self) -> bool:
        """Whether masks remove whole units (`neuron`, `filter`): see `structured.py`."""
        return self.structure in UNIT_STRUCTURES

    @property
    def uses_sparsity(self) -> bool:
        """Whether the schedule's sparsity value decides the mask (magnitude, not 2:4)."""
        return self.criterion.uses_sparsity and self.structure != "2:4"


def num_kept(size, sparsity):
    """tfmot's count of kept entries: max(round(size * (1 - sparsity)), 1), as int32."""
    import tensorflow as tf

    kept = tf.math.round(tf.cast(size, tf.float32) * (1.0 - tf.cast(sparsity, tf.float32)))
    return tf.cast(tf.math.maximum(kept, 1.0), tf.int32)


def keep_top_k(scores, k):
    """A 0/1 mask (scores' shape and dtype) keeping exactly the k largest scores.

    Among equal scores `tf.math.top_k` keeps the lower index. When exactly k
    scores are positive, they are the k largest whatever the ties below them,
    so the mask is `scores > 0` without the top-k: the same mask, and the usual
    case once a schedule has reached its level (a kernel pruned to k weights
    and trained inside that mask has k nonzero magnitudes).
    """
    import tensorflow as tf

    flat = tf.reshape(scores, [-1])
    positive = flat > 0

    def by_top_k():
        _, indices = tf.math.top_k(flat, k=k, sorted=False)
        return tf.scatter_nd(indices[:, None], tf.ones_like(indices, flat.dtype), tf.shape(flat))

    # tf.equal, not ==: in TFF's graphs `==` on tensors is Python's identity test.
    exactly_k = tf.math.equal(tf.math.count_nonzero(positive, dtype=tf.int32),
                              tf.cast(k, tf.int32))
    kept = tf.cond(exactly_k, lambda: tf.cast(positive, flat.dtype), by_top_k)
    return tf.reshape(kept, tf.shape(scores))


def _as_2d(weights):
    import tensorflow as tf

    if weights.shape.rank == 2:
        return weights
    return tf.reshape(weights, [-1, weights.shape[-1]])


def _block_scores(weights, spec: MaskSpec):
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils

    pooled = pruning_utils.factorized_pool(
        tf.math.abs(_as_2d(weights)),
        window_shape=list(spec.block_size),
        pooling_type=spec.block_pooling,
        strides=list(spec.block_size),
        padding="SAME",
    )
    blocks = [-(-d // b) for d, b in zip(_as_2d(weights).shape, spec.block_size, strict=True)]
    return tf.reshape(pooled, blocks)


def _expand_blocks(block_mask, weights, spec: MaskSpec):
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils

    rows, cols = _as_2d(weights).shape
    expanded = pruning_utils.expand_tensor(block_mask, list(spec.block_size))
    return tf.reshape(tf.slice(expanded, [0, 0], [rows, cols]), tf.shape(weights))


def n_by_m_mask(weights, m_by_n=(2, 4)):
    """tfmot's N:M mask: `m_by_n[0]` zeros in every `m_by_n[1]` consecutive input weights.

    Args:
      weights: a rank-2 (Dense: [in, out]) or rank-4 (Conv2D: [kh, kw, in, out]) kernel.
    """
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_utils

    prepared = pruning_utils.weights_rearrange(weights)
    mask = pruning_utils.generate_m_by_n_mask(prepared, m_by_n)
    return tf.cast(pruning_utils.m_by_n_sparsity_mask_prepare(mask, weights.shape), weights.dtype)


def _scores(weights, spec: MaskSpec):
    import tensorflow as tf

    if spec.structure == "block":
        return _block_scores(weights, spec)
    return tf.math.abs(weights)


def _to_weight_mask(score_mask, weights, spec: MaskSpec):
    if spec.structure == "block":
        return _expand_blocks(score_mask, weights, spec)
    return score_mask


def _criterion_masks(scores: list, spec: MaskSpec, sparsity) -> list:
    """Masks over score tensors (elements or blocks) by the spec's criterion."""
    return list(spec.criterion.masks(scores, sparsity))


def compute_masks(kernels: list, spec: MaskSpec, sparsity) -> list:
    """Computes one 0/1 mask per kernel.

    Args:
      kernels: float tensors (or arrays) of any static shape; rank 2 or 4 for
        `2:4`, and rank >= 2 for `block`.
      spec: the criterion, scope and structure.
      sparsity: target fraction of zeros in [0, 1), used by `magnitude`: a
        scalar (per layer, or over all kernels together with scope `global`),
        or a vector of one level per kernel (scope `layer`; `layer_budgets.py`).

    Returns:
      A list of masks, each with its kernel's shape and dtype.
    """
    import tensorflow as tf

    check(not spec.is_unit_structure, "structure", spec.structure,
          "an element structure here; unit masks come from structured.structured_masks")
    kernels = [tf.convert_to_tensor(k) for k in kernels]
    if spec.structure == "2:4":
        masks = [n_by_m_mask(k) for k in kernels]
        if not spec.criterion.uses_sparsity:  # its own rule, within the N:M pattern
            criterion = _criterion_masks([tf.math.abs(k) for k in kernels], spec, sparsity)
            masks = [m * c for m, c in zip(masks, criterion, strict=True)]
        return masks
    scores = [_scores(k, spec) for k in kernels]
    score_masks = _criterion_masks(scores, spec, sparsity)
    return [_to_weight_mask(m, k, spec) for m, k in zip(score_masks, kernels, strict=True)]


def mask_update(update: Sequence, masks: Sequence) -> tuple:
    """Multiplies each tensor of a (DP-noised) aggregate by its public 0/1 mask (TF ops).

    Post-processing of the DP output with the broadcast mask: exactly zero off
    the mask, noise only on kept coordinates, no privacy cost (see
    `fedprune/federated/privacy.py`).

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
