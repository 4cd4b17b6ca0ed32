"""Model surgery: rebuild a structurally pruned model with fewer units and filters.

`structured.py` zeroes whole units in place (same shapes); `shrink` removes
them. For every pruned layer with kept units K (sorted indices):
  * its kernel keeps `kernel[..., K]` and its bias `bias[K]`, and the layer is
    rebuilt with |K| units / filters;
  * BatchNormalization layers on the way to its consumer keep gamma, beta, the
    moving mean and the moving variance at K;
  * the consumer (next Dense/Conv layer) keeps the input slice of K: Dense rows
    K, Conv input channels K, and for a Dense after a channels-last Flatten of P
    positions the rows p * units + k for every position p and k in K;
  * the output layer is never shrunk (only its input rows are sliced).
When the dropped units of the source model output exactly zero (kernel column,
bias and BatchNorm gamma/beta zeroed, see `structured.apply_unit_masks`), the
shrunk model computes the same function (tests: within 1e-5; measured 0.0).

The result is a plain Keras model of standard layers: it saves and loads
without fedprune. Everything here is eager and works on numpy arrays.
"""

from __future__ import annotations

import numpy as np

from fedprune.model import builders
from fedprune.pruning import wrappers
from fedprune.pruning.structured import StructuredLayout
from fedprune.pruning.unit_layout import (
    UNIT_LAYERS,
    UnsupportedArchitecture,
    chain_layers,
    structured_layout,
)


def _flat_indices(kept, num_units: int, repeat: int) -> np.ndarray:
    """Indices of units `kept` on an axis with `repeat` positions per unit (p * units + k)."""
    return (np.arange(repeat)[:, None] * num_units + np.asarray(kept)[None, :]).ravel()


def _validated(layout: StructuredLayout, kept_units: dict) -> dict[str, np.ndarray]:
    unknown = sorted(set(kept_units) - set(layout.names))
    if unknown:
        raise ValueError(f"kept_units names layers that are not pruned: {unknown}; "
                         f"pruned layers: {list(layout.names)}")
    kept = {}
    for p in layout.layers:
        if p.name not in kept_units:
            continue
        k = np.asarray(kept_units[p.name])
        if (k.ndim != 1 or k.size == 0 or not np.issubdtype(k.dtype, np.integer)
                or k.min() < 0 or k.max() >= p.num_units or np.unique(k).size != k.size):
            raise ValueError(f"kept_units[{p.name!r}] must be 1-D distinct integers in "
                             f"[0, {p.num_units}), at least one; got {kept_units[p.name]!r}")
        kept[p.name] = np.sort(k).astype(np.int64)
    return kept


def slice_weights(layout: StructuredLayout, kept_units: dict, trainable: list,
                  non_trainable: list | None = None) -> tuple[list, list | None]:
    """Slices a model's weight lists to the kept units (what `shrink` loads).

    Also maps any per-weight state laid out like the trainable weights (e.g. the
    server optimizer's momentum or Adam moments: pass them as `trainable`).

    Args:
      layout: `unit_layout.structured_layout` of the (plain) source model.
      kept_units: {pruned layer name: kept unit indices}; absent layers keep all.
      trainable: arrays in the source model's `trainable_weights` order.
      non_trainable: arrays in its `non_trainable_weights` order, or None.

    Returns:
      (trainable, non_trainable) numpy lists in the shrunk model's order (the
      same order, smaller shapes); non_trainable is None when not given.
    """
    kept = _validated(layout, kept_units)
    trainable = [np.asarray(w) for w in trainable]
    if non_trainable is not None:
        non_trainable = [np.asarray(w) for w in non_trainable]
    for p in layout.layers:
        if p.name not in kept:
            continue
        k = kept[p.name]
        trainable[p.kernel_index] = np.take(trainable[p.kernel_index], k, axis=-1)
        if p.bias_index is not None:
            trainable[p.bias_index] = trainable[p.bias_index][k]
        for bn in p.batchnorms:
            rows = _flat_indices(k, p.num_units, bn.repeat)
            for i in (bn.gamma_index, bn.beta_index):
                if i is not None:
                    trainable[i] = trainable[i][rows]
            if non_trainable is not None:
                for i in (bn.moving_mean_index, bn.moving_variance_index):
                    non_trainable[i] = non_trainable[i][rows]
        rows = _flat_indices(k, p.num_units, p.consumer_repeat)
        trainable[p.consumer_kernel_index] = np.take(
            trainable[p.consumer_kernel_index], rows, axis=-2)
    return trainable, non_trainable


