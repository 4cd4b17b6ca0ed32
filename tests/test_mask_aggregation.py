"""Mask aggregation rules and diagnostics: hand-built clients, then the whole process.

The rules are checked by what they compute: golden numbers on hand-built
client uploads (each derived in a comment), and, end to end, one round of the
pruning process with four clients against the rule applied by hand to what
each client uploads on its own.
"""

import collections
import dataclasses

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedprune.federated import communication
from fedprune.federated import process as fp_process
from fedprune.federated.client_work import uplink_bytes
from fedprune.model import builders
from fedprune.pruning import mask_aggregation, masking, schedules

# One 4-weight kernel; the broadcast model is all ones. Each client prunes to
# its own mask; its delta turns the broadcast into its pruned model.
CURRENT = np.ones(4, np.float32)
MASKS = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0]], np.float32)
FINALS = np.array([[2, 4, 0, 0], [4, 0, 6, 0], [6, 0, 0, 0]], np.float32)
WEIGHTS = [1.0, 1.0, 2.0]  # examples per client

# Two clients (1 and 3 examples), a 3-weight kernel: weight 1 is kept by exactly
# half of the clients, the tie that `majority` keeps.
TIE_MASKS = np.array([[1, 1, 0], [1, 0, 0]], np.float32)
TIE_FINALS = np.array([[2, 4, 0], [6, 0, 0]], np.float32)
TIE_WEIGHTS = [1.0, 3.0]


pytestmark = pytest.mark.usefixtures("tff_local_context")


def _aggregate(finals, masks, weights, rule="nonzero"):
    """The mask aggregator's server output for hand-built client uploads (`rule`'s fields)."""
    current = np.ones(finals.shape[1], np.float32)
    payloads = [mask_aggregation.client_payload((current - f,), (f,), (m,))
                for f, m in zip(finals, masks, strict=True)]
    kernel = (tff.TensorType(np.float32, [finals.shape[1]]),)
    value_type = tff.to_type(collections.OrderedDict(delta=kernel, kept=kernel,
                                                     kept_values=kernel))
    process = mask_aggregation.build_mask_aggregator(rule).create(value_type,
                                                                  tff.TensorType(np.float32))
    return process.next(process.initialize(), payloads, weights).result


@pytest.fixture(scope="module")
def aggregate(tff_local_context):
    return _aggregate(FINALS, MASKS, WEIGHTS)


def _combined(rule, aggregate):
    current = np.ones(aggregate["mean"]["delta"][0].shape, np.float32)
    delta, votes = mask_aggregation.pseudo_delta(rule, (tf.constant(current),), aggregate, [0])
    combined = current - np.asarray(delta[0])
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
    # The rule's own aggregator averages only the fields the rule reads, to the same result.
    own = _aggregate(FINALS, MASKS, WEIGHTS, rule)
    assert tuple(own["mean"]) == mask_aggregation.MEAN_FIELDS[rule]
    np.testing.assert_array_equal(_combined(rule, own), _combined(rule, aggregate))
    np.testing.assert_array_equal(own["kept_count"][0], aggregate["kept_count"][0])


@pytest.mark.parametrize(
    "rule, expected",
    [
        # FedAvg with weights 1 and 3: (2 + 3*6)/4 = 5, (4 + 0)/4 = 1, 0.
        ("average", [5.0, 1.0, 0.0]),
        # Weight 0 kept by both: (2 + 3*6)/(1 + 3) = 5; weight 1 only by client 1 (its 4).
        ("nonzero", [5.0, 4.0, 0.0]),
        # Keep counts 2, 1, 0 of 2: 2*1 >= 2 keeps the tie at FedAvg's 1 (not client 1's 4).
        ("majority", [5.0, 1.0, 0.0]),
    ],
)
def test_rules_on_a_half_and_half_tie(rule, expected):
    aggregate = _aggregate(TIE_FINALS, TIE_MASKS, TIE_WEIGHTS)
    np.testing.assert_array_equal(aggregate["kept_count"][0], [2, 1, 0])
    assert aggregate["num_clients"] == 2
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


# --------------------------------------------------------------------------
# End to end: one round of the pruning process with clients that prune.

# Clients of 10, 7, 4 and 2 batches of 16 digits: 160, 112, 64 and 32 examples,
# the weights of the weighted rules.
CLIENT_BATCHES = (10, 7, 4, 2)


@dataclasses.dataclass
class RuleRound:
    """Round 1 of the pruning process under one rule, and each client's upload alone."""

    kernel_idx: list  # positions of the pruned kernels among the trainable weights
    alone: list  # per client: the global trainable weights after a round with it alone
    together: list  # the global trainable weights after the round with all clients
    diagnostics: dict  # that round's mask diagnostics


