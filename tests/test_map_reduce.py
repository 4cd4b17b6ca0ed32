"""The round compiled to TFF's MapReduceForm computes the composed round bit for bit.

`build_pruning_process` composes a round from TFF's learning templates and
runs it compiled to one MapReduceForm (`fedprune/federated/map_reduce.py`).
Each case builds the composed process, compiles its round, and runs the composed
`next`, the compiled one and the compiled one with its state packed
(`PruningProcess.next`) from the same state for three rounds on the same data:
every state and metric value must be equal (not close), with the same Python
containers, leaf types, dtypes and shapes.
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses

import numpy as np
import pytest
from cli_util import CHEAP_OUTPUTS

from fedprune.config import ExperimentConfig
from fedprune.federated import map_reduce
from fedprune.program import assembly

pytestmark = pytest.mark.usefixtures("tff_local_context")

# `composed_builds` replaces it in the module while a test builds composed processes.
COMPILE_ROUND = map_reduce.compile_round

# Three rounds: the ramps run to their end (rounds 1-3) and regrowth adjusts after
# rounds 1 and 2 (< --regrow_end_round=3).
BASE = ExperimentConfig(rounds=3, num_clients=3, clients_per_round=3,
                        max_examples_per_client=32, begin_round=1, end_round=3, eval_every=3,
                        **CHEAP_OUTPUTS)

# Every masking mode, each with other parts of the round that change its computations.
CASES = {
    "none: the fused mean": dict(masking="none", schedule="none"),
    "server: erk budgets, adam, random regrowth": dict(
        masking="server", sparsity_distribution="erk", server_optimizer="adam",
        server_lr=0.01, regrow="random", regrow_end_round=3),
    "client: majority masks, step granularity": dict(
        masking="client", mask_aggregation="majority", prune_granularity="step"),
    "both: int8 uploads, gradient regrowth": dict(
        masking="both", upload_quantization="int8", regrow="gradient", regrow_end_round=3),
    "both: client regrowth (FedDST)": dict(
        masking="both", regrow="random", regrow_at="client", regrow_end_round=3),
    "server: neuron structure": dict(masking="server", structure="neuron", final_sparsity=0.5,
                                    prune_output_layer=False),
    # DP's clipping and division; its noise comes from TensorFlow's stateful random ops,
    # which are not seedable, so with noise the two rounds differ by construction
    # (`test_compiled_round_draws_fresh_dp_noise_every_round`).
    "server: fixed-clip DP without noise": dict(masking="server", dp="fixed",
                                                dp_noise_multiplier=0.0, dp_clip=0.05),
}

# The intrinsics of every compiled round: the server's `prepare`, the broadcast, the
# clients' `work`, one aggregate, the server's `update` and the two selections of its
# state and metrics (server-placed maps are `federated_apply`s).
ROUND_INTRINSICS = {"federated_apply": 4, "federated_broadcast": 1, "federated_map": 1,
                    "federated_aggregate": 1, "federated_zip_at_clients": 1,
                    "federated_zip_at_server": 1}


def _config(**changes) -> ExperimentConfig:
    return dataclasses.replace(BASE, **changes).validate()


def _intrinsics(computation) -> dict[str, int]:
    import tensorflow_federated as tff

    counts = collections.Counter()

    def visit(block):
        if isinstance(block, tff.framework.Intrinsic):
            counts[block.uri] += 1
        return block, False

    tff.framework.transform_postorder(computation.to_building_block(), visit)
    return dict(counts)


def _flat(value) -> list[np.ndarray]:
    import tensorflow_federated as tff

    return [np.asarray(v) for v in
            tff.structure.flatten(tff.structure.from_container(value, recursive=True))]


@pytest.fixture
def composed_builds(monkeypatch):
    """`assembly.build_process` builds composed rounds (and forgets them afterwards).

    Yields the list of the composed `LearningProcess`es built.
    """
    built = []

    def composed(process):
        built.append(process)
        return map_reduce.CompiledRound(process, process.next)

    monkeypatch.setattr(map_reduce, "compile_round", composed)
    assembly.clear_process_cache()
    yield built
    assembly.clear_process_cache()


def _shape_of(value):
    """`value`'s Python containers, and each leaf's Python type, dtype and shape."""
    import attr

    if isinstance(value, collections.abc.Mapping):
        return type(value), [(k, _shape_of(v)) for k, v in value.items()]
    if isinstance(value, (tuple, list)):
        return type(value), [_shape_of(v) for v in value]
    if attr.has(type(value)):
        return type(value), [_shape_of(getattr(value, f.name)) for f in attr.fields(type(value))]
    return type(value), np.asarray(value).dtype, np.shape(value)


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_compiled_round_equals_the_composed_round(composed_builds, case):
    """The compiled round, called with its state as it is (`process.next`) and packed
    (`PruningProcess.next`), returns the composed round's values in its containers."""
    config = _config(**CASES[case])
    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    composed = pp.process.next
    compiled = COMPILE_ROUND(composed_builds[-1])
    assert compiled.process.next.type_signature == composed.type_signature
    assert _intrinsics(compiled.process.next) == ROUND_INTRINSICS
    assert _intrinsics(composed)["federated_apply"] > 2 * ROUND_INTRINSICS["federated_apply"]

    next_fns = (composed, compiled.process.next, compiled.next)
    states = [pp.process.initialize()] * len(next_fns)
    for round_num in range(1, config.rounds + 1):
        outputs = [next_fn(state, assembly.round_inputs(config, data, round_num).datasets)
                   for next_fn, state in zip(next_fns, states, strict=True)]
        expected = _flat(outputs[0])
        for output in outputs[1:]:
            assert _shape_of(output) == _shape_of(outputs[0])
            actual = _flat(output)
            assert len(actual) == len(expected)
            for want, got in zip(expected, actual, strict=True):
                np.testing.assert_array_equal(got, want)
        states = [output.state for output in outputs]
    # The rounds moved the model (the comparison is not of two untouched states).
    assert not np.array_equal(_flat(states[0].global_model_weights)[0],
                              _flat(pp.process.initialize().global_model_weights)[0])


