"""A composed learning process's round, compiled to TFF's MapReduceForm.

`tff.learning.templates.compose_learning_process` joins the four parts of a
round (distributor, client work, aggregator, finalizer) by federated plumbing:
the round of masking `both` has 3 broadcasts, 7 maps and 3 zips at the
clients, 2 sums and 42 server-placed applies and zips, and TFF's C++ runtime
pays for each one (a call, a thread, a wake-up: `BUILD_NOTES.md`, "The round as
one MapReduceForm").
TFF's own MapReduce compiler (`tff.backends.mapreduce`, the form TFF hands to
production systems) merges every TensorFlow computation on each side of the
broadcast and the aggregation into one, so the round becomes

    prepare (server) -> broadcast -> work (clients) -> aggregate -> update (server)

with the same TensorFlow ops: states and metrics are bit for
bit those of the composed round (tested in tests/test_map_reduce.py for every
masking mode and the processes' other options).

Grappler is off in the compilation (TFF's default would rewrite the graphs
aggressively, which may reorder floating-point arithmetic). The process keeps
the composed round's `initialize`, `get_model_weights`, `set_model_weights`,
hyperparameter functions and `next` type signature (with its Python
containers: `next` still returns a `LearningProcessOutput` whose state is a
`LearningAlgorithmState`), so programs, checkpoints and `for_cell` see no
difference.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import math
from collections.abc import Callable


@dataclasses.dataclass(frozen=True)
class CompiledRound:
    """A learning process's round compiled once, called two ways.

    Attributes:
      process: the `LearningProcess` with its `next` compiled: the composed
        process's computations and type signatures (`next`'s with its Python
        containers), for TFF's programs, tests and tools.
      next: `PackedNext`, the same round with the state moved across TFF's
        boundary as one array per dtype: what a run calls every round.
    """

    process: object
    next: Callable


def compile_round(process) -> CompiledRound:
    """`process`'s round compiled to one MapReduceForm round, structured and packed.

    Both ways compute the same round, bit for bit, as one server map before
    the broadcast, one client map, one `federated_aggregate` and one server
    map after it.

    Args:
      process: a `tff.learning.templates.LearningProcess` whose `next`,
        `(state@SERVER, data@CLIENTS) -> <state@SERVER, metrics@SERVER>`, has
        one broadcast phase and one aggregation phase (every process
        `build_pruning_process` composes).

    Raises:
      tff.backends.mapreduce's `MapReduceFormCompilationError` (or TypeError)
      for a round that does not fit the form (e.g. a second broadcast that
      depends on an aggregate, or secure sums).
    """
    import tensorflow_federated as tff

    form = _map_reduce_form(process.next)
    compiled = tff.learning.templates.LearningProcess(
        process.initialize, _structured_next(form, process.next), process.get_model_weights,
        process.set_model_weights, get_hparams_fn=process.get_hparams,
        set_hparams_fn=process.set_hparams)
    return CompiledRound(compiled, PackedNext(form, compiled.next))


def _map_reduce_form(next_fn):
    """`next_fn` as TFF's MapReduceForm (Grappler off); refuses secure sums."""
    import tensorflow as tf
    import tensorflow_federated as tff

    no_grappler = tf.compat.v1.ConfigProto()
    no_grappler.graph_options.rewrite_options.disable_meta_optimizer = True
    form = tff.backends.mapreduce.get_map_reduce_form_for_computation(next_fn, no_grappler)
    secure = (form.secure_sum_bitwidth, form.secure_sum_max_input,
              form.secure_modular_sum_modulus)
    # fedprune's aggregators use no secure sums; the form's own computation
    # (`get_computation_for_map_reduce_form`) would still call the three secure
    # intrinsics on empty values, which TFF's C++ runtime refuses.
    if any(len(s.type_signature.result) for s in secure):
        raise TypeError("a round with secure sums: not compiled to a MapReduceForm")
    return form


