"""`--regrow=gradient` (RigL at the server): the clients' top-k gradients and their mean.

RigL (Evci et al. 2020) grows the pruned coordinates where the magnitude of
the dense gradient is largest. Its federated form here (server regrowth, as in
FedTiny and jaxpruner's server-side RigL):

* In a round that ends with an adjustment (f_r > 0, `regrowth.RegrowSpec.
  fractions`), each sampled client computes, at the **broadcast** model (no
  local step taken), the gradient of its mean loss over all its data w.r.t.
  each pruned kernel: the batch gradients weighted by batch size, one pass,
  the same `forward_pass(training=True)` its local training runs. tfmot's
  wrapper writes `kernel * mask` into the kernel variable and the layer reads
  that variable, so the gradient w.r.t. the variable is the dense gradient at
  the masked weights (pruned coordinates included).
* Per pruned kernel it keeps its k' coordinates of largest |gradient| among
  those pruned in the broadcast mask (`regrowth.top_k_pruned`), with
  k' = `regrowth.grow_count(broadcast mask, f_r)` = min(floor(f_r |m|), N - |m|):
  the server's k for the layer whenever the level did not fall since the
  broadcast (schedules only raise sparsity), so the server never needs more.
  An efficient client sends them as k' (int32 index, float32 value) pairs,
  `encodings.encode_top_k`: 8 k' bytes per kernel, added to `uplink_bytes`
  (so to `bytes_up`). In rounds without an adjustment k' = 0: nothing is
  computed, sent or counted.
* In the simulation the pairs travel scattered into a dense zero tensor, next
  to the model update in the client's `ClientResult` (`OrderedDict(model=
  <update>, regrow_gradient=<one tensor per pruned kernel>)`); the aggregator
  (`build_gradient_aggregator`) runs the model's own aggregator on `model` and
  TFF's `federated_mean` weighted by the client weight (the number of
  examples, as for the model mean) on `regrow_gradient`. The server's grow
  scores are |that mean| (`server_masking.adjust_topology`): the
  example-weighted sum of the clients' sparse gradients divided by the total
  weight, which ranks coordinates as the sum does.

Departures from RigL: the gradient is a mean over the round's clients of each
client's full-data gradient, not one mini-batch; each client sends only its
own top-k', so a coordinate's aggregate lacks the clients that did not rank
it (a truncated sum); coordinates the schedule's re-mask prunes in this very
round were kept in the broadcast, carry no uploaded gradient and score 0, so
they grow only after every candidate with a gradient (ties: lower index).
"""

from __future__ import annotations

import collections

import numpy as np

from fedprune.federated import encodings
from fedprune.pruning import regrowth
from fedprune.pruning.schedules import table_lookup
from fedprune.pruning.wrappers import PruningLayout

GRADIENT_KEY = "regrow_gradient"
MODEL_KEY = "model"