def test_built_processes_run_the_compiled_round():
    """`process.next` is the compiled round; `PruningProcess.next` the same round with the
    state as one tensor per dtype (masks, kernels and schedules: float32, int64, int32,
    bool), from a grid cell's state as from the built one."""
    import tensorflow_federated as tff

    assembly.clear_process_cache()
    config = _config(masking="both")
    data = assembly.load_data(config)
    built = assembly.build_process(config, data)
    cell = assembly.build_process(dataclasses.replace(config, final_sparsity=0.5, seed=3), data)
    assert cell.process.next is built.process.next  # one trace for both
    for pp in (built, cell):
        assert _intrinsics(pp.process.next) == ROUND_INTRINSICS
        packed = pp._next.computation
        assert _intrinsics(packed) == ROUND_INTRINSICS
        state_type = packed.type_signature.parameter[0].member
        assert [t.dtype for t in tff.structure.flatten(state_type)] == [
            np.float32, np.int64, np.int32, np.bool_]
        states = [pp.process.initialize()] * 2
        for round_num in (1, 2):
            datasets = assembly.round_inputs(config, data, round_num).datasets
            outputs = [pp.process.next(states[0], datasets), pp.next(states[1], datasets)]
            assert _shape_of(outputs[1]) == _shape_of(outputs[0])
            for want, got in zip(_flat(outputs[0]), _flat(outputs[1]), strict=True):
                np.testing.assert_array_equal(got, want)
            states = [output.state for output in outputs]


def test_compiled_round_draws_fresh_dp_noise_every_round():
    """With the clients' updates clipped to nothing, each round's step is the noise: its
    spread is z * C / m per weight and it is uncorrelated with the round before."""
    assembly.clear_process_cache()
    z, clip, m = 1e5, 1e-6, 3
    config = _config(masking="none", schedule="none", dp="fixed", dp_noise_multiplier=z,
                     dp_clip=clip, rounds=4)
    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    assert _intrinsics(pp.process.next) == ROUND_INTRINSICS
    state = pp.process.initialize()
    kernels = [np.asarray(state.global_model_weights.trainable[0])]
    for round_num in range(1, config.rounds + 1):
        datasets = assembly.round_inputs(config, data, round_num).datasets
        state = pp.process.next(state, datasets).state
        kernels.append(np.asarray(state.global_model_weights.trainable[0]))
    steps = [(after - before).ravel()
             for before, after in zip(kernels[:-1], kernels[1:], strict=True)]
    for step in steps:  # 8,192 weights: the spread within a few per cent
        assert np.std(step) == pytest.approx(z * clip / m, rel=0.1)
    # |r| ~ 0.01 for independent draws; 1 for noise drawn again.
    for before, after in zip(steps[:-1], steps[1:], strict=True):
        assert abs(np.corrcoef(before, after)[0, 1]) < 0.1


@pytest.mark.parametrize("packs", [True, False], ids=["static shapes", "an unknown dimension"])
def test_packing_moves_a_struct_as_one_tensor_per_dtype_bit_for_bit(packs):
    import tensorflow as tf
    import tensorflow_federated as tff

    kernel_shape = [2, 3] if packs else [None, 3]
    struct_type = tff.StructType([
        ("weights", tff.StructType([tff.TensorType(np.float32, kernel_shape),
                                    tff.TensorType(np.float32, [3])])),
        ("step", tff.TensorType(np.int64)),
        ("started", tff.TensorType(np.bool_)),
        ("rate", tff.TensorType(np.float32)),
    ])
    packing = map_reduce._Packing(struct_type)
    if packs:
        assert packing.packed_type == tff.StructType([
            tff.TensorType(np.float32, [10]), tff.TensorType(np.int64, [1]),
            tff.TensorType(np.bool_, [1])])
    else:
        assert packing.packed_type == struct_type

    @tff.tensorflow.computation(struct_type)
    def round_trip(value):
        packed = packing.pack(value)
        if packs:
            assert [t.shape.as_list() for t in tf.nest.flatten(packed)] == [[10], [1], [1]]
        return packing.unpack(packed)

    kernel = np.array([[-0.0, np.nan, 1e-45], [np.inf, -3.5, 2.0]], np.float32)
    value = collections.OrderedDict(
        weights=(kernel, np.array([1.0, -0.0, 7.25], np.float32)), step=np.int64(2**40 + 1),
        started=np.bool_(True), rate=np.float32(0.1))
    got = round_trip(value)
    for want, actual in zip(_flat(value), _flat(got), strict=True):
        assert want.dtype == actual.dtype
        np.testing.assert_array_equal(np.atleast_1d(actual).view(np.uint8),  # the bits
                                      np.atleast_1d(want).view(np.uint8))
