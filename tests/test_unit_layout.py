"""Unit layouts: pruned layers, their consumers and dependent weights; what is rejected."""

import pytest
import tensorflow as tf
from structured_models import MODELS, bn_cnn

from fedprune.errors import InvalidArgument
from fedprune.model import builders
from fedprune.pruning import unit_layout, wrappers

L = tf.keras.layers


# ----------------------------------------------------------------------------- layouts


@pytest.mark.parametrize(
    "name, expected",
    [
        # (class, units, consumer_repeat, BatchNorms) per pruned layer; output layer excluded.
        ("mlp", [("Dense", 32, 1, 0), ("Dense", 16, 1, 0)]),
        # 8x8 -> pool -> 4x4 -> pool -> 2x2: the Dense after Flatten sees 2 * 2 = 4 positions.
        ("cnn", [("Conv2D", 8, 1, 0), ("Conv2D", 16, 4, 0), ("Dense", 32, 1, 0)]),
        ("bn_cnn", [("Conv2D", 8, 1, 1), ("Conv2D", 16, 4, 1), ("Dense", 32, 1, 0)]),
    ],
)
def test_layout_finds_pruned_layers_and_consumers(name, expected):
    model = MODELS[name]()
    layout = unit_layout.structured_layout(model)
    assert [(p.layer_class, p.num_units, p.consumer_repeat, len(p.batchnorms))
            for p in layout.layers] == expected
    weighted = [layer.name for layer in model.layers if type(layer).__name__ in ("Dense", "Conv2D")]
    assert layout.output_layer == weighted[-1] and layout.output_layer not in layout.names
    assert [p.consumer for p in layout.layers] == weighted[1:]
    for p in layout.layers:
        layer = model.get_layer(p.name)
        assert model.trainable_weights[p.kernel_index] is layer.kernel
        assert model.trainable_weights[p.bias_index] is layer.bias
        consumer = model.get_layer(p.consumer)
        assert model.trainable_weights[p.consumer_kernel_index] is consumer.kernel
        for bn in p.batchnorms:
            bn_layer = model.get_layer(bn.name)
            assert model.trainable_weights[bn.gamma_index] is bn_layer.gamma
            assert model.trainable_weights[bn.beta_index] is bn_layer.beta
            assert model.non_trainable_weights[bn.moving_mean_index] is bn_layer.moving_mean
            assert (model.non_trainable_weights[bn.moving_variance_index]
                    is bn_layer.moving_variance)


def test_layout_of_a_tfmot_wrapped_model_points_at_its_own_lists():
    plain = bn_cnn()
    wrapped = wrappers.wrap_for_pruning(plain, prune_output_layer=False)
    layout = unit_layout.structured_layout(wrapped)
    # The wrapper adds mask/threshold/step non-trainables, so indices differ from
    # the plain model's, but they name the same variables: 2 BatchNorms x (moving
    # mean, variance) + 3 wrapped layers (both convs, the hidden Dense; not the
    # output layer) x (mask, threshold, pruning_step) = 4 + 9.
    assert len(plain.non_trainable_weights) == 4
    assert len(layout.non_trainable_shapes) == len(wrapped.non_trainable_weights) == 13
    for p in layout.layers:
        assert wrapped.trainable_weights[p.kernel_index] is plain.get_layer(p.name).kernel
        for bn in p.batchnorms:
            assert (wrapped.non_trainable_weights[bn.moving_mean_index]
                    is plain.get_layer(bn.name).moving_mean)


def test_batchnorm_after_flatten_is_indexed_per_position():
    model = tf.keras.Sequential([
        L.InputLayer(input_shape=(2, 2, 1)), L.Conv2D(3, 1), L.Flatten(),
        L.BatchNormalization(), L.Dense(2),
    ])
    (p,) = unit_layout.structured_layout(model).layers
    assert p.batchnorms[0].repeat == 4 and p.consumer_repeat == 4  # 2 * 2 positions


# ----------------------------------------------------------------------------- rejected


class _Subclassed(tf.keras.Model):
    def __init__(self):
        super().__init__()
        self.a, self.b = L.Dense(4), L.Dense(2)

    def call(self, x):
        return self.b(self.a(x))


def _residual():
    inputs = tf.keras.Input((4,))
    h = L.Dense(4, activation="relu")(inputs)
    return tf.keras.Model(inputs, L.Dense(2)(L.Add()([h, L.Dense(4)(h)])))


def _concatenated():
    inputs = tf.keras.Input((4,))
    a, b = L.Dense(3)(inputs), L.Dense(3)(inputs)
    return tf.keras.Model(inputs, L.Dense(2)(L.Concatenate()([a, b])))


def _shared():
    inputs = tf.keras.Input((4,))
    dense = L.Dense(4, activation="relu")
    return tf.keras.Model(inputs, L.Dense(2)(dense(dense(inputs))))


def _seq(make_layers, input_shape=(4,)):
    # Layers are made when the test runs, not at collection: Keras layers made
    # before another test built a model inside a TF graph (TFF tracing) can come
    # back as v1 layers that fail to build (seen with Reshape).
    return lambda: tf.keras.Sequential([L.InputLayer(input_shape=input_shape), *make_layers()])


def _subclassed():
    model = _Subclassed()
    model(tf.zeros([1, 4]))
    return model


def _frozen():
    model = builders.mlp((4,), 2, hidden=(3,))
    model.layers[1].trainable = False
    return model


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: builders.rnn((5,), 7, units=4), "Embedding"),
        (_residual, "Add"),
        (_concatenated, "Concatenate"),
        (_shared, "not a chain"),
        (_subclassed, "subclassed"),
        (_seq(lambda: [L.Dense(3, activation="sigmoid"), L.Dense(2)]), "does not map 0 to 0"),
        (_seq(lambda: [L.Dense(3), L.Activation("softmax"), L.Dense(2)]), "does not map 0 to 0"),
        (_seq(lambda: [L.Dense(4), L.Reshape((2, 2)), L.Flatten(), L.Dense(2)]), "Reshape"),
        (_seq(lambda: [L.Conv2D(2, 1), L.BatchNormalization(scale=False), L.Flatten(),
                      L.Dense(2)], input_shape=(2, 2, 1)), "scale=True"),
        (_seq(lambda: [L.Conv2D(2, 1), L.BatchNormalization(axis=1), L.Flatten(),
                      L.Dense(2)], input_shape=(2, 2, 1)), "channel"),
        (_seq(lambda: [L.Flatten(), L.Dense(2)]), "no Dense/Conv layer before its output"),
        (_frozen, "frozen"),
    ],
)
def test_unsupported_architectures_raise(build, message):
    with pytest.raises(unit_layout.UnsupportedArchitecture, match=message):
        unit_layout.structured_layout(build())


def test_pruning_the_output_layer_is_rejected():
    with pytest.raises(InvalidArgument, match="--prune_output_layer=True"):
        unit_layout.structured_layout(MODELS["mlp"](), prune_output_layer=True)
