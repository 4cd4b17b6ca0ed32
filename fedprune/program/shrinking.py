"""Shrinking a unit-pruned global model mid-training, and continuing on the smaller model.

After the round `R = ExperimentConfig.shrink_round()` the global model of a
`--structure=neuron|filter` run is exactly unit-sparse (`server_masking`), so
`surgery.shrink` can cut the dropped units out without changing its function.
Training then continues on a new TFF process built for the smaller model:

1. `kept_units`: the surviving units of every unit-pruned layer, read from the
   wrapper masks the server broadcast (and checked: a dropped unit's kernel
   column, bias and BatchNorm gamma/beta must be exactly zero).
2. `plain_model` + `surgery.shrink`: the smaller plain Keras model with the
   surviving weights.
3. A new process (`assembly.build_process(..., shrunk_model=...)`: masking `none`, no schedule;
   the pruning is over, the small model trains dense) and `transfer_state`: its
   state gets the shrunk weights and the old server optimizer state sliced to
   the kept units (`surgery.slice_weights`): SGD is stateless, SGD momentum and
   Adam's moments keep the entries of surviving weights, scalars such as Adam's
   step count are carried over, so the optimizer continues as if the removed
   units had never existed. The finalizer's and client work's round counters
   are carried over too.

Model size numbers (`model_size`): parameters of the plain (stripped) model,
its bytes as float32, and multiply-adds per example (`surgery.macs_per_example`).
"""

from __future__ import annotations

import collections
import weakref

import numpy as np

from fedprune.model import surgery
from fedprune.pruning import structured, unit_layout, wrappers


class ShrinkError(RuntimeError):
    """The global model is not unit-sparse where its masks say (it cannot be shrunk exactly)."""


def _mask_index(pp, p: structured.PrunedUnits) -> int:
    return next(k.mask_index for k in pp.layout.kernels if k.trainable_index == p.kernel_index)


def kept_units(pp, weights) -> dict[int, np.ndarray]:
    """{kernel index: sorted int64 indices of the surviving units} per unit-pruned layer.

    Keyed by the kernel's position in the trainable weights, which is the same
    in every instance of the model (layer names are not: Keras numbers them
    per instance); `by_name` maps the keys to a model's layer names.

    Args:
      pp: the `process.PruningProcess` of a `--structure=neuron|filter` run.
      weights: its global `ModelWeights`.

    Raises:
      ShrinkError: a dropped unit has a nonzero kernel column, bias, gamma or beta.
    """
    kept = {}
    trainable = [np.asarray(w) for w in weights.trainable]
    for p in pp.units.layers:
        mask = np.asarray(weights.non_trainable[_mask_index(pp, p)])
        unit_mask = mask.reshape(-1, p.num_units).max(axis=0) > 0
        dropped = [(p.kernel_index, ~unit_mask[None, :],
                    trainable[p.kernel_index].reshape(-1, p.num_units))]
        dropped += [(i, np.tile(~unit_mask, repeat), trainable[i])
                    for i, repeat in structured.dependent_weights(p)]
        for index, where, values in dropped:
            if np.any(values[np.broadcast_to(where, values.shape)] != 0):
                raise ShrinkError(f"layer {p.name!r}: trainable weight {index} is nonzero for "
                                  "units its mask dropped; the masked model is not unit-sparse")
        kept[p.kernel_index] = np.flatnonzero(unit_mask).astype(np.int64)
    return kept


def by_name(layout: structured.StructuredLayout, kept: dict[int, np.ndarray]) -> dict:
    """`kept` keyed by the names of the layers of the model `layout` was read from."""
    return {p.name: kept[p.kernel_index] for p in layout.layers if p.kernel_index in kept}


def plain_model(pp, weights=None):
    """The global model as a plain Keras model (tfmot wrappers stripped) holding `weights`
    (None: Keras' fresh initialization, e.g. to count the architecture)."""
    model = pp.keras_model_fn()
    if weights is not None:
        for variables, values in ((model.trainable_weights, weights.trainable),
                                  (model.non_trainable_weights, weights.non_trainable)):
            for variable, value in zip(variables, values, strict=True):
                variable.assign(value)
    return wrappers.strip(model) if pp.masking_mode.wraps_model else model


# keras_model_fn -> `model_size` of its plain model (`process_model_size`).
_SIZES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def process_model_size(pp) -> dict:
    """`model_size` of `pp`'s plain model: its architecture's, whatever the weights.

    Computed once per `pp.keras_model_fn` (the cells of a grid that share a traced
    process share it), so a run does not build a Keras model only to count it.
    """
    size = _SIZES.get(pp.keras_model_fn)
    if size is None:
        size = _SIZES[pp.keras_model_fn] = model_size(plain_model(pp))
    return dict(size)


def model_size(model) -> dict:
    """{params, model_bytes, macs_per_example} of a plain Keras model (see `surgery`).

    `macs_per_example` is "" (unknown) for layers `surgery.macs_per_example`
    cannot count (e.g. the LSTM of `builders.rnn`) rather than an undercount.
    """
    try:
        macs = surgery.macs_per_example(model)
    except unit_layout.UnsupportedArchitecture:
        macs = ""
    return {"params": surgery.count_params(model), "model_bytes": surgery.model_bytes(model),
            "macs_per_example": macs}


def transfer_state(old_state, new_process, *, layout: structured.StructuredLayout,
                   kept: dict, shrunk_model):
    """The new process's state continuing the old one after the shrink.

    Args:
      old_state: the `LearningAlgorithmState` of the unit-pruned process.
      new_process: the shrunk model's `LearningProcess` (its `initialize()` gives
        the structure; `set_model_weights` loads the shrunk weights).
      layout: `unit_layout.structured_layout` of the plain full model (its
        trainable order is the wrapped model's and, smaller, the shrunk model's).
      kept: {layer name in `layout`: kept unit indices} (`by_name`).
      shrunk_model: the plain shrunk model (its weights become the global model).

    Returns:
      A state of `new_process` with the shrunk weights, the sliced server optimizer state and
      the old round counters.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    new_state = new_process.initialize()
    shapes = [tuple(s) for s in layout.trainable_shapes]

    def slice_entry(value):
        if isinstance(value, (list, tuple)) and [tuple(np.shape(v)) for v in value] == shapes:
            return surgery.slice_weights(layout, kept, list(value))[0]
        return value

    old_optimizer = old_state.finalizer["optimizer"]
    template = new_state.finalizer["optimizer"]
    sliced = collections.OrderedDict(
        (key, slice_entry(value)) for key, value in old_optimizer.items())
    flat_template, flat = tf.nest.flatten(template), tf.nest.flatten(sliced)
    if [np.shape(a) for a in flat_template] != [np.shape(a) for a in flat]:
        found = [np.shape(a) for a in flat]
        wanted = [np.shape(a) for a in flat_template]
        raise ShrinkError("the server optimizer state does not map onto the shrunk model's "
                          f"({found} vs {wanted})")
    optimizer = tf.nest.pack_sequence_as(template, [np.asarray(a) for a in flat])
    state = new_state._replace(
        finalizer=collections.OrderedDict(optimizer=optimizer,
                                          round=old_state.finalizer["round"]),
        client_work=collections.OrderedDict(hparams=new_state.client_work["hparams"],
                                            round=old_state.client_work["round"]))
    weights = tff.learning.models.ModelWeights(
        tuple(v.numpy() for v in shrunk_model.trainable_weights),
        tuple(v.numpy() for v in shrunk_model.non_trainable_weights))
    return new_process.set_model_weights(state, weights)