def _structured_next(form, next_fn):
    """The form's round with `next_fn`'s type signature and Python containers."""
    from tensorflow_federated.python.core.impl.computation import computation_impl
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    round_fn = _round(form, _Packing(form.prepare.type_signature.parameter, packs=False),
                      _Packing(form.update.type_signature.result[1], packs=False))
    return computation_impl.ConcreteComputation(
        computation_proto=computation_impl.ConcreteComputation.get_proto(round_fn),
        context_stack=context_stack_impl.context_stack,
        annotated_type=next_fn.type_signature)


def _round(form, state_packing: _Packing, metrics_packing: _Packing):
    """The form's round as `(state@SERVER, data@CLIENTS) -> <state, metrics>@SERVER`.

    The state enters and leaves as `state_packing` packs it, the metrics leave
    as `metrics_packing` does (`packs=False`: as they are); both are packed and
    unpacked inside the server's `prepare` and `update`, so the round keeps its
    9 intrinsics.
    """
    import tensorflow_federated as tff

    # What crosses the broadcast, the clients' upload and the aggregation's
    # accumulator travel as one tensor per dtype (`_Packing`).
    broadcast_packing = _Packing(form.prepare.type_signature.result)
    upload_packing = _Packing(form.work.type_signature.result[0])
    sum_packing = _Packing(form.zero.type_signature.result)
    data_type = form.work.type_signature.parameter[0]
    aggregate_type = form.update.type_signature.parameter[1]

    @tff.tensorflow.computation(state_packing.packed_type)
    def prepare(state):
        return broadcast_packing.pack(form.prepare(state_packing.unpack(state)))

    @tff.tensorflow.computation(data_type, broadcast_packing.packed_type)
    def work(data, broadcast):
        # The aggregate's input, selected inside TensorFlow (the three others are the
        # empty secure sums' inputs): a selection outside is one more map over the clients.
        return upload_packing.pack(form.work([data, broadcast_packing.unpack(broadcast)])[0])

    @tff.tensorflow.computation
    def zero():
        return sum_packing.pack(form.zero())

    @tff.tensorflow.computation(sum_packing.packed_type, upload_packing.packed_type)
    def accumulate(partial, upload):
        return sum_packing.pack(form.accumulate([sum_packing.unpack(partial),
                                                 upload_packing.unpack(upload)]))

    @tff.tensorflow.computation(sum_packing.packed_type, sum_packing.packed_type)
    def merge(first, second):
        return sum_packing.pack(form.merge([sum_packing.unpack(first),
                                            sum_packing.unpack(second)]))

    @tff.tensorflow.computation(sum_packing.packed_type)
    def report(partial):
        return form.report(sum_packing.unpack(partial))

    @tff.tensorflow.computation(state_packing.packed_type, aggregate_type)
    def update(state, aggregate):
        updated = tff.structure.from_container(
            form.update([state_packing.unpack(state), aggregate]))
        return state_packing.pack(updated[0]), metrics_packing.pack(updated[1])

    @tff.federated_computation(tff.FederatedType(state_packing.packed_type, tff.SERVER),
                               form.type_signature.parameter[1])
    def round_fn(state, client_data):
        broadcast = tff.federated_broadcast(tff.federated_map(prepare, state))
        uploads = tff.federated_map(work, tff.federated_zip([client_data, broadcast]))
        aggregate = tff.federated_aggregate(uploads, zero(), accumulate, merge, report)
        updated = tff.federated_map(update, tff.federated_zip((state, (aggregate, (), (), ()))))
        # Two SERVER values, as a learning process's `next` returns, not one SERVER struct.
        return collections.OrderedDict(state=updated[0], metrics=updated[1])

    return round_fn


