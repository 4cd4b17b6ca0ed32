"""Client work: TFF's own model-delta client update, plus what pruning needs.

Local training is TFF's own model-delta update on the tfmot-wrapped model,
unchanged: `build_model_delta_update_with_tff_optimizer`, the loop inside
`tff.learning.templates.build_model_delta_client_work`, with `DATASET_ITERATOR`
(a hand-written client loop measured 4x slower per round). Each wrapper
multiplies its kernel by the broadcast mask before every batch, so clients
train inside the mask. What this module adds runs in the same TF computation
as the training, one call per client and round as in stock FedAvg
(`LocalTraining`), selected by the masking mode (`masking_modes.py`):

* `server`: the upload is masked by the broadcast mask (`delta * mask`). The
  last optimizer step moves pruned coordinates by one gradient step, which the
  server's re-mask would remove anyway, but would make the upload dense.
  With `--structure=neuron|filter` the dropped units' biases and BatchNorm
  gamma/beta (which tfmot does not mask) are masked the same way, so the
  upload is exactly unit-sparse.
* `client` / `both` (`--prune_granularity=round`): in round r a client trains
  inside the broadcast mask (in `both` the server's mask; in `client` the
  union of the previous round's client masks, `server_masking.keep_client_support`),
  then prunes its trained kernels to the schedule's sparsity for round r (per
  kernel with `--sparsity_distribution=erk`, `layer_budgets.py`) with
  the same `masking.compute_masks` rule the server uses, restricted to the
  mask it trained in, and uploads the delta that turns the broadcast model
  into its pruned model: `m * delta + (1 - m) * broadcast`. The broadcast
  model itself is never re-pruned to the server's rule by the client.
  (`--prune_granularity=step` clients prune inside local training instead:
  `step_pruning.py`.)
* `none`: TFF's local training on the plain model; the update passes through.

Every mode also measures what an efficient upload would cost (`uplink_bytes`,
summed over the round's clients) on the actual client updates.

With `--regrow=gradient` (modes `server`, `both`) clients also upload, in
rounds that end with a topology adjustment, their top-k gradients at the
broadcast model for the server's growth (`regrow_gradients.py`); the update
becomes `OrderedDict(model=<the update above>, regrow_gradient=...)` and
`uplink_bytes` includes the k (index, value) pairs.

With `--regrow_at=client` (FedDST, mode `both`) clients adjust their own
masks after pruning in adjustment rounds (`client_regrowth.py`): they drop
their smallest kept weights and grow as many, at 0, by random draws or their
own gradient, and upload the adjusted masks in the usual payload.

State: `OrderedDict(hparams=<TFF client optimizer hparams>, round=int32)`,
where `round` counts completed rounds (round r trains with `round == r - 1`);
plus `schedule` when clients prune, and `regrow_key` (int64 [2], `[seed, 0]`)
with `--regrow_at=client --regrow=random`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from fedprune.errors import check
from fedprune.federated import client_regrowth, encodings, regrow_gradients
from fedprune.federated.masking_modes import MaskingMode, masking_mode
from fedprune.federated.server_masking import build_initial_schedule
from fedprune.pruning import mask_aggregation, regrowth, structured
from fedprune.pruning.masking import MaskSpec, compute_masks
from fedprune.pruning.schedules import ScheduleTable, kernel_sparsity, table_lookup
from fedprune.pruning.wrappers import PruningLayout


def uplink_bytes(tensors, known_masks, quantization: str = encodings.NO_QUANTIZATION):
    """Bytes of the smallest encoding of each tensor, summed (TF ops; int64 scalar).

    The closed forms of `encodings.py` (dense b N, bitmap ceil(N/8) + b nnz,
    coordinate list (4 + b) nnz, and b |mask| for values inside a mask the
    receiver knows, valid only when the tensor is zero outside that mask; b = 4
    bytes per float32 value, 2 for `fp16`, 1 for `int8`, which adds a 4-byte
    scale per tensor), evaluated on the client's actual update before
    quantization (its positions are what is written); tests check them against
    the measured encodings.

    Args:
      tensors: float tensors (one client's update).
      known_masks: per tensor, the 0/1 mask the server broadcast, or None.
      quantization: the values' wire format (`--upload_quantization`).
    """
    import tensorflow as tf

    b = encodings.value_bytes(quantization)
    side = encodings.scale_bytes(quantization)
    total = tf.constant(0, tf.int64)
    for tensor, mask in zip(tensors, known_masks, strict=True):
        n = tensor.shape.num_elements()
        nnz = tf.math.count_nonzero(tensor, dtype=tf.int64)
        sizes = [tf.constant(b * n, tf.int64), -(-n // 8) + b * nnz, (4 + b) * nnz]
        if mask is not None:
            inside = tf.math.count_nonzero(mask, dtype=tf.int64)
            zero_outside = tf.equal(tf.math.count_nonzero(tensor * (1.0 - mask)), 0)
            sizes.append(tf.where(zero_outside, b * inside, tf.constant(b * n, tf.int64)))
        total += side + tf.reduce_min(tf.stack(sizes))
    return total


@dataclasses.dataclass(frozen=True)
class LocalTraining:
    """TFF's model-delta local training, as `build_model_delta_client_work` sets it up.

    For client computations that run TFF's own client loop (`DATASET_ITERATOR`)
    and then their own TF ops in the same computation: one worker call per
    client and round, as in stock FedAvg, instead of a second `federated_map`
    per client (the speed section of BENCHMARKS.md compares fedprune `none`
    with stock FedAvg on the same loop). `DATASET_ITERATOR` rather than TFF's
    default `DATASET_REDUCE`: about 3x faster per round here, with bit-identical
    weights (BUILD_NOTES.md, "Round-time profile"; BENCHMARKS.md, rows (c) and
    (c-iter)).

    Attributes:
      model_fn: no-arg callable returning a fresh `tff.learning.models.VariableModel`.
      client_optimizer: the `tff.learning.optimizers.Optimizer` of local steps.
      weights_type, data_type: TFF types of the broadcast `ModelWeights` and of
        a client's dataset.
      hparams: the optimizer's hyperparameters (the client work's state), and
        `hparams_type` their TFF type.
      metric_finalizers: the model's `metric_finalizers()` (name -> callable
        of the summed unfinalized metric), as TFF's `sum_then_finalize` reads them.
    """

    model_fn: Callable
    client_optimizer: object
    weights_type: object
    data_type: object
    hparams: object
    hparams_type: object
    metric_finalizers: collections.OrderedDict

    def build(self):
        """(TFF's client update `tf.function`, the model it trains); call inside a computation.

        The update is `client_update(optimizer, broadcast_weights, dataset,
        hparams) -> (ClientResult(update=broadcast - trained, update_weight=
        number of examples), unfinalized metrics)`.
        """
        import tensorflow_federated as tff
        from tensorflow_federated.python.learning.templates import model_delta_client_work

        built = []

        def keep_model():
            built.append(self.model_fn())
            return built[-1]

        client_update = model_delta_client_work.build_model_delta_update_with_tff_optimizer(
            model_fn=keep_model, weighting=tff.learning.ClientWeighting.NUM_EXAMPLES,
            loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
        return client_update, built[0]

    def measurements(self, metrics, uplink_bytes):
        """`<train=finalized metrics, uplink_bytes=int64>@SERVER`; call in a federated computation.

        TFF's `sum_then_finalize` of the clients' unfinalized metrics, with the
        clients' upload bytes (int64 per client) in the same `federated_sum`:
        one pass over the round's clients instead of two (`fused_mean.py` says
        why that matters).
        """
        import tensorflow_federated as tff

        total = tff.federated_sum(tff.federated_zip(
            collections.OrderedDict(train=metrics, uplink_bytes=uplink_bytes)))

        @tff.tensorflow.computation(total.type_signature.member)
        def finalize(summed):
            return collections.OrderedDict(
                train=collections.OrderedDict(
                    (name, finalizer(summed["train"][name]))
                    for name, finalizer in self.metric_finalizers.items()),
                uplink_bytes=summed["uplink_bytes"])

        return tff.federated_map(finalize, total)


def local_training(model_fn: Callable, client_optimizer) -> LocalTraining:
    """Types, optimizer hyperparameters and metric aggregation of TFF's local training."""
    import tensorflow as tf
    import tensorflow_federated as tff

    with tf.Graph().as_default():  # as TFF's builder: no variables in the global context
        model = model_fn()
        metric_finalizers = collections.OrderedDict(model.metric_finalizers())
    # As TFF's builder: the hyperparameters of an optimizer state for a whimsy spec.
    hparams = client_optimizer.get_hparams(
        client_optimizer.initialize(tf.TensorSpec(shape=(), dtype=tf.float32)))

    @tff.federated_computation
    def server_hparams():
        return tff.federated_value(hparams, tff.SERVER)

    return LocalTraining(
        model_fn=model_fn, client_optimizer=client_optimizer,
        weights_type=tff.learning.models.weights_type_from_model(model),
        data_type=tff.SequenceType(tff.types.tensorflow_to_type(model.input_spec)),
        hparams=hparams, hparams_type=server_hparams.type_signature.result.member,
        metric_finalizers=metric_finalizers)