@pytest.fixture(scope="module")
def rule_rounds(digits_clients):
    """rule -> `RuleRound` (MLP 64-16-10, masking `client`, 50 % from round 1), run once."""
    clients = [ds.take(n) for ds, n in zip(digits_clients(4, 640), CLIENT_BATCHES, strict=True)]
    done = {}

    def get(rule):
        if rule not in done:
            pp = fp_process.build_pruning_process(
                model_builder=lambda: builders.mlp((64,), 10, hidden=(16,)),
                input_spec=clients[0].element_spec, masking="client",
                schedule=schedules.ConstantSparsity(0.5, begin_round=1),
                mask_spec=masking.MaskSpec(), num_rounds=1,
                client_optimizer=fp_process.make_optimizer("sgd", 0.1),
                server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0,
                mask_aggregation=rule)
            assert pp.table.sparsity[1] == 0.5  # clients prune to 50 % at the end of round 1
            state = pp.process.initialize()

            def run(cohort):
                output = pp.process.next(state, cohort)
                weights = pp.process.get_model_weights(output.state).trainable
                return [np.asarray(w) for w in weights], output.metrics["finalizer"]["masks"]

            together, diagnostics = run(clients)
            done[rule] = RuleRound([k.trainable_index for k in pp.layout.kernels],
                                   [run([client])[0] for client in clients], together,
                                   {k: float(v) for k, v in diagnostics.items()})
        return done[rule]

    return get


def _pooled_jaccard(masks):
    """Sum over client pairs of |m_i & m_j| over sum of |m_i | m_j|, pair by pair."""
    pairs = [(a, b) for a in range(len(masks)) for b in range(a + 1, len(masks))]
    inter = sum(np.sum(masks[a] * masks[b]) for a, b in pairs)
    union = sum(np.sum(np.maximum(masks[a], masks[b])) for a, b in pairs)
    return inter / union


