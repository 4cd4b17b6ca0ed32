"""Keras side of pruning: which layers get tfmot wrappers, and where their variables live.

fedprune wraps prunable layers with tfmot's `PruneLowMagnitude`, whose
`call` multiplies the kernel by its `mask` before every forward pass: clients
therefore train inside the mask they were sent. Masks are decided at round
granularity by `masking.compute_masks` (on the server after aggregation, and on
clients at the end of local training; see `client_work.py` and
`server_masking.py`), so the wrappers carry `NeverPrune`, a schedule that never
recomputes a mask, and are `MaskOnlyPruneLowMagnitude`: tfmot's wrapper without
the per-batch work that `NeverPrune` makes void (the step count, its assertion
and a mask update that never fires). Only `--prune_granularity=step` clients
carry a real tfmot schedule, in client steps, in tfmot's own wrapper
(`pruning_params`; `fedprune/pruning/step_schedule.py`).

TFF sees the model as `ModelWeights(trainable, non_trainable)`: kernels and
biases are trainable; each wrapper adds a float `mask` (kernel-shaped) and a
scalar `threshold` per kernel, and one int64 `pruning_step`, all non-trainable.
`PruningLayout` records their positions in those two lists.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

# Layer classes whose kernel is pruned by default: Dense and convolutions.
# Biases and normalization layers are never pruned.
PRUNABLE_LAYER_NAMES = (
    "Dense",
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
)


def _never_prune_class():
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    class NeverPrune(tfmot.sparsity.keras.PruningSchedule):
        """A tfmot schedule that never recomputes the mask (masks come from fedprune)."""

        def __call__(self, step):
            return tf.constant(False), tf.constant(0.0, tf.float32)

        def get_config(self):
            return {"class_name": "NeverPrune", "config": {}}

    return NeverPrune


@functools.cache
def mask_only_wrapper_class():
    """`MaskOnlyPruneLowMagnitude`, tfmot's wrapper for masks decided per round (a class)."""
    import tensorflow as tf
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    class MaskOnlyPruneLowMagnitude(pruning_wrapper.PruneLowMagnitude):
        """tfmot's `PruneLowMagnitude` whose `call` only applies the mask, then the layer.

        tfmot's `call(training=True)` also adds, on every batch, the
        `pruning_step` increment, an assertion that the step is >= 1 and
        `conditional_mask_update`, a `tf.cond` on the schedule. Under `NeverPrune`
        the cond never updates, and nothing reads a client's step in round
        granularity (TFF returns only the trainable delta; the server sets every
        broadcast step, `server_masking.py`), so these ops change no weight; they
        cost 25 µs per batch on the mlp, idle (BUILD_NOTES.md, "Round-granularity
        wrappers apply the mask only"). The variables, the mask (`weight <-
        weight * mask` on every call as in tfmot, training or not), the layer's
        call and `strip_pruning` are tfmot's. Outside a distribution strategy
        the mask is assigned directly, as tfmot's `weight_mask_op` does without
        a replica context; tfmot's own op would pass it through the default
        replica context's `merge_call` and a one-replica mean, which give the
        same values for a few more ops per batch.
        """

        @tf.autograph.experimental.do_not_convert  # plain Python over Python values
        def call(self, inputs, training=None, **kwargs):
            if tf.distribute.has_strategy():
                self.add_update(self.pruning_obj.weight_mask_op())
            else:
                self.add_update(tf.group([weight.assign(tf.cast(weight * mask, weight.dtype))
                                          for weight, mask, _ in self.pruning_vars]))
            return self.call_layer(inputs, training, **kwargs)

        @tf.autograph.experimental.do_not_convert  # plain Python over Python values
        def call_layer(self, inputs, training=None, **kwargs):
            """The wrapped layer's call, as tfmot's `call` makes it, without the mask."""
            if training is None:
                training = tf.keras.backend.learning_phase()
            if "training" in inspect.getfullargspec(self.layer.call).args:
                return self.layer.call(inputs, training=training, **kwargs)
            return self.layer.call(inputs, **kwargs)

    return MaskOnlyPruneLowMagnitude


