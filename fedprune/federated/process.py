"""Builds the federated pruning process from TFF's learning templates.

    distributor (broadcast ModelWeights incl. masks)
      -> client work (TFF model-delta update on the tfmot-wrapped model + masking, client_work.py)
      -> aggregator (example-weighted mean: MeanFactory's, in one sum, fused_mean.py)
      -> finalizer (TFF apply-optimizer + server re-mask, server_masking.py)

joined by `tff.learning.templates.compose_learning_process`, whose `next` then
runs compiled to one TFF MapReduceForm round (`map_reduce.py`: the same ops, bit
for bit). Nothing of FedAvg's body is forked: with masking `none` the parts are
TFF's own and the process computes exactly
`tff.learning.algorithms.build_weighted_fed_avg` (the aggregator's sums fused
into one pass over the clients, bit for bit equal).

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

import collections
import dataclasses
from collections.abc import Callable

import numpy as np

from fedprune.errors import check
from fedprune.federated import (
    fused_mean,
    map_reduce,
    masking_modes,
    quantization,
    regrow_gradients,
)
from fedprune.federated.client_work import build_pruning_client_work
from fedprune.federated.masking_modes import MaskingMode
from fedprune.federated.server_masking import (
    build_initial_schedule,
    build_masking_finalizer,
    remask_weights,
)
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
from fedprune.pruning.schedules import RoundSchedule, ScheduleTable, schedule_data
from fedprune.runtime import autograph

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


def _traced_regrowth(spec: regrowth.RegrowSpec | None) -> regrowth.RegrowSpec | None:
    """What of a regrowth spec a traced process fixes: all of it but the seed, and
    nothing when it does not regrow (None, or rule `none`: no regrowth is traced)."""
    if spec is None or not spec.enabled:
        return None
    return dataclasses.replace(spec, seed=0)


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
    _for_cell: Callable | None = dataclasses.field(default=None, repr=False, compare=False)
    _next: Callable | None = dataclasses.field(default=None, repr=False, compare=False)

    def next(self, state, data):
        """One round: what `process.next(state, data)` returns, in less time.

        The same values, dtypes and Python containers (a `LearningProcessOutput`;
        tested in tests/test_map_reduce.py), from the same compiled round, called
        with the state packed into one array per dtype
        (`map_reduce.PackedNext`): TFF then moves a few arrays to its worker and
        back instead of every state tensor. Round loops call this;
        `process.next` is the TFF computation itself, for TFF's programs.

        Args:
          state: a state of this process (`process.initialize()`, or what a
            round returned).
          data: the round's client datasets, a list.
        """
        if self._next is None:
            return self.process.next(state, data)
        return self._next(state, data)

    def for_cell(self, schedule: RoundSchedule, *, seed: int,
                 regrow: regrowth.RegrowSpec | None = None,
                 step_mapping: step_schedule.StepMapping | None = None) -> PruningProcess:
        """This process for another schedule and seed, without building or tracing anything.

        The schedule is data in the process's state (`schedules.schedule_data`;
        with `--prune_granularity=step` also the clients' step schedule,
        `step_schedule_data.py`, and the steps per round), so a grid's cells
        that differ only in schedule values, final sparsity, seed or step
        mapping share one traced process: the returned `process` is this
        one's, except that `initialize` returns the cell's state (its schedule
        table, the initial weights `seed` gives, re-masked at round 0 as the
        schedule says, `regrow`'s RNG key, and with `--upload_quantization` the
        seed of its rounding). Rounds run exactly as in a process built for the
        cell (tested).

        Args:
          schedule: the cell's schedule, in rounds (validated against the
            masking mode as in `build_pruning_process`).
          seed: seeds the initial model weights (and quantized uploads' rounding).
          regrow: the cell's regrowth spec (None: as built); it may differ from
            the built one only in its seed.
          step_mapping: with `--prune_granularity=step`, the cell's round ->
            step mapping (None: `schedule` mapped with the built process's steps
            per round and frequency). Ignored at round granularity.

        Raises:
          InvalidArgument: what would change the traced computations (another
            regrowth spec than its seed), or a schedule the step mapping refuses.
        """
        return self._for_cell(schedule, seed, regrow, step_mapping)

    @staticmethod
    def model_weights(state):
        """The global `ModelWeights` of a state this process returned.

        What `process.get_model_weights(state)` returns (tested in
        tests/test_process.py), read from the composed state's
        `global_model_weights` in Python instead of through a TFF call (which
        costs a round trip to the worker, ~10 ms, every round).
        """
        return state.global_model_weights


@autograph.plain_modules()  # half the AutoGraph work of a first build, same ops
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
      seed: seeds the initial model weights, and with `upload_quantization` the
        rounding (the initial value of the aggregator state's `seed`).
      prune_output_layer: False leaves the last weighted layer dense.
      mask_aggregation: how clients' pruned models combine in modes whose
        clients prune (`client`, `both`): one of `mask_aggregation.RULES` (see
        that module); `average` in the other modes.
      model_aggregator: a weighted `tff.aggregators` factory for plain deltas
        (default: MeanFactory's mean in one federated_sum, `fused_mean.py`);
        modes whose clients prune use the mask aggregator.
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
      regrow: prune and regrow (`regrowth.RegrowSpec`; unstructured magnitude
        masks, round granularity). None: no regrowth. At the server after its
        re-mask (a mode that re-masks); rule `gradient`: clients also upload
        top-k gradients in adjustment rounds (`regrow_gradients.py`),
        aggregated beside the model update. At the clients (`at == "client"`,
        FedDST, mode `both`): each client adjusts its own masks after pruning
        (`client_regrowth.py`) and the server re-masks their aggregate.
      upload_quantization: `none`, `fp16` or `int8` (`--upload_quantization`):
        clients' deltas are quantized before the weighted mean
        (`quantization.build_quantized_mean_factory` around `model_aggregator`)
        and `uplink_bytes` counts the values at that width. In modes whose
        clients prune, the payload's delta and kept values are quantized and
        its masks pass as bits (around the mask aggregator).

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
        regrowth.check_combination(
            regrow.rule, structure=mask_spec.structure, mask_criterion=mask_spec.mask_criterion,
            prune_granularity="round" if step_mapping is None else "step", at=regrow.at)
        masking_modes.check_regrowth(mode, regrow.rule, regrow.at)
    masking_modes.check_upload_quantization(upload_quantization)

    import tensorflow as tf
    import tensorflow_federated as tff

    wrapped = mode.wraps_model
    regrowing = regrow is not None and regrow.enabled
    at_clients = regrowing and regrow.at == "client"
    by_gradient = regrowing and regrow.rule == "gradient" and not at_clients

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
        from fedprune.pruning.step_schedule_data import DataStepSchedule

        masking_modes.check_step_granularity(mode)
        table, step_data = _step_schedule(schedule, step_mapping, num_rounds)
        # The clients' schedule: tfmot's, with its parameters read from the client
        # work's state (`step_schedule_data.py`), so `for_cell` can change them.
        clients_schedule = DataStepSchedule(step_data)
        params = {"pruning_schedule": clients_schedule, **step_schedule.wrapper_params(mask_spec)}

        def client_keras_model_fn():
            return wrappers.wrap_for_pruning(model_builder(), prune_output_layer=prune_output_layer,
                                             pruning_params=params)

    def model_fn():
        return tff.learning.models.from_keras_model(
            client_keras_model_fn(), loss=loss_fn(), input_spec=input_spec, metrics=metrics_fn()
        )

    def initial_arrays(model_seed: int):
        """(the initial model, its trainable and non-trainable weights) for a seed."""
        tf.keras.utils.set_random_seed(model_seed)
        model = keras_model_fn()
        if wrapped:
            return model, *wrappers.initial_weights(model, wrappers.pruning_layout(model))
        return (model, [v.numpy() for v in model.trainable_weights],
                [v.numpy() for v in model.non_trainable_weights])

    initial_model, trainable, non_trainable = initial_arrays(seed)
    if wrapped:
        layout = wrappers.pruning_layout(initial_model)
    else:
        # The kernels a pruned run would prune, for measuring the dense model's
        # sparsity; wrapping keeps the trainable order, so their indices hold.
        layout = wrappers.pruning_layout(
            wrappers.wrap_for_pruning(initial_model, prune_output_layer=prune_output_layer))
    kernel_shapes = [k.shape for k in layout.kernels]
    table = layer_budgets.with_layer_budgets(table, kernel_shapes, sparsity_distribution)
    units = None
    if mask_spec.is_unit_structure:
        units = _unit_layout(initial_model, layout, mask_spec.structure)
    parts_layout = layout if wrapped else None
    remask = mode.server_remasks
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
            weights = remask_weights(weights, np.int32(0), layout=layout,
                                     schedule=schedule_data(table), mask_spec=mask_spec,
                                     units=units)
        return weights

    weights_type = initial_model_weights_fn.type_signature.result
    if step_mapping is not None:
        client_work = build_step_client_work(model_fn=model_fn,
                                             client_optimizer=client_optimizer,
                                             masking=mode, layout=layout,
                                             schedule=clients_schedule,
                                             upload_quantization=upload_quantization)
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
            client_regrow=regrow if at_clients else None,
        )
    update_type = client_work.next.type_signature.result.result.member.update
    client_prunes = mode.client_prunes
    if client_prunes:
        factory = mask_aggregation_lib.build_mask_aggregator(mask_aggregation)
        fields = quantization.QUANTIZED_PAYLOAD_FIELDS  # the masks go as bits
    else:
        factory = model_aggregator or fused_mean.build_fused_mean_factory()
        fields = None  # a plain delta: every tensor
    if upload_quantization != "none":
        factory = quantization.build_quantized_mean_factory(
            upload_quantization, seed=seed, inner=factory, fields=fields)
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
        steps_per_round=step_mapping.steps_per_round if step_mapping is not None else None,
        regrow=regrow,
    )
    process = tff.learning.templates.compose_learning_process(
        initial_model_weights_fn,
        tff.learning.templates.build_broadcast_process(weights_type),
        client_work,
        aggregator,
        finalizer,
    )
    # The same round, bit for bit, in far fewer federated calls (map_reduce.py).
    compiled = map_reduce.compile_round(process)
    process = compiled.process
    regrow_key = None  # which part's state holds `--regrow=random`'s key
    if regrowing and regrow.at == "server":
        regrow_key = "finalizer"
    elif at_clients and regrow.rule == "random":
        regrow_key = "client_work"
    cell_state = _CellState(process=process, remask=remask,
                            client_schedule=client_prunes and step_mapping is None,
                            steps=step_mapping is not None,
                            regrow_key=regrow_key,
                            aggregator_seed=upload_quantization != "none")
    if remask:
        cell_state.initial_remask = tff.tensorflow.computation(
            lambda weights, data: remask_weights(weights, np.int32(0), layout=layout,
                                                 schedule=data, mask_spec=mask_spec,
                                                 units=units),
            weights_type, build_initial_schedule(table).type_signature.result)

    # seed -> the initial weights it gives (read-only arrays), for `for_cell`: the cells of
    # a grid that share this process and a seed need one Keras model built, not one each.
    initial_by_seed: collections.OrderedDict = collections.OrderedDict()

    def cell_initial_arrays(cell_seed: int) -> tuple[list, list]:
        if cell_seed not in initial_by_seed:
            initial_by_seed[cell_seed] = _read_only(*initial_arrays(cell_seed)[1:])
            while len(initial_by_seed) > _INITIAL_WEIGHTS_CACHE_SIZE:
                initial_by_seed.popitem(last=False)
        else:
            # What building them leaves set: TensorFlow's global seed, which the clients'
            # shuffles read (`datasets.preprocess_client_dataset`), is the cell's.
            tf.keras.utils.set_random_seed(cell_seed)
        return initial_by_seed[cell_seed]

    def for_cell(cell_schedule: RoundSchedule, cell_seed: int,
                 cell_regrow: regrowth.RegrowSpec | None,
                 cell_mapping: step_schedule.StepMapping | None) -> PruningProcess:
        masking_modes.check_schedule(mode, cell_schedule)
        cell_regrow = regrow if cell_regrow is None else cell_regrow
        check(_traced_regrowth(cell_regrow) == _traced_regrowth(regrow), "regrow",
              cell_regrow.rule if cell_regrow else "none",
              f"{regrow.rule if regrow else 'none'}, the regrowth the process was built with "
              "(only its seed may differ)")
        cell_steps = None
        if step_mapping is None:
            cell_mapping, cell_table = None, cell_schedule.table(num_rounds)
        else:
            cell_mapping = cell_mapping or step_schedule.step_mapping(
                cell_schedule, steps_per_round=step_mapping.steps_per_round,
                prune_every_steps=step_mapping.frequency, source=step_mapping.source)
            cell_table, step_data = _step_schedule(cell_schedule, cell_mapping, num_rounds)
            cell_steps = (step_data, cell_mapping.steps_per_round)
        cell_table = layer_budgets.with_layer_budgets(cell_table, kernel_shapes,
                                                      sparsity_distribution)
        cell_trainable, cell_non_trainable = cell_initial_arrays(cell_seed)
        cell_process = _CellProcess(cell_state, schedule_data(cell_table),
                                    cell_trainable, cell_non_trainable, seed=cell_seed,
                                    regrow_seed=cell_regrow.seed if cell_regrow else None,
                                    steps=cell_steps)
        return PruningProcess(cell_process, mode, layout, cell_table, keras_model_fn, units,
                              cell_mapping, for_cell, compiled.next)

    return PruningProcess(process, mode, layout, table, keras_model_fn, units, step_mapping,
                          for_cell, compiled.next)


_INITIAL_WEIGHTS_CACHE_SIZE = 16  # seeds whose initial weights a built process keeps


def _step_schedule(schedule: RoundSchedule, mapping: step_schedule.StepMapping,
                   num_rounds: int) -> tuple[ScheduleTable, collections.OrderedDict]:
    """(the server's per-round table, the clients' `step_schedule_data`) of a step schedule."""
    from fedprune.pruning.step_schedule_data import step_schedule_data

    in_steps = step_schedule.tfmot_step_schedule(schedule, mapping)
    table = step_schedule.step_table(in_steps, num_rounds=num_rounds,
                                     steps_per_round=mapping.steps_per_round)
    return table, step_schedule_data(in_steps)


def _read_only(trainable, non_trainable) -> tuple[list, list]:
    """Copies of the arrays that refuse in-place writes (they are shared between cells)."""
    def frozen(array):
        array = np.array(array)
        array.flags.writeable = False
        return array

    return [frozen(a) for a in trainable], [frozen(a) for a in non_trainable]


@dataclasses.dataclass
class _CellState:
    """What `PruningProcess.for_cell` needs of a built process to write a cell's state."""

    process: object  # the built `LearningProcess`
    remask: bool  # the finalizer's state holds `schedule`
    client_schedule: bool  # the client work's state holds `schedule` (`client_work.py`)
    # --prune_granularity=step: the client work's state holds `step_schedule`
    # (`step_pruning.py`), the finalizer's `steps_per_round`.
    steps: bool
    # "finalizer": `finalizer["regrow"]["key"]` (server regrowth); "client_work":
    # `client_work["regrow_key"]` (random client regrowth); None: no key.
    regrow_key: str | None
    # The aggregator's state holds `seed` (quantized uploads' rounding, `quantization.py`).
    aggregator_seed: bool = False
    initial_remask: object = None  # (ModelWeights, schedule) -> the round-0 re-mask
    initial_state: object = None  # the built process's `initialize()`, once computed


class _CellProcess:
    """A built learning process whose `initialize` returns one cell's state.

    Everything else (`next`, `get_model_weights`, ...) is the built process's own.
    """

    def __init__(self, built: _CellState, schedule: dict, trainable, non_trainable, *,
                 seed: int, regrow_seed: int | None, steps: tuple | None = None):
        """`steps`: (`step_schedule_data`, steps per round) at step granularity."""
        self._built, self._schedule = built, schedule
        self._arrays = (tuple(trainable), tuple(non_trainable))
        self._seed, self._regrow_seed, self._steps = seed, regrow_seed, steps

    def __getattr__(self, name):
        return getattr(self._built.process, name)

    def initialize(self):
        import tensorflow_federated as tff

        built = self._built
        if built.initial_state is None:  # the same for every cell but what is replaced here
            built.initial_state = built.process.initialize()
        state = built.initial_state
        weights = tff.learning.models.ModelWeights(*self._arrays)
        # Without a mask update at round 0 the re-mask leaves initial weights as they are
        # (all-ones masks, zero thresholds and steps).
        if built.remask and self._schedule["updates"][0]:
            weights = built.initial_remask(weights, self._schedule)
        client_work, finalizer, aggregator = state.client_work, state.finalizer, state.aggregator
        if built.client_schedule:
            client_work = collections.OrderedDict(client_work, schedule=self._schedule)
        if built.remask:
            finalizer = collections.OrderedDict(finalizer, schedule=self._schedule)
        if built.steps:
            step_data, steps_per_round = self._steps
            client_work = collections.OrderedDict(client_work, step_schedule=step_data)
            finalizer = collections.OrderedDict(finalizer,
                                                steps_per_round=np.int64(steps_per_round))
        if built.regrow_key == "finalizer":
            regrow_state = collections.OrderedDict(
                finalizer["regrow"], key=np.array([self._regrow_seed, 0], np.int64))
            finalizer = collections.OrderedDict(finalizer, regrow=regrow_state)
        elif built.regrow_key == "client_work":
            client_work = collections.OrderedDict(
                client_work, regrow_key=np.array([self._regrow_seed, 0], np.int64))
        if built.aggregator_seed:
            aggregator = collections.OrderedDict(aggregator, seed=np.int64(self._seed))
        return state._replace(global_model_weights=weights, client_work=client_work,
                              aggregator=aggregator, finalizer=finalizer)


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
