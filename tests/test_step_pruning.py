"""--prune_granularity=step: tfmot prunes inside local training, in client steps.

The contract of the client path: with one client, full participation and
server SGD at learning rate 1, `--masking=client` federated training is
centralized Keras `fit` with tfmot's `prune_low_magnitude` and
`UpdatePruningStep` on the same batches in the same order (one local epoch per
round = one Keras epoch), masks equal and weights within 1e-6, round after
round. Then: masks are tfmot's `_update_mask` (its tie rule, not fedprune's
exactly-k), tfmot's N:M and block masks, the round -> step mapping and its
refusals.
"""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
from tensorflow_model_optimization.python.core.sparsity.keras import pruning_impl

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.federated import process as fp_process
from fedprune.model import builders
from fedprune.pruning import masking, schedules, step_schedule

pytestmark = pytest.mark.usefixtures("tff_local_context")

HIDDEN = (16,)  # MLP 64-16-10: kernels of 1,024 and 160 weights
BATCHES = 8  # one client of 128 digits in batches of 16: 8 client steps per round
ROUNDS = 4


@pytest.fixture(scope="module")
def one_client(digits_clients):
    (dataset,) = digits_clients(1, 16 * BATCHES)
    return dataset


def _build(client_data, schedule, *, steps_per_round, prune_every_steps, masking_mode="client",
           mask_spec=None, model_builder=None, client_lr=0.1, num_rounds=ROUNDS):
    mapping = step_schedule.step_mapping(schedule, steps_per_round=steps_per_round,
                                         prune_every_steps=prune_every_steps)
    return fp_process.build_pruning_process(
        model_builder=model_builder or (lambda: builders.mlp((64,), 10, hidden=HIDDEN)),
        input_spec=client_data.element_spec, masking=masking_mode, schedule=schedule,
        mask_spec=mask_spec or masking.MaskSpec(), num_rounds=num_rounds,
        client_optimizer=fp_process.make_optimizer("sgd", client_lr),
        server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0, step_mapping=mapping)


# (round schedule, its steps with 8 steps per round and frequency f, f, the
# centralized tfmot schedule built by hand from those steps).
CONTRACT = {
    # 0.2 -> 0.75 over rounds 1..3 = steps 8..24, every 2 steps: 9 mask updates in
    # rounds 1 (step 8), 2 (10, 12, 14, 16) and 3 (18, ..., 24); none in round 4.
    "polynomial": (schedules.PolynomialDecay(0.2, 0.75, begin_round=1, end_round=3, power=3),
                   2, lambda: tfmot.sparsity.keras.PolynomialDecay(
                       0.2, 0.75, begin_step=8, end_step=24, power=3, frequency=2)),
    # 0.6 from round 1 = step 8 on, every 3 steps to the end: 8, 11, ..., 32.
    "constant": (schedules.ConstantSparsity(0.6, begin_round=1, end_round=-1),
                 3, lambda: tfmot.sparsity.keras.ConstantSparsity(
                     0.6, begin_step=8, end_step=-1, frequency=3)),
}


def _kept(size, sparsity):
    # tfmot's count: max(round(N * (1 - s)), 1) in float32 (ties could add more).
    return max(int(np.round(np.float32(size) * (np.float32(1) - np.float32(sparsity)))), 1)


