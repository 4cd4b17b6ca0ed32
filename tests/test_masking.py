"""Mask maths: golden numbers and parity with tfmot's own mask code."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl

from fedprune.errors import InvalidArgument
from fedprune.pruning import masking

# The seeds' worked example (3 x 2 kernel).
SEED_TABLE = np.array([[0.8, 0.3], [0.5, 0.7], [0.2, 0.6]], np.float32)


def _mask(weights, sparsity=0.0, **spec):
    return masking.compute_masks([weights], masking.MaskSpec(**spec), sparsity)[0].numpy()


def test_threshold_keeps_four_of_six():
    # theta = 0.4 keeps |w| >= 0.4: 0.8, 0.5, 0.7, 0.6; prunes 0.3 and 0.2.
    mask = _mask(SEED_TABLE, mask_criterion="threshold", threshold=0.4)
    np.testing.assert_array_equal(mask, [[1, 0], [1, 1], [0, 1]])


def test_relative_rate_half_keeps_above_0_4():
    # rate 0.5 * max 0.8 = 0.4; keep |w| > 0.4: 0.8, 0.5, 0.7, 0.6.
    mask = _mask(SEED_TABLE, mask_criterion="relative", relative_rate=0.5)
    np.testing.assert_array_equal(mask, [[1, 0], [1, 1], [0, 1]])


@pytest.mark.parametrize(
    "sparsity, kept",
    [(0.0, 6), (0.5, 3), (0.7, 2), (0.99, 1)],  # max(round(6 * (1 - s)), 1)
)
def test_magnitude_keeps_tfmot_count(sparsity, kept):
    mask = _mask(SEED_TABLE, sparsity)
    assert mask.sum() == kept
    # The kept entries are the largest ones.
    assert SEED_TABLE[mask == 1].min() >= SEED_TABLE[mask == 0].max(initial=0)


def test_magnitude_ties_keep_exactly_k():
    weights = np.array([1.0, 1.0, 1.0, 1.0, 0.5, 0.0], np.float32)
    # k = 3 of four tied ones: tf.math.top_k takes the lower indices first
    # (tfmot would keep all four tied ones).
    np.testing.assert_array_equal(_mask(weights, 0.5), [1, 1, 1, 0, 0, 0])


def _top_k_reference(scores, k):
    """tf.math.top_k's choice: the k largest, the lower index first among equals."""
    order = np.argsort(-scores, kind="stable")
    mask = np.zeros_like(scores)
    mask[order[:k]] = 1
    return mask


@pytest.mark.parametrize("scores, k", [
    # Exactly k positive scores (the shortcut): ties, zeros and negatives below them.
    ([0.0, 2.0, 0.0, 2.0, -1.0, 0.5], 3),
    ([0.0, 0.0, -np.inf, 3.0], 1),
    ([1.0, 1.0, 1.0, 1.0], 4),
    # Not exactly k positive (top_k): ties at 0 and at the k-th largest.
    ([0.0, 2.0, 0.0, 2.0, -1.0, 0.5], 4),
    ([0.0, 2.0, 0.0, 2.0, -1.0, 0.5], 2),
    ([1.0, 1.0, 1.0, 1.0, 0.5, 0.0], 3),
    ([-3.0, -1.0, -2.0, -1.0], 2),
])
def test_keep_top_k_is_top_k_with_or_without_the_positive_shortcut(scores, k):
    scores = np.asarray(scores, np.float32)
    want = _top_k_reference(scores, k)
    np.testing.assert_array_equal(masking.keep_top_k(tf.constant(scores), k).numpy(), want)
    graph = tf.function(masking.keep_top_k)  # inside a graph, k as a tensor
    np.testing.assert_array_equal(graph(tf.constant(scores), tf.constant(k)).numpy(), want)
    with tf.Graph().as_default():  # TF1-style graphs as TFF traces them (`==` is identity)
        mask = masking.keep_top_k(tf.constant(scores), tf.constant(k))
        with tf.compat.v1.Session() as session:
            np.testing.assert_array_equal(session.run(mask), want)