@dataclasses.dataclass(frozen=True)
class PrunedKernel:
    """Where one pruned kernel and its mask sit in `ModelWeights`.

    Attributes:
      name: the wrapped layer's name.
      shape: the kernel's shape.
      trainable_index: index of the kernel in `ModelWeights.trainable`.
      mask_index: index of its mask in `ModelWeights.non_trainable`.
      threshold_index: index of its threshold in `ModelWeights.non_trainable`.
    """

    name: str
    shape: tuple[int, ...]
    trainable_index: int
    mask_index: int
    threshold_index: int

    @property
    def size(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclasses.dataclass(frozen=True)
class PruningLayout:
    """Positions of pruned kernels, masks and pruning steps in `ModelWeights`.

    Attributes:
      kernels: one entry per pruned kernel, in model order.
      step_indices: indices of every wrapper's int64 `pruning_step` in
        `ModelWeights.non_trainable`.
      trainable_shapes: shapes of all trainable weights (kernels and biases).
    """

    kernels: tuple[PrunedKernel, ...]
    step_indices: tuple[int, ...]
    trainable_shapes: tuple[tuple[int, ...], ...]

    @property
    def num_pruned_params(self) -> int:
        return sum(k.size for k in self.kernels)


def is_pruning_wrapper(layer) -> bool:
    """Whether `layer` is tfmot's `PruneLowMagnitude` or a subclass (without importing tfmot)."""
    return any(cls.__name__ == "PruneLowMagnitude" for cls in type(layer).__mro__)


def is_prunable(layer, *, is_output: bool, prune_output_layer: bool) -> bool:
    """Whether fedprune wraps `layer`: Dense/Conv kernels, optionally not the output layer."""
    if is_output and not prune_output_layer:
        return False
    return type(layer).__name__ in PRUNABLE_LAYER_NAMES


def wrap_for_pruning(model, *, prune_output_layer: bool = True, pruning_params=None):
    """Returns a clone of `model` whose prunable layers carry tfmot wrappers.

    The wrapped layers are the original layer objects, so the clone shares the
    original's kernels and biases. Masks start at ones, pruning steps at -1
    (call `initial_weights` or set them >= 0 before training).

    Args:
      model: a plain Keras model.
      prune_output_layer: False leaves the last weighted layer unwrapped.
      pruning_params: `prune_low_magnitude` arguments (`pruning_schedule`,
        `block_size`, ...) for tfmot's own wrapper. Default:
        `MaskOnlyPruneLowMagnitude` wrappers with the `NeverPrune` schedule.
        Only `--prune_granularity=step` clients pass a real schedule
        (`fedprune/federated/step_pruning.py`); the variables are the same.

    Raises:
      InvalidArgument: when no layer of the model is prunable.
    """
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    from fedprune.errors import check

    if pruning_params is None:
        wrap = functools.partial(mask_only_wrapper_class(),
                                 pruning_schedule=_never_prune_class()())
    else:
        wrap = functools.partial(tfmot.sparsity.keras.prune_low_magnitude, **pruning_params)
    weighted = [layer for layer in model.layers if layer.weights]
    output_layer = weighted[-1] if weighted else None

    def clone_fn(layer):
        if is_prunable(layer, is_output=layer is output_layer,
                       prune_output_layer=prune_output_layer):
            return wrap(layer)
        return layer

    # Cloning calls each layer once on a symbolic input to build it. Inside TFF's
    # graph tracing (Keras' v1 layers), that call sees the symbolic learning phase,
    # so every tfmot wrapper would build both branches of its training conds: the
    # step increment and the mask update, with cond_v2's intermediates. Those ops
    # are dead (the training call passes `training` explicitly) yet cost ~0.7 s of
    # tracing per model and go into the serialized computation. At learning phase
    # 0 only the inference branch is built; the variables are the same
    # (BUILD_NOTES.md, "Building the wrapped model at learning phase 0").
    from keras.src import backend as keras_backend  # the scope without its warning

    with keras_backend.deprecated_internal_learning_phase_scope(0):
        wrapped = tf.keras.models.clone_model(model, clone_function=clone_fn)
    check(any(is_pruning_wrapper(layer) for layer in wrapped.layers),
          "prune_output_layer", prune_output_layer, "a model with at least one prunable layer")
    return wrapped


def stable_names(layers) -> list[str]:
    """Layer names that do not depend on how many models this process has built.

    Keras numbers automatic names process-wide (`dense`, `dense_1`, ... then
    `dense_160` in the 80th model), so per-layer metric columns would differ
    between a grid's cells. A layer with an automatic name gets the name it has
    in the first model of a fresh process (its class in snake case, then `_1`,
    `_2`, ... per class, in layer order); a name given explicitly is kept.
    """
    import re

    from keras.src.utils.generic_utils import to_snake_case  # keras' own naming rule

    counts: dict[str, int] = {}
    names = []
    for layer in layers:
        base = to_snake_case(type(layer).__name__)
        if re.fullmatch(re.escape(base) + r"(_\d+)?", layer.name):
            n = counts.get(base, 0)
            counts[base] = n + 1
            names.append(base if n == 0 else f"{base}_{n}")
        else:
            names.append(layer.name)
    return names


def pruning_layout(wrapped_model) -> PruningLayout:
    """Reads the positions of kernels, masks, thresholds and steps of a wrapped model."""
    trainable = {v.ref(): i for i, v in enumerate(wrapped_model.trainable_weights)}
    non_trainable = {v.ref(): i for i, v in enumerate(wrapped_model.non_trainable_weights)}
    kernels, steps = [], []
    names = stable_names([layer.layer if is_pruning_wrapper(layer)
                           else layer for layer in wrapped_model.layers])
    for layer, name in zip(wrapped_model.layers, names, strict=True):
        if not is_pruning_wrapper(layer):
            continue
        steps.append(non_trainable[layer.pruning_step.ref()])
        for weight, mask, threshold in layer.pruning_vars:
            kernels.append(
                PrunedKernel(
                    name=name,
                    shape=tuple(weight.shape.as_list()),
                    trainable_index=trainable[weight.ref()],
                    mask_index=non_trainable[mask.ref()],
                    threshold_index=non_trainable[threshold.ref()],
                )
            )
    return PruningLayout(
        kernels=tuple(kernels),
        step_indices=tuple(steps),
        trainable_shapes=tuple(tuple(v.shape.as_list()) for v in wrapped_model.trainable_weights),
    )


def initial_weights(wrapped_model, layout: PruningLayout) -> tuple[list, list]:
    """(trainable, non_trainable) numpy arrays of a wrapped model with every pruning step at 0.

    tfmot's wrapper asserts `pruning_step >= 1` after its own increment, and
    Keras' `UpdatePruningStep` callback that would lift it from -1 never runs
    under TFF: starting at 0 makes the first `call(training=True)` valid.
    """
    trainable = [v.numpy() for v in wrapped_model.trainable_weights]
    non_trainable = [v.numpy() for v in wrapped_model.non_trainable_weights]
    for i in layout.step_indices:
        non_trainable[i] = non_trainable[i] * 0
    return trainable, non_trainable


def strip(wrapped_model):
    """tfmot `strip_pruning`: a plain Keras model with the (masked) kernels, no wrappers."""
    import tensorflow_model_optimization as tfmot

    return tfmot.sparsity.keras.strip_pruning(wrapped_model)