class PackedNext:
    """A compiled round called with its state as one array per dtype across TFF's boundary.

    `PackedNext(form, structured)(state, data)` returns what `structured(state,
    data)` returns, the same values, dtypes, shapes and Python containers
    (tested in tests/test_map_reduce.py), but TFF serializes, sends and
    deserializes a few arrays instead of every state tensor and metric, each of
    which it pays for on both sides of its worker's channel. The state is
    concatenated into one array per dtype here, in numpy, and split again
    inside the server's first and last computations of the round; the new
    state and the metrics come back packed the same way and are split here
    into views of the arrays TFF returned (read-only, as TFF's own), in the
    containers `structured`'s type names (as TFF's `type_to_py_container`
    would build them).

    A state or metrics with a tensor of unknown shape are not packed: the call
    is `structured`'s.

    Attributes:
      computation: the packed round, `(<one tensor per dtype>@SERVER,
        data@CLIENTS) -> <state=<one tensor per dtype>@SERVER,
        metrics=<one tensor per dtype>@SERVER>`; None if not packed.
    """

    def __init__(self, form, structured):
        """`form`: the round's MapReduceForm; `structured`: the same round, `_structured_next`'s."""
        from tensorflow_federated.python.core.impl.computation import computation_impl
        from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

        self._structured = structured
        self._state = _Packing(form.prepare.type_signature.parameter)
        self._metrics = _Packing(form.update.type_signature.result[1])
        self.computation = None
        if self._state.packs and self._metrics.packs:
            self._build = _container_builder(structured.type_signature.result)
            round_fn = _round(form, self._state, self._metrics)
            self.computation = computation_impl.ConcreteComputation(
                computation_proto=computation_impl.ConcreteComputation.get_proto(round_fn),
                context_stack=context_stack_impl.context_stack,
                annotated_type=round_fn.type_signature)

    def __call__(self, state, data):
        """One round: `structured(state, data)`'s output, a `LearningProcessOutput`."""
        if self.computation is None:
            return self._structured(state, data)
        output = self.computation(self._state.pack_arrays(state), data)
        return self._build(iter(self._state.unpack_leaves(output["state"])
                                + self._metrics.unpack_leaves(output["metrics"])))


def _container_builder(type_spec) -> Callable:
    """A function of an iterator over a value's leaves, in `type_spec`'s order, to the value.

    The value has the Python containers `type_spec` names, built as TFF's
    `type_to_py_container` builds them from a `tff.structure.Struct`
    (namedtuples and attrs classes by keyword, other named containers from
    (name, value) pairs, unnamed ones from the values; OrderedDict or tuple
    where the type names none), without building the Struct first.

    Args:
      type_spec: a tensor type, a struct type, or an all-equal federated type
        of either.
    """
    import attrs
    import tensorflow_federated as tff
    from tensorflow_federated.python.common_libs import py_typecheck

    if isinstance(type_spec, tff.FederatedType):
        if not type_spec.all_equal:
            raise TypeError(f"not an all-equal federated type: {type_spec}")
        type_spec = type_spec.member
    if isinstance(type_spec, tff.TensorType):
        return next
    elements = [(name, _container_builder(element))
                for name, element in tff.structure.iter_elements(type_spec)]
    named = any(name is not None for name, _ in elements)
    container = getattr(type_spec, "python_container", None) or (
        collections.OrderedDict if named else tuple)
    if isinstance(container, py_typecheck.SupportsNamedTuple) or attrs.has(container):
        return lambda leaves: container(**{name: build(leaves) for name, build in elements})
    if named:
        return lambda leaves: container([(name, build(leaves)) for name, build in elements])
    return lambda leaves: container([build(leaves) for _, build in elements])