def shrink(model, kept_units: dict):
    """A new, smaller plain Keras model keeping only `kept_units` of each pruned layer.

    Args:
      model: a plain (unwrapped; see `wrappers.strip`) Sequential or functional
        model that `unit_layout.structured_layout` accepts.
      kept_units: {layer name: 1-D array of kept unit/filter indices} for any of
        the pruned layers (`structured_layout(model).names`); absent layers keep
        all their units. E.g. from `kept_units_from_masks`.

    Returns:
      A new model of the same kind (Sequential for Sequential, else functional),
      same layer names and configs except `units`/`filters`, with the sliced
      weights. The source model is not changed.

    Raises:
      UnsupportedArchitecture: for models `structured_layout` rejects, or
        tfmot-wrapped ones.
      ValueError: for unknown layer names or invalid indices in `kept_units`.
    """
    import tensorflow as tf

    layers = chain_layers(model)
    wrapped = [layer.name for layer in layers if wrappers.is_pruning_wrapper(layer)]
    if wrapped:
        raise UnsupportedArchitecture(
            f"layers {wrapped} carry tfmot wrappers; shrink a plain model (wrappers.strip)")
    layout = structured_layout(model)
    kept = _validated(layout, kept_units)
    trainable, non_trainable = slice_weights(
        layout, kept, [v.numpy() for v in model.trainable_weights],
        [v.numpy() for v in model.non_trainable_weights])

    new_layers = []
    for layer in layers:
        config = layer.get_config()
        if layer.name in kept:
            config["units" if type(layer).__name__ == "Dense" else "filters"] = len(
                kept[layer.name])
        new_layers.append(type(layer).from_config(config))
    shape, dtype = model.input_shape[1:], model.inputs[0].dtype
    if isinstance(model, tf.keras.Sequential):
        new = tf.keras.Sequential(
            [tf.keras.layers.InputLayer(input_shape=shape, dtype=dtype)] + new_layers,
            name=model.name)
    else:
        inputs = x = tf.keras.Input(shape=shape, dtype=dtype)
        for layer in new_layers:
            x = layer(x)
        new = tf.keras.Model(inputs, x, name=model.name)

    for variables, values in ((new.trainable_weights, trainable),
                              (new.non_trainable_weights, non_trainable)):
        shapes = [tuple(v.shape.as_list()) for v in variables]
        if shapes != [w.shape for w in values]:  # same layers in the same order
            raise RuntimeError(f"rebuilt model's weights {shapes} do not match the sliced "
                               f"weights {[w.shape for w in values]}")
        for variable, value in zip(variables, values, strict=True):
            variable.assign(value)
    return new


