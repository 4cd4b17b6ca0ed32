"""The server-side masking step after federated averaging.

A `FinalizerProcess` that runs TFF's own `build_apply_optimizer_finalizer`
(server SGD with learning rate 1.0 is plain FedAvg; Adam is FedAdam) and then
re-masks the new global model:

    weights <- optimizer(weights, mean client delta)
    if the schedule updates the mask at round r: mask <- compute_masks(kernels, s_r)
    kernels <- kernels * mask;  the mask is stored in the model's non-trainable weights

so the model broadcast for round r + 1 is exactly as sparse as the schedule says
for round r, whatever the optimizer did: server momentum (Adam) moves pruned
coordinates, and the re-mask puts them back to zero. Between updates the mask
is kept and re-applied. The mask lives in `ModelWeights.non_trainable`, so it is
part of the server state and is broadcast with the model; TFF never aggregates
non-trainable weights, so the server alone owns masks and pruning steps.

With `remask` and plain-delta uploads, the aggregate is first multiplied by the
broadcast mask (`masking.mask_update`) before the optimizer sees it. Clients
upload `delta * mask`, so for a mean this changes nothing (bit for bit); for a
differentially private aggregate it removes the noise TFF adds to pruned
coordinates, so neither the model nor a stateful optimizer's moments see it
(post-processing with the public mask; see `fedprune/federated/privacy.py`).

With `--structure=neuron|filter` the mask removes whole units instead
(`structured.structured_masks`): each pruned layer's wrapper mask holds the
expanded unit mask (clients train inside it: tfmot multiplies the kernel by it
before every batch), and the dropped units' biases and BatchNorm gamma/beta are
zeroed too (`structured.apply_unit_masks`), so the model is exactly unit-sparse
and `surgery.shrink` of it computes the same function. The next layer's input
rows for dropped units are zeroed as well (dead weights: they get no gradient
and the shrink cuts them out), so the downlink skips them before the shrink.

With `--masking=client` there is no schedule mask: the global masks become
the union of the round's client masks (`keep_client_support`), the mask the
next round's clients start from.

The global step lives in the same place: every wrapper's `pruning_step` is set
to `round * steps_per_round` after each round (`steps_per_round` = 1 unless
`--prune_granularity=step`, see `fedprune/pruning/step_schedule.py`; then it
is in the state, data like `schedule`, since it follows the data's partition),
and is broadcast with the model.

With `--regrow` (prune and regrow, `fedprune/pruning/regrowth.py`) the
server adjusts the topology right after the schedule's re-mask, at the rounds
the regrowth spec names: it drops the smallest kept weights and grows as many
pruned coordinates, at zero (`adjust_topology`), so each layer keeps exactly the
schedule's number of mask entries. With `--regrow=gradient` the aggregate is
`OrderedDict(model=<the aggregate above>, regrow_gradient=<per pruned kernel,
the example-weighted mean of the clients' top-k gradients>)`
(`fedprune/federated/regrow_gradients.py`) and growth picks the largest
|regrow_gradient| among the candidates. With `--regrow_at=client` (FedDST,
`fedprune/federated/client_regrowth.py`) the clients adjusted their masks;
the server re-masks the aggregate to the schedule's level in adjustment
rounds too, ranking exact zeros by the clients' votes (`regrowth.vote_scores`),
and measures the same exploration diagnostics (`exploration`).

State: `OrderedDict(optimizer=<TFF optimizer state>, round=int32[,
schedule=<schedules.schedule_data>][, steps_per_round=int64])`, `round`
counting completed rounds, `schedule` (when the server re-masks) the table the
re-mask reads and `steps_per_round` (`--prune_granularity=step`) the global
step's rate: data, not constants traced into the computation, so the same
process runs any schedule of the same number of rounds
(`process.PruningProcess.for_cell`); with
regrowth also `regrow=OrderedDict(key=int64[2] (the RNG key, split every
round), regrown=<per kernel: the 0/1 mask of the last adjustment's grown
weights>, ever_active=<per kernel: 0/1, kept by some mask so far>)`, so
`--resume` continues the same random stream (with `--regrow_at=client`
without `key`: the clients' key is in the client work's state).
"""