@pytest.mark.parametrize("name", sorted(CONTRACT))
def test_one_client_equals_centralized_tfmot_fit(one_client, name):
    schedule, frequency, tfmot_schedule = CONTRACT[name]
    pp = _build(one_client, schedule, steps_per_round=BATCHES, prune_every_steps=frequency)
    state = pp.process.initialize()
    initial = pp.process.get_model_weights(state)

    central = tfmot.sparsity.keras.prune_low_magnitude(
        builders.mlp((64,), 10, hidden=HIDDEN), pruning_schedule=tfmot_schedule())
    assert [tuple(v.shape) for v in central.trainable_weights] == [
        tuple(np.shape(w)) for w in initial.trainable]
    for var, value in zip(central.trainable_weights, initial.trainable, strict=True):
        var.assign(value)
    central.compile(optimizer=tf.keras.optimizers.SGD(0.1),
                    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    batches = one_client.map(lambda b: (b["x"], b["y"]))
    callback = tfmot.sparsity.keras.UpdatePruningStep()

    # tfmot wraps every layer of the model (Flatten too, with a step and no mask).
    central_masks = [v for v in central.non_trainable_weights if "/mask" in v.name]
    central_steps = [v for v in central.non_trainable_weights if "/pruning_step" in v.name]
    assert len(central_masks) == len(pp.layout.kernels) == 2

    worst = 0.0
    for r in range(1, ROUNDS + 1):
        state = pp.process.next(state, [one_client]).state
        fl = pp.process.get_model_weights(state)
        central.fit(batches, epochs=1, shuffle=False, callbacks=[callback], verbose=0)
        for k, mask in zip(pp.layout.kernels, central_masks, strict=True):
            np.testing.assert_array_equal(fl.non_trainable[k.mask_index], mask.numpy(),
                                          err_msg=f"round {r}, {k.name}")
        for ours, theirs in zip(fl.trainable, central.trainable_weights, strict=True):
            worst = max(worst, float(np.max(np.abs(ours - theirs.numpy()))))
        assert worst < 1e-6, (r, worst)
        # The server's global step is the centralized one: 8 steps per round.
        assert {int(fl.non_trainable[i]) for i in pp.layout.step_indices} == {BATCHES * r}
        assert {int(v.numpy()) for v in central_steps} == {BATCHES * r}
    # The ramp was pruned: the final masks keep tfmot's count at the final sparsity.
    final = schedule.final_sparsity_value
    for k in pp.layout.kernels:
        kept = int(fl.non_trainable[k.mask_index].sum())
        assert kept == _kept(k.size, final), (k.name, kept)
        assert np.count_nonzero(fl.trainable[k.trainable_index]) == kept
    print(f"{name}: max |w_FL - w_central| over {ROUNDS} rounds = {worst:.3g}")


def _tied_mlp():
    """An MLP whose initial kernels are multiples of 1/40: many ties in |w|."""
    def tied(shape, dtype=None):
        values = np.round(np.random.default_rng(len(shape) + shape[-1]).normal(size=shape) * 4)
        return tf.constant(values / 40.0, dtype or tf.float32)

    return tf.keras.Sequential([
        tf.keras.layers.InputLayer(input_shape=(64,)),
        tf.keras.layers.Dense(16, activation="relu", kernel_initializer=tied),
        tf.keras.layers.Dense(16, kernel_initializer=tied),
    ])


@pytest.mark.parametrize("structure", ["unstructured", "2:4", "block"])
def test_step_masks_are_tfmots_update_mask_bit_for_bit(one_client, structure):
    # One step per round and a one-shot schedule at round 1 = step 1: every client
    # computes its mask on the first batch, from the broadcast kernel itself.
    # MAX pooling keeps the ties of the block scores too.
    spec = masking.MaskSpec(structure=structure, block_size=(1, 4), block_pooling="MAX")
    pp = _build(one_client, schedules.OneShot(0.5, begin_round=1), steps_per_round=1,
                prune_every_steps=1, mask_spec=spec, model_builder=_tied_mlp, num_rounds=1)
    state = pp.process.initialize()
    initial = pp.process.get_model_weights(state)
    fl = pp.process.get_model_weights(pp.process.next(state, [one_client]).state)
    params = step_schedule.wrapper_params(spec)
    exactly_k_differs = False
    for k in pp.layout.kernels:
        kernel = tf.Variable(initial.trainable[k.trainable_index])
        theirs = pruning_impl.Pruning(
            training_step_fn=lambda: tf.constant(1, tf.int64),
            pruning_vars=[(kernel, tf.Variable(tf.ones_like(kernel)), tf.Variable(0.0))],
            pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.5, 1, 1, 1),
            block_size=params.get("block_size", (1, 1)),
            block_pooling_type=params.get("block_pooling_type", "AVG"),
            sparsity_m_by_n=params.get("sparsity_m_by_n"),
        )._maybe_update_block_mask(kernel)[1].numpy()
        ours = fl.non_trainable[k.mask_index]
        np.testing.assert_array_equal(ours, theirs, err_msg=k.name)
        assert 0.3 < 1.0 - ours.mean() <= 0.5, k.name  # pruned, at most half
        # fedprune's round rule keeps exactly k (ties by index); tfmot keeps every tie.
        exact_k = masking.compute_masks([kernel], spec, 0.5)[0].numpy()
        exactly_k_differs |= not np.array_equal(exact_k, theirs)
    assert exactly_k_differs == (structure != "2:4")  # 2:4 is tfmot's own utility either way


# --------------------------------------------------------------------------
# The round -> step mapping.

