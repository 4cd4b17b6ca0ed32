"""Reading a Keras model's unit layout: which layers' units are pruned, where their weights sit.

`structured_layout` walks a model's layers and returns the
`structured.StructuredLayout` that the unit masks of `structured.py` act on:
per pruned layer the indices of its kernel, bias and dependent BatchNorm
weights in the model's weight lists, and the next Dense/Conv layer (its
consumer). `surgery.shrink` reads the same chain (`chain_layers`).

Which architectures: a single chain of layers (Sequential, or a functional
model without branches) of Dense / Conv1D / Conv2D / Conv3D (channels_last,
groups=1) with, between them, BatchNormalization (on the channel axis, with
`scale=True`), Flatten, pooling, dropout and activations that map 0 to 0
(ReLU, tanh, ELU, ...; not sigmoid or softmax). Every Dense/Conv layer except
the output layer (the last one) is pruned; its consumer is the next Dense/Conv
layer. Anything else (residual additions, concatenations, RNNs, embeddings,
a Reshape after the first weighted layer, subclassed models) raises
`UnsupportedArchitecture` from `structured_layout`.

Reads the Keras model eagerly.
"""

from __future__ import annotations

from fedprune.errors import check
from fedprune.pruning import wrappers
from fedprune.pruning.structured import BatchNormSlots, PrunedUnits, StructuredLayout

# Layers whose output units are pruned (and which consume pruned units).
UNIT_LAYERS = ("Dense", "Conv1D", "Conv2D", "Conv3D")
# Layers that pass a zero channel on as a zero channel, channel-for-channel.
_PASSTHROUGH_LAYERS = (
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D",
    "MaxPooling1D", "MaxPooling2D", "MaxPooling3D",
    "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "GlobalMaxPooling1D", "GlobalMaxPooling2D", "GlobalMaxPooling3D",
    "GlobalAveragePooling1D", "GlobalAveragePooling2D", "GlobalAveragePooling3D",
)
_ACTIVATION_LAYERS = ("Activation", "ReLU", "LeakyReLU", "ELU")
# Accepted only before the first Dense/Conv layer (they would scramble channels after it).
_INPUT_LAYERS = ("Reshape",)
SUPPORTED_LAYERS = (UNIT_LAYERS + ("BatchNormalization", "Flatten") + _PASSTHROUGH_LAYERS
                    + _ACTIVATION_LAYERS + _INPUT_LAYERS)


class UnsupportedArchitecture(ValueError):
    """`structured_layout` cannot prune units of this model exactly (the message says why)."""


def _inner(layer):
    # tfmot's PruneLowMagnitude wraps the real layer; its kernel is the same variable.
    return layer.layer if wrappers.is_pruning_wrapper(layer) else layer


def _maps_zero_to_zero(fn) -> bool:
    import numpy as np
    import tensorflow as tf

    return bool(np.all(np.asarray(fn(tf.zeros([1, 2]))) == 0))


def chain_layers(model) -> list:
    """The model's layers as a chain (InputLayers dropped), or `UnsupportedArchitecture`."""
    import tensorflow as tf

    if not getattr(model, "_is_graph_network", False) and not isinstance(
            model, tf.keras.Sequential):
        raise UnsupportedArchitecture(
            f"model {model.name!r} is subclassed; structured pruning needs a Sequential or "
            "functional model")
    if not model.built or len(model.inputs or []) != 1 or len(model.outputs or []) != 1:
        raise UnsupportedArchitecture(
            f"model {model.name!r} must be built with one input and one output")
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    for layer in layers:
        name = type(_inner(layer)).__name__
        if name not in SUPPORTED_LAYERS:
            raise UnsupportedArchitecture(
                f"layer {layer.name!r} ({name}) is not supported by structured pruning; "
                "supported: a chain of " + ", ".join(SUPPORTED_LAYERS)
                + " (no residual connections, concatenations, RNNs or embeddings)")
    # One input, one output, single-input layers and one node per depth, each
    # layer used once: the graph is a chain.
    depths = model._nodes_by_depth
    if len(depths) != len(layers) + 1 or any(len(nodes) != 1 for nodes in depths.values()):
        raise UnsupportedArchitecture(
            f"model {model.name!r} is not a chain of layers (a layer is shared or branches)")
    return layers


def _check_unit_layer(layer):
    if type(layer).__name__ != "Dense":
        if layer.data_format != "channels_last" or layer.groups != 1:
            raise UnsupportedArchitecture(
                f"layer {layer.name!r}: structured pruning needs channels_last convolutions "
                "with groups=1")


