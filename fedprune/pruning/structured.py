"""Structured (unit / filter) pruning maths: which output units of a layer survive.

Unstructured masks (`masking.py`) zero single weights; structured masks zero
whole output units of Dense layers and whole filters of convolutions, so that
`surgery.shrink` can later rebuild a genuinely smaller model. A unit's score is
the norm of its incoming weights (Li et al. 2017, "Pruning Filters for
Efficient ConvNets", use the L1 norm of each filter; the L2 norm is the other
common choice), and per layer the k = max(round(units * (1 - s)), 1)
highest-scoring units are kept (tfmot's count, see `masking.num_kept`),
exactly k, ties broken by the lower index.

Masked model == shrunk model. Removing a unit is exact only when the masked
model's unit already outputs exactly zero for every input, and its consumers
then see zeros. So the structured mask zeroes, for every dropped unit:
  * its kernel column (Dense) or filter (Conv),
  * its bias entry: a zero kernel column with a bias b still outputs act(b),
  * gamma and beta of every BatchNormalization between the layer and its
    consumer: at inference a zero input channel leaves BatchNorm as
    beta - gamma * moving_mean / sqrt(moving_variance + eps), not 0. With
    gamma = beta = 0 the channel is 0 whatever the moving statistics, which
    are therefore left as they are (`surgery` slices them away).
Zeroing the kernel alone is not equivalent (tests show the difference).
The consumer's input rows for a dropped unit are left untouched: they
multiply zeros, and `surgery.shrink` removes them.

Which layers are pruned, and where their kernels, biases and BatchNorm
weights sit in a model's weight lists, is a `StructuredLayout`, read from a
Keras model by `unit_layout.structured_layout`. Functions on weights are TF
ops (eager or inside `tf.function` / TFF TensorFlow computations).
"""

from __future__ import annotations

import dataclasses

from fedprune.errors import check

NORMS = ("l1", "l2")
SCOPES = ("layer", "global")


@dataclasses.dataclass(frozen=True)
class BatchNormSlots:
    """A BatchNormalization whose channels follow a pruned layer's units.

    Attributes:
      name: the BatchNormalization layer's name.
      repeat: entries per unit on the normalized axis: 1 before a Flatten;
        after a Flatten of P positions, P (entry p * units + u belongs to unit u).
      gamma_index: index of gamma in the trainable weights.
      beta_index: index of beta in the trainable weights (None when `center=False`).
      moving_mean_index: index of the moving mean in the non-trainable weights.
      moving_variance_index: index of the moving variance in the non-trainable weights.
    """

    name: str
    repeat: int
    gamma_index: int
    beta_index: int | None
    moving_mean_index: int
    moving_variance_index: int


@dataclasses.dataclass(frozen=True)
class PrunedUnits:
    """One layer whose output units are pruned, and the layers that depend on them.

    Indices are positions in the model's `trainable_weights` and
    `non_trainable_weights` lists (TFF's `ModelWeights.trainable` / `.non_trainable`).

    Attributes:
      name: the layer's name.
      layer_class: 'Dense', 'Conv1D', 'Conv2D' or 'Conv3D'.
      kernel_shape: the kernel's shape; its last axis is the units / filters.
      kernel_index: index of the kernel in the trainable weights.
      bias_index: index of the bias in the trainable weights (None without a bias).
      batchnorms: BatchNormalization layers between this layer and its consumer.
      consumer: name of the next Dense/Conv layer, which reads these units.
      consumer_kernel_index: index of the consumer's kernel in the trainable weights;
        its axis -2 (Dense rows, Conv input channels) is indexed by these units.
      consumer_repeat: positions per unit on that axis (1, or P after a Flatten
        of P positions: channels-last row p * units + u belongs to unit u).
    """

    name: str
    layer_class: str
    kernel_shape: tuple[int, ...]
    kernel_index: int
    bias_index: int | None
    batchnorms: tuple[BatchNormSlots, ...]
    consumer: str
    consumer_kernel_index: int
    consumer_repeat: int

    @property
    def num_units(self) -> int:
        return self.kernel_shape[-1]


@dataclasses.dataclass(frozen=True)
class StructuredLayout:
    """Where the pruned layers' weights and their dependents sit in a model's weight lists.

    Attributes:
      layers: one entry per pruned layer, in model order.
      output_layer: name of the output layer (never pruned).
      trainable_shapes: shapes of the model's trainable weights.
      non_trainable_shapes: shapes of the model's non-trainable weights.
    """

    layers: tuple[PrunedUnits, ...]
    output_layer: str
    trainable_shapes: tuple[tuple[int, ...], ...]
    non_trainable_shapes: tuple[tuple[int, ...], ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.layers)

    def layer(self, name: str) -> PrunedUnits:
        """The entry of the pruned layer `name` (KeyError when it is not pruned)."""
        for p in self.layers:
            if p.name == name:
                return p
        raise KeyError(f"{name!r} is not a pruned layer; pruned layers: {self.names}")


