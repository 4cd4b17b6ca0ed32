"""Surgery: the shrunk model equals the structurally masked one and is as small as computed."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import structured_models
import tensorflow as tf

from fedprune.model import builders, surgery
from fedprune.pruning import structured, unit_layout, wrappers

L = tf.keras.layers


def _functional_mlp():
    inputs = tf.keras.Input((64,))
    h = L.Dense(32, activation="relu")(inputs)
    h = L.Dropout(0.5)(L.Dense(16, activation="tanh")(h))
    return tf.keras.Model(inputs, L.Dense(10)(h))


MODELS = {
    "mlp": (structured_models.MODELS["mlp"], (64,)),
    "cnn": (structured_models.MODELS["cnn"], (8, 8, 1)),
    "bn_cnn": (structured_models.bn_cnn, (8, 8, 1)),
    "functional_mlp": (_functional_mlp, (64,)),
}

# Parameters and multiply-adds before and after keeping half the units of every
# pruned layer (sparsity 0.5: max(round(n / 2), 1) units).
CLOSED_FORMS = {
    # 64-32-16-10 -> 64-16-8-10.
    "mlp": dict(
        params=(64 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10,        # 2,778
                64 * 16 + 16 + 16 * 8 + 8 + 8 * 10 + 10),           # 1,266
        macs=(64 * 32 + 32 * 16 + 16 * 10,                           # 2,720
              64 * 16 + 16 * 8 + 8 * 10),                            # 1,232
    ),
    # conv 5x5 (8 -> 4 filters) on 8x8, pool -> 4x4, conv 5x5 (16 -> 8) on 4x4,
    # pool -> 2x2, flatten 2*2*16 = 64 (-> 32), dense 32 (-> 16), output 10.
    "cnn": dict(
        params=(5 * 5 * 1 * 8 + 8 + 5 * 5 * 8 * 16 + 16 + 64 * 32 + 32 + 32 * 10 + 10,  # 5,834
                5 * 5 * 1 * 4 + 4 + 5 * 5 * 4 * 8 + 8 + 32 * 16 + 16 + 16 * 10 + 10),  # 1,610
        macs=(5 * 5 * 1 * 8 * 8 * 8 + 5 * 5 * 8 * 16 * 4 * 4 + 64 * 32 + 32 * 10,   # 66,368
              5 * 5 * 1 * 4 * 8 * 8 + 5 * 5 * 4 * 8 * 4 * 4 + 32 * 16 + 16 * 10),   # 19,872
    ),
    # As "cnn" with 3x3 kernels, plus BatchNorm's 4 vectors (gamma, beta, moving
    # mean and variance) per channel; BatchNorm is not counted in multiply-adds.
    "bn_cnn": dict(
        params=(3 * 3 * 1 * 8 + 8 + 4 * 8 + 3 * 3 * 8 * 16 + 16 + 4 * 16
                + 64 * 32 + 32 + 32 * 10 + 10,                                     # 3,754
                3 * 3 * 1 * 4 + 4 + 4 * 4 + 3 * 3 * 4 * 8 + 8 + 4 * 8
                + 32 * 16 + 16 + 16 * 10 + 10),                                    # 1,082
        macs=(3 * 3 * 1 * 8 * 8 * 8 + 3 * 3 * 8 * 16 * 4 * 4 + 64 * 32 + 32 * 10,  # 25,408
              3 * 3 * 1 * 4 * 8 * 8 + 3 * 3 * 4 * 8 * 4 * 4 + 32 * 16 + 16 * 10),  # 7,584
    ),
    "functional_mlp": dict(
        params=(2_778, 1_266),
        macs=(2_720, 1_232),
    ),
}


def _randomized(name, seed=0):
    """A model with every weight random (a trained model has nonzero biases and BN stats)."""
    build, shape = MODELS[name]
    model = build()
    rng = np.random.default_rng(seed)
    for v in model.weights:
        low_high = (0.5, 2.0) if "moving_variance" in v.name else None
        value = (rng.uniform(*low_high, v.shape) if low_high
                 else rng.normal(0.0, 0.5, v.shape))
        v.assign(value.astype(np.float32))
    x = np.random.default_rng(seed + 1).normal(size=(16,) + shape).astype(np.float32)
    return model, x


def _assign(model, trainable):
    for variable, value in zip(model.trainable_weights, trainable, strict=True):
        variable.assign(value)


def _masked(name, norm, sparsity=0.5):
    """(model with the structured mask applied, inputs, layout, unit masks as numpy)."""
    model, x = _randomized(name)
    layout = unit_layout.structured_layout(model)
    trainable, _, unit_masks = structured.prune_units(
        model.trainable_weights, model.non_trainable_weights, layout, sparsity, norm=norm)
    _assign(model, trainable)
    return model, x, layout, [m.numpy() for m in unit_masks]


# Logits of a model and its shrunk copy (test_shrunk_equals_masked says why not 0).
TOLERANCE = 1e-4


def _max_difference(a, b, x):
    return float(np.abs(a(x, training=False).numpy() - b(x, training=False).numpy()).max())


@pytest.mark.parametrize("norm", structured.NORMS)
@pytest.mark.parametrize("name", list(MODELS))
def test_shrunk_equals_masked(name, norm):
    model, x, _, unit_masks = _masked(name, norm)
    kept = surgery.kept_units_from_masks(model)
    for mask, indices in zip(unit_masks, kept.values(), strict=True):
        np.testing.assert_array_equal(indices, np.flatnonzero(mask))
    small = surgery.shrink(model, kept)
    # Measured 0.0 for all four models and both norms on one machine; on another, up to
    # 3.1e-5 for the CNN: oneDNN picks its convolution kernels by the CPU and the channel
    # count, so the shrunk model's sums can be ordered differently. TOLERANCE accepts
    # that; a wrong unit kept moves the logits by far more.
    assert _max_difference(model, small, x) <= TOLERANCE
    assert type(small) is type(model)
    if name == "bn_cnn":  # in training mode BatchNorm uses batch statistics: still equal
        difference = np.abs(model(x, training=True).numpy() - small(x, training=True).numpy())
        assert difference.max() <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_unshrink_puts_the_shrunk_weights_back_at_full_size(name):
    model, x, _, _ = _masked(name, "l2")
    small = surgery.shrink(model, surgery.kept_units_from_masks(model))
    full, _ = _randomized(name, seed=7)  # every weight nonzero before
    # Keyed by `full`'s layer names (Keras numbers them per instance).
    names = unit_layout.structured_layout(full).names
    surgery.unshrink(full, small, dict(zip(names, surgery.kept_units_from_masks(model).values(),
                                           strict=True)))
    # Measured: 0.0 (the same sums in the same order as the shrunk model's).
    assert _max_difference(full, small, x) <= TOLERANCE
    assert _max_difference(full, model, x) <= TOLERANCE
    kept = sum(int(np.count_nonzero(w)) for w in full.trainable_weights)
    assert kept == sum(int(np.count_nonzero(w)) for w in small.trainable_weights)
    assert surgery.count_params(full) == surgery.count_params(model)


@pytest.mark.parametrize("name", list(MODELS))
def test_params_bytes_and_macs_match_closed_forms(name):
    model, _, _, _ = _masked(name, "l2")
    small = surgery.shrink(model, surgery.kept_units_from_masks(model))
    params, macs = CLOSED_FORMS[name]["params"], CLOSED_FORMS[name]["macs"]
    assert (surgery.count_params(model), surgery.count_params(small)) == params
    assert (surgery.model_bytes(model), surgery.model_bytes(small)) == (4 * params[0],
                                                                       4 * params[1])
    assert (surgery.macs_per_example(model), surgery.macs_per_example(small)) == macs


@pytest.mark.parametrize(
    "name, partial, difference",
    [
        # Kernel columns zeroed, biases kept: dropped units output act(b) != 0.
        ("mlp", "kernel", 0.1),
        ("cnn", "kernel", 0.1),
        ("bn_cnn", "kernel", 0.1),
        # Kernel and bias zeroed but not BN gamma/beta: a zero channel leaves BN as
        # beta - gamma * mean / sqrt(var + eps), not 0.
        ("bn_cnn", "kernel+bias", 0.1),
    ],
)
def test_partial_masking_is_not_equivalent(name, partial, difference):
    model, x = _randomized(name)
    layout = unit_layout.structured_layout(model)
    kernels = [model.trainable_weights[p.kernel_index] for p in layout.layers]
    unit_masks, kernel_masks = structured.structured_masks(kernels, 0.5)
    trainable = [v.numpy() for v in model.trainable_weights]
    for p, unit_mask, kernel_mask in zip(layout.layers, unit_masks, kernel_masks, strict=True):
        trainable[p.kernel_index] = trainable[p.kernel_index] * kernel_mask.numpy()
        if partial == "kernel+bias":
            trainable[p.bias_index] = trainable[p.bias_index] * unit_mask.numpy()
    _assign(model, trainable)
    kept = {p.name: np.flatnonzero(m) for p, m in zip(layout.layers, unit_masks, strict=True)}
    # Measured: 2.06 (mlp), 6.49 (cnn), 4.81 (bn_cnn, kernel), 4.85 (bn_cnn,
    # kernel+bias); the full structured mask gives 0.0. (Freshly initialized
    # models have zero biases and identity BN, so the gap appears after training.)
    assert _max_difference(model, surgery.shrink(model, kept), x) > difference


@pytest.mark.parametrize("name", ["cnn", "bn_cnn"])
def test_output_layer_is_untouched(name):
    model, _, layout, _ = _masked(name, "l1")
    kept = surgery.kept_units_from_masks(model)
    small = surgery.shrink(model, kept)
    out, small_out = model.get_layer(layout.output_layer), small.get_layer(layout.output_layer)
    assert small_out.units == out.units == 10
    np.testing.assert_array_equal(small_out.bias.numpy(), out.bias.numpy())
    # Only its input rows are sliced: the last pruned layer's kept units.
    np.testing.assert_array_equal(small_out.kernel.numpy(),
                                  out.kernel.numpy()[kept[layout.layers[-1].name]])


def test_dense_after_flatten_keeps_the_flattened_rows_of_kept_channels():
    model, _, layout, _ = _masked("cnn", "l2")
    conv = layout.layers[1]  # 16 filters, consumed by the Dense after a 2x2 Flatten
    kept = surgery.kept_units_from_masks(model)
    small = surgery.shrink(model, kept)
    rows = [p * 16 + k for p in range(4) for k in kept[conv.name]]  # channels-last order
    np.testing.assert_array_equal(
        small.get_layer(conv.consumer).kernel.numpy()[:, :],
        model.get_layer(conv.consumer).kernel.numpy()[rows][:, kept[conv.consumer]])


def test_slice_weights_maps_per_weight_state_like_the_weights():
    model, _, layout, _ = _masked("bn_cnn", "l2")
    kept = surgery.kept_units_from_masks(model)
    small = surgery.shrink(model, kept)
    trainable, non_trainable = surgery.slice_weights(
        layout, kept, [v.numpy() for v in model.trainable_weights],
        [v.numpy() for v in model.non_trainable_weights])
    for variable, value in zip(small.trainable_weights, trainable, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    for variable, value in zip(small.non_trainable_weights, non_trainable, strict=True):
        np.testing.assert_array_equal(variable.numpy(), value)
    # E.g. an optimizer's per-weight moments: same slicing, trainable-shaped.
    moments, none = surgery.slice_weights(
        layout, kept, [np.ones(s, np.float32) for s in layout.trainable_shapes])
    assert none is None
    assert [m.shape for m in moments] == [tuple(v.shape) for v in small.trainable_weights]


def test_kept_units_from_masks_rules():
    model = builders.mlp((4,), 2, hidden=(3,))
    kernel, bias = np.ones((4, 3), np.float32), np.zeros(3, np.float32)
    kernel[:, 1] = 0  # unit 1: zero column and zero bias -> dropped
    kernel[:, 2] = 0
    bias[2] = 0.5  # unit 2: zero column but a bias -> outputs relu(0.5), kept
    model.layers[1].set_weights([kernel, bias])
    np.testing.assert_array_equal(surgery.kept_units_from_masks(model)[model.layers[1].name],
                                  [0, 2])
    # A layer with every unit dropped keeps unit 0 (it outputs 0): no layer vanishes.
    model.layers[1].set_weights([np.zeros((4, 3), np.float32), np.zeros(3, np.float32)])
    np.testing.assert_array_equal(surgery.kept_units_from_masks(model)[model.layers[1].name],
                                  [0])


def test_kept_units_from_masks_keeps_channels_with_batchnorm_beta():
    model, _, layout, unit_masks = _masked("bn_cnn", "l2")
    first = layout.layers[0]
    dropped = int(np.flatnonzero(unit_masks[0] == 0)[0])
    beta = model.get_layer(first.batchnorms[0].name).beta
    beta.assign(tf.tensor_scatter_nd_update(beta, [[dropped]], [1.0]))  # channel outputs relu(1)
    assert dropped in surgery.kept_units_from_masks(model)[first.name]


@pytest.mark.parametrize(
    "kept, message",
    [
        ({"nope": [0]}, "not pruned"),
        ({"first": [0, 99]}, r"\[0, 32\)"),
        ({"first": []}, "at least one"),
        ({"first": [1, 1]}, "distinct"),
        ({"first": [0.5]}, "integers"),
    ],
)
def test_shrink_rejects_bad_kept_units(kept, message):
    model = MODELS["mlp"][0]()
    first = unit_layout.structured_layout(model).names[0]
    kept = {first if k == "first" else k: np.asarray(v) for k, v in kept.items()}
    with pytest.raises(ValueError, match=message):
        surgery.shrink(model, kept)


def test_shrink_rejects_wrapped_models():
    wrapped = wrappers.wrap_for_pruning(MODELS["mlp"][0](), prune_output_layer=False)
    with pytest.raises(unit_layout.UnsupportedArchitecture, match="wrappers.strip"):
        surgery.shrink(wrapped, {})


def test_macs_reject_layers_they_cannot_count():
    with pytest.raises(unit_layout.UnsupportedArchitecture, match="Embedding"):
        surgery.macs_per_example(builders.rnn((5,), 7, units=4))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_shrunk_model_loads_in_plain_keras(tmp_path):
    model, x, _, _ = _masked("bn_cnn", "l2")
    small = surgery.shrink(model, surgery.kept_units_from_masks(model))
    small.save(tmp_path / "small.h5")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", model(x, training=False).numpy())
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import tensorflow as tf
        model = tf.keras.models.load_model({str(tmp_path / "small.h5")!r}, compile=False)
        assert "fedprune" not in sys.modules
        x = np.load({str(tmp_path / "x.npy")!r})
        expected = np.load({str(tmp_path / "expected.npy")!r})
        diff = np.abs(model(x, training=False).numpy() - expected)
        print(model.count_params(), float(diff.max()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    params, difference = done.stdout.split()
    assert int(params) == 1_082 and float(difference) <= 1e-5