from __future__ import annotations

import collections

import numpy as np

from fedprune.errors import check
from fedprune.federated import regrow_gradients
from fedprune.pruning import mask_aggregation, masking, regrowth, structured
from fedprune.pruning.masking import MaskSpec, compute_masks
from fedprune.pruning.schedules import ScheduleTable, kernel_sparsity, schedule_data, table_lookup
from fedprune.pruning.wrappers import PruningLayout


def _unit_masks(kernels, old_masks, sparsity, *, layout: PruningLayout,
                units: structured.StructuredLayout, mask_spec: MaskSpec) -> list:
    """Per `layout.kernels` entry: the new expanded unit mask, or its old one (not unit-pruned)."""
    position = {k.trainable_index: n for n, k in enumerate(layout.kernels)}
    unit_masks, _ = structured.structured_masks(
        [kernels[position[p.kernel_index]] for p in units.layers], sparsity,
        norm=mask_spec.unit_norm, scope=mask_spec.mask_scope)
    masks = list(old_masks)
    for p, unit_mask in zip(units.layers, unit_masks, strict=True):
        masks[position[p.kernel_index]] = structured.expand_unit_mask(unit_mask, p.kernel_shape)
    return masks


def _kernels_and_masks(weights, layout: PruningLayout) -> tuple[list, list, list, list]:
    """(trainable, non_trainable, pruned kernels, their masks) of `weights`, as lists."""
    trainable, non_trainable = list(weights.trainable), list(weights.non_trainable)
    return (trainable, non_trainable, [trainable[k.trainable_index] for k in layout.kernels],
            [non_trainable[k.mask_index] for k in layout.kernels])


def _set_masks(trainable: list, non_trainable: list, layout: PruningLayout, masks) -> None:
    """Masks the kernels and stores each mask and tfmot threshold (in place, TF ops)."""
    import tensorflow as tf

    for k, mask in zip(layout.kernels, masks, strict=True):
        kernel = trainable[k.trainable_index]
        trainable[k.trainable_index] = kernel * mask
        non_trainable[k.mask_index] = mask
        # tfmot's threshold: the smallest kept magnitude (0 when nothing is pruned).
        kept = tf.where(mask > 0, tf.abs(kernel), tf.fill(tf.shape(kernel), np.inf))
        threshold = tf.where(tf.reduce_all(mask > 0), 0.0, tf.reduce_min(kept))
        non_trainable[k.threshold_index] = tf.cast(threshold, kernel.dtype)


def _set_steps(non_trainable: list, layout: PruningLayout, round_num, steps_per_round):
    """Every wrapper's `pruning_step` <- the global step after `round_num` (in place).

    `steps_per_round`: a Python int or an int64 scalar tensor.
    """
    import tensorflow as tf

    for i in layout.step_indices:
        non_trainable[i] = tf.cast(round_num, tf.int64) * steps_per_round


