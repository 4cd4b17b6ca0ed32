"""How clients' pruned models are combined, and how masks behave under aggregation.

When clients prune locally (masking `client` and `both`), their masks differ,
and plain averaging of their weights revives every weight that any client kept.
Each client therefore also uploads its kernel masks, and the server combines
by one of three rules (`--mask_aggregation`):

  average   weighted FedAvg of the deltas; the server mask (in `both`) decides.
            A weight that every client pruned is exactly 0 (the mean of the
            deltas alone would leave b - sum_c w_c b / sum_c w_c, ~1e-8).
  nonzero   per weight, the example-weighted average over the clients that
            kept it (zero where none did): sum_i w_i m_i x_i / sum_i w_i m_i.
  majority  a weight survives when at least half the round's clients keep it
            (an unweighted vote); survivors take the FedAvg value.

Diagnostics, computed on the server every round (fractions of the pruned
kernels' weights):

  mask_drift           Hamming distance between the previous and the new
                       global mask (the zero pattern of the broadcast kernels).
  regrowth             of the weights pruned in the previous global model, the
                       fraction that are nonzero after aggregation and the
                       optimizer step, before the server's re-mask.
  client_sparsity      the round's clients' mean mask sparsity (unweighted),
                       from the same keep counts: 1 - sum c / (n N). In
                       `client` mode the global model is the union of the
                       clients' masks, so it is denser than this.
  client_mask_jaccard  pooled pairwise Jaccard agreement of the round's client
                       masks: sum over pairs |m_i & m_j| / sum over pairs
                       |m_i | m_j|, exact from per-weight keep counts c:
                       sum_pairs |m_i & m_j| = sum c (c - 1) / 2 and
                       sum_pairs |m_i | m_j| = (n - 1) sum c - sum_pairs |m_i & m_j|.
                       (The pooled ratio, not the mean of per-pair ratios, which
                       would need every client's mask at the server.)
"""

from __future__ import annotations

import collections

import numpy as np

RULES = ("average", "nonzero", "majority")


def client_payload(delta, final_kernels, masks):
    """What a pruning client uploads: its delta, its kernel masks, its kept values.

    Args:
      delta: the client's update tensors (one per trainable weight).
      final_kernels: the client's pruned kernels (zero off its mask), in layout order.
      masks: the client's 0/1 kernel masks, in layout order.

    Returns:
      `OrderedDict(delta=..., kept=masks, kept_values=final_kernels)`.
    """
    return collections.OrderedDict(
        delta=tuple(delta), kept=tuple(masks), kept_values=tuple(final_kernels)
    )


# The payload fields whose weighted mean each rule reads (`pseudo_delta`); the
# others are not averaged (`kept` is always summed into `kept_count`).
MEAN_FIELDS = {"average": ("delta",), "majority": ("delta",),
               "nonzero": ("delta", "kept", "kept_values")}


def build_mask_aggregator(rule: str):
    """A weighted aggregation factory for `client_payload` values.

    Args:
      rule: one of RULES: which payload fields are averaged (`MEAN_FIELDS`).

    Returns a `tff.aggregators.WeightedAggregationFactory` whose process maps
    client payloads and weights to `OrderedDict(mean=<weighted mean of the
    rule's MEAN_FIELDS>, kept_count=<per-weight number of clients keeping it>,
    num_clients=float32)` at the server.
    """
    from fedprune.federated import fused_mean

    # One client map, one federated_sum, one server map (`fused_mean.py`).
    return fused_mean.build_fused_mean_factory(
        mean_fields=MEAN_FIELDS[rule], sum_fields={"kept_count": "kept"},
        count_name="num_clients")


