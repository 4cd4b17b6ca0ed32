"""Structured (neuron/filter) federated pruning, and shrinking the global model mid-training.

In-process TFF cases use 4 digits clients and MLP 64-20-10 / a small
Conv(6)-BatchNorm CNN; the end-to-end cases (`slow`) run `loop.run_experiment`
for 4 rounds of 3 clients.
"""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff
from cli_util import CHEAP_OUTPUTS

from fedprune.config import ExperimentConfig
from fedprune.federated import client_work
from fedprune.federated import process as fp_process
from fedprune.model import surgery
from fedprune.program import shrinking
from fedprune.pruning import masking, schedules, structured, unit_layout

L = tf.keras.layers
NUM_CLIENTS = 4
# Half the units after round 1, three quarters after round 2 (then kept).
POLY = schedules.PolynomialDecay(0.5, 0.75, begin_round=1, end_round=2, power=1)

pytestmark = pytest.mark.usefixtures("tff_local_context")


@pytest.fixture(scope="module")
def client_data(digits_clients):
    return digits_clients(NUM_CLIENTS, 320)


def _bn_cnn():
    return tf.keras.Sequential([
        L.InputLayer(input_shape=(64,)), L.Reshape((8, 8, 1)),
        L.Conv2D(6, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(), L.Dense(10),
    ])


BUILDERS = {
    # tanh: a dropped unit's bias gets gradients on clients (ReLU's would be 0 at 0).
    "neuron": lambda: tf.keras.Sequential([
        L.InputLayer(input_shape=(64,)), L.Dense(20, activation="tanh"), L.Dense(10)]),
    "filter": _bn_cnn,
}
UNITS = {"neuron": 20, "filter": 6}


def _build(client_data, structure, server="sgd", norm="l2"):
    return fp_process.build_pruning_process(
        model_builder=BUILDERS[structure],
        input_spec=client_data[0].element_spec,
        masking="server",
        schedule=POLY,
        mask_spec=masking.MaskSpec(structure=structure, unit_norm=norm),
        num_rounds=3,
        client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer(server, 1.0 if server == "sgd" else 0.05),
        seed=0,
        prune_output_layer=False,
    )


def _run(pp, client_data, rounds):
    state = pp.process.initialize()
    states = [state]
    for _ in range(rounds):
        state = pp.process.next(state, client_data).state
        states.append(state)
    return states


@pytest.fixture(scope="module")
def trained(client_data):
    """(structure, server) -> (pp, states after rounds 0..3); each built and run once."""
    cache = {}

    def get(structure, server):
        if (structure, server) not in cache:
            pp = _build(client_data, structure, server)
            cache[structure, server] = pp, _run(pp, client_data, 3)
        return cache[structure, server]

    return get


@pytest.mark.parametrize("structure, server", [("neuron", "sgd"), ("filter", "adam")])
def test_broadcast_model_is_exactly_unit_sparse_every_round(trained, structure, server):
    pp, states = trained(structure, server)
    (p,) = pp.units.layers
    # Units kept after rounds 0..3: all, max(round(n * 0.5), 1), round(n * 0.25), the same.
    n = UNITS[structure]
    expected_kept = [n, round(n * 0.5), round(n * 0.25), round(n * 0.25)]
    mask_index = pp.layout.kernels[0].mask_index
    previous = None
    for r, state in enumerate(states):
        weights = pp.process.get_model_weights(state)
        mask = weights.non_trainable[mask_index]
        unit_mask = mask.reshape(-1, n).max(axis=0)
        assert unit_mask.sum() == expected_kept[r], r
        np.testing.assert_array_equal(mask, np.broadcast_to(unit_mask, mask.shape))
        dropped = unit_mask == 0
        kernel = weights.trainable[p.kernel_index].reshape(-1, n)
        assert not kernel[:, dropped].any(), r
        assert kernel[:, ~dropped].all(), r  # trained weights are nonzero
        for i, _ in structured.dependent_weights(p):  # bias, and BatchNorm gamma and beta
            assert not weights.trainable[i][dropped].any(), (r, i)
            assert r == 0 or weights.trainable[i][~dropped].all(), (r, i)  # biases start at 0
        consumer = weights.trainable[p.consumer_kernel_index]  # rows p * units + u read u
        rows = np.tile(dropped, p.consumer_repeat)
        assert not consumer[..., rows, :].any(), r
        if previous is not None and r == 3:  # no update after round 2: the same units
            np.testing.assert_array_equal(unit_mask, previous)
        previous = unit_mask
    weights = pp.process.get_model_weights(states[-1])
    kept = shrinking.kept_units(pp, weights)
    assert [len(k) for k in kept.values()] == [expected_kept[-1]]
    # A dropped unit whose bias is not zero cannot be cut out exactly.
    trainable = list(weights.trainable)
    trainable[p.bias_index] = trainable[p.bias_index].copy()
    trainable[p.bias_index][np.flatnonzero(dropped)[0]] = 0.5
    with pytest.raises(shrinking.ShrinkError, match="nonzero for units its mask dropped"):
        shrinking.kept_units(pp, tff.learning.models.ModelWeights(trainable,
                                                                  weights.non_trainable))


def test_uploads_are_zero_on_dropped_units_biases_too(client_data, trained):
    # tanh: a dropped unit's bias gets a nonzero gradient on the clients (tanh'(0) = 1),
    # so only the client's upload mask keeps its update at zero.
    pp, states = trained("neuron", "sgd")
    (p,) = pp.units.layers
    broadcast = pp.process.get_model_weights(states[1])  # 10 of 20 units
    dropped = ~broadcast.trainable[p.kernel_index].any(axis=0)
    assert dropped.sum() == 10
    # The server also zeroes the output layer's rows of dropped units, which alone makes
    # their bias gradients 0; put values there to see what the upload mask does.
    trainable = list(broadcast.trainable)
    consumer = trainable[p.consumer_kernel_index].copy()
    assert not consumer[dropped].any()
    consumer[dropped] = 0.3
    trainable[p.consumer_kernel_index] = consumer
    broadcast = tff.learning.models.ModelWeights(trainable, broadcast.non_trainable)

    def model_fn():
        return tff.learning.models.from_keras_model(
            pp.keras_model_fn(), input_spec=client_data[0].element_spec,
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))

    results = {}
    for name, units in (("masked", pp.units), ("kernel-only", None)):
        work = client_work.build_pruning_client_work(
            model_fn=model_fn, client_optimizer=fp_process.make_optimizer("sgd", 0.1),
            masking="server", layout=pp.layout, table=pp.table,
            mask_spec=masking.MaskSpec(structure="neuron"), units=units)
        output = work.next(work.initialize(), [broadcast] * 2, client_data[:2])
        results[name] = [r.update for r in output.result]
    for update in results["masked"]:
        assert not update[p.bias_index][dropped].any()
        assert update[p.bias_index][~dropped].all()
        assert not update[p.kernel_index][:, dropped].any()
    for update in results["kernel-only"]:  # what tfmot alone would upload
        assert update[p.bias_index][dropped].all()


