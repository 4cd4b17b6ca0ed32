"""Structured masks: unit scores, exactly-k unit masks, layouts, what is zeroed and rejected."""

import numpy as np
import pytest
import tensorflow as tf

from fedprune.errors import InvalidArgument
from fedprune.model import builders
from fedprune.pruning import structured, wrappers

L = tf.keras.layers


def _bn_cnn():
    """CNN with BatchNorm after each conv (Conv -> BN -> ReLU -> MaxPool, twice)."""
    return tf.keras.Sequential([
        L.InputLayer(input_shape=(8, 8, 1)),
        L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(16, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(), L.Dense(32, activation="relu"), L.Dense(10),
    ])


MODELS = {
    "mlp": lambda: builders.mlp((64,), 10, hidden=(32, 16)),
    "cnn": lambda: builders.cnn((8, 8, 1), 10, filters=(8, 16), dense_units=32),
    "bn_cnn": _bn_cnn,
}


# ----------------------------------------------------------------------------- unit scores


def test_dense_unit_scores_golden():
    kernel = np.array([[1, -2], [-3, 0], [0, 4]], np.float32)  # [in=3, units=2]
    # Column 0 = (1, -3, 0): L1 = 4, L2 = sqrt(1 + 9) = sqrt(10).
    # Column 1 = (-2, 0, 4): L1 = 6, L2 = sqrt(4 + 16) = sqrt(20).
    np.testing.assert_allclose(structured.unit_scores(kernel, "l1"), [4, 6])
    np.testing.assert_allclose(structured.unit_scores(kernel, "l2"), np.sqrt([10, 20]), rtol=1e-6)


def test_conv_unit_scores_golden():
    kernel = np.zeros((2, 1, 2, 3), np.float32)  # [kh=2, kw=1, in=2, filters=3]
    kernel[..., 0] = 1.0  # four ones: L1 = 4, L2 = 2
    kernel[..., 1] = np.array([[3, 0], [0, -4]]).reshape(2, 1, 2)  # L1 = 7, L2 = 5
    # Filter 2 stays zero: L1 = L2 = 0.
    np.testing.assert_allclose(structured.unit_scores(kernel, "l1"), [4, 7, 0])
    np.testing.assert_allclose(structured.unit_scores(kernel, "l2"), [2, 5, 0])


@pytest.mark.parametrize("norm, kept", [("l1", [1, 0]), ("l2", [0, 1])])
def test_norms_rank_differently(norm, kept):
    # Unit 0 = (2, 2): L1 4, L2 2.83; unit 1 = (3, 0): L1 3, L2 3. Keep 1 of 2.
    kernel = np.array([[2, 3], [2, 0]], np.float32)
    units, _ = structured.structured_masks([kernel], 0.5, norm=norm)
    np.testing.assert_array_equal(units[0], kept)


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("norm", structured.NORMS)
@pytest.mark.parametrize(
    "sparsity, k",
    [(0.0, 10), (0.3, 7), (0.5, 5), (0.8, 2), (0.99, 1)],  # max(round(10 * (1 - s)), 1)
)
def test_keeps_exactly_k_highest(norm, sparsity, k):
    kernel = np.random.default_rng(0).normal(size=(3, 3, 4, 10)).astype(np.float32)
    units, kernels = structured.structured_masks([kernel], sparsity, norm=norm)
    units, kernel_mask = units[0].numpy(), kernels[0].numpy()
    assert units.sum() == k
    scores = structured.unit_scores(kernel, norm).numpy()
    assert scores[units == 1].min() >= scores[units == 0].max(initial=0)
    # The kernel mask is the unit mask on every incoming weight.
    np.testing.assert_array_equal(kernel_mask, np.broadcast_to(units, kernel.shape))


def test_ties_keep_exactly_k_by_index():
    units, _ = structured.structured_masks([np.ones((3, 8), np.float32)], 0.5)
    np.testing.assert_array_equal(units[0], [1, 1, 1, 1, 0, 0, 0, 0])


def test_global_scope_ranks_across_layers_and_keeps_one_per_layer():
    small = np.full((2, 4), 0.1, np.float32)  # every unit scores below every large one
    large = np.arange(1, 9, dtype=np.float32).reshape(2, 4)  # unit scores increase
    units, _ = structured.structured_masks([small, large], 0.5, scope="global")
    # k = round(8 * 0.5) = 4: the small layer keeps only its forced best unit (0, by
    # index among ties); the large layer keeps its three best.
    np.testing.assert_array_equal(units[0], [1, 0, 0, 0])
    np.testing.assert_array_equal(units[1], [0, 1, 1, 1])


def test_masks_in_a_tf_function_with_tensor_sparsity():
    kernel = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([5, 6]), tf.TensorSpec([], tf.float32)])
    def masks(kernel, sparsity):
        return structured.structured_masks([kernel], sparsity, norm="l1")[0][0]

    eager = structured.structured_masks([kernel], 0.5, norm="l1")[0][0]
    np.testing.assert_array_equal(masks(kernel, tf.constant(0.5)), eager)
    assert masks(kernel, tf.constant(0.5)).numpy().sum() == 3