@pytest.mark.parametrize("seed", range(5))
def test_a_kernel_trained_inside_its_mask_keeps_that_mask_at_the_same_level(seed):
    # The shortcut's usual case: pruned to k, trained inside the mask, pruned to k again.
    rng = np.random.default_rng(seed)
    kernel = rng.normal(size=(64, 128)).astype(np.float32)
    mask = _mask(kernel, 0.8)
    trained = (kernel + rng.normal(scale=0.1, size=kernel.shape).astype(np.float32)) * mask
    np.testing.assert_array_equal(_mask(trained, 0.8), mask)
    assert _mask(trained, 0.9).sum() == masking.num_kept(kernel.size, 0.9).numpy()


def test_global_scope_ranks_across_layers():
    small = np.full((2, 2), 0.1, np.float32)
    large = np.arange(1, 5, dtype=np.float32).reshape(2, 2)
    masks = masking.compute_masks([small, large], masking.MaskSpec(mask_scope="global"), 0.5)
    assert masks[0].numpy().sum() == 0 and masks[1].numpy().sum() == 4


def _tfmot_mask(weights, sparsity, **kwargs):
    var = tf.Variable(weights)
    pruning = pruning_impl.Pruning(
        training_step_fn=lambda: tf.constant(1, tf.int64),
        pruning_vars=[(var, tf.Variable(tf.ones_like(weights)), tf.Variable(0.0))],
        pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(sparsity, 0),
        block_size=kwargs.get("block_size", (1, 1)),
        block_pooling_type=kwargs.get("block_pooling_type", "AVG"),
        sparsity_m_by_n=kwargs.get("sparsity_m_by_n"),
    )
    return pruning._maybe_update_block_mask(var)[1].numpy()


@pytest.mark.parametrize("shape", [(64, 32), (33, 10)])
@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.95])
def test_magnitude_equals_tfmot(shape, sparsity):
    weights = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    np.testing.assert_array_equal(_mask(weights, sparsity), _tfmot_mask(weights, sparsity))


@pytest.mark.parametrize("block", [(1, 4), (2, 2), (4, 1)])
@pytest.mark.parametrize("pooling", ["AVG", "MAX"])
def test_block_equals_tfmot(block, pooling):
    weights = np.random.default_rng(1).normal(size=(16, 12)).astype(np.float32)
    ours = _mask(weights, 0.75, structure="block", block_size=block, block_pooling=pooling)
    theirs = _tfmot_mask(weights, 0.75, block_size=block, block_pooling_type=pooling)
    np.testing.assert_array_equal(ours, theirs)
    assert ours.sum() == 16 * 12 // 4  # 48 blocks of 4, keep 12


def _groups_of_four(array):
    """[groups, 4]: every 4 consecutive input weights (axis -2) of a Dense or Conv kernel."""
    return np.moveaxis(array, -2, -1).reshape(-1, 4)


def test_two_four_golden():
    # One Dense column of 8 inputs = two groups of 4. Group 1 (0.1, -0.9, 0.3, 0.2):
    # the two largest |w| are -0.9 and 0.3. Group 2 (5, -6, 0.01, 0.02): 5 and -6.
    weights = np.array([[0.1], [-0.9], [0.3], [0.2], [5.0], [-6.0], [0.01], [0.02]], np.float32)
    mask = _mask(weights, structure="2:4")
    np.testing.assert_array_equal(mask[:, 0], [0, 1, 1, 0, 1, 1, 0, 0])
    # With a threshold the mask is the intersection: |w| >= 0.5 drops 0.3, keeps -0.9, 5, -6.
    np.testing.assert_array_equal(
        _mask(weights, structure="2:4", mask_criterion="threshold", threshold=0.5)[:, 0],
        [0, 1, 0, 0, 1, 1, 0, 0])


# Every kernel shape the 2:4 tests use: small Dense and Conv2D kernels, and the
# MLP 64-16-10 of test_process's structure x criterion x masking grid.
TWO_FOUR_SHAPES = [(16, 8), (3, 3, 8, 4), (64, 16), (16, 10)]


