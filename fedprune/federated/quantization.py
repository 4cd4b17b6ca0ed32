"""Quantized uploads (`--upload_quantization`): clients send their update's values narrower.

A `tff.aggregators.WeightedAggregationFactory` (`QuantizedMeanFactory`) that
wraps the weighted mean (TFF's `MeanFactory` by default): at each client it
quantizes every tensor of the update and dequantizes it, in one
`tff.federated_map`, then hands the dequantized update to the inner mean.
The wire payload is the quantized form, whose exact bytes `encodings.py`
produces (`encode(..., quantization=...)`) and the client work counts
(`client_work.uplink_bytes`). Dequantizing before the sum is forced by the
per-client scale: codes of clients with different scales cannot be summed.
TFF's `EncodedSumFactory` places the "decode before sum" part of its
encoders the same way.

* `fp16`: a cast to IEEE half floats and back (round to nearest even;
  |x| > 65504 becomes inf, which a model update never reaches in practice).
* `int8`: per tensor, scale = max|x| / 127 (float32); y = x / scale is rounded
  **stochastically**, up with probability y - floor(y), so the dequantized
  value codes * scale is an unbiased estimate of x and is off by less than
  one step (scale). Zeros stay exactly 0, so a masked update stays zero off
  its mask and the mask encodings still apply.

**Randomness**: stateless, so a run is deterministic given its seed. The
aggregator keeps the run's seed and a round counter r in its state (r counts
`next` calls: r = round - 1) and broadcasts both; the seed of a client's
tensor i is
`stateless_fold_in(stateless_fold_in([seed, r], f), i)`, where f is a
fingerprint (`tf.fingerprint`) of the client's own unquantized update: TFF
gives a computation placed at clients no client index, and an update is a
function of the client's data and the broadcast model, so f tells the
round's clients apart and is reproducible. Two clients with bit-identical
updates would draw the same rounding noise. The seed is data, not a traced
constant, so the cells of a grid that differ in their seed share one traced
process (`PruningProcess.for_cell` writes it into the initial state).

**Pruning clients** (`--masking=client|both`) upload
`mask_aggregation.client_payload`, `OrderedDict(delta, kept, kept_values)`:
the same factory, with `fields=QUANTIZED_PAYLOAD_FIELDS`, quantizes the float
fields (`delta`, `kept_values`; the seed's fingerprint covers them, in that
order, and i counts their tensors) and passes the 0/1 masks (`kept`) through
as bits, around `mask_aggregation.build_mask_aggregator`. Zeros stay zeros,
so the keep counts and the pruned positions are those of the unquantized
payload. Per kernel the server reads one of the two float fields (the delta
for `--mask_aggregation=average|majority`, the kept values for `nonzero`),
so the wire carries one float tensor per kernel (`client_work.py` counts the
delta's encoding, which bounds the kept values': those lie inside the
client's mask, inside the broadcast one).

The numpy codec (`encodings.quantize_int8`) implements the same rule with a
numpy generator; tests check both against each other's bounds.
"""

from __future__ import annotations

import collections

import numpy as np

from fedprune.federated.encodings import FP16, INT8, INT8_LEVELS, NO_QUANTIZATION, QUANTIZATIONS

# The fields of `mask_aggregation.client_payload` that hold float values (the
# third, `kept`, holds the 0/1 masks, which are sent as bits).
QUANTIZED_PAYLOAD_FIELDS = ("delta", "kept_values")


def quantize_dequantize(tensor, quantization: str, seed=None):
    """The float32 tensor a server decodes from one quantized tensor (TF ops).

    Args:
      tensor: a float32 tensor (one tensor of a client update).
      quantization: one of `encodings.QUANTIZATIONS`.
      seed: int64 shape-[2] stateless seed for `int8`'s stochastic rounding.

    Returns:
      float32 tensor of the same shape: `tensor` for `none`, the fp16 round
      trip for `fp16`, codes * scale for `int8`.
    """
    import tensorflow as tf

    if quantization == NO_QUANTIZATION:
        return tensor
    if quantization == FP16:
        return tf.cast(tf.cast(tensor, tf.float16), tensor.dtype)
    if quantization != INT8:
        raise ValueError(f"unknown quantization {quantization!r}; expected one of "
                         f"{QUANTIZATIONS}")
    scale = tf.reduce_max(tf.abs(tensor)) / float(INT8_LEVELS)
    scaled = tf.math.divide_no_nan(tensor, scale)
    low = tf.floor(scaled)
    uniform = tf.random.stateless_uniform(tf.shape(tensor), seed=seed, dtype=tensor.dtype)
    codes = low + tf.cast(uniform < scaled - low, tensor.dtype)
    codes = tf.clip_by_value(codes, -float(INT8_LEVELS), float(INT8_LEVELS))
    return codes * scale


def client_seed(base_seed, round_num, tensors):
    """The stateless seed of one client's rounding: ([base_seed, round] folded with a fingerprint).

    Args:
      base_seed: the run's seed (`--seed`): an int or an int64 scalar tensor
        (the aggregator's state holds it).
      round_num: int32 scalar tensor, the aggregator's round counter.
      tensors: the client's unquantized update tensors (their bytes are fingerprinted).

    Returns:
      int64 shape-[2] seed.
    """
    import tensorflow as tf

    base = tf.cast(tf.convert_to_tensor(base_seed, dtype_hint=tf.int64), tf.int64)
    seed = tf.stack([base, tf.cast(round_num, tf.int64)])
    return fold_in_fingerprint(seed, tensors)


