"""Structured masks: unit scores, exactly-k unit masks, what is zeroed."""

import numpy as np
import pytest
import tensorflow as tf
from structured_models import MODELS, bn_cnn

from fedprune.errors import InvalidArgument
from fedprune.pruning import structured, unit_layout

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


# ----------------------------------------------------------------------------- applying masks


def test_apply_unit_masks_zeroes_columns_biases_and_batchnorm():
    model = bn_cnn()
    rng = np.random.default_rng(2)
    trainable = [rng.normal(size=v.shape).astype(np.float32) for v in model.trainable_weights]
    non_trainable = [rng.uniform(0.5, 2, size=v.shape).astype(np.float32)
                     for v in model.non_trainable_weights]
    layout = unit_layout.structured_layout(model)
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
    layout = unit_layout.structured_layout(model)
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
