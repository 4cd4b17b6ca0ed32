"""Model builders and which weights fedprune prunes."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot

from fedprune.errors import InvalidArgument
from fedprune.model import builders
from fedprune.pruning import wrappers


@pytest.mark.parametrize(
    "name, input_shape, classes, params",
    [
        ("mlp", (64,), 10, 64 * 128 + 128 + 128 * 10 + 10),  # the seeds' model on digits
        ("mlp", (28, 28, 1), 10, 784 * 128 + 128 + 128 * 10 + 10),
        ("mlp2", (64,), 10, 64 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10),
        # conv 5x5x1x32 + 32, conv 5x5x32x64 + 64, dense 7*7*64 x 512 + 512, 512 x 62 + 62
        ("cnn", (28, 28, 1), 62, 832 + 51_264 + 3136 * 512 + 512 + 512 * 62 + 62),
        ("rnn", (80,), 90, 90 * 8 + 4 * (256 * (8 + 256) + 256) + 256 * 90 + 90),
    ],
)
def test_parameter_counts(name, input_shape, classes, params):
    model = builders.build_model(name, input_shape, classes, seed=0)
    assert builders.count_params(model) == params


def test_same_seed_same_weights():
    a = builders.build_model("mlp", (64,), 10, seed=3).get_weights()
    b = builders.build_model("mlp", (64,), 10, seed=3).get_weights()
    c = builders.build_model("mlp", (64,), 10, seed=4).get_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not np.array_equal(a[0], c[0])


def test_unknown_model_names_the_flag():
    with pytest.raises(InvalidArgument, match="--model="):
        builders.build_model("resnet", (64,), 10)


@pytest.mark.parametrize(
    "name, input_shape, prune_output, pruned",
    [
        ("mlp", (64,), True, [(64, 128), (128, 10)]),
        ("mlp", (64,), False, [(64, 128)]),
        ("cnn", (8, 8, 1), True, [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512), (512, 10)]),
        ("cnn", (8, 8, 1), False, [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512)]),
        ("rnn", (80,), True, [(256, 90)]),  # Embedding and LSTM are not pruned by default
    ],
)
def test_only_dense_and_conv_kernels_are_pruned(name, input_shape, prune_output, pruned):
    classes = 90 if name == "rnn" else 10
    wrapped = wrappers.wrap_for_pruning(builders.build_model(name, input_shape, classes, seed=0),
                                       prune_output_layer=prune_output)
    layout = wrappers.pruning_layout(wrapped)
    assert [k.shape for k in layout.kernels] == pruned
    assert layout.num_pruned_params == sum(int(np.prod(s)) for s in pruned)
    # Kernels only: no bias (rank 1) is ever pruned.
    trainable = wrapped.trainable_weights
    assert all(trainable[k.trainable_index].shape.rank >= 2 for k in layout.kernels)


COND_OPS = {"If", "StatelessIf"}
# tfmot's own wrapper with a real schedule in steps, as `--prune_granularity=step` clients have.
STEP_PARAMS = {"pruning_schedule": tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, 0, 10,
                                                                        frequency=2)}


@pytest.mark.parametrize("name, input_shape, wrapped_layers", [("mlp", (64,), 2),
                                                                ("cnn", (8, 8, 1), 4)])
@pytest.mark.parametrize("params", [None, STEP_PARAMS], ids=["round", "step"])
def test_wrapping_inside_a_graph_builds_only_the_inference_branch(name, input_shape,
                                                                  wrapped_layers, params):
    """Under TFF's graph tracing, cloning builds no training cond; a training call builds
    tfmot's step assertion and mask update only in tfmot's own (step) wrapper."""
    from keras.src import backend as keras_backend

    with tf.Graph().as_default() as graph:
        plain = builders.build_model(name, input_shape, 10, seed=0)
        before = len(graph.get_operations())
        wrapped = wrappers.wrap_for_pruning(plain, pruning_params=params)
        added = graph.get_operations()[before:]
        assert not {op.type for op in added} & COND_OPS
        # The graph's learning phase is symbolic again (the scope left nothing behind).
        assert tf.is_tensor(keras_backend.learning_phase())
        layout = wrappers.pruning_layout(wrapped)
        assert len(layout.kernels) == len(layout.step_indices) == wrapped_layers
        before = len(graph.get_operations())
        wrapped(tf.zeros((1, *input_shape)), training=True)
        added = graph.get_operations()[before:]
        conds = sorted(op.name.rsplit("/", 1)[-1] for op in added if op.type in COND_OPS)
        step_ops = [op for op in added if "pruning_step" in op.name]
        if params is None:  # the mask op alone: one kernel assignment per wrapper
            assert conds == [] and step_ops == []
            assert sum(op.type == "AssignVariableOp" for op in added) == wrapped_layers
        else:
            assert conds == ["AssertGuard"] * wrapped_layers + ["cond"] * wrapped_layers


@pytest.mark.parametrize("params, steps_after", [(None, [0, 0]), (STEP_PARAMS, [1, 1])],
                         ids=["round", "step"])
def test_initial_weights_make_the_wrapper_valid_inside_tff(params, steps_after):
    # tfmot starts pruning_step at -1 and asserts >= 1 after its own increment;
    # Keras' UpdatePruningStep callback would fix that, but TFF never runs callbacks.
    # fedprune's round wrappers neither count nor assert (MaskOnlyPruneLowMagnitude).
    wrapped = wrappers.wrap_for_pruning(builders.build_model("mlp", (64,), 10, seed=0),
                                        pruning_params=params)
    layout = wrappers.pruning_layout(wrapped)
    steps = [wrapped.non_trainable_weights[i].numpy() for i in layout.step_indices]
    assert steps == [-1, -1]
    if params is not None:
        with pytest.raises(tf.errors.InvalidArgumentError):
            wrapped(np.zeros((1, 64), np.float32), training=True)
    trainable, non_trainable = wrappers.initial_weights(wrapped, layout)
    assert [non_trainable[i] for i in layout.step_indices] == [0, 0]
    for var, value in zip(wrapped.non_trainable_weights, non_trainable, strict=True):
        var.assign(value)
    wrapped(np.zeros((1, 64), np.float32), training=True)  # valid now
    assert [wrapped.non_trainable_weights[i].numpy() for i in layout.step_indices] == steps_after


def _kernel_shapes(name, input_shape):
    wrapped = wrappers.wrap_for_pruning(builders.build_model(name, input_shape, 10, seed=0))
    return [k.shape for k in wrappers.pruning_layout(wrapped).kernels]


def _train_six_steps(name, input_shape, params, masks):
    """Kernels and biases, and test outputs, of a wrapped model after 6 SGD steps.

    `masks`: the 0/1 mask of each pruned kernel (layout order).
    """
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    rng = np.random.default_rng(0)
    x = rng.normal(size=(6, 8, *input_shape)).astype(np.float32)
    y = rng.integers(0, 10, size=(6, 8))
    wrapped = wrappers.wrap_for_pruning(builders.build_model(name, input_shape, 10, seed=0),
                                        pruning_params=params)
    kinds = {type(layer).__name__ for layer in wrapped.layers
             if isinstance(layer, pruning_wrapper.PruneLowMagnitude)}
    assert kinds == {"PruneLowMagnitude" if params else "MaskOnlyPruneLowMagnitude"}
    layout = wrappers.pruning_layout(wrapped)
    trainable, non_trainable = wrappers.initial_weights(wrapped, layout)
    for k, mask in zip(layout.kernels, masks, strict=True):
        non_trainable[k.mask_index] = mask
    for var, value in zip([*wrapped.trainable_weights, *wrapped.non_trainable_weights],
                          [*trainable, *non_trainable], strict=True):
        var.assign(value)
    def loss_fn(labels, logits):  # Keras' loss objects refuse a strategy's scope
        return tf.reduce_mean(tf.keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))

    @tf.function
    def train(x, y):
        for i in tf.range(x.shape[0]):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[i], wrapped(x[i], training=True))
            gradients = tape.gradient(loss, wrapped.trainable_weights)
            # SGD by hand: Keras' optimizers want `strategy.run` in a strategy's scope.
            for variable, gradient in zip(wrapped.trainable_weights, gradients, strict=True):
                variable.assign_sub(0.1 * gradient)

    train(tf.constant(x), tf.constant(y))
    return [v.numpy() for v in wrapped.trainable_weights], wrapped(x[0], training=False).numpy()


@pytest.mark.parametrize("strategy", [False, True], ids=["no strategy", "a strategy's scope"])
@pytest.mark.parametrize("name, input_shape", [("mlp", (64,)), ("cnn", (8, 8, 1))])
def test_round_wrappers_train_exactly_as_tfmots_wrapper_with_never_prune(name, input_shape,
                                                                          strategy):
    """MaskOnlyPruneLowMagnitude vs tfmot's PruneLowMagnitude, both with NeverPrune:
    the same kernels, biases and outputs, bit for bit, after 6 SGD steps in a
    tf.function inside a half-zero mask. Without a distribution strategy the
    mask-only wrapper assigns the mask itself; in a strategy's scope it runs
    tfmot's `weight_mask_op`."""
    import contextlib

    rng = np.random.default_rng(1)
    shapes = _kernel_shapes(name, input_shape)
    masks = [(rng.random(shape) < 0.5).astype(np.float32) for shape in shapes]
    scope = (tf.distribute.OneDeviceStrategy("/cpu:0").scope() if strategy
             else contextlib.nullcontext())
    with scope:
        assert tf.distribute.has_strategy() == strategy
        mine = _train_six_steps(name, input_shape, None, masks)
    tfmots = _train_six_steps(name, input_shape,
                              {"pruning_schedule": wrappers._never_prune_class()()}, masks)
    assert 0.45 < np.mean([m.mean() for m in masks]) < 0.55
    for a, b in zip(mine[0], tfmots[0], strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(mine[1], tfmots[1])
    # The masks matter: training without them (all ones) gives other outputs.
    ones = [np.ones(shape, np.float32) for shape in shapes]
    assert not np.array_equal(mine[1], _train_six_steps(name, input_shape, None, ones)[1])


def test_strip_keeps_masked_kernels():
    wrapped = wrappers.wrap_for_pruning(builders.build_model("mlp", (64,), 10, seed=0))
    layout = wrappers.pruning_layout(wrapped)
    kernel = layout.kernels[0]
    mask = np.zeros(kernel.shape, np.float32)
    mask[:, :5] = 1
    wrapped.non_trainable_weights[kernel.mask_index].assign(mask)
    wrapped.trainable_weights[kernel.trainable_index].assign(
        wrapped.trainable_weights[kernel.trainable_index] * mask)
    stripped = wrappers.strip(wrapped)
    assert not any("prune" in layer.name for layer in stripped.layers)
    assert np.count_nonzero(stripped.get_weights()[0]) == np.count_nonzero(mask[:, :5] * 1.0)