def remask_weights(weights, round_num, *, layout: PruningLayout, schedule,
                   mask_spec: MaskSpec, units: structured.StructuredLayout | None = None,
                   steps_per_round=1, votes=None, adjusts=None):
    """Applies the schedule's mask decision for `round_num` to model weights (TF ops).

    Args:
      weights: `ModelWeights`-like with `.trainable` and `.non_trainable` sequences.
      round_num: int32 scalar; the round that has just completed (0 = initial model).
      layout: where kernels, masks, thresholds and steps are.
      schedule: the schedule per round, `schedules.schedule_data` (arrays or tensors).
      mask_spec: the mask rule.
      units: for `mask_spec.is_unit_structure`: the unit-pruned layers
        (`structured.restrict` of the wrapped model's `structured_layout`);
        their kernels must be wrapped. Their dropped units' biases and
        BatchNorm gamma/beta are zeroed as well.
      steps_per_round: 1 when one tfmot step is one round; with
        `--prune_granularity=step`, the client steps a round stands for
        (`step_schedule.StepMapping`; an int or an int64 scalar tensor).
      votes: `--regrow_at=client`: per kernel, how many of the round's clients
        keep each weight; the magnitude re-mask then ranks exact zeros by them
        (`regrowth.vote_scores`). None: by |w| alone.
      adjusts: `--regrow_at=client`: a bool scalar, the clients adjusted their
        masks this round, so the masks are recomputed even without a schedule
        update. None: only at the schedule's updates.

    Returns:
      `tff.learning.models.ModelWeights` with kernels masked, masks and
      thresholds updated when the schedule says so, and every tfmot
      `pruning_step` set to the global step `round_num * steps_per_round`
      (>= 0, as the wrapper requires).
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    trainable, non_trainable, kernels, old_masks = _kernels_and_masks(weights, layout)
    sparsity = kernel_sparsity(schedule, round_num)  # per kernel with layer budgets
    if mask_spec.is_unit_structure:
        def new_masks():
            return _unit_masks(kernels, old_masks, sparsity, layout=layout, units=units,
                               mask_spec=mask_spec)
    elif votes is not None:
        def new_masks():
            return list(mask_spec.criterion.masks(regrowth.vote_scores(kernels, votes), sparsity))
    else:
        def new_masks():
            return compute_masks(kernels, mask_spec, sparsity)
    updates = table_lookup(schedule["updates"], round_num)
    if adjusts is not None:
        updates = tf.logical_or(updates, adjusts)
    masks = tf.cond(updates, new_masks, lambda: old_masks)
    _set_masks(trainable, non_trainable, layout, masks)
    if mask_spec.is_unit_structure:
        position = {k.trainable_index: n for n, k in enumerate(layout.kernels)}
        unit_masks = [structured.unit_mask_of(masks[position[p.kernel_index]])
                      for p in units.layers]
        trainable, non_trainable = structured.apply_unit_masks(trainable, non_trainable, units,
                                                               unit_masks)
        trainable = structured.zero_consumer_inputs(trainable, units, unit_masks)
    _set_steps(non_trainable, layout, round_num, steps_per_round)
    return tff.learning.models.ModelWeights(tuple(trainable), tuple(non_trainable))


def adjust_topology(old, weights, regrow_state, round_num, *, layout: PruningLayout,
                    fractions: np.ndarray, grow_scores=None):
    """Drop and grow after the schedule's re-mask (TF ops; see `regrowth.drop_and_grow`).

    Args:
      old: the broadcast `ModelWeights` of this round (their masks: the old topology).
      weights: the re-masked `ModelWeights` after this round (`remask_weights`).
      regrow_state: `OrderedDict(key, regrown, ever_active)` (module docstring).
      round_num: int32 scalar, the round that has just completed.
      layout: where kernels and masks are.
      fractions: f_r per round (`RegrowSpec.fractions`); 0 means no adjustment
        (k = 0 leaves the mask as it is).
      grow_scores: per pruned kernel, the scores growth ranks candidates by
        (`--regrow=gradient`: |aggregate gradient|); None: uniform draws from
        the state's RNG key (`random`). The key is split every round either way.

    Returns:
      (weights, regrow_state, diagnostics): the adjusted weights (masks,
      masked kernels, thresholds), the next state, and `OrderedDict(
      mask_change=<fraction of pruned-kernel mask entries that differ from
      the broadcast mask>, regrown_survival=<of the weights grown at the
      previous adjustment, the fraction still kept after the drop of this
      one; NaN in rounds without an adjustment or with nothing grown before>,
      itop=<fraction of pruned-kernel weights kept by some mask so far: in-time
      over-parameterization, Liu et al. 2021>)`.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    trainable, non_trainable, kernels, masks = _kernels_and_masks(weights, layout)
    old_masks = _kernels_and_masks(old, layout)[3]
    fraction = table_lookup(fractions, round_num)
    keys = tf.random.experimental.stateless_split(regrow_state["key"], num=2)
    if grow_scores is None:
        scores = regrowth.random_scores([kernel.shape for kernel in kernels], keys[1])
    else:
        scores = list(grow_scores)
    adjusted = [regrowth.drop_and_grow(kernel, mask, fraction, score)
                for kernel, mask, score in zip(kernels, masks, scores, strict=True)]
    survivors, grown = [a[0] for a in adjusted], [a[1] for a in adjusted]
    new_masks = [s + g for s, g in zip(survivors, grown, strict=True)]
    _set_masks(trainable, non_trainable, layout, new_masks)
    new_state, diagnostics = exploration(old_masks, new_masks, grown, survivors, regrow_state,
                                         fraction > 0)
    new_state = collections.OrderedDict(key=keys[0], **new_state)
    weights = tff.learning.models.ModelWeights(tuple(trainable), tuple(non_trainable))
    return weights, new_state, diagnostics


