"""Model builders and which weights fedprune prunes."""

import numpy as np
import pytest
import tensorflow as tf

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


@pytest.mark.parametrize("name, input_shape, wrapped_layers", [("mlp", (64,), 2),
                                                                ("cnn", (8, 8, 1), 4)])
def test_wrapping_inside_a_graph_builds_only_the_inference_branch(name, input_shape,
                                                                  wrapped_layers):
    """Under TFF's graph tracing, cloning builds no training cond; a training call still does."""
    from keras.src import backend as keras_backend

    with tf.Graph().as_default() as graph:
        plain = builders.build_model(name, input_shape, 10, seed=0)
        before = len(graph.get_operations())
        wrapped = wrappers.wrap_for_pruning(plain)
        added = graph.get_operations()[before:]
        assert not {op.type for op in added} & COND_OPS
        # The graph's learning phase is symbolic again (the scope left nothing behind).
        assert tf.is_tensor(keras_backend.learning_phase())
        layout = wrappers.pruning_layout(wrapped)
        assert len(layout.kernels) == len(layout.step_indices) == wrapped_layers
        # Training inside the graph builds each wrapper's step assertion and mask update.
        before = len(graph.get_operations())
        wrapped(tf.zeros((1, *input_shape)), training=True)
        conds = sorted(op.name.rsplit("/", 1)[-1] for op in graph.get_operations()[before:]
                       if op.type in COND_OPS)
        assert conds == ["AssertGuard"] * wrapped_layers + ["cond"] * wrapped_layers


def test_initial_weights_make_the_wrapper_valid_inside_tff():
    # tfmot starts pruning_step at -1 and asserts >= 1 after its own increment;
    # Keras' UpdatePruningStep callback would fix that, but TFF never runs callbacks.
    wrapped = wrappers.wrap_for_pruning(builders.build_model("mlp", (64,), 10, seed=0))
    layout = wrappers.pruning_layout(wrapped)
    steps = [wrapped.non_trainable_weights[i].numpy() for i in layout.step_indices]
    assert steps == [-1, -1]
    with pytest.raises(tf.errors.InvalidArgumentError):
        wrapped(np.zeros((1, 64), np.float32), training=True)
    trainable, non_trainable = wrappers.initial_weights(wrapped, layout)
    assert [non_trainable[i] for i in layout.step_indices] == [0, 0]
    for var, value in zip(wrapped.non_trainable_weights, non_trainable, strict=True):
        var.assign(value)
    wrapped(np.zeros((1, 64), np.float32), training=True)  # valid now
    assert [wrapped.non_trainable_weights[i].numpy() for i in layout.step_indices] == [1, 1]


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