def test_shrunk_process_continues_with_sliced_adam_state(client_data, trained):
    pp, states = trained("filter", "adam")
    old = states[2]
    weights = pp.process.get_model_weights(old)
    plain = shrinking.plain_model(pp, weights)
    layout = unit_layout.structured_layout(plain)
    kept = shrinking.by_name(layout, shrinking.kept_units(pp, weights))
    small = surgery.shrink(plain, kept)
    x = np.concatenate([b["x"] for b in client_data[0].as_numpy_iterator()])
    masked_logits = plain(x, training=False).numpy()
    assert np.abs(small(x, training=False).numpy() - masked_logits).max() <= 1e-5
    # Conv 3x3 6 -> 2 filters (+ BatchNorm's 4 vectors), Dense 4*4*2 = 32 rows of 10.
    assert surgery.count_params(small) == 9 * 2 + 2 + 4 * 2 + 32 * 10 + 10 == 358
    small_pp = fp_process.build_pruning_process(
        model_builder=lambda: tf.keras.models.clone_model(small),
        input_spec=client_data[0].element_spec, masking="none",
        schedule=schedules.make_schedule("none"), mask_spec=masking.MaskSpec(), num_rounds=3,
        client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer("adam", 0.05), seed=0,
        prune_output_layer=False)
    new = shrinking.transfer_state(old, small_pp.process, layout=layout, kept=kept,
                                   shrunk_model=small)
    old_adam, new_adam = old.finalizer["optimizer"], new.finalizer["optimizer"]
    assert new_adam["step"] == old_adam["step"] == 2
    (p,) = layout.layers
    k = kept[p.name]
    for moment in ("accumulator", "preconditioner"):
        np.testing.assert_array_equal(new_adam[moment][p.kernel_index],
                                      old_adam[moment][p.kernel_index][..., k])
        np.testing.assert_array_equal(new_adam[moment][p.bias_index],
                                      old_adam[moment][p.bias_index][k])
        rows = (np.arange(16)[:, None] * 6 + k[None, :]).ravel()  # Flatten of 4x4 positions
        np.testing.assert_array_equal(new_adam[moment][p.consumer_kernel_index],
                                      old_adam[moment][p.consumer_kernel_index][rows])
    assert new.finalizer["round"] == 2
    new_weights = small_pp.process.get_model_weights(new)
    for loaded, variable in zip(new_weights.trainable, small.trainable_weights, strict=True):
        np.testing.assert_array_equal(loaded, variable.numpy())
    after = small_pp.process.next(new, client_data)
    assert np.isfinite(float(after.metrics["client_work"]["train"]["loss"]))