def exploration(old_masks, new_masks, grown, kept_after, regrow_state, adjusts):
    """How a round moved the topology, and the exploration state after it (TF ops).

    Args:
      old_masks: the broadcast masks of the round, per pruned kernel.
      new_masks: the masks after the round.
      grown: 0/1 per kernel, the weights this round's adjustment grew.
      kept_after: 0/1 per kernel, what of the old mask this adjustment kept
        (the server's survivors of the drop; with `--regrow_at=client`, the new masks).
      regrow_state: `OrderedDict(regrown, ever_active[, key])` before the round.
      adjusts: bool scalar, the round ends with an adjustment (f_r > 0).

    Returns:
      (`OrderedDict(regrown, ever_active)` after the round, `OrderedDict(
      mask_change, regrown_survival, itop)`; see `adjust_topology`).
    """
    import tensorflow as tf

    def total(tensors):
        return tf.add_n([tf.reduce_sum(t) for t in tensors])

    size = float(sum(int(np.prod(m.shape)) for m in new_masks))
    previous = list(regrow_state["regrown"])
    grown_before = total(previous)
    survived = tf.math.divide_no_nan(
        total([p * s for p, s in zip(previous, kept_after, strict=True)]), grown_before)
    ever = [tf.maximum(e, tf.maximum(o, n)) for e, o, n in
            zip(regrow_state["ever_active"], old_masks, new_masks, strict=True)]
    diagnostics = collections.OrderedDict(
        mask_change=total([tf.abs(n - o) for n, o in zip(new_masks, old_masks, strict=True)])
        / size,
        regrown_survival=tf.where(tf.logical_and(adjusts, grown_before > 0), survived,
                                  tf.constant(np.nan, tf.float32)),
        itop=total(ever) / size)
    new_state = collections.OrderedDict(
        regrown=tuple(tf.where(adjusts, g, p) for g, p in zip(grown, previous, strict=True)),
        ever_active=tuple(ever))
    return new_state, diagnostics


def keep_client_support(weights, aggregate, round_num, *, layout: PruningLayout, rule: str,
                        steps_per_round=1):
    """`--masking=client`: the global masks become the union of the clients' masks (TF ops).

    No schedule mask: the kernels keep whatever some client kept (`majority`:
    at least half of the clients), so the global model is denser than each
    client's. Stored as the wrappers' masks, it is the mask the next round's
    clients start from (they train inside it). The kernels are multiplied by it:
    a no-op after server SGD (nobody's weights are exactly 0 already), and it
    keeps server momentum (Adam) off weights no client kept. The wrappers'
    `pruning_step` is set to the global step, as in `remask_weights`.
    """
    import tensorflow_federated as tff

    trainable, non_trainable = list(weights.trainable), list(weights.non_trainable)
    old_masks = [non_trainable[k.mask_index] for k in layout.kernels]
    masks = mask_aggregation.support_masks(rule, aggregate, old_masks)
    _set_masks(trainable, non_trainable, layout, masks)
    _set_steps(non_trainable, layout, round_num, steps_per_round)
    return tff.learning.models.ModelWeights(tuple(trainable), tuple(non_trainable))