def _top_half(values):
    """0/1 mask of the larger half of |values| (a client's 50 % magnitude mask)."""
    mask = np.zeros(values.size, np.float32)
    mask[np.argsort(-np.abs(values).ravel(), kind="stable")[:values.size // 2]] = 1
    return mask.reshape(values.shape)


def _uploads(result: RuleRound, i: int):
    """The clients' uploads of trainable weight i: (values x_c, masks m_c or None).

    Alone in a round, a client's upload is the global model: its kernels pruned to
    50 % per layer (zero off its mask) and its biases. Clients train
    deterministically (unshuffled batches), so in the 4-client round they upload
    the same. The server's w * delta / w can leave float residue (~1e-8) where the
    delta cancels the broadcast weight, so a kernel's mask is read as the larger
    half of |x_c| and the residue is dropped.
    """
    values = [a[i] for a in result.alone]
    if i not in result.kernel_idx:
        return values, None
    masks = [_top_half(v) for v in values]
    assert max(np.abs(v[m == 0]).max() for v, m in zip(values, masks, strict=True)) < 1e-6
    return [v * m for v, m in zip(values, masks, strict=True)], masks


W = np.array([16.0 * n for n in CLIENT_BATCHES])  # examples: the clients' weights


def _weighted(arrays):
    return sum(w * a for w, a in zip(W, arrays, strict=True))


@pytest.mark.parametrize("rule", mask_aggregation.RULES)
def test_rules_end_to_end_combine_what_each_client_uploaded(rule_rounds, rule):
    result = rule_rounds(rule)
    n = len(CLIENT_BATCHES)
    all_masks, all_counts = [], []
    for i, together in enumerate(result.together):
        values, masks = _uploads(result, i)
        fedavg = _weighted(values) / W.sum()
        if masks is None:  # biases: example-weighted FedAvg under every rule
            np.testing.assert_allclose(together, fedavg, rtol=1e-5, atol=1e-7)
            continue
        count = sum(masks)
        all_masks.append(masks)
        all_counts.append(count.ravel())
        if rule == "average":
            expected = fedavg
        elif rule == "nonzero":  # sum_c w_c m_c x_c / sum_c w_c m_c, 0 where nobody kept it
            kept_weight = _weighted(masks)
            expected = np.where(kept_weight > 0,
                                _weighted(values) / np.maximum(kept_weight, 1e-30), 0.0)
        else:  # majority: FedAvg where at least half of the clients kept the weight
            expected = fedavg * (2 * count >= n)
        np.testing.assert_allclose(together, expected, rtol=1e-5, atol=1e-7)
    # The clients' masks differ (the rules differ only there): weights kept by
    # some clients only (nonzero != average), by fewer than half (majority drops
    # them) and by exactly half (majority keeps them).
    counts = np.concatenate(all_counts)
    assert np.isin([0, 1, 2, 3, 4], counts).all(), np.bincount(counts.astype(int))

    # The round's diagnostics: the clients' masks' Jaccard agreement, pooled over
    # both kernels and all pairs; nothing pruned before round 1 to regrow (0 / 0
    # is reported as 0); and, the initial kernels having no zeros, a mask drift
    # equal to the new kernels' fraction of exact zeros.
    pooled = _pooled_jaccard([np.concatenate([m[c].ravel() for m in all_masks])
                              for c in range(n)])
    assert result.diagnostics["client_mask_jaccard"] == pytest.approx(pooled, rel=1e-5)
    assert result.diagnostics["regrowth"] == 0.0
    kernels = [result.together[i] for i in result.kernel_idx]
    zeros = sum(np.sum(k == 0) for k in kernels) / sum(k.size for k in kernels)
    assert result.diagnostics["mask_drift"] == pytest.approx(zeros, rel=1e-6)
    if rule != "average":  # zero exactly where nobody kept (majority: fewer than half)
        assert zeros == np.mean(2 * counts < n if rule == "majority" else counts == 0)


@pytest.mark.parametrize("rule", mask_aggregation.RULES)
def test_every_rule_leaves_exact_zeros_where_every_client_pruned(rule_rounds, rule):
    # `average` used to leave b - sum_c w_c b / sum_c w_c there (float residue, ~1e-8),
    # which sparsity, nonzero counts and mask_drift counted as kept weights.
    result = rule_rounds(rule)
    nobody_total = 0
    for i in result.kernel_idx:
        _, masks = _uploads(result, i)
        nobody = sum(masks) == 0
        nobody_total += int(nobody.sum())
        np.testing.assert_array_equal(result.together[i][nobody], 0.0)
        # Alone in a round, a client's pruned weights are exact zeros too (50 % of each kernel).
        for alone in result.alone:
            assert np.count_nonzero(alone[i]) == alone[i].size // 2
    assert nobody_total > 0


def test_average_exact_zero_on_hand_built_clients(aggregate):
    # Weight 3 is pruned by all three clients; a broadcast of ones must give exactly 0.
    current = np.full(4, 0.1, np.float32)  # 0.1 is not exact in binary: residue-prone
    payloads = aggregate["mean"]["delta"][0] + (current - 1.0)
    shifted = dict(aggregate, mean=dict(aggregate["mean"], delta=(payloads,)))
    delta, _ = mask_aggregation.pseudo_delta("average", (tf.constant(current),), shifted, [0])
    combined = current - np.asarray(delta[0])
    assert combined[3] == 0.0
    np.testing.assert_allclose(combined, [4.5, 1.0, 1.5, 0.0], rtol=1e-6)


def _unfused_reference(rule, value_type, payloads, weights):
    """The aggregator as separate intrinsics: MeanFactory, a sum of masks, a client count."""
    fields = mask_aggregation.MEAN_FIELDS[rule]
    mean_type = tff.StructWithPythonType(
        [(f, getattr(value_type, f)) for f in fields], collections.OrderedDict)
    mean = tff.aggregators.MeanFactory().create(mean_type, tff.TensorType(np.float32))

    @tff.tensorflow.computation(value_type.kept)
    def one(kept):
        del kept
        return np.float32(1.0)

    @tff.federated_computation(tff.FederatedType(value_type, tff.CLIENTS),
                               tff.FederatedType(tff.TensorType(np.float32), tff.CLIENTS))
    def reference(value, weight):
        averaged = tff.federated_zip(collections.OrderedDict((f, value[f]) for f in fields))
        return (mean.next(mean.initialize(), averaged, weight).result,
                tff.federated_sum(value.kept),
                tff.federated_sum(tff.federated_map(one, value.kept)))

    return reference(payloads, weights)


@pytest.mark.parametrize("rule", mask_aggregation.RULES)
def test_fused_aggregator_equals_separate_intrinsics(rule):
    # Seven clients with uneven weights and random two-kernel payloads: the one
    # fused sum gives bit for bit what MeanFactory and two more sums give.
    rng = np.random.default_rng(7)
    shapes = [(5, 3), (3, 2)]
    kernels = tuple(tff.TensorType(np.float32, s) for s in shapes)
    value_type = tff.to_type(collections.OrderedDict(
        delta=kernels + (tff.TensorType(np.float32, [3]),), kept=kernels, kept_values=kernels))
    payloads, weights = [], []
    for c in range(7):
        masks = tuple((rng.random(s) < 0.5).astype(np.float32) for s in shapes)
        values = tuple(m * rng.normal(size=s).astype(np.float32)
                       for m, s in zip(masks, shapes, strict=True))
        delta = tuple(rng.normal(size=s).astype(np.float32) for s in shapes + [(3,)])
        payloads.append(mask_aggregation.client_payload(delta, values, masks))
        weights.append(float(3 * c + 1))
    process = mask_aggregation.build_mask_aggregator(rule).create(value_type,
                                                                  tff.TensorType(np.float32))
    output = process.next(process.initialize(), payloads, weights)
    mean, kept_count, num_clients = _unfused_reference(rule, value_type, payloads, weights)
    assert num_clients == output.result["num_clients"] == 7.0
    for got, want in zip(tf.nest.flatten((output.result["mean"], output.result["kept_count"])),
                         tf.nest.flatten((mean, kept_count)), strict=True):
        np.testing.assert_array_equal(got, want)