def structured_layout(model, *, prune_output_layer: bool = False) -> StructuredLayout:
    """Reads which layers' units are pruned and where their dependent weights are.

    Every Dense/Conv layer but the last (the output layer, whose units are the
    classes) is pruned; its consumer is the next Dense/Conv layer of the chain,
    possibly through BatchNormalization, Flatten, pooling, dropout and
    activations. Works on plain models and on tfmot-wrapped ones (indices then
    refer to the wrapped model's weight lists).

    Args:
      model: a built Keras Sequential or functional model.
      prune_output_layer: must be False: the output layer is never shrunk
        (present so that the driver's flag can be passed through and rejected).

    Raises:
      InvalidArgument: for `prune_output_layer=True`.
      UnsupportedArchitecture: for models outside the supported chain (see the
        module docstring), or with no Dense/Conv layer before the output layer.
    """
    import numpy as np

    check(not prune_output_layer, "prune_output_layer", prune_output_layer,
          "False with structured pruning (the output layer's units are the classes)")
    layers = chain_layers(model)
    trainable = {v.ref(): i for i, v in enumerate(model.trainable_weights)}
    non_trainable = {v.ref(): i for i, v in enumerate(model.non_trainable_weights)}

    def index(table, variable, layer):
        if variable is None:
            return None
        if variable.ref() not in table:
            raise UnsupportedArchitecture(
                f"layer {layer.name!r} is frozen (trainable=False); structured pruning needs "
                "its kernel, bias, gamma and beta trainable")
        return table[variable.ref()]

    inners = [_inner(layer) for layer in layers]
    unit_positions = [i for i, layer in enumerate(inners) if type(layer).__name__ in UNIT_LAYERS]
    if len(unit_positions) < 2:
        raise UnsupportedArchitecture(
            f"model {model.name!r} has no Dense/Conv layer before its output layer")
    output_position = unit_positions[-1]

    pruned, pending = [], None  # pending: the pruned layer whose units flow forward
    for position, layer in enumerate(inners):
        kind = type(layer).__name__
        if kind in UNIT_LAYERS:
            _check_unit_layer(layer)
            if pending is not None:
                if kind != "Dense" and pending["repeat"] != 1:
                    raise UnsupportedArchitecture(f"convolution {layer.name!r} after a Flatten")
                pruned.append(PrunedUnits(
                    name=pending["layer"].name,
                    layer_class=type(pending["layer"]).__name__,
                    kernel_shape=tuple(pending["layer"].kernel.shape.as_list()),
                    kernel_index=index(trainable, pending["layer"].kernel, pending["layer"]),
                    bias_index=index(trainable, getattr(pending["layer"], "bias", None),
                                     pending["layer"]),
                    batchnorms=tuple(pending["batchnorms"]),
                    consumer=layer.name,
                    consumer_kernel_index=index(trainable, layer.kernel, layer),
                    consumer_repeat=pending["repeat"],
                ))
                pending = None
            if position != output_position:
                if not _maps_zero_to_zero(layer.activation):
                    raise UnsupportedArchitecture(
                        f"layer {layer.name!r}: its activation does not map 0 to 0, so a "
                        "dropped unit would not output 0")
                pending = {"layer": layer, "repeat": 1, "batchnorms": []}
        elif kind in _INPUT_LAYERS:
            if position > unit_positions[0]:
                raise UnsupportedArchitecture(
                    f"layer {layer.name!r} ({kind}) after the first Dense/Conv layer")
        elif pending is None:
            continue  # before the first or after the output layer: nothing to follow
        elif kind == "BatchNormalization":
            axis = list(np.atleast_1d(layer.axis))
            rank = len(layer.input_shape)
            if axis not in ([rank - 1], [-1]) or not layer.scale:
                raise UnsupportedArchitecture(
                    f"BatchNormalization {layer.name!r} must normalize the last (channel) "
                    "axis and have scale=True")
            pending["batchnorms"].append(BatchNormSlots(
                name=layer.name,
                repeat=pending["repeat"],
                gamma_index=index(trainable, layer.gamma, layer),
                beta_index=index(trainable, layer.beta, layer),
                moving_mean_index=index(non_trainable, layer.moving_mean, layer),
                moving_variance_index=index(non_trainable, layer.moving_variance, layer),
            ))
        elif kind == "Flatten":
            if layer.data_format != "channels_last":
                raise UnsupportedArchitecture(f"Flatten {layer.name!r} must be channels_last")
            pending["repeat"] *= int(np.prod(layer.input_shape[1:-1], dtype=np.int64))
        elif kind in _ACTIVATION_LAYERS:
            if not _maps_zero_to_zero(layer.call):
                raise UnsupportedArchitecture(
                    f"layer {layer.name!r} does not map 0 to 0, so a dropped unit would "
                    "not output 0")
        elif getattr(layer, "data_format", "channels_last") != "channels_last":
            raise UnsupportedArchitecture(f"layer {layer.name!r} must be channels_last")
    return StructuredLayout(
        layers=tuple(pruned),
        output_layer=inners[output_position].name,
        trainable_shapes=tuple(tuple(v.shape.as_list()) for v in model.trainable_weights),
        non_trainable_shapes=tuple(
            tuple(v.shape.as_list()) for v in model.non_trainable_weights),
    )