@pytest.mark.parametrize("schedule, spr, every, expected", [
    (schedules.PolynomialDecay(0.0, 0.8, 1, 20), 9, 1, ("PolynomialDecay", 9, 180, 1)),
    (schedules.PolynomialDecay(0.0, 0.8, 2, 6, prune_every=1), 10, 5,
     ("PolynomialDecay", 20, 60, 5)),
    (schedules.ConstantSparsity(0.5, 3, -1), 7, 2, ("ConstantSparsity", 21, -1, 2)),
    (schedules.ConstantSparsity(0.5, 3, 5), 7, 2, ("ConstantSparsity", 21, 35, 2)),
    (schedules.OneShot(0.9, 4), 12, 1, ("ConstantSparsity", 48, 48, 1)),
])
def test_step_mapping_multiplies_rounds_by_steps_per_round(schedule, spr, every, expected):
    mapping = step_schedule.step_mapping(schedule, steps_per_round=spr, prune_every_steps=every)
    assert (mapping.schedule_class, mapping.begin_step, mapping.end_step,
            mapping.frequency) == expected
    in_steps = step_schedule.tfmot_step_schedule(schedule, mapping)
    assert type(in_steps).__name__ == expected[0]
    # Same sparsity at the end of round r as the round schedule at round r.
    for r in range(schedule.last_update_round, schedule.last_update_round + 3):
        assert float(in_steps(tf.constant(r * spr, tf.int64))[1]) == pytest.approx(
            float(schedule.tfmot_schedule()(tf.constant(r, tf.int64))[1]), abs=1e-6)


def test_step_table_summarizes_steps_per_round():
    # 0 -> 0.8 over rounds 1..3 with 4 steps per round, every 3 steps: updates at
    # steps 4, 7, 10 (rounds 1, 2, 3: windows (0,4], (4,8], (8,12]); none after.
    schedule = schedules.PolynomialDecay(0.0, 0.8, 1, 3, power=1)
    mapping = step_schedule.step_mapping(schedule, steps_per_round=4, prune_every_steps=2)
    table = step_schedule.step_table(step_schedule.tfmot_step_schedule(schedule, mapping),
                                     num_rounds=5, steps_per_round=4)
    # Steps 4, 6, 8, 10, 12: round 1 ends at step 4 (s 0), round 2 at 8 (0.4), round 3 at 12.
    np.testing.assert_array_equal(table.updates, [False, True, True, True, False, False])
    np.testing.assert_allclose(table.sparsity, [0, 0, 0.4, 0.8, 0.8, 0.8], atol=1e-6)
    # With the default frequency (1 step) the levels at round ends are the round table's.
    mapping = step_schedule.step_mapping(schedule, steps_per_round=4, prune_every_steps=1)
    table = step_schedule.step_table(step_schedule.tfmot_step_schedule(schedule, mapping),
                                     num_rounds=5, steps_per_round=4)
    np.testing.assert_allclose(table.sparsity, schedule.table(5).sparsity, atol=1e-6)


@pytest.mark.parametrize("sizes, epochs, batch, cap, expected", [
    ([160, 112, 64, 32], 1, 16, None, 6),  # 10, 7, 4, 2 steps: mean 5.75
    ([100, 20], 1, 16, None, 5),  # 7 and 2 steps (partial last batches): mean 4.5, half up
    ([100, 20], 3, 16, None, 12),  # ceil(300/16) = 19 and ceil(60/16) = 4: 11.5
    ([100, 20], 1, 16, 32, 2),  # capped at 32 examples: 2 and 2
    ([1], 1, 16, None, 1),
])
def test_default_steps_per_round_is_the_mean_client(sizes, epochs, batch, cap, expected):
    assert step_schedule.mean_local_steps(sizes, local_epochs=epochs, batch_size=batch,
                                          max_examples=cap) == expected


STEP = dict(prune_granularity="step", masking="client")


@pytest.mark.parametrize("changes, flag", [
    (dict(prune_granularity="steps"), "prune_granularity"),
    (dict(steps_per_round=5), "steps_per_round"),  # round granularity keeps the default
    (dict(prune_every_steps=5), "prune_every_steps"),
    (dict(STEP, masking="server"), "prune_granularity"),
    (dict(STEP, mask_criterion="threshold", threshold=0.1), "mask_criterion"),
    (dict(STEP, mask_scope="global"), "mask_scope"),
    (dict(STEP, structure="neuron", prune_output_layer=False), "structure"),
    (dict(STEP, structure="block", model="cnn"), "model"),
    (dict(STEP, prune_every=19, end_round=20), "prune_every"),
    (dict(STEP, schedule="oneshot", begin_round=0), "begin_round"),
    (dict(STEP, steps_per_round=7, prune_every_steps=4), "prune_every_steps"),  # 133 % 4
    (dict(STEP, steps_per_round=-1), "steps_per_round"),
    (dict(STEP, prune_every_steps=0), "prune_every_steps"),
])
def test_unsupported_step_combinations_name_their_flag(changes, flag):
    with pytest.raises(InvalidArgument, match=f"^--{flag}="):
        dataclasses.replace(ExperimentConfig(), **changes).validate()