@pytest.mark.parametrize("shape", TWO_FOUR_SHAPES)
def test_two_four_equals_tfmot_and_keeps_the_two_largest_of_every_four(shape):
    weights = np.random.default_rng(2).normal(size=shape).astype(np.float32)
    ours = _mask(weights, structure="2:4")
    np.testing.assert_array_equal(ours, _tfmot_mask(weights, 0.5, sparsity_m_by_n=(2, 4)))
    groups, magnitudes = _groups_of_four(ours), _groups_of_four(np.abs(weights))
    assert groups.shape == (np.prod(shape) // 4, 4)
    # Exactly 2 of every 4, and they are the group's 2 largest |w| (no ties in normals).
    np.testing.assert_array_equal(groups.sum(axis=1), 2)
    top_two = np.argsort(-magnitudes, axis=1)[:, :2]
    expected = np.zeros_like(groups)
    np.put_along_axis(expected, top_two, 1, axis=1)
    np.testing.assert_array_equal(groups, expected)


@pytest.mark.parametrize("shape", TWO_FOUR_SHAPES)
def test_two_four_with_threshold_is_intersection(shape):
    weights = np.random.default_rng(3).normal(size=shape).astype(np.float32)
    both = _mask(weights, structure="2:4", mask_criterion="threshold", threshold=0.5)
    expected = _mask(weights, structure="2:4") * (np.abs(weights) >= 0.5)
    np.testing.assert_array_equal(both, expected)
    # At most 2 of every 4; exactly 2 where the group's second largest |w| is >= 0.5.
    second = np.sort(_groups_of_four(np.abs(weights)), axis=1)[:, -2]
    kept = _groups_of_four(both).sum(axis=1)
    np.testing.assert_array_equal(kept[second >= 0.5], 2)
    assert kept.max() == 2 and (kept < 2).any()  # the threshold removed some


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"mask_criterion": "random"}, "mask_criterion"),
        ({"mask_criterion": "threshold"}, "threshold"),
        ({"mask_criterion": "relative", "relative_rate": 1.5}, "relative_rate"),
        ({"structure": "4:8"}, "structure"),
        ({"block_size": (0, 4)}, "block_size"),
    ],
)
def test_bad_spec_names_the_flag(kwargs, flag):
    with pytest.raises(InvalidArgument, match=f"--{flag}="):
        masking.MaskSpec(**kwargs)


def test_runs_inside_tf_function():
    @tf.function
    def fn(w, s):
        return masking.compute_masks([w], masking.MaskSpec(), s)[0]

    # Keep 3 of 6: the largest are 0.8, 0.7 and 0.6 (as in the eager golden below).
    np.testing.assert_array_equal(fn(tf.constant(SEED_TABLE), tf.constant(0.5)),
                                  [[1, 0], [0, 1], [0, 1]])
    np.testing.assert_array_equal(_mask(SEED_TABLE, 0.5), [[1, 0], [0, 1], [0, 1]])


@pytest.mark.parametrize("scope", masking.SCOPES)
@pytest.mark.parametrize("name", masking.CRITERIA.names())
def test_every_criterion_gives_0_1_masks_of_each_kernel_shape(name, scope):
    params = masking.CRITERIA.entry(name).params
    if "mask_scope" not in params and scope == "global":
        pytest.skip(f"{name} does not read --mask_scope")
    spec = masking.MaskSpec(mask_criterion=name, mask_scope=scope, threshold=0.4,
                            relative_rate=0.5)
    kernels = [SEED_TABLE, np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)]
    masks = [m.numpy() for m in masking.compute_masks(kernels, spec, 0.5)]
    for mask, kernel in zip(masks, kernels, strict=True):
        assert mask.shape == kernel.shape and mask.dtype == kernel.dtype
        assert set(np.unique(mask)) <= {0.0, 1.0}
    if spec.criterion.uses_sparsity:  # k = max(round(N * (1 - s)), 1) kept, here N / 2
        assert sum(m.sum() for m in masks) == sum(k.size for k in kernels) / 2


def test_a_criterion_overrides_one_hook():
    @dataclasses.dataclass(frozen=True)
    class Smallest(masking.MaskCriterion):
        """Keeps the k smallest |w| (registered nowhere: called directly)."""

        def masks(self, scores, sparsity):
            return [masking.keep_top_k(-s, masking.num_kept(tf.size(s), sparsity))
                    for s in scores]

    # Keep 2 of 6: the smallest are 0.2 and 0.3.
    mask = Smallest().masks([tf.abs(tf.constant(SEED_TABLE))], 2 / 3)[0].numpy()
    np.testing.assert_array_equal(mask, [[0, 1], [0, 0], [1, 0]])
