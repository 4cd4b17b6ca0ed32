"""An example-weighted mean with one `federated_sum` per round.

`tff.aggregators.MeanFactory` computes sum_c w_c x_c / sum_c w_c with one
client-side map (w_c x_c) and two `federated_sum`s (the weighted values, the
weights), and callers that also need unweighted sums (the masks' keep counts,
the number of clients: `mask_aggregation.py`) add one more intrinsic per sum.
TFF's C++ executor runs every CLIENTS-placed intrinsic as one TF call per
client, so each extra intrinsic costs a pass over the round's clients
(`docs/design.md`, "One sum per round"; timings in BUILD_NOTES.md). This factory
sends one struct per client, (w_c x_c, w_c, the summed fields, 1), through one
`federated_sum`, and divides at the server: the same operations in the same
client order as MeanFactory, so its mean is bit for bit MeanFactory's
(`tests/test_fused_mean.py`).

State and measurements keep MeanFactory's types (both empty structs), so
server states, checkpoints and metrics are those of a MeanFactory process.
"""

from __future__ import annotations

import collections
from collections.abc import Mapping, Sequence

import numpy as np


def build_fused_mean_factory(
    *,
    mean_fields: Sequence[str] | None = None,
    sum_fields: Mapping[str, str] | None = None,
    count_name: str | None = None,
    no_nan_division: bool = False,
):
    """A `tff.aggregators.WeightedAggregationFactory`: weighted mean and sums in one pass.

    Args:
      mean_fields: None to average the whole client value (the process's
        result is the weighted mean, as MeanFactory's); else the names of the
        fields of a named-struct value to average.
      sum_fields: with `mean_fields`, result name -> value field of the fields
        summed unweighted over the clients (e.g. masks into keep counts).
      count_name: with `mean_fields`, the result name of the number of clients
        (float32), or None for none.
      no_nan_division: as MeanFactory's: a zero total weight gives a zero
        mean instead of 0/0.

    Returns:
      A factory whose process maps client values and float32 weights to the
      mean (`mean_fields=None`), else to `OrderedDict(mean=OrderedDict(<mean
      field>: <weighted mean>), <sum name>: <sum>, ..., [<count_name>: n])`.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    sum_fields = dict(sum_fields or {})
    if mean_fields is None and (sum_fields or count_name):
        raise ValueError("sum_fields and count_name need named mean_fields")

    def divide(x, total):
        total = tf.cast(total, x.dtype)
        return tf.math.divide_no_nan(x, total) if no_nan_division else tf.math.divide(x, total)

    class FusedMeanFactory(tff.aggregators.WeightedAggregationFactory):
        """MeanFactory's weighted mean, plus unweighted sums, through one federated_sum."""

        def create(self, value_type, weight_type):
            # MeanFactory's state and measurements: those of its two inner
            # SumFactory processes, all empty (tests/test_fused_mean.py
            # checks that the type signatures are MeanFactory's).
            @tff.federated_computation
            def init_fn():
                return tff.federated_value(
                    collections.OrderedDict(value_sum_process=(), weight_sum_process=()),
                    tff.SERVER)

            @tff.tensorflow.computation(value_type, weight_type)
            def summands(value, weight):
                if mean_fields is None:
                    averaged = value
                else:
                    averaged = collections.OrderedDict((f, value[f]) for f in mean_fields)
                parts = collections.OrderedDict(
                    weighted=tf.nest.map_structure(
                        lambda x: x * tf.cast(weight, x.dtype), averaged),
                    weight=weight)
                for name, field in sum_fields.items():
                    parts[name] = value[field]
                if count_name is not None:
                    parts[count_name] = np.float32(1.0)
                return parts

            @tff.tensorflow.computation(summands.type_signature.result)
            def finish(total):
                averaged = tf.nest.map_structure(
                    lambda x: divide(x, total["weight"]), total["weighted"])
                if mean_fields is None:
                    return averaged
                result = collections.OrderedDict(mean=averaged)
                for name in [*sum_fields, *([count_name] if count_name else [])]:
                    result[name] = total[name]
                return result

            @tff.federated_computation(
                init_fn.type_signature.result,
                tff.FederatedType(value_type, tff.CLIENTS),
                tff.FederatedType(weight_type, tff.CLIENTS),
            )
            def next_fn(state, value, weight):
                total = tff.federated_sum(tff.federated_map(summands, (value, weight)))
                measurements = tff.federated_value(
                    collections.OrderedDict(mean_value=(), mean_weight=()), tff.SERVER)
                return tff.templates.MeasuredProcessOutput(
                    state, tff.federated_map(finish, total), measurements)

            return tff.templates.AggregationProcess(init_fn, next_fn)

    return FusedMeanFactory()