# ----------------------------------------------------------------------------- scores and masks


def unit_scores(kernel, norm: str = "l2"):
    """The norm of each output unit's incoming weights.

    Args:
      kernel: a Dense kernel [in, units] or a Conv kernel [..., in, filters].
      norm: 'l2' (sqrt of the sum of squares) or 'l1' (sum of absolute values).

    Returns:
      A [units] tensor of the kernel's dtype: the norm over all axes but the last.
    """
    import tensorflow as tf

    check(norm in NORMS, "norm", norm, "one of " + "|".join(NORMS))
    kernel = tf.convert_to_tensor(kernel)
    axes = list(range(kernel.shape.rank - 1))
    if norm == "l1":
        return tf.reduce_sum(tf.abs(kernel), axis=axes)
    return tf.sqrt(tf.reduce_sum(tf.square(kernel), axis=axes))


def _keep_top_k(scores, k):
    """0/1 vector keeping exactly the k largest scores (ties: the lower index)."""
    import tensorflow as tf

    # top_k puts the lower index first among equal values (sorted=True).
    _, indices = tf.math.top_k(scores, k=k, sorted=True)
    return tf.scatter_nd(indices[:, None], tf.ones_like(indices, scores.dtype),
                         tf.shape(scores))


def expand_unit_mask(unit_mask, kernel_shape):
    """The kernel mask of a unit mask: every weight of unit u gets unit_mask[u]."""
    import tensorflow as tf

    return tf.broadcast_to(unit_mask, kernel_shape)


def structured_masks(kernels: list, sparsity, *, norm: str = "l2",
                     scope: str = "layer") -> tuple[list, list]:
    """Unit masks keeping the highest-scoring units of each kernel.

    Args:
      kernels: Dense [in, units] or Conv [..., in, filters] kernels (tensors or arrays).
      sparsity: scalar fraction of units to drop, in [0, 1) (may be a tensor).
      norm: the unit score, one of NORMS (see `unit_scores`).
      scope: 'layer' keeps k = max(round(units * (1 - s)), 1) units in every
        kernel. 'global' ranks all units of all kernels by their raw score and
        keeps k = max(round(total_units * (1 - s)), len(kernels)) in all, the
        best unit of each kernel always among them (a layer never disappears).
        Raw norms grow with fan-in, so 'global' favours wide-input layers.

    Returns:
      (unit_masks, kernel_masks): per kernel a 0/1 [units] vector with exactly k
      ones (ties broken by the lower index), and the kernel-shaped mask
      (`expand_unit_mask`), both of the kernel's dtype.
    """
    import tensorflow as tf

    from fedprune.pruning.masking import num_kept

    check(scope in SCOPES, "scope", scope, "one of " + "|".join(SCOPES))
    kernels = [tf.convert_to_tensor(k) for k in kernels]
    scores = [unit_scores(k, norm) for k in kernels]
    if scope == "layer":
        unit_masks = [_keep_top_k(s, num_kept(tf.size(s), sparsity)) for s in scores]
    else:
        # Each kernel's best unit scores +inf, so it survives any sparsity.
        forced = [tf.tensor_scatter_nd_update(
            s, [[tf.argmax(s, output_type=tf.int32)]], tf.constant([float("inf")], s.dtype))
            for s in scores]
        flat = tf.concat(forced, axis=0)
        k = tf.maximum(num_kept(tf.size(flat), sparsity), len(kernels))
        kept = _keep_top_k(flat, k)
        unit_masks = tf.split(kept, [s.shape[0] for s in scores])
    kernel_masks = [expand_unit_mask(m, k.shape) for m, k in zip(unit_masks, kernels, strict=True)]
    return list(unit_masks), kernel_masks


def unit_index_mask(unit_mask, repeat: int):
    """A unit mask spread over an axis with `repeat` positions per unit (after a Flatten)."""
    import tensorflow as tf

    return unit_mask if repeat == 1 else tf.tile(unit_mask, [repeat])