def build_initial_schedule(table: ScheduleTable):
    """A no-argument `tff.tensorflow.computation` returning `schedule_data(table)`.

    The initial value of a process state's `schedule` (here and in
    `client_work.py`); its result type is the type of every table of the same
    number of rounds and pruned kernels.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    schedule = schedule_data(table)

    @tff.tensorflow.computation
    def initial_schedule():
        return collections.OrderedDict((k, tf.constant(v)) for k, v in schedule.items())

    return initial_schedule


def build_masking_finalizer(
    *,
    server_optimizer,
    model_weights_type,
    layout: PruningLayout,
    table: ScheduleTable,
    mask_spec: MaskSpec,
    remask: bool,
    aggregate_type=None,
    aggregation_rule: str = "average",
    units: structured.StructuredLayout | None = None,
    steps_per_round: int | None = None,
    regrow: regrowth.RegrowSpec | None = None,
):
    """Builds TFF's apply-optimizer finalizer followed by the server mask step.

    Args:
      server_optimizer: a `tff.learning.optimizers.Optimizer`.
      model_weights_type: the `ModelWeights` TFF type of the global model.
      layout: positions of the pruned kernels (and, when `remask`, their masks).
      table: the schedule per round: the initial value of the state's
        `schedule` when `remask` (a state of the same shapes with another
        table runs that table).
      mask_spec: the server's mask rule.
      remask: False for masking modes `none` and `client` (no schedule mask).
        True also multiplies a plain-delta aggregate by the broadcast mask
        before the optimizer step (a no-op for a mean of masked uploads; it
        removes a DP aggregate's noise off the mask).
      aggregate_type: the aggregator's output type when clients upload
        `mask_aggregation.client_payload`s (modes `client`, `both`); None when
        they upload plain deltas.
      aggregation_rule: one of `mask_aggregation.RULES` (with `aggregate_type`).
      units: the unit-pruned layers for `--structure=neuron|filter` (see
        `remask_weights`), else None.
      steps_per_round: the global step after round r is `r * steps_per_round`,
        written into every wrapper's `pruning_step`. None: one step per round.
        An int (`--prune_granularity=step`): the initial value of the state's
        `steps_per_round` (int64), which the mask step reads (a state with
        another value runs that mapping).
      regrow: prune and regrow after the re-mask (`adjust_topology`); needs
        `remask`. None or rule `none`: no adjustment, and the state and
        measurements are those without regrowth. Rule `gradient`: the
        aggregate is `OrderedDict(model=A, regrow_gradient=<float32 per
        pruned kernel>)` (`regrow_gradients.build_gradient_aggregator`).
        With `at == "client"` the clients adjusted their masks (`aggregate_type`
        needed): the server re-masks in adjustment rounds too, ranking zeros by
        the clients' votes, and only measures (`exploration`).

    Without `remask` but with `aggregate_type` (`--masking=client`), the global
    masks become the union of the clients' masks (`keep_client_support`).

    Returns:
      A `tff.learning.templates.FinalizerProcess` with type signature
      `(<optimizer=S, round=int32[, schedule=<schedule_data>][,
      steps_per_round=int64]>@SERVER,
      ModelWeights@SERVER, A@SERVER) ->
      (state@SERVER, ModelWeights@SERVER, <optimizer=<update_non_finite=int32>,
      masks=<mask_drift, regrowth[, client_mask_jaccard, client_sparsity]
      [, mask_change, regrown_survival, itop]>>@SERVER)`, with A the trainable
      weights' type or `aggregate_type`; with regrowth the state also has
      `regrow` (module docstring).
    """
    import tensorflow_federated as tff

    inner = tff.learning.templates.build_apply_optimizer_finalizer(
        server_optimizer, model_weights_type
    )
    round_type = tff.TensorType(np.int32)
    update_type = aggregate_type or model_weights_type.trainable
    kernel_idx = [k.trainable_index for k in layout.kernels]
    regrowing = regrow is not None and regrow.enabled
    at_clients = regrowing and regrow.at == "client"
    by_gradient = regrowing and regrow.rule == "gradient" and not at_clients
    if by_gradient:
        gradient_type = tff.StructWithPythonType(
            [tff.TensorType(np.float32, model_weights_type.trainable[i].shape)
             for i in kernel_idx], tuple)
        upload_type = tff.StructWithPythonType(
            [(regrow_gradients.MODEL_KEY, update_type),
             (regrow_gradients.GRADIENT_KEY, gradient_type)], collections.OrderedDict)
    else:
        upload_type = update_type
    if regrowing:
        check(remask, "regrow", regrow.rule, "none unless the server re-masks")
        check(not at_clients or aggregate_type is not None, "regrow_at", regrow.at,
              "server unless clients prune")
        fractions = regrow.fractions(len(table.sparsity) - 1)

        @tff.tensorflow.computation
        def initial_regrow_state():
            import tensorflow as tf

            zeros = tuple(tf.zeros(model_weights_type.trainable[i].shape, tf.float32)
                          for i in kernel_idx)
            state = collections.OrderedDict(regrown=zeros, ever_active=zeros)
            if at_clients:  # the clients' key is in the client work's state
                return state
            return collections.OrderedDict(key=tf.constant([regrow.seed, 0], tf.int64), **state)

        regrow_type = initial_regrow_state.type_signature.result

    initial_schedule = build_initial_schedule(table)

    if aggregate_type is not None:

        @tff.tensorflow.computation(model_weights_type, update_type)
        def to_delta(weights, aggregate):
            delta, _ = mask_aggregation.pseudo_delta(aggregation_rule, weights.trainable,
                                                     aggregate, kernel_idx)
            return delta

    elif remask:

        @tff.tensorflow.computation(model_weights_type, update_type)
        def mask_aggregate(weights, aggregate):
            masks = [None] * len(aggregate)
            for k in layout.kernels:
                masks[k.trainable_index] = weights.non_trainable[k.mask_index]
            delta = list(masking.mask_update(aggregate, masks))
            if mask_spec.is_unit_structure:
                # Dropped units' biases, gamma/beta and consumer rows are zero in the
                # broadcast model too: keep a DP aggregate's noise off them as well.
                unit_masks = [structured.unit_mask_of(masks[p.kernel_index])
                              for p in units.layers]
                delta, _ = structured.apply_unit_masks(delta, list(weights.non_trainable),
                                                       units, unit_masks)
                delta = structured.zero_consumer_inputs(delta, units, unit_masks)
            return tuple(delta)

    # What the mask step reads besides the weights and the aggregate.
    extras_types = collections.OrderedDict(round=round_type)
    if remask:
        extras_types["schedule"] = initial_schedule.type_signature.result
    spr_in_state = steps_per_round is not None
    if spr_in_state:
        extras_types["steps_per_round"] = tff.TensorType(np.int64)
    if regrowing:
        extras_types["regrow"] = regrow_type
    if by_gradient:
        extras_types["gradient"] = gradient_type

    @tff.tensorflow.computation(
        model_weights_type, model_weights_type, update_type,
        tff.StructWithPythonType(list(extras_types.items()), collections.OrderedDict))
    def mask_and_measure(old, stepped, aggregate, extras):
        round_num = extras["round"]
        spr = extras["steps_per_round"] if spr_in_state else 1
        old_kernels = [old.trainable[i] for i in kernel_idx]
        weights = stepped
        if aggregate_type is not None and aggregation_rule == "majority":
            _, votes = mask_aggregation.pseudo_delta("majority", old.trainable, aggregate,
                                                     kernel_idx)
            trainable = list(weights.trainable)
            for i, vote in zip(kernel_idx, votes, strict=True):
                trainable[i] = trainable[i] * vote
            weights = tff.learning.models.ModelWeights(tuple(trainable), weights.non_trainable)
        diagnostics = collections.OrderedDict(
            regrowth=mask_aggregation.regrowth(old_kernels,
                                               [weights.trainable[i] for i in kernel_idx]))
        if remask:
            weights = remask_weights(
                weights, round_num, layout=layout, schedule=extras["schedule"],
                mask_spec=mask_spec, units=units, steps_per_round=spr,
                votes=aggregate["kept_count"] if at_clients else None,
                adjusts=table_lookup(fractions, round_num) > 0 if at_clients else None)
        elif aggregate_type is not None:
            weights = keep_client_support(weights, aggregate, round_num, layout=layout,
                                          rule=aggregation_rule,
                                          steps_per_round=spr)
        if at_clients:
            old_masks = _kernels_and_masks(old, layout)[3]
            new_masks = _kernels_and_masks(weights, layout)[3]
            regrow_state, adjusted = exploration(
                old_masks, new_masks,
                [n * (1.0 - o) for n, o in zip(new_masks, old_masks, strict=True)], new_masks,
                extras["regrow"], table_lookup(fractions, round_num) > 0)
        elif regrowing:
            weights, regrow_state, adjusted = adjust_topology(
                old, weights, extras["regrow"], round_num, layout=layout, fractions=fractions,
                grow_scores=regrow_gradients.gradient_scores(extras["gradient"])
                if by_gradient else None)
        diagnostics["mask_drift"] = mask_aggregation.mask_drift(
            old_kernels, [weights.trainable[i] for i in kernel_idx])
        if aggregate_type is not None:
            diagnostics["client_mask_jaccard"] = mask_aggregation.pooled_jaccard(
                aggregate["kept_count"], aggregate["num_clients"])
            diagnostics["client_sparsity"] = mask_aggregation.mean_client_sparsity(
                aggregate["kept_count"], aggregate["num_clients"])
        if regrowing:
            diagnostics.update(adjusted)
            return weights, diagnostics, regrow_state
        return weights, diagnostics

    @tff.tensorflow.computation(round_type)
    def increment(round_num):
        return round_num + 1

    @tff.federated_computation
    def init_fn():
        state = collections.OrderedDict(
            optimizer=inner.initialize(), round=tff.federated_value(np.int32(0), tff.SERVER))
        if remask:
            state["schedule"] = tff.federated_eval(initial_schedule, tff.SERVER)
        if spr_in_state:
            state["steps_per_round"] = tff.federated_value(np.int64(steps_per_round),
                                                           tff.SERVER)
        if regrowing:
            state["regrow"] = tff.federated_eval(initial_regrow_state, tff.SERVER)
        return tff.federated_zip(state)

    @tff.federated_computation(
        init_fn.type_signature.result,
        tff.FederatedType(model_weights_type, tff.SERVER),
        tff.FederatedType(upload_type, tff.SERVER),
    )
    def next_fn(state, weights, aggregate):
        if by_gradient:
            gradient = getattr(aggregate, regrow_gradients.GRADIENT_KEY)
            aggregate = getattr(aggregate, regrow_gradients.MODEL_KEY)
        delta = aggregate
        if aggregate_type is not None:
            delta = tff.federated_map(to_delta, (weights, aggregate))
        elif remask:
            delta = tff.federated_map(mask_aggregate, (weights, aggregate))
        inner_output = inner.next(state.optimizer, weights, delta)
        round_num = tff.federated_map(increment, state.round)
        new_state = collections.OrderedDict(optimizer=inner_output.state, round=round_num)
        extras = collections.OrderedDict(round=round_num)
        if remask:
            extras["schedule"] = new_state["schedule"] = state.schedule
        if spr_in_state:
            extras["steps_per_round"] = new_state["steps_per_round"] = state.steps_per_round
        if regrowing:
            extras["regrow"] = state.regrow
        if by_gradient:
            extras["gradient"] = gradient
        outputs = tff.federated_map(
            mask_and_measure, (weights, inner_output.result, aggregate, tff.federated_zip(extras)))
        if regrowing:
            new_weights, diagnostics, new_state["regrow"] = outputs
        else:
            new_weights, diagnostics = outputs
        new_state = tff.federated_zip(new_state)
        measurements = tff.federated_zip(
            collections.OrderedDict(optimizer=inner_output.measurements, masks=diagnostics)
        )
        return tff.templates.MeasuredProcessOutput(new_state, new_weights, measurements)

    return tff.learning.templates.FinalizerProcess(init_fn, next_fn)