def pseudo_delta(rule: str, current, aggregate, kernel_indices):
    """The update the server optimizer applies, and the survivors' vote masks (TF ops).

    Args:
      rule: one of RULES.
      current: the global trainable weights the clients started from.
      aggregate: the aggregator's output (see `build_mask_aggregator`).
      kernel_indices: positions of the pruned kernels among the trainable weights.

    Returns:
      (delta tuple, votes): with server SGD at learning rate 1, `current - delta`
      is the rule's combined model. `votes` are 0/1 masks per kernel for
      `majority` (None otherwise) that the server applies after the optimizer.
    """
    import tensorflow as tf

    mean = aggregate["mean"]
    delta = list(mean["delta"])
    votes = None
    if rule == "average":
        someone = aggregate["num_clients"] > 0
        for j, i in enumerate(kernel_indices):
            nobody = tf.logical_and(tf.equal(aggregate["kept_count"][j], 0.0), someone)
            # Exactly `current` there, so that current - delta is exactly 0.
            delta[i] = tf.where(nobody, tf.convert_to_tensor(current[i]), delta[i])
    elif rule == "nonzero":
        for j, i in enumerate(kernel_indices):
            kept, values = mean["kept"][j], mean["kept_values"][j]
            combined = tf.math.divide_no_nan(values, kept)  # 0 where no client kept it
            delta[i] = current[i] - combined
    elif rule == "majority":
        n = aggregate["num_clients"]
        votes = [tf.cast(2.0 * count >= n, count.dtype) for count in aggregate["kept_count"]]
    return tuple(delta), votes


def support_masks(rule: str, aggregate, old_masks):
    """The global masks of `--masking=client`: the union of the round's client masks (TF).

    What survives the rule: a weight some client kept (`average`, `nonzero`),
    or at least half of the clients kept (`majority`). A round without
    clients keeps `old_masks`.
    """
    import tensorflow as tf

    n = aggregate["num_clients"]
    masks = []
    for count, old in zip(aggregate["kept_count"], old_masks, strict=True):
        keep = 2.0 * count >= n if rule == "majority" else count > 0.0
        masks.append(tf.where(n > 0, tf.cast(keep, old.dtype), old))
    return masks


def mean_client_sparsity(kept_counts, num_clients):
    """The clients' mean mask sparsity over all pruned kernels, 1 - sum c / (n N) (TF)."""
    import tensorflow as tf

    total = float(sum(int(np.prod(c.shape)) for c in kept_counts))
    kept = tf.add_n([tf.reduce_sum(c) for c in kept_counts])
    n = tf.cast(num_clients, tf.float32)
    return tf.where(n > 0, 1.0 - tf.math.divide_no_nan(kept, n * total), 0.0)


def pooled_jaccard(kept_counts, num_clients):
    """Pooled pairwise Jaccard agreement of client masks from per-weight keep counts (TF)."""
    import tensorflow as tf

    counts = tf.concat([tf.reshape(c, [-1]) for c in kept_counts], axis=0)
    n = tf.cast(num_clients, tf.float32)
    intersections = tf.reduce_sum(counts * (counts - 1.0) / 2.0)
    unions = (n - 1.0) * tf.reduce_sum(counts) - intersections
    return tf.math.divide_no_nan(intersections, unions)


def mask_drift(old_kernels, new_kernels):
    """Fraction of kernel weights whose zero/nonzero state changed (TF)."""
    import tensorflow as tf

    # tf.not_equal, not `!=`: inside TFF's graphs `!=` on tensors is Python identity.
    changed = sum(tf.math.count_nonzero(tf.not_equal(tf.not_equal(o, 0.0), tf.not_equal(n, 0.0)))
                  for o, n in zip(old_kernels, new_kernels, strict=True))
    total = sum(int(np.prod(o.shape)) for o in old_kernels)
    return tf.cast(changed, tf.float32) / float(total)


def regrowth(old_kernels, aggregated_kernels):
    """Of the weights zero in `old_kernels`, the fraction nonzero in `aggregated_kernels` (TF)."""
    import tensorflow as tf

    pruned = sum(tf.math.count_nonzero(tf.equal(o, 0.0)) for o in old_kernels)
    regrown = sum(tf.math.count_nonzero(tf.logical_and(tf.equal(o, 0.0), tf.not_equal(a, 0.0)))
                  for o, a in zip(old_kernels, aggregated_kernels, strict=True))
    return tf.math.divide_no_nan(tf.cast(regrown, tf.float32), tf.cast(pruned, tf.float32))