def build_client_gradients(*, model_fn, weights_type, data_type, layout: PruningLayout,
                           fractions: np.ndarray):
    """The client's upload in adjustment rounds (see the module docstring).

    Args:
      model_fn: no-arg callable returning the client's `VariableModel` (wrapped).
      weights_type: the broadcast `ModelWeights` TFF type.
      data_type: the client dataset's `tff.SequenceType`.
      layout: where the pruned kernels and their masks are.
      fractions: f_r per round (`RegrowSpec.fractions`); 0: no adjustment.

    Returns:
      A `tff.tensorflow.computation` `(ModelWeights, data, round=int32) ->
      (<float32 kernel-shaped>..., int64)`: per pruned kernel the client's
      top-k' gradient entries scattered into zeros, and their encoded size,
      `encodings.TOP_K_ENTRY_BYTES` * sum k'. `round` counts completed rounds
      (this is round `round + 1`).
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    kernel_idx = [k.trainable_index for k in layout.kernels]
    mask_idx = [k.mask_index for k in layout.kernels]
    shapes = [weights_type.trainable[i].shape for i in kernel_idx]

    @tff.tensorflow.computation(weights_type, data_type, tff.TensorType(np.int32))
    def client_gradients(broadcast, data, round_num):
        model = model_fn()
        masks = [broadcast.non_trainable[j] for j in mask_idx]
        fraction = table_lookup(fractions, round_num + 1)

        dense = kernel_gradients_if(fraction > 0, model, broadcast, data, kernel_idx)
        uploads, entries = [], tf.constant(0, tf.int64)
        for gradient, mask, shape in zip(dense, masks, shapes, strict=True):
            k = regrowth.grow_count(mask, fraction)  # 0 without an adjustment
            indices, values = regrowth.top_k_pruned(gradient, mask, k)
            uploads.append(regrowth.scatter_dense(indices, values, shape))
            entries += tf.cast(k, tf.int64)
        return tuple(uploads), entries * encodings.TOP_K_ENTRY_BYTES

    return client_gradients


def kernel_gradients_if(needed, model, weights, data, kernel_indices) -> tuple:
    """`mean_kernel_gradients` when the bool tensor `needed` holds, else zeros (TF ops).

    The pass over the client's data runs only in rounds that use it (an
    adjustment round); the assignments run inside their own `tf.function`.
    """
    import tensorflow as tf

    @tf.function
    def dense_gradients():
        return mean_kernel_gradients(model, weights, data, kernel_indices)

    def no_gradients():
        return tuple(tf.zeros(weights.trainable[i].shape, tf.float32) for i in kernel_indices)

    return tf.cond(needed, dense_gradients, no_gradients)


def mean_kernel_gradients(model, weights, data, kernel_indices) -> tuple:
    """The gradient of a client's mean loss over `data` at `weights`, per kernel (TF ops).

    Assigns `weights` (`ModelWeights`) to `model`'s variables, so call it inside
    a `tf.function` (see docs/design.md, "Variable assignments inside TFF
    computations"). One pass over the batches, each batch's gradient weighted
    by its size, the `forward_pass(training=True)` of local training. tfmot's
    wrapper writes kernel * mask into the kernel variable and the layer reads
    it, so this is the dense gradient at the masked weights, pruned
    coordinates included.

    Args:
      model: the client's `tff.learning.models.VariableModel` (wrapped).
      weights: `ModelWeights` values to evaluate the gradient at.
      data: the client's dataset of batches.
      kernel_indices: positions of the kernels among the trainable weights.

    Returns:
      float32 tensors, one per kernel (zeros for an empty dataset).
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    variables = tff.learning.models.ModelWeights.from_model(model)
    for variable, value in zip(variables.trainable, weights.trainable, strict=True):
        variable.assign(value)
    for variable, value in zip(variables.non_trainable, weights.non_trainable, strict=True):
        variable.assign(value)
    kernels = [variables.trainable[i] for i in kernel_indices]
    sums = tuple(tf.zeros(k.shape, tf.float32) for k in kernels)
    count = tf.constant(0.0)
    for batch in data:
        with tf.GradientTape() as tape:
            output = model.forward_pass(batch, training=True)
        grads = tape.gradient(output.loss, kernels)
        n = tf.cast(output.num_examples, tf.float32)
        sums = tuple(s + n * g for s, g in zip(sums, grads, strict=True))
        count += n
    return tuple(s / tf.maximum(count, 1.0) for s in sums)


def build_gradient_aggregator(inner):
    """Wraps a weighted aggregation factory for `OrderedDict(model=U, regrow_gradient=G)`.

    The created process runs `inner` on `model` (its state and measurements
    are the process's) and `tff.federated_mean` weighted by the client weight
    on `regrow_gradient`; its result is `OrderedDict(model=<inner's result>,
    regrow_gradient=<weighted mean>)@SERVER`.
    """
    import tensorflow_federated as tff

    class GradientAggregationFactory(tff.aggregators.WeightedAggregationFactory):
        """`inner` on the model update, a weighted mean on the regrowth gradients."""

        def create(self, value_type, weight_type):
            model = inner.create(getattr(value_type, MODEL_KEY), weight_type)

            @tff.federated_computation(
                model.initialize.type_signature.result,
                tff.FederatedType(value_type, tff.CLIENTS),
                tff.FederatedType(weight_type, tff.CLIENTS),
            )
            def next_fn(state, value, weight):
                output = model.next(state, getattr(value, MODEL_KEY), weight)
                gradient = tff.federated_mean(getattr(value, GRADIENT_KEY), weight)
                result = tff.federated_zip(collections.OrderedDict(
                    [(MODEL_KEY, output.result), (GRADIENT_KEY, gradient)]))
                return tff.templates.MeasuredProcessOutput(output.state, result,
                                                           output.measurements)

            return tff.templates.AggregationProcess(model.initialize, next_fn)

    return GradientAggregationFactory()


def gradient_scores(gradients):
    """Grow scores from the aggregate gradients: |g|, 0 where not finite (TF ops)."""
    import tensorflow as tf

    return [tf.where(tf.math.is_finite(g), tf.abs(g), tf.zeros_like(g)) for g in gradients]
