"""fused_mean.py: MeanFactory's weighted mean (and unweighted sums) in one federated_sum.

Bit for bit against TFF's own parts run as separate intrinsics, on random
clients with uneven weights; the state and measurement types are MeanFactory's.
"""

import collections

import numpy as np
import pytest
import tensorflow_federated as tff

from fedprune.federated import fused_mean

pytestmark = pytest.mark.usefixtures("tff_local_context")

SHAPES = [(5, 3), (3,), (3, 2)]
WEIGHT = tff.TensorType(np.float32)


def _clients(num_clients, zero_weights=False, seed=3):
    rng = np.random.default_rng(seed)
    values = [tuple(rng.normal(size=s).astype(np.float32) for s in SHAPES)
              for _ in range(num_clients)]
    weights = [0.0 if zero_weights else float(2 * c + 1) for c in range(num_clients)]
    return values, weights


def _run(factory, value_type, values, weights):
    process = factory.create(value_type, WEIGHT)
    return process, process.next(process.initialize(), values, weights)


@pytest.mark.parametrize("num_clients", [1, 2, 9])
@pytest.mark.parametrize("no_nan_division, zero_weights", [(False, False), (True, False),
                                                           (True, True)])
def test_plain_mean_is_meanfactory_bit_for_bit(num_clients, no_nan_division, zero_weights):
    value_type = tff.to_type(tuple(tff.TensorType(np.float32, s) for s in SHAPES))
    values, weights = _clients(num_clients, zero_weights)
    fused, got = _run(fused_mean.build_fused_mean_factory(no_nan_division=no_nan_division),
                      value_type, values, weights)
    stock, want = _run(tff.aggregators.MeanFactory(no_nan_division=no_nan_division),
                       value_type, values, weights)
    for g, w in zip(got.result, want.result, strict=True):
        np.testing.assert_array_equal(g, w)
    if zero_weights:  # 0/0 -> 0 under no_nan_division
        assert all(np.all(np.asarray(g) == 0.0) for g in got.result)
    else:  # and it is the weighted mean
        expected = np.average(np.stack([v[0] for v in values]), axis=0, weights=weights)
        np.testing.assert_allclose(got.result[0], expected, rtol=1e-5, atol=1e-6)
    assert fused.initialize.type_signature == stock.initialize.type_signature
    assert fused.next.type_signature == stock.next.type_signature


def test_named_fields_sums_and_count():
    # Four clients: "a" averaged with weights 1, 3, 5, 7; "m" summed unweighted.
    rng = np.random.default_rng(0)
    a = [rng.normal(size=(4,)).astype(np.float32) for _ in range(4)]
    m = [(rng.random(4) < 0.5).astype(np.float32) for _ in range(4)]
    values = [collections.OrderedDict(a=x, m=y) for x, y in zip(a, m, strict=True)]
    weights = [1.0, 3.0, 5.0, 7.0]
    value_type = tff.to_type(collections.OrderedDict(
        a=tff.TensorType(np.float32, [4]), m=tff.TensorType(np.float32, [4])))
    factory = fused_mean.build_fused_mean_factory(
        mean_fields=("a",), sum_fields={"m_count": "m"}, count_name="n")
    _, output = _run(factory, value_type, values, weights)
    result = output.result
    assert list(result) == ["mean", "m_count", "n"]
    assert list(result["mean"]) == ["a"]
    assert result["n"] == 4.0
    np.testing.assert_array_equal(result["m_count"], np.sum(m, axis=0))
    stock = tff.aggregators.MeanFactory().create(
        tff.to_type(collections.OrderedDict(a=value_type.a)), WEIGHT)
    want = stock.next(stock.initialize(), [collections.OrderedDict(a=x) for x in a], weights)
    np.testing.assert_array_equal(result["mean"]["a"], want.result["a"])
    np.testing.assert_allclose(result["mean"]["a"],
                               np.average(np.stack(a), axis=0, weights=weights), rtol=1e-6)


def test_sums_need_named_fields():
    with pytest.raises(ValueError, match="named mean_fields"):
        fused_mean.build_fused_mean_factory(count_name="n")


def test_one_sum_per_round():
    # The point of the module: one federated_sum where MeanFactory has two.
    value_type = tff.to_type(tuple(tff.TensorType(np.float32, s) for s in SHAPES))

    def sums(factory):
        text = factory.create(value_type, WEIGHT).next.to_building_block().compact_representation()
        return text.count("federated_sum")

    assert sums(fused_mean.build_fused_mean_factory()) == 1
    assert sums(tff.aggregators.MeanFactory()) == 2
