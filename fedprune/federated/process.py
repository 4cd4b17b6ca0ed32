"""Builds the federated pruning process from TFF's learning templates.

    distributor (broadcast ModelWeights incl. masks)
      -> client work (TFF model-delta update on the tfmot-wrapped model + masking, client_work.py)
      -> aggregator (example-weighted mean, `tff.aggregators.MeanFactory`)
      -> finalizer (TFF apply-optimizer + server re-mask, server_masking.py)

joined by `tff.learning.templates.compose_learning_process`. Nothing of FedAvg's
body is forked: with masking `none` the parts are TFF's own and the process
computes exactly `tff.learning.algorithms.build_weighted_fed_avg`.

The masking mode (`masking_modes.py`) selects the parts: with `wraps_model`
the model carries tfmot wrappers; with `client_prunes` the client work prunes
and the aggregator combines clients' masks (`mask_aggregation.py`); with
`server_remasks` the finalizer re-applies the schedule's mask.

Clients prune at the end of local training (`client_work.py`), or with a
`step_mapping` (`--prune_granularity=step`) inside it, with tfmot's own
schedule in client steps (`step_pruning.py`, `fedprune/pruning/step_schedule.py`).
In mode `client` the server only averages, so the global mask is the union of
the clients' masks (denser than the schedule).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from fedprune.errors import check
from fedprune.federated import masking_modes, quantization, regrow_gradients
from fedprune.federated.client_work import build_pruning_client_work
from fedprune.federated.masking_modes import MaskingMode
from fedprune.federated.server_masking import build_masking_finalizer, remask_weights
from fedprune.federated.step_pruning import build_step_client_work
from fedprune.pruning import (
    layer_budgets,
    regrowth,
    step_schedule,
    structured,
    unit_layout,
    wrappers,
)
from fedprune.pruning import mask_aggregation as mask_aggregation_lib
from fedprune.pruning.masking import UNIT_STRUCTURES, MaskSpec
from fedprune.pruning.schedules import RoundSchedule, ScheduleTable

SERVER_OPTIMIZERS = ("sgd", "adam")


def make_optimizer(name: str, learning_rate: float, *, momentum: float = 0.0):
    """A TFF optimizer: `sgd` (with optional heavy-ball momentum) or `adam`.

    Adam uses epsilon 1e-3, as in Reddi et al. (2021) "Adaptive Federated
    Optimization" for FedAdam.
    """
    import tensorflow_federated as tff

    check(name in SERVER_OPTIMIZERS, "server_optimizer", name,
          "one of " + "|".join(SERVER_OPTIMIZERS))
    if name == "adam":
        return tff.learning.optimizers.build_adam(learning_rate, epsilon=1e-3)
    return tff.learning.optimizers.build_sgdm(learning_rate, momentum=momentum or None)


@dataclasses.dataclass
class PruningProcess:
    """A composed learning process and what is needed to read its state.

    Attributes:
      process: the `tff.learning.templates.LearningProcess`.
      masking_mode: the masking mode.
      layout: positions of pruned kernels and masks in `ModelWeights`; for a
        mode that does not wrap the model (`none`), the kernels a pruned run
        would prune (mask indices unused).
      table: the schedule evaluated at rounds 0..num_rounds (with
        `layer_sparsity` per pruned kernel for `--sparsity_distribution=erk`).
      keras_model_fn: builds the Keras model the weights belong to (wrapped
        if `masking_mode.wraps_model`); for evaluation and export.
      units: for `--structure=neuron|filter`, the unit-pruned layers
        (`structured.StructuredLayout` of the wrapped model's weight lists).
      step_mapping: the round -> client step mapping of `--prune_granularity=step`
        (None: round granularity).
    """

    process: object
    masking_mode: MaskingMode
    layout: wrappers.PruningLayout | None
    table: ScheduleTable
    keras_model_fn: Callable
    units: structured.StructuredLayout | None = None
    step_mapping: step_schedule.StepMapping | None = None


def build_pruning_process(
    *,
    model_builder: Callable,
    input_spec,
    masking: str | MaskingMode,
    schedule: RoundSchedule,
    mask_spec: MaskSpec,
    num_rounds: int,
    client_optimizer,
    server_optimizer,
    seed: int,
    prune_output_layer: bool = True,
    mask_aggregation: str = "average",
    model_aggregator=None,
    loss_fn: Callable | None = None,
    metrics_fn: Callable | None = None,
    step_mapping: step_schedule.StepMapping | None = None,
    sparsity_distribution: str = "uniform",
    regrow: regrowth.RegrowSpec | None = None,
    upload_quantization: str = "none",
) -> PruningProcess:
    """Builds the federated pruning process.

    Args:
      model_builder: no-arg callable returning a fresh plain Keras model (logits).
      input_spec: the element spec of a client batch, `OrderedDict(x=..., y=...)`.
      masking: a `masking_modes.MaskingMode` or its name (`--masking`).
      schedule: when and how much to prune, in rounds.
      mask_spec: the mask criterion and structure.
      num_rounds: training rounds (the schedule is tabulated for 0..num_rounds).
      client_optimizer: `tff.learning.optimizers.Optimizer` for local steps.
      server_optimizer: `tff.learning.optimizers.Optimizer` applied to the mean delta.
      seed: seeds the initial model weights.
      prune_output_layer: False leaves the last weighted layer dense.
      mask_aggregation: how clients' pruned models combine in modes whose
        clients prune (`client`, `both`): one of `mask_aggregation.RULES` (see
        that module); `average` in the other modes.
      model_aggregator: a weighted `tff.aggregators` factory for plain deltas
        (default: MeanFactory); modes whose clients prune use the mask aggregator.
      loss_fn: no-arg callable returning a Keras loss (default: sparse CE from logits).
      metrics_fn: no-arg callable returning Keras metrics (default: sparse accuracy).
      step_mapping: prune in client steps (`--prune_granularity=step`, modes
        `client`/`both`): the clients' wrappers carry `schedule` mapped to steps
        by it, the server's table is the step schedule per round, and the
        server's global step after round r is `r * step_mapping.steps_per_round`.
        None prunes at round granularity.
      sparsity_distribution: how each round's global sparsity is split among
        the pruned kernels (`layer_budgets.DISTRIBUTIONS`): `uniform`, every
        kernel at the schedule's level; `erk`, Erdős–Rényi-kernel budgets at
        each round's level (`table.layer_sparsity`).
      regrow: prune and regrow at the server after its re-mask
        (`regrowth.RegrowSpec`; a mode that re-masks, unstructured magnitude
        masks, round granularity). None: no regrowth. Rule `gradient`: clients
        also upload top-k gradients in adjustment rounds
        (`regrow_gradients.py`), aggregated beside the model update.
      upload_quantization: `none`, `fp16` or `int8` (`--upload_quantization`):
        clients' deltas are quantized before the weighted mean
        (`quantization.build_quantized_mean_factory` around `model_aggregator`)
        and `uplink_bytes` counts the values at that width. Modes whose
        clients prune upload a mask payload and are refused.

    Returns:
      A `PruningProcess` whose `process.next` has the type signature
      `(LearningAlgorithmState@SERVER, data@CLIENTS) -> LearningProcessOutput`.

    Raises:
      InvalidArgument: an unknown mode, or a mode the other arguments do not
        fit (`masking_modes.check_*`), before anything is built.
    """
    mode = masking_modes.masking_mode(masking)
    masking_modes.check_schedule(mode, schedule)
    masking_modes.check_mask_aggregation(mode, mask_aggregation)
    if mask_spec.is_unit_structure:
        masking_modes.check_unit_structure(mode, mask_spec.structure)
    layer_budgets.check_distribution(
        sparsity_distribution, masking=mode.name, prunes=mode.wraps_model,
        mask_criterion=mask_spec.mask_criterion,
        mask_scope=mask_spec.mask_scope, structure=mask_spec.structure,
        prune_granularity="round" if step_mapping is None else "step")
    if regrow is not None:
        masking_modes.check_regrowth(mode, regrow.rule)
        if regrow.enabled:
            check(mask_spec.structure == "unstructured" and step_mapping is None
                  and mask_spec.mask_criterion == "magnitude", "regrow", regrow.rule,
                  "none unless --structure=unstructured, --mask_criterion=magnitude and "
                  "--prune_granularity=round")
    masking_modes.check_upload_quantization(mode, upload_quantization)

    import tensorflow as tf
    import tensorflow_federated as tff

    wrapped = mode.wraps_model
    by_gradient = regrow is not None and regrow.rule == "gradient"

    def keras_model_fn():
        model = model_builder()
        if wrapped:
            model = wrappers.wrap_for_pruning(model, prune_output_layer=prune_output_layer)
        return model

    loss_fn = loss_fn or (lambda: tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    metrics_fn = metrics_fn or (lambda: [tf.keras.metrics.SparseCategoricalAccuracy()])
    table = schedule.table(num_rounds)
    client_keras_model_fn = keras_model_fn
    if step_mapping is not None:
        masking_modes.check_step_granularity(mode)
        in_steps = step_schedule.tfmot_step_schedule(schedule, step_mapping)
        table = step_schedule.step_table(in_steps, num_rounds=num_rounds,
                                         steps_per_round=step_mapping.steps_per_round)
        params = {"pruning_schedule": in_steps, **step_schedule.wrapper_params(mask_spec)}

        def client_keras_model_fn():
            return wrappers.wrap_for_pruning(model_builder(), prune_output_layer=prune_output_layer,
                                             pruning_params=params)

    def model_fn():
        return tff.learning.models.from_keras_model(
            client_keras_model_fn(), loss=loss_fn(), input_spec=input_spec, metrics=metrics_fn()
        )

    tf.keras.utils.set_random_seed(seed)
    initial_model = keras_model_fn()
    if wrapped:
        layout = wrappers.pruning_layout(initial_model)
        trainable, non_trainable = wrappers.initial_weights(initial_model, layout)
    else:
        trainable = [v.numpy() for v in initial_model.trainable_weights]
        non_trainable = [v.numpy() for v in initial_model.non_trainable_weights]
        # The kernels a pruned run would prune, for measuring the dense model's
        # sparsity; wrapping keeps the trainable order, so their indices hold.
        layout = wrappers.pruning_layout(
            wrappers.wrap_for_pruning(initial_model, prune_output_layer=prune_output_layer))
    table = layer_budgets.with_layer_budgets(table, [k.shape for k in layout.kernels],
                                             sparsity_distribution)
    units = None
    if mask_spec.is_unit_structure:
        units = _unit_layout(initial_model, layout, mask_spec.structure)
    parts_layout = layout if wrapped else None
    remask = mode.server_remasks
    steps_per_round = step_mapping.steps_per_round if step_mapping is not None else 1
    if step_mapping is not None and mask_spec.structure == "block":
        check(all(len(k.shape) == 2 for k in layout.kernels), "structure", "block",
              "rank-2 kernels with --prune_granularity=step (tfmot's block_size); "
              "convolutions are rank 4")

    @tff.tensorflow.computation
    def initial_model_weights_fn():
        weights = tff.learning.models.ModelWeights(
            tuple(tf.constant(w) for w in trainable), tuple(tf.constant(w) for w in non_trainable)
        )
        if remask:  # the schedule may prune the initial model (begin_round == 0)
            weights = remask_weights(weights, np.int32(0), layout=layout, table=table,
                                     mask_spec=mask_spec, units=units)
        return weights

    weights_type = initial_model_weights_fn.type_signature.result
    if step_mapping is not None:
        client_work = build_step_client_work(model_fn=model_fn,
                                             client_optimizer=client_optimizer,
                                             masking=mode, layout=layout)
    else:
        client_work = build_pruning_client_work(
            model_fn=model_fn,
            client_optimizer=client_optimizer,
            masking=mode,
            layout=parts_layout,
            table=table,
            mask_spec=mask_spec,
            units=units,
            upload_quantization=upload_quantization,
            regrow_fractions=regrow.fractions(num_rounds) if by_gradient else None,
        )
    update_type = client_work.next.type_signature.result.result.member.update
    client_prunes = mode.client_prunes
    if client_prunes:
        factory = mask_aggregation_lib.build_mask_aggregator()
    else:
        factory = model_aggregator or tff.aggregators.MeanFactory()
        if upload_quantization != "none":
            factory = quantization.build_quantized_mean_factory(
                upload_quantization, seed=seed, inner=factory)
    if by_gradient:
        factory = regrow_gradients.build_gradient_aggregator(factory)
    aggregator = factory.create(update_type, tff.TensorType(np.float32))
    aggregate_type = aggregator.next.type_signature.result.result.member
    if by_gradient:
        aggregate_type = getattr(aggregate_type, regrow_gradients.MODEL_KEY)
    finalizer = build_masking_finalizer(
        server_optimizer=server_optimizer,
        model_weights_type=weights_type,
        layout=layout,
        table=table,
        mask_spec=mask_spec,
        remask=remask,
        aggregate_type=aggregate_type if client_prunes else None,
        aggregation_rule=mask_aggregation,
        units=units,
        steps_per_round=steps_per_round,
        regrow=regrow,
    )
    process = tff.learning.templates.compose_learning_process(
        initial_model_weights_fn,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work,
        aggregator,
        finalizer,
    )
    return PruningProcess(process, mode, layout, table, keras_model_fn, units, step_mapping)


def _unit_layout(wrapped_model, layout: wrappers.PruningLayout,
                 structure: str) -> structured.StructuredLayout:
    """The layers `structure` removes units from; each must carry a tfmot wrapper (a mask)."""
    units = structured.restrict(unit_layout.structured_layout(wrapped_model),
                                UNIT_STRUCTURES[structure])
    check(bool(units.layers), "structure", structure,
          "a structure the model has units for: neuron needs Dense hidden layers, filter "
          "convolutions before the output layer")
    wrapped = {k.trainable_index for k in layout.kernels}
    unwrapped = [p.name for p in units.layers if p.kernel_index not in wrapped]
    check(not unwrapped, "structure", structure, f"wrapped layers to prune (not {unwrapped})")
    return units
