"""fedprune.runtime.autograph: the modules AutoGraph leaves as written build the same ops."""

import collections
import contextlib

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.python.autograph.core import config
from tensorflow.python.autograph.impl import conversion

from fedprune.model import builders
from fedprune.pruning import wrappers
from fedprune.runtime import autograph


def test_rules_apply_inside_the_block_only_and_nest():
    from tensorflow_model_optimization.python.core.sparsity.keras import pruning_wrapper

    call = pruning_wrapper.PruneLowMagnitude.call
    tf_rules = config.CONVERSION_RULES
    assert not conversion.is_allowlisted(call)
    with autograph.plain_modules():
        assert conversion.is_allowlisted(call)
        assert config.CONVERSION_RULES[len(autograph.PLAIN_MODULES):] == tf_rules
        with autograph.plain_modules(("attr",)):
            assert len(config.CONVERSION_RULES) == len(tf_rules) + len(autograph.PLAIN_MODULES) + 1
        assert conversion.is_allowlisted(call)
    assert config.CONVERSION_RULES == tf_rules
    with pytest.raises(RuntimeError), autograph.plain_modules():
        raise RuntimeError  # an exception inside restores them too
    assert config.CONVERSION_RULES == tf_rules and not conversion.is_allowlisted(call)


def _ops(graph) -> collections.Counter:
    """Op types of a graph and of the functions it calls (cond branches, while bodies)."""
    graph_def = graph.as_graph_def()
    ops = collections.Counter(node.op for node in graph_def.node)
    for function in graph_def.library.function:
        ops.update(node.op for node in function.node_def)
    return ops


@pytest.mark.parametrize("name, input_shape", [("mlp", (64,)), ("cnn", (8, 8, 1))])
@pytest.mark.parametrize("step_schedule", [False, True], ids=["round", "step"])
def test_a_training_step_builds_the_same_ops_and_numbers_either_way(name, input_shape,
                                                                    step_schedule):
    """The wrappers run as written vs converted by AutoGraph: same ops, same results.

    Round wrappers are fedprune's mask-only subclass; step wrappers are tfmot's own
    `PruneLowMagnitude`, whose `call` and schedule `plain_modules` leaves as written.
    """
    import tensorflow_model_optimization as tfmot

    plain = builders.build_model(name, input_shape, 10, seed=0)
    params = ({"pruning_schedule": tfmot.sparsity.keras.PolynomialDecay(0.0, 0.5, 0, 4)}
              if step_schedule else None)
    wrapped = wrappers.wrap_for_pruning(plain, pruning_params=params)
    layout = wrappers.pruning_layout(wrapped)
    trainable, non_trainable = wrappers.initial_weights(wrapped, layout)
    x = np.random.default_rng(0).normal(size=(4, *input_shape)).astype(np.float32)
    results, graphs = [], []
    for scoped in (False, True):
        variables = [*wrapped.trainable_weights, *wrapped.non_trainable_weights]
        for var, value in zip(variables, [*trainable, *non_trainable], strict=True):
            var.assign(value)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(wrapped(x, training=True) ** 2)
            return loss, tape.gradient(loss, wrapped.trainable_weights)

        with autograph.plain_modules() if scoped else contextlib.nullcontext():
            concrete = step.get_concrete_function(tf.TensorSpec(x.shape))
        graphs.append(_ops(concrete.graph))
        loss, gradients = concrete(tf.constant(x))
        results.append([loss.numpy(), *(g.numpy() for g in gradients),
                        *(v.numpy() for v in wrapped.non_trainable_weights)])
    assert graphs[0] == graphs[1]
    for converted, as_written in zip(*results, strict=True):
        np.testing.assert_array_equal(converted, as_written)