def fold_in_fingerprint(seed, tensors):
    """`seed` (int64 [2]) folded with `tf.fingerprint` of float32 `tensors`' bytes (TF ops).

    A client's stateless seed: TFF gives a computation placed at clients no
    client index, and a client's update is a function of its data and the
    broadcast model.
    """
    import tensorflow as tf

    flat = tf.concat([tf.reshape(t, [-1]) for t in tensors], axis=0)
    digest = tf.fingerprint(tf.reshape(tf.bitcast(flat, tf.int32), [1, -1]))[0]
    return tf.random.experimental.stateless_fold_in(seed, tf.bitcast(digest, tf.int64))


def quantize_update(value, quantization: str, seed, round_num, fields=None):
    """One client's update as the server decodes it (TF ops; the body of the client-side map).

    Args:
      value: the update: a sequence of float32 tensors, or with `fields` a
        mapping of named fields (`mask_aggregation.client_payload`).
      quantization: `fp16` or `int8`.
      seed: the run's seed, an int or an int64 scalar tensor.
      round_num: int32 scalar tensor, the aggregator's round counter.
      fields: None (every tensor of `value` is quantized) or the names of
        the fields whose tensors are; the other fields pass through unchanged.

    Returns:
      A tuple of the dequantized tensors (`fields=None`), else an
      `OrderedDict` of `value`'s fields in order, the chosen ones dequantized.
      Tensor i of the quantized ones (in field order) is rounded with seed
      `stateless_fold_in(client_seed(seed, round_num, <those tensors>), i)`.
    """
    import tensorflow as tf

    if fields is None:
        chosen = list(value)
    else:
        chosen = [t for name in fields for t in tf.nest.flatten(value[name])]
    base = client_seed(seed, round_num, chosen)
    decoded = [quantize_dequantize(t, quantization,
                                   tf.random.experimental.stateless_fold_in(base, i))
               for i, t in enumerate(chosen)]
    if fields is None:
        return tuple(decoded)
    out = collections.OrderedDict()
    for name in value:
        if name in fields:
            count = len(tf.nest.flatten(value[name]))
            out[name] = tf.nest.pack_sequence_as(value[name], decoded[:count])
            decoded = decoded[count:]
        else:
            out[name] = value[name]
    return out


def build_quantized_mean_factory(quantization: str, *, seed: int, inner=None, fields=None):
    """A weighted aggregation factory that quantizes each client's update first.

    Args:
      quantization: `fp16` or `int8` (`none` needs no wrapper).
      seed: the run's seed, the initial value of the state's `seed`; with the
        aggregator's round counter and the client's update fingerprint it seeds
        `int8`'s rounding (module docstring).
      inner: the weighted factory of the dequantized updates (default:
        `tff.aggregators.MeanFactory()`).
      fields: None for a plain delta (a tuple of tensors, all quantized), or
        the names of the fields of a structured update to quantize, e.g.
        `QUANTIZED_PAYLOAD_FIELDS` for pruning clients' payloads around
        `mask_aggregation.build_mask_aggregator(rule)`.

    Returns:
      A `tff.aggregators.WeightedAggregationFactory`. Its process's state is
      `OrderedDict(inner=<inner state>, round=int32, seed=int64)@SERVER` and its
      result and measurements are the inner process's.
    """
    import tensorflow_federated as tff

    if quantization not in (FP16, INT8):
        raise ValueError(f"quantization must be {FP16} or {INT8}, got {quantization!r}")
    inner = inner or tff.aggregators.MeanFactory()

    class QuantizedMeanFactory(tff.aggregators.WeightedAggregationFactory):
        """Quantize at the client, dequantize, then the inner weighted mean."""

        def create(self, value_type, weight_type):
            inner_process = inner.create(value_type, weight_type)
            round_type, seed_type = tff.TensorType(np.int32), tff.TensorType(np.int64)

            @tff.tensorflow.computation(value_type, round_type, seed_type)
            def quantize_fn(value, round_num, run_seed):
                return quantize_update(value, quantization, run_seed, round_num, fields)

            @tff.tensorflow.computation(round_type)
            def increment(round_num):
                return round_num + 1

            @tff.federated_computation
            def init_fn():
                return tff.federated_zip(collections.OrderedDict(
                    inner=inner_process.initialize(),
                    round=tff.federated_value(np.int32(0), tff.SERVER),
                    seed=tff.federated_value(np.int64(seed), tff.SERVER)))

            @tff.federated_computation(
                init_fn.type_signature.result,
                tff.FederatedType(value_type, tff.CLIENTS),
                tff.FederatedType(weight_type, tff.CLIENTS),
            )
            def next_fn(state, value, weight):
                decoded = tff.federated_map(quantize_fn, (
                    value, tff.federated_broadcast(state.round),
                    tff.federated_broadcast(state.seed)))
                output = inner_process.next(state.inner, decoded, weight)
                new_state = tff.federated_zip(collections.OrderedDict(
                    inner=output.state, round=tff.federated_map(increment, state.round),
                    seed=state.seed))
                return tff.templates.MeasuredProcessOutput(
                    new_state, output.result, output.measurements)

            return tff.templates.AggregationProcess(init_fn, next_fn)

    return QuantizedMeanFactory()
