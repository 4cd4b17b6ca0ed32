"""Client work of `--prune_granularity=step`: tfmot prunes inside local training.

The clients' wrappers carry the run's schedule in client steps: tfmot's own
`PolynomialDecay` or `ConstantSparsity` (`step_schedule.tfmot_step_schedule`)
as a `step_schedule_data.DataStepSchedule`, the same computation with its
parameters read from the client work's state (broadcast to the clients), so
one traced process runs every step schedule of a grid; with tfmot's
`block_size` / `sparsity_m_by_n` where the structure asks for them. Local
training is TFF's own model-delta update
(`build_model_delta_update_with_tff_optimizer`, the loop inside
`tff.learning.templates.build_model_delta_client_work`, `DATASET_ITERATOR`),
unchanged. On every batch tfmot's wrapper advances its `pruning_step`,
recomputes the mask when the schedule says so at that step
(`Pruning.conditional_mask_update`, tfmot's `_update_mask`: nothing is
re-implemented here), multiplies the kernel by the mask, and the optimizer
steps. What TFF's client work lacks, and this module adds:

* the wrappers' variables after training: TFF returns only the trainable
  delta, so the update runs inside an inner `tf.function` that then reads the
  model's weights (automatic control dependencies order the reads after the
  training; see docs/design.md, "Variable assignments inside TFF computations");
* tfmot's end-of-epoch re-mask (`UpdatePruningStep.on_epoch_end`): the last
  optimizer step moves pruned weights, so the upload is the trained kernels
  times the client's final mask;
* the pruning client's upload (`mask_aggregation.client_payload`: delta, mask,
  kept values) and its size (`client_work.uplink_bytes`), as in round mode.

The broadcast carries the global step: the server sets every wrapper's
`pruning_step` to `(r - 1) * steps_per_round` before round r
(`server_masking`), and the client's wrapper counts on from there. The client's
own step and mask never leave the client: the server keeps the global step,
and the masks it broadcasts are its own (`client`: the union of the clients'
masks; `both`: its re-mask).

State: `OrderedDict(hparams=<TFF client optimizer hparams>, round=int32,
step_schedule=<step_schedule_data.step_schedule_data>)`: as in
`client_work.build_pruning_client_work`, with the step schedule's data.
"""

from __future__ import annotations

import collections

import numpy as np

from fedprune.federated import encodings, masking_modes
from fedprune.federated.client_work import local_training, uplink_bytes
from fedprune.federated.masking_modes import MaskingMode
from fedprune.pruning import mask_aggregation
from fedprune.pruning.wrappers import PruningLayout


def build_step_client_work(*, model_fn, client_optimizer, masking: str | MaskingMode,
                           layout: PruningLayout, schedule,
                           upload_quantization: str = encodings.NO_QUANTIZATION):
    """Builds the client work of pruning clients with tfmot's step schedule.

    Args:
      model_fn: no-arg callable returning a fresh `tff.learning.models.VariableModel`
        of the tfmot-wrapped model whose wrappers carry the step schedule.
      client_optimizer: a `tff.learning.optimizers.Optimizer` for local steps.
      masking: a mode whose clients prune (`client`, `both`), or its name.
      layout: positions of pruned kernels, masks and steps.
      schedule: the `step_schedule_data.DataStepSchedule` the wrappers of
        `model_fn`'s model carry; its `defaults` are the initial value of the
        state's `step_schedule`, which it reads while the clients' training is
        traced (a state with another schedule's data runs that schedule).
      upload_quantization: the wire format of the uploaded values, for the
        byte count (`quantization.py` does the quantizing, in the aggregator).

    Returns:
      A `tff.learning.templates.ClientWorkProcess` with type signature
      `(<hparams=H, round=int32, step_schedule=<step_schedule_data>>@SERVER,
      ModelWeights@CLIENTS, data@CLIENTS) ->
      (state@SERVER, ClientResult(update=mask_aggregation.client_payload,
      update_weight=float32)@CLIENTS, <train=metrics, uplink_bytes=int64>@SERVER)`.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    masking_modes.check_step_granularity(masking_modes.masking_mode(masking))
    training = local_training(model_fn, client_optimizer)
    weights_type, data_type = training.weights_type, training.data_type

    @tff.federated_computation
    def init_fn():
        return tff.federated_zip(collections.OrderedDict(
            hparams=tff.federated_value(training.hparams, tff.SERVER),
            round=tff.federated_value(np.int32(0), tff.SERVER),
            step_schedule=tff.federated_value(schedule.defaults, tff.SERVER)))

    kernel_idx = [k.trainable_index for k in layout.kernels]
    mask_idx = [k.mask_index for k in layout.kernels]

    schedule_type = init_fn.type_signature.result.member.step_schedule

    @tff.tensorflow.computation(training.hparams_type, schedule_type, weights_type, data_type)
    def train_and_prune(optimizer_hparams, step_schedule, broadcast, dataset):
        # The wrappers' schedule reads this cell's data while their training is traced.
        with schedule.bound(step_schedule):
            client_update, client_model = training.build()

            @tf.function
            def train(optimizer_hparams, broadcast, dataset):
                result, metrics = client_update(client_optimizer, broadcast, dataset,
                                                optimizer_hparams)
                after = tff.learning.models.ModelWeights.from_model(client_model)
                return (result, metrics, [v.read_value() for v in after.trainable],
                        [v.read_value() for v in after.non_trainable])

            result, metrics, trained, wrapper_state = train(optimizer_hparams, broadcast,
                                                            dataset)
        masks = [wrapper_state[j] for j in mask_idx]  # tfmot's masks after the last batch
        delta = list(result.update)  # broadcast - trained (zeros if non-finite, weight 0)
        for i, m in zip(kernel_idx, masks, strict=True):
            # The upload turns the broadcast kernel into the trained one times the
            # final mask (UpdatePruningStep's end-of-epoch re-mask).
            delta[i] = m * delta[i] + (1.0 - m) * broadcast.trainable[i]
        known = [None] * len(delta)
        for i, j in zip(kernel_idx, mask_idx, strict=True):
            known[i] = broadcast.non_trainable[j]
        sent = uplink_bytes(delta, known, upload_quantization)
        sent += sum(-(-int(np.prod(m.shape)) // 8) for m in masks)  # the masks as bitmaps
        kept_values = [trained[i] * m for i, m in zip(kernel_idx, masks, strict=True)]
        payload = mask_aggregation.client_payload(delta, kept_values, masks)
        client_result = tff.learning.templates.ClientResult(
            update=payload, update_weight=result.update_weight)
        return client_result, metrics, sent

    @tff.tensorflow.computation(tff.TensorType(np.int32))
    def increment(round_num):
        return round_num + 1

    @tff.federated_computation(init_fn.type_signature.result,
                               tff.FederatedType(weights_type, tff.CLIENTS),
                               tff.FederatedType(data_type, tff.CLIENTS))
    def next_fn(state, weights, client_data):
        hparams_at_clients = tff.federated_broadcast(state.hparams)
        schedule_at_clients = tff.federated_broadcast(state.step_schedule)
        result, metrics, sent = tff.federated_map(
            train_and_prune, (hparams_at_clients, schedule_at_clients, weights, client_data))
        new_state = tff.federated_zip(collections.OrderedDict(
            hparams=state.hparams, round=tff.federated_map(increment, state.round),
            step_schedule=state.step_schedule))
        return tff.templates.MeasuredProcessOutput(
            new_state, result, training.measurements(metrics, sent))

    return tff.learning.templates.ClientWorkProcess(init_fn, next_fn)
