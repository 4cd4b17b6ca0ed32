"""Mask aggregation rules and diagnostics on a hand-built three-client example."""

import collections

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedprune import communication, mask_aggregation
from fedprune.client_work import uplink_bytes

# One 4-weight kernel; the broadcast model is all ones. Each client prunes to
# its own mask; its delta turns the broadcast into its pruned model.
CURRENT = np.ones(4, np.float32)
MASKS = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], np.float32)
FINALS = np.array([[2, 4, 0, 0], [4, 0, 6, 0], [6, 0, 0, 0]], np.float32)
WEIGHTS = [1.0, 1.0, 2.0]  # examples per client


pytestmark = pytest.mark.usefixtures("tff_local_context")


@pytest.fixture(scope="module")
def aggregate(tff_local_context):
    payloads = [mask_aggregation.client_payload((CURRENT - f,), (f,), (m,))
                for f, m in zip(FINALS, MASKS, strict=True)]
    kernel = (tff.TensorType(np.float32, [4]),)
    value_type = tff.to_type(collections.OrderedDict(delta=kernel, kept=kernel,
                                                     kept_values=kernel))
    process = mask_aggregation.build_mask_aggregator().create(value_type,
                                                              tff.TensorType(np.float32))
    return process.next(process.initialize(), payloads, WEIGHTS).result


def _combined(rule, aggregate):
    delta, votes = mask_aggregation.pseudo_delta(rule, (tf.constant(CURRENT),), aggregate, [0])
    combined = CURRENT - np.asarray(delta[0])
    if votes is not None:
        combined = combined * np.asarray(votes[0])
    return combined


@pytest.mark.parametrize(
    "rule, expected",
    [
        # Weighted FedAvg of the pruned models: (2 + 4 + 2*6)/4, (4 + 0 + 0)/4, (0 + 6 + 0)/4, 0.
        ("average", [4.5, 1.0, 1.5, 0.0]),
        # Average over the clients that kept each weight: all three; only c1; only c2; none.
        ("nonzero", [4.5, 4.0, 6.0, 0.0]),
        # Keep counts 3, 1, 1, 0 of 3 clients: only weight 0 has >= half; it takes FedAvg's 4.5.
        ("majority", [4.5, 0.0, 0.0, 0.0]),
    ],
)
def test_rules_on_three_clients(aggregate, rule, expected):
    np.testing.assert_allclose(_combined(rule, aggregate), expected, rtol=1e-6)


def test_keep_counts_and_client_count(aggregate):
    np.testing.assert_array_equal(aggregate["kept_count"][0], [3, 1, 1, 0])
    assert aggregate["num_clients"] == 3


def test_pooled_jaccard_matches_pairs(aggregate):
    # Pairs (1,2), (1,3), (2,3): intersections 1, 1, 1; unions 3, 2, 2 -> 3 / 7.
    value = mask_aggregation.pooled_jaccard(aggregate["kept_count"], aggregate["num_clients"])
    assert float(value) == pytest.approx(3 / 7)
    pairs = [(0, 1), (0, 2), (1, 2)]
    inter = sum(np.sum(MASKS[a] * MASKS[b]) for a, b in pairs)
    union = sum(np.sum(np.maximum(MASKS[a], MASKS[b])) for a, b in pairs)
    assert float(value) == pytest.approx(inter / union)


def test_drift_and_regrowth():
    old = [tf.constant([[0.0, 1.0], [0.0, 2.0]])]
    new = [tf.constant([[3.0, 0.0], [0.0, 2.0]])]
    # Zero pattern changed at (0,0) and (0,1): 2 of 4.
    assert float(mask_aggregation.mask_drift(old, new)) == 0.5
    # Of the two weights pruned before, (0,0) came back: 1 of 2.
    assert float(mask_aggregation.regrowth(old, new)) == 0.5


@pytest.mark.parametrize("density", [0.0, 1 / 64, 0.25, 0.9, 1.0])
def test_uplink_closed_form_equals_measured_encodings(density):
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(16, 8)).astype(np.float32)
    mask = (rng.random((16, 8)) < density).astype(np.float32)
    bias = rng.normal(size=8).astype(np.float32)
    tensors = [kernel * mask, bias]
    ours = int(uplink_bytes([tf.constant(t) for t in tensors], [tf.constant(mask), None]))
    theirs = communication.payload_bytes(tensors, known_masks=[mask, None]).sent
    assert ours == theirs
    # Mass off the known mask: masked values are not allowed, the rest still are.
    leaky = [kernel, bias]
    ours = int(uplink_bytes([tf.constant(t) for t in leaky], [tf.constant(mask), None]))
    assert ours == communication.payload_bytes(leaky).sent


def test_payload_structure():
    payload = mask_aggregation.client_payload((1, 2), (3,), (4,))
    assert payload == collections.OrderedDict(delta=(1, 2), kept=(4,), kept_values=(3,))