def _prune_kernels(kernels, spec: MaskSpec, sparsity, started, within=None):
    """Masks for `kernels` by `spec` at `sparsity`, or all-ones before pruning has started.

    With `within` (0/1 masks holding at least the level's count; magnitude,
    unstructured) the largest |w| inside them are kept first, then exact zeros
    inside them (`regrowth.vote_scores`), so a mask restricted to `within` keeps
    exactly the level's count even when weights inside are 0 (grown at 0 and
    never moved by training).
    """
    import tensorflow as tf

    def prune():
        if within is None:
            return compute_masks(kernels, spec, sparsity)
        return list(spec.criterion.masks(regrowth.vote_scores(kernels, within), sparsity))

    return tf.cond(started, prune, lambda: [tf.ones_like(k) for k in kernels])


def build_pruning_client_work(
    *,
    model_fn,
    client_optimizer,
    masking: str | MaskingMode,
    layout: PruningLayout | None,
    table: ScheduleTable,
    mask_spec: MaskSpec,
    units: structured.StructuredLayout | None = None,
    upload_quantization: str = encodings.NO_QUANTIZATION,
    regrow_fractions: np.ndarray | None = None,
    client_regrow: regrowth.RegrowSpec | None = None,
):
    """Builds the client work for one masking mode.

    Args:
      model_fn: no-arg callable returning a fresh `tff.learning.models.VariableModel`
        (the tfmot-wrapped model if the mode `wraps_model`).
      client_optimizer: a `tff.learning.optimizers.Optimizer` for local steps.
      masking: a `masking_modes.MaskingMode` or its name (`--masking`).
      layout: positions of pruned kernels and masks (None for `none`).
      table: the schedule evaluated per round: the initial value of the
        state's `schedule` in modes that `client_prunes` (a state of the same
        shapes with another table runs that table; `schedules.schedule_data`).
      mask_spec: the mask rule clients use in modes that `client_prunes`.
      units: for `--structure=neuron|filter` (mode `server` only): the
        unit-pruned layers, whose biases and BatchNorm gamma/beta uploads are
        masked by the unit mask the broadcast kernel mask holds.
      upload_quantization: the wire format of the uploaded values, for the
        byte count (`quantization.py` does the quantizing, in the aggregator).
      regrow_fractions: f_r per round for `--regrow=gradient` at the server:
        clients upload top-k gradients in adjustment rounds.
      client_regrow: `--regrow_at=client` (a mode whose clients prune): each
        client adjusts its own masks after pruning (`client_regrowth.py`).

    Returns:
      A `tff.learning.templates.ClientWorkProcess` with type signature
      `(<hparams=H, round=int32[, schedule=S][, regrow_key=int64[2]]>@SERVER,
      ModelWeights@CLIENTS, data@CLIENTS) ->
      (state@SERVER, ClientResult(update=U, update_weight=float32)@CLIENTS,
      <train=metrics, uplink_bytes=int64>@SERVER)`, where U is the trainable
      weights' delta, or for `client`/`both` `mask_aggregation.client_payload`
      (delta, kernel masks, pruned kernels) so the server can combine masks;
      with `regrow_fractions`, U is `OrderedDict(model=<that>,
      regrow_gradient=<float32 per pruned kernel>)`. `round` counts completed
      rounds; `schedule` (modes that `client_prunes`) is `schedule_data(table)`,
      of which the server broadcasts the row of the round being trained.
    """
    mode = masking_mode(masking)
    import tensorflow as tf
    import tensorflow_federated as tff

    training = local_training(model_fn, client_optimizer)
    weights_type, data_type = training.weights_type, training.data_type
    round_type = tff.TensorType(np.int32)
    kernels = layout.kernels if layout is not None else ()
    kernel_idx = [k.trainable_index for k in kernels]
    mask_idx = [k.mask_index for k in kernels]
    client_prunes = mode.client_prunes
    initial_schedule = build_initial_schedule(table)
    adjusting = client_regrow is not None and client_regrow.enabled
    check(not adjusting or client_prunes, "regrow_at", "client",
          "server unless clients prune (client_regrowth.py)")
    by_random = adjusting and client_regrow.rule == "random"
    if adjusting:
        client_fractions = client_regrow.fractions(len(table.sparsity) - 1)

    # What the server sends clients that prune, from its state.
    parts_types = [("schedule", initial_schedule.type_signature.result), ("round", round_type)]
    if by_random:

        @tff.tensorflow.computation
        def initial_regrow_key():
            return tf.constant([client_regrow.seed, 0], tf.int64)

        parts_types.append(("regrow_key", initial_regrow_key.type_signature.result))

    @tff.tensorflow.computation(tff.StructWithPythonType(parts_types, collections.OrderedDict))
    def schedule_row(parts):
        """What clients need of the schedule in round `round + 1`."""
        data, this_round = parts["schedule"], parts["round"] + 1
        row = collections.OrderedDict(sparsity=kernel_sparsity(data, this_round),
                                      started=table_lookup(data["started"], this_round))
        if adjusting:
            row["fraction"] = table_lookup(client_fractions, this_round)
        if by_random:
            row["key"] = tf.random.experimental.stateless_fold_in(
                parts["regrow_key"], tf.cast(this_round, tf.int64))
        return row

    def finish_body(result, broadcast, row, scores=None):
        delta = list(result.update)
        start_masks = [broadcast.non_trainable[j] for j in mask_idx]
        if client_prunes:
            final = [
                (broadcast.trainable[i] - delta[i]) * m
                for i, m in zip(kernel_idx, start_masks, strict=True)
            ]
            end_masks = _prune_kernels(final, mask_spec, row["sparsity"], row["started"],
                                       within=start_masks if scores is not None else None)
            end_masks = [e * m for e, m in zip(end_masks, start_masks, strict=True)]
        else:
            end_masks = start_masks
        kept_masks = end_masks  # where the client's model keeps its values
        if scores is not None:  # --regrow_at=client: grown weights are 0, in the mask
            kept_masks, end_masks = client_regrowth.adjust_masks(
                [f * m for f, m in zip(final, end_masks, strict=True)], end_masks,
                row["fraction"], list(scores))
        dependents = []  # (trainable index, its 0/1 mask) of unit-pruned biases, gamma, beta
        for p in units.layers if units is not None else ():
            unit_mask = structured.unit_mask_of(
                broadcast.non_trainable[mask_idx[kernel_idx.index(p.kernel_index)]])
            dependents += [(i, structured.unit_index_mask(unit_mask, repeat))
                           for i, repeat in structured.dependent_weights(p)]
        for i, m in [*zip(kernel_idx, kept_masks, strict=True), *dependents]:
            delta[i] = m * delta[i] + (1.0 - m) * broadcast.trainable[i]
        # The server knows the mask it broadcast: values inside it suffice when
        # the update is zero outside it.
        known = [None] * len(delta)
        for i, j in zip(kernel_idx, mask_idx, strict=True):
            known[i] = broadcast.non_trainable[j]
        for i, m in dependents:
            known[i] = m
        sent = uplink_bytes(delta, known, upload_quantization)
        if client_prunes:
            pruned = [f * m for f, m in zip(final, kept_masks, strict=True)]
            update = mask_aggregation.client_payload(delta, pruned, end_masks)
            # The masks ride along as bitmaps (their values are implied by the delta).
            sent += sum(-(-int(np.prod(m.shape)) // 8) for m in end_masks)
        else:
            update = tuple(delta)
        client_result = tff.learning.templates.ClientResult(
            update=update, update_weight=result.update_weight
        )
        return client_result, sent

    def client_body(optimizer_hparams, broadcast, dataset, row):
        """One client's round: TFF's local training, then `finish_body`, in one computation."""
        client_update, _ = training.build()
        result, metrics = client_update(client_optimizer, broadcast, dataset, optimizer_hparams)
        scores = None
        if adjusting:  # growth scores of the client (`client_regrowth.grow_scores`)
            trained = tff.learning.models.ModelWeights(
                tuple(b - d for b, d in zip(broadcast.trainable, result.update, strict=True)),
                broadcast.non_trainable)
            scores = client_regrowth.grow_scores(
                client_regrow.rule, model_fn=model_fn, trained=trained,
                update=list(result.update), data=dataset,
                key=row["key"] if by_random else None, fraction=row["fraction"],
                kernel_indices=kernel_idx)
        client_result, sent = finish_body(result, broadcast, row, scores)
        return client_result, metrics, sent

    # One TF computation per client and round (as stock FedAvg's): clients that
    # prune also receive their round's row of the schedule.
    if client_prunes:
        client_step = tff.tensorflow.computation(
            client_body, training.hparams_type, weights_type, data_type,
            schedule_row.type_signature.result)
    else:
        client_step = tff.tensorflow.computation(
            lambda optimizer_hparams, broadcast, dataset: client_body(
                optimizer_hparams, broadcast, dataset, None),
            training.hparams_type, weights_type, data_type)

    gradients = None
    if regrow_fractions is not None:
        gradients = regrow_gradients.build_client_gradients(
            model_fn=model_fn, weights_type=weights_type, data_type=data_type, layout=layout,
            fractions=regrow_fractions)
        result_type = client_step.type_signature.result[0]
        gradient_type, bytes_type = gradients.type_signature.result

        @tff.tensorflow.computation(result_type, bytes_type, gradient_type, bytes_type)
        def attach_gradients(result, sent, gradient, gradient_bytes):
            update = collections.OrderedDict([(regrow_gradients.MODEL_KEY, result.update),
                                              (regrow_gradients.GRADIENT_KEY, gradient)])
            client_result = tff.learning.templates.ClientResult(
                update=update, update_weight=result.update_weight)
            return client_result, sent + gradient_bytes

    @tff.federated_computation
    def init_fn():
        state = collections.OrderedDict(
            hparams=tff.federated_value(training.hparams, tff.SERVER),
            round=tff.federated_value(np.int32(0), tff.SERVER))
        if client_prunes:
            state["schedule"] = tff.federated_eval(initial_schedule, tff.SERVER)
        if by_random:
            state["regrow_key"] = tff.federated_eval(initial_regrow_key, tff.SERVER)
        return tff.federated_zip(state)

    state_type = init_fn.type_signature.result

    @tff.tensorflow.computation(round_type)
    def increment(round_num):
        return round_num + 1

    @tff.federated_computation(
        state_type,
        tff.FederatedType(weights_type, tff.CLIENTS),
        tff.FederatedType(data_type, tff.CLIENTS),
    )
    def next_fn(state, weights, client_data):
        client_args = [tff.federated_broadcast(state.hparams), weights, client_data]
        if client_prunes:
            parts = collections.OrderedDict(schedule=state.schedule, round=state.round)
            if by_random:
                parts["regrow_key"] = state.regrow_key
            client_args.append(tff.federated_broadcast(
                tff.federated_map(schedule_row, tff.federated_zip(parts))))
        result, metrics, upload_bytes = tff.federated_map(client_step, tuple(client_args))
        if gradients is not None:
            gradient, gradient_bytes = tff.federated_map(
                gradients, (weights, client_data, tff.federated_broadcast(state.round)))
            result, upload_bytes = tff.federated_map(
                attach_gradients, (result, upload_bytes, gradient, gradient_bytes))
        new_state = collections.OrderedDict(
            hparams=state.hparams, round=tff.federated_map(increment, state.round))
        if client_prunes:
            new_state["schedule"] = state.schedule
        if by_random:
            new_state["regrow_key"] = state.regrow_key
        new_state = tff.federated_zip(new_state)
        return tff.templates.MeasuredProcessOutput(
            new_state, result, training.measurements(metrics, upload_bytes))

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