def kept_units_from_masks(model, weights: list | None = None) -> dict[str, np.ndarray]:
    """The units of each pruned layer that a structured mask left alive.

    A unit is dropped when its kernel column (filter) and bias entry are all
    zero and so are gamma and beta of its BatchNorm entries: its output is then
    identically zero (see `structured.apply_unit_masks`). A layer whose units
    are all dropped keeps unit 0 (which outputs zero), so no layer vanishes.

    Args:
      model: a Keras model `unit_layout.structured_layout` accepts (plain or
        tfmot-wrapped).
      weights: its trainable weights (`model.trainable_weights` order, e.g.
        TFF's `ModelWeights.trainable`); None reads the model's own.

    Returns:
      {pruned layer name: sorted int64 array of kept unit indices}, for every
      pruned layer.
    """
    layout = structured_layout(model)
    if weights is None:
        weights = [v.numpy() for v in model.trainable_weights]
    weights = [np.asarray(w) for w in weights]
    kept = {}
    for p in layout.layers:
        kernel = weights[p.kernel_index]
        alive = np.any(kernel.reshape(-1, p.num_units) != 0, axis=0)
        if p.bias_index is not None:
            alive |= weights[p.bias_index] != 0
        for bn in p.batchnorms:
            for i in (bn.gamma_index, bn.beta_index):
                if i is not None:
                    alive |= np.any(weights[i].reshape(bn.repeat, p.num_units) != 0, axis=0)
        indices = np.flatnonzero(alive)
        kept[p.name] = indices if indices.size else np.zeros(1, np.int64)
    return {name: k.astype(np.int64) for name, k in kept.items()}


def count_params(model) -> int:
    """All parameters, trainable and non-trainable (BatchNorm moving statistics included)."""
    return builders.count_params(model)


def model_bytes(model) -> int:
    """Bytes of all parameters stored as float32 (4 per parameter of `count_params`)."""
    return 4 * count_params(model)


def macs_per_example(model) -> int:
    """Multiply-adds of one example's forward pass through the Dense and Conv layers.

    Convention: one multiply-add per kernel weight per output position, i.e.
    Dense in * out (times positions when applied to a sequence or image),
    Conv kh * kw * (c_in / groups) * c_out * H_out * W_out (likewise in 1-D/3-D).
    Biases, BatchNorm, activations and pooling are not counted. Multiply by 2
    for FLOPs counted as separate multiplies and adds.

    Raises:
      UnsupportedArchitecture: for layers with weights other than Dense, Conv
        and BatchNormalization (e.g. LSTM, Embedding, nested models), rather
        than undercounting them.
    """
    total = 0
    for layer in model.layers:
        inner = layer.layer if wrappers.is_pruning_wrapper(layer) else layer
        kind = type(inner).__name__
        if kind in UNIT_LAYERS:
            positions = int(np.prod(layer.output_shape[1:-1], dtype=np.int64))
            total += inner.kernel.shape.num_elements() * positions
        elif inner.weights and kind != "BatchNormalization":
            raise UnsupportedArchitecture(
                f"macs_per_example counts Dense, Conv1D/2D/3D and BatchNormalization; "
                f"layer {layer.name!r} is {kind}")
    return int(total)


def unshrink(full_model, small_model, kept_units: dict) -> None:
    """Loads a shrunk model's weights into the full architecture, zeros at dropped units.

    The inverse of `slice_weights` on its image: every weight of `small_model`
    goes where `slice_weights` took it from, every other entry of `full_model`
    (dropped units' kernel columns, biases, BatchNorm entries, and the next
    layer's input rows for them) becomes 0, so `full_model` is exactly
    unit-sparse and computes what `small_model` does.

    Args:
      full_model: a plain Keras model of the unshrunk architecture (changed in place).
      small_model: `shrink(model of that architecture, kept_units)` or a model of
        its architecture.
      kept_units: {pruned layer name of `full_model`: kept unit indices}.
    """
    layout = structured_layout(full_model)
    sources = []
    for variables in (full_model.trainable_weights, full_model.non_trainable_weights):
        sources.append([np.arange(v.shape.num_elements()).reshape(v.shape.as_list())
                        for v in variables])
    trainable, non_trainable = slice_weights(layout, kept_units, *sources)
    for variables, indices, values in (
            (full_model.trainable_weights, trainable, small_model.trainable_weights),
            (full_model.non_trainable_weights, non_trainable,
             small_model.non_trainable_weights)):
        for variable, where, value in zip(variables, indices, values, strict=True):
            full = np.zeros(variable.shape.num_elements(), variable.dtype.as_numpy_dtype)
            full[np.asarray(where).ravel()] = value.numpy().ravel()
            variable.assign(full.reshape(variable.shape.as_list()))