def test_model_size_of_a_model_macs_cannot_count():
    from fedprune.model import builders

    rnn = builders.rnn((5,), 7, embedding_dim=2, units=4)
    # Embedding 7x2, LSTM 4 * (2 + 4 + 1) * 4, Dense 4x7 + 7.
    params = 7 * 2 + 4 * 4 * (2 + 4 + 1) + 4 * 7 + 7
    assert shrinking.model_size(rnn) == {"params": params, "model_bytes": 4 * params,
                                         "macs_per_example": ""}


# --------------------------------------------------------------------------
# End to end: loop.run_experiment shrinks, continues, exports, resumes.


def _config(**changes):
    base = dict(num_clients=3, clients_per_round=3, rounds=4, begin_round=1, end_round=2,
                structure="neuron", model="mlp", masking="server", prune_output_layer=False,
                final_sparsity=0.5, **CHEAP_OUTPUTS)
    return ExperimentConfig(**{**base, **changes}).validate()


@pytest.fixture(scope="module")
def shrunk_run(tmp_path_factory):
    from fedprune.program import loop

    out = tmp_path_factory.mktemp("shrunk")
    summary = loop.run_experiment(_config(), out, log=lambda line: None)
    with open(out / "metrics.csv") as f:
        import csv

        rows = list(csv.DictReader(f))
    return out, summary, rows


@pytest.mark.slow
def test_run_shrinks_after_the_schedule_and_keeps_training(shrunk_run):
    out, summary, rows = shrunk_run
    info = json.loads((out / "shrink.json").read_text())
    assert info["round"] == 2 == _config().shrink_round()
    assert info["max_abs_logit_difference"] <= 1e-5
    assert info["test_accuracy_shrunk"] == info["test_accuracy_masked"]
    # MLP 64-128-10 keeps 64 hidden units: 64*64 + 64 + 64*10 + 10 parameters.
    before, after = 64 * 128 + 128 + 128 * 10 + 10, 64 * 64 + 64 + 64 * 10 + 10
    assert (before, after) == (9_610, 4_810)
    assert [int(r["params"]) for r in rows] == [before, before, after, after]
    assert [int(r["macs_per_example"]) for r in rows] == [64 * 128 + 1280] * 2 + [
        64 * 64 + 640] * 2
    assert [int(r["model_bytes"]) for r in rows] == [4 * before] * 2 + [4 * after] * 2
    accuracy = [float(r["test_accuracy"]) for r in rows]
    assert accuracy[2] >= accuracy[1] - 0.05  # no jump down after the shrink
    assert accuracy[3] > 0.5
    assert int(rows[3]["nonzero_params"]) > 0.99 * after  # the small model trains dense
    shrink = summary["shrink"]
    assert shrink["before"]["params"] == before and shrink["after"]["params"] == after
    assert shrink["kept_units"] == {"0": 64} and shrink["units_before"] == {"0": 128}
    assert shrink["median_round_seconds_before"] > 0
    assert shrink["median_round_seconds_after"] > 0
    assert summary["params"] == summary["model_params"] == after
    # The downlink of the small model is dense: 4 bytes per parameter per client.
    assert int(rows[3]["dense_bytes_down"]) == 3 * 4 * after


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:You are saving your model as an HDF5 file")
def test_exported_shrunk_model_loads_in_plain_keras(shrunk_run):
    out, _, _ = shrunk_run
    script = textwrap.dedent(f"""
        import sys
        import tensorflow as tf
        model = tf.keras.models.load_model({str(out / "model" / "model.h5")!r}, compile=False)
        assert "fedprune" not in sys.modules
        print(model.count_params(), model.layers[-2].units)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd="/", timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["4810", "64"]


@pytest.mark.slow
def test_resume_after_the_shrink_gives_the_uninterrupted_result(shrunk_run, tmp_path):
    from fedprune.program import loop

    out, summary, rows = shrunk_run
    loop.run_experiment(_config(), tmp_path, log=lambda line: None, stop_after_round=3)
    resumed = loop.run_experiment(_config(), tmp_path, resume=True, log=lambda line: None)
    for key in ("final_test_accuracy", "final_train_loss", "final_nonzero_params",
                "total_bytes_down", "total_bytes_up", "params", "macs_per_example"):
        assert resumed[key] == summary[key], key
    assert resumed["shrink"]["kept_units"] == summary["shrink"]["kept_units"]