@pytest.mark.parametrize("changes", [
    STEP, dict(STEP, masking="both"), dict(STEP, structure="2:4", final_sparsity=0.5),
    dict(STEP, structure="block", block_size=(2, 2)), dict(STEP, steps_per_round=7),
    dict(STEP, schedule="constant", begin_round=2, prune_every_steps=3),
    dict(STEP, model="cnn", structure="2:4", final_sparsity=0.5),
])
def test_supported_step_combinations_validate(changes):
    config = dataclasses.replace(ExperimentConfig(), **changes).validate()
    assert config.fingerprint() != ExperimentConfig().fingerprint()


def test_new_fields_at_their_defaults_keep_the_fingerprint():
    # The default's fingerprint since commit cb42ba4 (tests/test_config.py).
    assert ExperimentConfig(prune_granularity="round", steps_per_round=0,
                            prune_every_steps=1).fingerprint() == "cacb424d245d153f"


def test_schedule_without_tfmot_class_is_refused():
    with pytest.raises(InvalidArgument, match="^--schedule='none'"):
        step_schedule.step_mapping(schedules.NoPruning(), steps_per_round=4, prune_every_steps=1)


def test_step_form_comes_from_the_schedule_class_not_its_name():
    # The registry's step schedules, and a new schedule class maps by its
    # `tfmot_step_class` (an extension needs no edit in step_schedule.py).
    assert step_schedule.step_schedules() == ("constant", "polynomial", "oneshot")

    @dataclasses.dataclass(frozen=True)
    class Renamed(schedules.PolynomialDecay):
        name: ClassVar[str] = "renamed"

    poly = schedules.PolynomialDecay(0.1, 0.8, begin_round=2, end_round=6)
    renamed = Renamed(0.1, 0.8, begin_round=2, end_round=6)
    assert (step_schedule.step_mapping(renamed, steps_per_round=3, prune_every_steps=2)
            == step_schedule.step_mapping(poly, steps_per_round=3, prune_every_steps=2))

    @dataclasses.dataclass(frozen=True)
    class Mislabelled(schedules.PolynomialDecay):
        name: ClassVar[str] = "mislabelled"
        tfmot_step_class: ClassVar[str] = "ConstantSparsity"

    with pytest.raises(InvalidArgument, match="^--schedule='mislabelled'.*PolynomialDecay"):
        step_schedule.step_mapping(Mislabelled(0.1, 0.8, begin_round=2, end_round=6),
                                   steps_per_round=3, prune_every_steps=2)


def test_auto_steps_per_round_is_resolved_from_the_data_and_checked():
    from fedprune.program import assembly

    # 4 digits clients (Dirichlet 0.5, seed 0) of 172, 384, 500 and 381 examples:
    # 11, 24, 32 and 24 steps of 16, mean 22.75 -> 23 steps per round.
    # The frequency is checked once steps_per_round is resolved.
    config = ExperimentConfig(prune_granularity="step", masking="client", num_clients=4,
                              clients_per_round=4, prune_every_steps=4).validate()
    data = assembly.load_data(config)
    assert [data.num_examples(c) for c in data.client_ids] == [172, 384, 500, 381]
    # (20 - 1) * 23 = 437 is not a multiple of 4.
    with pytest.raises(InvalidArgument, match="^--prune_every_steps=4: .* = 437 "):
        assembly.step_mapping(config, data)
    mapping = assembly.step_mapping(dataclasses.replace(config, prune_every_steps=1), data)
    assert mapping.to_dict() == dict(
        steps_per_round=23, begin_step=23, end_step=460, frequency=1,
        schedule_class="PolynomialDecay", source=mapping.source)
    assert "mean over the training clients" in mapping.source
    assert assembly.step_mapping(dataclasses.replace(config, steps_per_round=5,
                                                     prune_every_steps=5), data).end_step == 100
