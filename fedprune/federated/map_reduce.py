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

    @tff.tensorflow.computation(form.work.type_signature.parameter)
    def work(arg):
        # Selected inside TensorFlow: a selection outside it is one more map
        # over the clients (~2 ms a round of 10 clients).
        return form.work(arg)[0]

    @tff.federated_computation(form.type_signature.parameter)
    def round_fn(state, client_data):
        broadcast = tff.federated_broadcast(tff.federated_map(form.prepare, state))
        client_outputs = tff.federated_map(work, tff.federated_zip([client_data, broadcast]))
        aggregate = tff.federated_aggregate(client_outputs, form.zero(), form.accumulate,
                                            form.merge, form.report)
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
