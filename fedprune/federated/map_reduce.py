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
import math


def compile_round(process):
    """`process` with its `next` compiled to one MapReduceForm round (`compile_next`).

    Args:
      process: a `tff.learning.templates.LearningProcess` whose `next` fits
        the form (every process `build_pruning_process` composes).

    Returns:
      A `LearningProcess` with `process`'s computations but `next`.
    """
    import tensorflow_federated as tff

    return tff.learning.templates.LearningProcess(
        process.initialize, compile_next(process.next), process.get_model_weights,
        process.set_model_weights, get_hparams_fn=process.get_hparams,
        set_hparams_fn=process.set_hparams)


def compile_next(next_fn):
    """A round computation compiled to TFF's MapReduceForm.

    Args:
      next_fn: `(state@SERVER, data@CLIENTS) -> <state@SERVER, metrics@SERVER>`
        with one broadcast phase and one aggregation phase, e.g. a composed
        learning process's `next`.

    Returns:
      A computation of `next_fn`'s type signature (with its Python containers)
      that computes the same round, bit for bit, as one server map before the
      broadcast, one client map, one `federated_aggregate` and one server map
      after it.

    Raises:
      tff.backends.mapreduce's `MapReduceFormCompilationError` (or TypeError)
      for a round that does not fit the form (e.g. a second broadcast that
      depends on an aggregate, or secure sums).
    """
    import tensorflow as tf
    import tensorflow_federated as tff
    from tensorflow_federated.python.core.impl.computation import computation_impl
    from tensorflow_federated.python.core.impl.context_stack import context_stack_impl

    result_names = [name for name, _ in tff.structure.iter_elements(next_fn.type_signature.result)]
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

    # What crosses the broadcast, the clients' upload and the aggregation's
    # accumulator travel as one tensor per dtype (`_Packing`).
    broadcast_packing = _Packing(form.prepare.type_signature.result)
    upload_packing = _Packing(form.work.type_signature.result[0])
    sum_packing = _Packing(form.zero.type_signature.result)
    data_type = form.work.type_signature.parameter[0]

    @tff.tensorflow.computation(form.prepare.type_signature.parameter)
    def prepare(state):
        return broadcast_packing.pack(form.prepare(state))

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

    @tff.federated_computation(form.type_signature.parameter)
    def round_fn(state, client_data):
        broadcast = tff.federated_broadcast(tff.federated_map(prepare, state))
        uploads = tff.federated_map(work, tff.federated_zip([client_data, broadcast]))
        aggregate = tff.federated_aggregate(uploads, zero(), accumulate, merge, report)
        updated = tff.federated_map(form.update,
                                    tff.federated_zip((state, (aggregate, (), (), ()))))
        # Two SERVER values, as `next_fn` returns, not one SERVER struct.
        return collections.OrderedDict(
            (name, updated[i]) for i, name in enumerate(result_names))

    # `next_fn`'s type, with its Python containers, on the compiled proto.
    return computation_impl.ConcreteComputation(
        computation_proto=computation_impl.ConcreteComputation.get_proto(round_fn),
        context_stack=context_stack_impl.context_stack,
        annotated_type=next_fn.type_signature)


class _Packing:
    """A struct of tensors as one rank-1 tensor per dtype, and back.

    TFF's C++ runtime pays per value it moves (per client, for what is
    broadcast or uploaded); concatenating a struct's tensors of each dtype
    into one, and splitting them on the other side, moves the same bytes in a
    few values, bit for bit (reshape, concat and split copy). A struct with a
    tensor of unknown shape is left as it is.

    Attributes:
      packed_type: the packed values' TFF type (the struct's own if not packed).
    """

    def __init__(self, struct_type):
        import tensorflow_federated as tff

        self._type = struct_type
        self._leaves = list(tff.structure.flatten(struct_type))
        self._packs = all(leaf.shape is not None and None not in leaf.shape
                          for leaf in self._leaves)
        self._groups = collections.OrderedDict()  # dtype -> indices of its leaves
        for i, leaf in enumerate(self._leaves):
            self._groups.setdefault(leaf.dtype, []).append(i)
        self.packed_type = struct_type
        if self._packs:
            self.packed_type = tff.StructType([
                tff.TensorType(dtype, [sum(self._size(i) for i in indices)])
                for dtype, indices in self._groups.items()])

    def _size(self, i: int) -> int:
        return math.prod(self._leaves[i].shape)

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