def unit_mask_of(kernel_mask):
    """The unit mask an expanded kernel mask holds: the max over all axes but the last."""
    import tensorflow as tf

    kernel_mask = tf.convert_to_tensor(kernel_mask)
    return tf.reduce_max(kernel_mask, axis=list(range(kernel_mask.shape.rank - 1)))


def dependent_weights(p: PrunedUnits) -> tuple[tuple[int, int], ...]:
    """(trainable index, repeat) of the weights besides the kernel that a dropped unit zeroes.

    Its bias entry (repeat 1) and the gamma and beta of its BatchNorm layers
    (their `repeat`): `unit_index_mask(unit_mask, repeat)` masks each.
    """
    slots = [] if p.bias_index is None else [(p.bias_index, 1)]
    for bn in p.batchnorms:
        slots += [(i, bn.repeat) for i in (bn.gamma_index, bn.beta_index) if i is not None]
    return tuple(slots)


def restrict(layout: StructuredLayout, layer_classes) -> StructuredLayout:
    """`layout` with only the pruned layers of the given classes (e.g. only Dense: neuron)."""
    return dataclasses.replace(
        layout, layers=tuple(p for p in layout.layers if p.layer_class in layer_classes))


def apply_unit_masks(trainable: list, non_trainable: list, layout: StructuredLayout,
                     unit_masks: list) -> tuple[list, list]:
    """Zeroes the dropped units of a model's weights (the structured mask).

    For every pruned layer and dropped unit: its kernel column / filter, its
    bias entry, and gamma and beta of the dependent BatchNormalization layers
    become 0, so the unit outputs exactly 0 and `surgery.shrink` is exact.
    Moving statistics and the consumer's input rows are not changed (they
    cannot make a zeroed unit nonzero).

    Args:
      trainable: the model's trainable weights (`ModelWeights.trainable`).
      non_trainable: the model's non-trainable weights; returned unchanged.
      layout: from `unit_layout.structured_layout` of the same model.
      unit_masks: one 0/1 [units] vector per `layout.layers` entry.

    Returns:
      (trainable, non_trainable) lists of tensors.
    """
    import tensorflow as tf

    check(len(unit_masks) == len(layout.layers), "unit_masks", len(unit_masks),
          f"one mask per pruned layer ({len(layout.layers)})")
    trainable = [tf.convert_to_tensor(w) for w in trainable]
    non_trainable = [tf.convert_to_tensor(w) for w in non_trainable]
    for p, mask in zip(layout.layers, unit_masks, strict=True):
        kernel = trainable[p.kernel_index]
        mask = tf.cast(mask, kernel.dtype)
        trainable[p.kernel_index] = kernel * mask  # broadcasts over the last (unit) axis
        for i, repeat in dependent_weights(p):
            trainable[i] = trainable[i] * unit_index_mask(mask, repeat)
    return trainable, non_trainable


def zero_consumer_inputs(trainable: list, layout: StructuredLayout, unit_masks: list) -> list:
    """Zeroes the consumers' input rows (axis -2) that read dropped units.

    Not needed for `surgery.shrink` to be exact (those rows multiply zeros), but
    they are dead weights: they receive zero gradients and are cut out by the
    shrink, and zeroing them lets the sparse encodings skip them before it.

    Args:
      trainable: the model's trainable weights.
      layout: from `unit_layout.structured_layout`.
      unit_masks: one 0/1 [units] vector per `layout.layers` entry.

    Returns:
      The trainable weights as tensors, the consumers' kernels masked.
    """
    import tensorflow as tf

    trainable = [tf.convert_to_tensor(w) for w in trainable]
    for p, mask in zip(layout.layers, unit_masks, strict=True):
        kernel = trainable[p.consumer_kernel_index]
        rows = unit_index_mask(tf.cast(mask, kernel.dtype), p.consumer_repeat)
        trainable[p.consumer_kernel_index] = kernel * rows[:, None]  # broadcasts over axis -2
    return trainable


def prune_units(trainable: list, non_trainable: list, layout: StructuredLayout, sparsity, *,
                norm: str = "l2", scope: str = "layer") -> tuple[list, list, list]:
    """Scores the pruned layers' units, computes `structured_masks` and applies them.

    Returns:
      (trainable, non_trainable, unit_masks): the masked weight lists (see
      `apply_unit_masks`) and the unit masks, one per `layout.layers` entry.
    """
    kernels = [trainable[p.kernel_index] for p in layout.layers]
    unit_masks, _ = structured_masks(kernels, sparsity, norm=norm, scope=scope)
    trainable, non_trainable = apply_unit_masks(trainable, non_trainable, layout, unit_masks)
    return trainable, non_trainable, unit_masks