class _Packing:
    """A struct of tensors as one rank-1 tensor per dtype, and back.

    TFF's C++ runtime pays per value it moves (per client, for what is
    broadcast or uploaded); concatenating a struct's tensors of each dtype
    into one, and splitting them on the other side, moves the same bytes in a
    few values, bit for bit (reshape, concat and split copy). A struct with a
    tensor of unknown shape is left as it is.

    Attributes:
      packed_type: the packed values' TFF type (the struct's own if not packed).
      packs: whether values are packed.
    """

    def __init__(self, struct_type, *, packs: bool = True):
        """`packs=False`: the struct travels as it is (`pack` and `unpack` return it)."""
        import tensorflow_federated as tff

        self._type = struct_type
        self._leaves = list(tff.structure.flatten(struct_type))
        self._packs = packs and all(
            isinstance(leaf, tff.TensorType) and leaf.shape is not None
            and None not in leaf.shape for leaf in self._leaves)
        self._groups = collections.OrderedDict()  # dtype -> indices of its leaves
        for i, leaf in enumerate(self._leaves):
            self._groups.setdefault(leaf.dtype, []).append(i)
        self.packed_type = struct_type
        if self._packs:
            self.packed_type = tff.StructType([
                tff.TensorType(dtype, [sum(self._size(i) for i in indices)])
                for dtype, indices in self._groups.items()])

    @property
    def packs(self) -> bool:
        return self._packs

    def _size(self, i: int) -> int:
        return math.prod(self._leaves[i].shape)

    def pack_arrays(self, value) -> tuple:
        """`value` (of the struct type, numpy or Python values) as one numpy array per dtype."""
        import numpy as np

        flat = _leaves_of(value, self._type)
        return tuple(
            np.concatenate([np.asarray(flat[i], self._leaves[i].dtype).reshape(-1)
                            for i in indices])
            for indices in self._groups.values())

    def unpack_leaves(self, packed) -> list:
        """The struct's leaves, in order, from the numpy arrays `pack_arrays` packed.

        Leaves are views of `packed`'s arrays; scalars are numpy scalars, as TFF
        returns them.
        """
        import numpy as np

        flat = [None] * len(self._leaves)
        for array, indices in zip(packed, self._groups.values(), strict=True):
            ends = np.cumsum([self._size(i) for i in indices])
            for i, part in zip(indices, np.split(np.asarray(array), ends[:-1]), strict=True):
                shape = tuple(self._leaves[i].shape)
                flat[i] = part[0] if shape == () else part.reshape(shape)
        return flat

    def pack(self, value):
        """`value` (of the struct type, inside a TF computation) as the packed tensors."""
        import tensorflow as tf

        if not self._packs:
            return value
        flat = _leaves_of(value, self._type)
        return tuple(tf.concat([tf.reshape(flat[i], [-1]) for i in indices], 0)
                     for indices in self._groups.values())

    def unpack(self, packed):
        """The struct (a `tff.structure.Struct`) of packed tensors."""
        import tensorflow as tf
        import tensorflow_federated as tff

        if not self._packs:
            return packed
        flat = [None] * len(self._leaves)
        for tensor, indices in zip(packed, self._groups.values(), strict=True):
            parts = tf.split(tensor, [self._size(i) for i in indices])
            for i, part in zip(indices, parts, strict=True):
                flat[i] = tf.reshape(part, self._leaves[i].shape)
        return tff.structure.pack_sequence_as(self._type, flat)


def _leaves_of(value, value_type) -> list:
    """The tensors of `value` in the order of `value_type`'s leaves.

    `value` is what a computation of that type returns inside a TF computation:
    a `tff.structure.Struct` or Python containers (dicts, attrs classes,
    named tuples, tuples) in the type's element order or by its names.
    """
    import tensorflow_federated as tff

    if isinstance(value_type, tff.TensorType):
        return [value]
    leaves = []
    for i, (name, element_type) in enumerate(tff.structure.iter_elements(value_type)):
        if isinstance(value, tff.structure.Struct) or name is None:
            element = value[i]
        elif isinstance(value, collections.abc.Mapping):
            element = value[name]
        else:
            element = getattr(value, name)
        leaves += _leaves_of(element, element_type)
    return leaves