@pytest.mark.parametrize("arg, value", [("norm", "l3"), ("scope", "model")])
def test_bad_norm_or_scope_names_the_argument(arg, value):
    with pytest.raises(InvalidArgument, match=f"--{arg}="):
        structured.structured_masks([np.ones((2, 2), np.float32)], 0.5, **{arg: value})


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
    layout = structured.structured_layout(model)
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
    plain = _bn_cnn()
    wrapped = wrappers.wrap_for_pruning(plain, prune_output_layer=False)
    layout = structured.structured_layout(wrapped)
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
    (p,) = structured.structured_layout(model).layers
    assert p.batchnorms[0].repeat == 4 and p.consumer_repeat == 4  # 2 * 2 positions


# ----------------------------------------------------------------------------- applying masks


def test_apply_unit_masks_zeroes_columns_biases_and_batchnorm():
    model = _bn_cnn()
    rng = np.random.default_rng(2)
    trainable = [rng.normal(size=v.shape).astype(np.float32) for v in model.trainable_weights]
    non_trainable = [rng.uniform(0.5, 2, size=v.shape).astype(np.float32)
                     for v in model.non_trainable_weights]
    layout = structured.structured_layout(model)
    unit_masks = [np.arange(p.num_units) % 2 == 0 for p in layout.layers]  # keep even units
    unit_masks = [m.astype(np.float32) for m in unit_masks]
    new_t, new_nt = structured.apply_unit_masks(trainable, non_trainable, layout, unit_masks)
    new_t = [w.numpy() for w in new_t]
    changed = set()
    for p, mask in zip(layout.layers, unit_masks, strict=True):
        np.testing.assert_array_equal(new_t[p.kernel_index], trainable[p.kernel_index] * mask)
        np.testing.assert_array_equal(new_t[p.bias_index], trainable[p.bias_index] * mask)
        changed |= {p.kernel_index, p.bias_index}
        for bn in p.batchnorms:
            np.testing.assert_array_equal(new_t[bn.gamma_index], trainable[bn.gamma_index] * mask)
            np.testing.assert_array_equal(new_t[bn.beta_index], trainable[bn.beta_index] * mask)
            changed |= {bn.gamma_index, bn.beta_index}
    # Everything else (the output layer's bias, moving statistics) is untouched;
    # consumer kernels change only as producers (their own columns).
    for i, w in enumerate(trainable):
        if i not in changed:
            np.testing.assert_array_equal(new_t[i], w)
    for before, after in zip(non_trainable, new_nt, strict=True):
        np.testing.assert_array_equal(after, before)


def test_prune_units_keeps_the_k_best_per_layer():
    model = MODELS["cnn"]()
    layout = structured.structured_layout(model)
    before = [w.numpy() for w in model.trainable_weights]
    trainable, _, unit_masks = structured.prune_units(
        model.trainable_weights, model.non_trainable_weights, layout, 0.75, norm="l1")
    trainable, unit_masks = [w.numpy() for w in trainable], [m.numpy() for m in unit_masks]
    # max(round(n * 0.25), 1) of 8, 16, 32 units: 2, 4, 8.
    assert [int(m.sum()) for m in unit_masks] == [2, 4, 8]
    for p, mask in zip(layout.layers, unit_masks, strict=True):
        # Each layer keeps its k units of largest L1 norm, scored on the weights
        # before any layer was pruned (random init: no ties), ...
        scores = structured.unit_scores(before[p.kernel_index], "l1").numpy()
        expected = np.zeros(p.num_units, np.float32)
        expected[np.argsort(-scores)[:int(mask.sum())]] = 1
        np.testing.assert_array_equal(mask, expected)
        # ... zeroes the others' kernel columns and biases, and leaves the kept ones as they were.
        np.testing.assert_array_equal(trainable[p.kernel_index], before[p.kernel_index] * mask)
        np.testing.assert_array_equal(trainable[p.bias_index], before[p.bias_index] * mask)
    # The output layer's kernel and bias are never masked.
    for i in (-2, -1):
        np.testing.assert_array_equal(trainable[i], before[i])


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
    with pytest.raises(structured.UnsupportedArchitecture, match=message):
        structured.structured_layout(build())


def test_pruning_the_output_layer_is_rejected():
    with pytest.raises(InvalidArgument, match="--prune_output_layer=True"):
        structured.structured_layout(MODELS["mlp"](), prune_output_layer=True)
