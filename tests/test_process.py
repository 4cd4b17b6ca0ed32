"""The federated pruning process: exact sparsity, parity with FedAvg, every combination."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_federated as tff

from fedprune.federated import process as fp_process
from fedprune.model import builders
from fedprune.pruning import masking, schedules

NUM_CLIENTS = 4
HIDDEN = (50,)  # MLP 64-50-10: kernels of 3,200 and 500 weights


pytestmark = pytest.mark.usefixtures("tff_local_context")


@pytest.fixture(scope="module")
def client_data(digits_clients):
    return digits_clients(NUM_CLIENTS, 640)


# Built processes, one per set of `_build` arguments: tests that need the same
# process share its trace (seconds each); a round is a pure function of state and
# data, and `client_data` is the module's one list of datasets. Emptied after the module.
_BUILT = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_built_processes():
    yield
    _BUILT.clear()


def _build(client_data, *, masking_mode, schedule, mask_spec=None, server="sgd",
           num_rounds=5, hidden=HIDDEN, mask_aggregation="average"):
    key = (masking_mode, schedule, mask_spec, server, num_rounds, hidden, mask_aggregation)
    if key not in _BUILT:
        _BUILT[key] = fp_process.build_pruning_process(
            model_builder=lambda: builders.mlp((64,), 10, hidden=hidden),
            input_spec=client_data[0].element_spec,
            masking=masking_mode,
            schedule=schedule,
            mask_spec=mask_spec or masking.MaskSpec(),
            num_rounds=num_rounds,
            client_optimizer=fp_process.make_optimizer("sgd", 0.1),
            server_optimizer=fp_process.make_optimizer(server, 1.0 if server == "sgd" else 0.01),
            seed=0, mask_aggregation=mask_aggregation,
        )
    return _BUILT[key]


def _run(pp, client_data, rounds):
    """The global weights after rounds 0..rounds; each read both ways, which must agree."""
    state = pp.process.initialize()
    history = [pp.process.get_model_weights(state)]
    for _ in range(rounds):
        state = pp.process.next(state, client_data).state
        history.append(pp.process.get_model_weights(state))
        _assert_same_weights(pp.model_weights(state), history[-1])
    return history


def _assert_same_weights(a, b):
    for x, y in zip([*a.trainable, *a.non_trainable], [*b.trainable, *b.non_trainable],
                    strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _kept(size, sparsity):
    # tfmot's count of kept weights: max(round(N * (1 - s)), 1), in float32.
    return max(int(np.round(np.float32(size) * (np.float32(1) - np.float32(sparsity)))), 1)


POLY = schedules.PolynomialDecay(0.5, 0.8, begin_round=1, end_round=3, power=3)


@pytest.mark.parametrize("server", ["sgd", "adam"])
@pytest.mark.parametrize("masking_mode", ["server", "both"])
def test_broadcast_model_has_exact_schedule_sparsity_every_round(client_data, masking_mode,
                                                                 server):
    pp = _build(client_data, masking_mode=masking_mode, schedule=POLY, server=server)
    history = _run(pp, client_data, 5)
    expected = pp.table.sparsity  # 0, 0.5, 0.7625, 0.8, 0.8, 0.8 after rounds 0..5
    np.testing.assert_allclose(expected, [0, 0.5, 0.7625, 0.8, 0.8, 0.8], atol=1e-6)
    initial_biases = [history[0].trainable[i] for i in (1, 3)]
    for r, weights in enumerate(history):
        for k in pp.layout.kernels:
            kernel = weights.trainable[k.trainable_index]
            mask = weights.non_trainable[k.mask_index]
            assert mask.sum() == _kept(k.size, expected[r]), (r, k.name)
            assert np.count_nonzero(kernel) == mask.sum(), (r, k.name)  # nothing off the mask
            assert not kernel[mask == 0].any()
        # Biases are never masked (only dead ReLU units keep their zero initial bias).
        if r > 0:
            assert all(np.count_nonzero(weights.trainable[i]) >= 0.8 * weights.trainable[i].size
                       for i in (1, 3))
    # Masks only shrink after the schedule ends: same mask in rounds 3, 4, 5.
    for k in pp.layout.kernels:
        np.testing.assert_array_equal(history[3].non_trainable[k.mask_index],
                                      history[5].non_trainable[k.mask_index])
    assert not np.allclose(history[5].trainable[1], initial_biases[0])
    assert [k.trainable_index for k in pp.layout.kernels] == [0, 2]


def test_dense_mode_matches_stock_fed_avg(client_data):
    pp = _build(client_data, masking_mode="none", schedule=schedules.NoPruning())
    ours = _run(pp, client_data, 3)[-1]

    def model_fn():
        return tff.learning.models.from_keras_model(
            builders.mlp((64,), 10, hidden=HIDDEN),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=client_data[0].element_spec,
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()],
        )

    stock = tff.learning.algorithms.build_weighted_fed_avg(
        model_fn,
        client_optimizer_fn=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer_fn=fp_process.make_optimizer("sgd", 1.0),
    )
    state = stock.initialize()
    state = stock.set_model_weights(state, _run(pp, client_data, 0)[0])
    for _ in range(3):
        state = stock.next(state, client_data).state
    theirs = stock.get_model_weights(state)
    for a, b in zip(ours.trainable, theirs.trainable, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
    assert not np.allclose(ours.trainable[0], _run(pp, client_data, 0)[0].trainable[0])


@pytest.mark.parametrize("masking_mode", ["none", "both"])
def test_client_datasets_train_as_under_tf_data_defaults(client_data, masking_mode):
    # fedprune's client datasets turn tf.data's autotuning and graph rewrites off
    # (`container.client_dataset_options`, which `client_data` carries as the
    # pipeline's datasets do): three rounds must end with the weights of the same
    # batches under tf.data's defaults, bit for bit, every wrapper variable included.
    tuned = tf.data.Options()
    tuned.autotune.enabled = True
    tuned.experimental_optimization.apply_default_optimizations = True
    defaults = [d.with_options(tuned) for d in client_data]
    assert [d.options().autotune.enabled for d in client_data] == [False] * NUM_CLIENTS
    assert [d.options().autotune.enabled for d in defaults] == [True] * NUM_CLIENTS
    schedule = schedules.NoPruning() if masking_mode == "none" else POLY
    pp = _build(client_data, masking_mode=masking_mode, schedule=schedule)
    ours = _run(pp, client_data, 3)[-1]
    _assert_same_weights(ours, _run(pp, defaults, 3)[-1])
    assert not np.array_equal(ours.trainable[0], _run(pp, client_data, 0)[0].trainable[0])


def test_client_mode_average_is_denser_than_each_client(client_data):
    # Clients prune to the schedule's level; averaging different masks densifies.
    pp = _build(client_data, masking_mode="client", schedule=POLY)
    history = _run(pp, client_data, 2)
    kernel = pp.layout.kernels[0]
    nonzero = np.count_nonzero(history[2].trainable[kernel.trainable_index])
    assert nonzero > _kept(kernel.size, pp.table.sparsity[2])
    # No schedule mask on the server in this mode: the global mask, which the next
    # round's clients train inside, is the union of the clients' masks (the support).
    for weights in history[1:]:
        mask = weights.non_trainable[kernel.mask_index]
        assert 0 < mask.sum() < kernel.size
        np.testing.assert_array_equal(mask, weights.trainable[kernel.trainable_index] != 0)


def test_server_adam_needs_the_remask(client_data):
    """Adam's momentum moves pruned coordinates; the re-mask after the optimizer restores them."""
    from fedprune.federated.server_masking import build_masking_finalizer

    pp = _build(client_data, masking_mode="server", schedule=POLY, server="adam")
    weights = _run(pp, client_data, 1)[1]
    weights_type = pp.process.initialize.type_signature.result.member.global_model_weights
    kernel = pp.layout.kernels[0]
    mask = weights.non_trainable[kernel.mask_index]
    # Round 1 was dense on the clients (pruning starts after it), so Adam's first
    # moment is nonzero everywhere; later updates are zero off the mask.
    dense_update = tuple(np.full_like(w, 0.01) for w in weights.trainable)
    masked_update = tuple(u * mask if i == kernel.trainable_index else u
                          for i, u in enumerate(dense_update))
    off_mask = {}
    for remask in (False, True):
        finalizer = build_masking_finalizer(
            server_optimizer=fp_process.make_optimizer("adam", 0.01),
            model_weights_type=weights_type, layout=pp.layout, table=pp.table,
            mask_spec=masking.MaskSpec(), remask=remask)
        state, new = finalizer.initialize(), weights
        for update in (dense_update, masked_update, masked_update):
            out = finalizer.next(state, new, update)
            state, new = out.state, out.result
        off_mask[remask] = np.count_nonzero(new.trainable[kernel.trainable_index][mask == 0])
    assert off_mask[False] == np.count_nonzero(mask == 0)  # momentum moved every pruned weight
    assert off_mask[True] == 0


SPECS = {
    "magnitude": dict(mask_criterion="magnitude"),
    "threshold": dict(mask_criterion="threshold", threshold=0.05),
    "relative": dict(mask_criterion="relative", relative_rate=0.1),
}


# Every pair of (masking mode, criterion, structure) values, in 9 builds instead of 27:
# a Latin square (structure = (mode + criterion) mod 3). The three choices meet in pairs
# in the code: the client work and the finalizer per mode run the criterion's and the
# structure's mask rule (`masking.compute_masks`, where criterion and structure meet).
_MODES, _STRUCTURES = ("client", "server", "both"), ("unstructured", "2:4", "block")
PAIRWISE = [(mode, criterion, _STRUCTURES[(i + j) % 3])
            for i, mode in enumerate(_MODES) for j, criterion in enumerate(sorted(SPECS))]


def test_the_combinations_cover_every_pair():
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert len({(c[a], c[b]) for c in PAIRWISE}) == 9


@pytest.mark.slow
@pytest.mark.parametrize("masking_mode, criterion, structure", PAIRWISE)
def test_every_pair_of_choices_builds_and_runs_a_round(client_data, masking_mode, criterion,
                                                       structure):
    spec = masking.MaskSpec(structure=structure, **SPECS[criterion])
    schedule = schedules.OneShot(0.5, begin_round=1)
    pp = _build(client_data, masking_mode=masking_mode, schedule=schedule, mask_spec=spec,
                num_rounds=1, hidden=(16,))
    weights = _run(pp, client_data[:2], 1)[1]
    pruned = 0
    for k in pp.layout.kernels:
        kernel = weights.trainable[k.trainable_index]
        mask = weights.non_trainable[k.mask_index]
        assert np.isfinite(kernel).all()
        if masking_mode == "client":  # the server's mask: the union of the clients' masks
            np.testing.assert_array_equal(mask, kernel != 0)
            continue
        assert not kernel[mask == 0].any()
        pruned += k.size - mask.sum()
        if structure == "2:4":
            assert np.moveaxis(mask, -2, -1).reshape(-1, 4).sum(axis=1).max() <= 2
        elif structure == "block":  # default (1, 4) blocks: each is all kept or all pruned
            for start in range(0, mask.shape[1], 4):
                block = mask[:, start:start + 4]
                assert (block.min(axis=1) == block.max(axis=1)).all()
        elif criterion == "magnitude":
            assert mask.sum() == k.size // 2  # 50 % of 1,024 and of 160
    assert masking_mode == "client" or pruned > 0


@pytest.mark.parametrize("rule", ["average", "nonzero", "majority"])
@pytest.mark.parametrize("masking_mode", ["client", "both"])
def test_mask_aggregation_rules_run_and_report_diagnostics(client_data, masking_mode, rule):
    # Two of the five rounds the shared processes are built for (POLY's levels after
    # rounds 1 and 2 do not depend on the number of rounds): `average` is the default
    # rule, so its processes are the ones the tests above use.
    pp = _build(client_data, masking_mode=masking_mode, schedule=POLY, mask_aggregation=rule)
    state = pp.process.initialize()
    for _ in range(2):
        output = pp.process.next(state, client_data)
        state = output.state
    diagnostics = output.metrics["finalizer"]["masks"]
    assert set(diagnostics) == {"regrowth", "mask_drift", "client_mask_jaccard",
                                "client_sparsity"}
    assert 0.0 < diagnostics["client_mask_jaccard"] <= 1.0
    # Every client pruned both kernels to round 2's level, 0.7625 (tfmot's counts).
    level = pp.table.sparsity[2]
    kept = sum(_kept(k.size, level) for k in pp.layout.kernels)
    assert float(diagnostics["client_sparsity"]) == pytest.approx(1 - kept / 3700, abs=1e-6)
    weights = pp.process.get_model_weights(state)
    kernel = pp.layout.kernels[0]
    nonzero = np.count_nonzero(weights.trainable[kernel.trainable_index])
    target = _kept(kernel.size, pp.table.sparsity[2])
    if masking_mode == "both":
        assert nonzero <= target and (rule == "majority" or nonzero == target)
    elif rule == "average":  # the union of the clients' masks survives averaging
        assert nonzero > target
        # Clients train inside their start masks, so what all of them pruned stays pruned.
        assert diagnostics["regrowth"] == 0


def test_rules_need_pruning_clients(client_data):
    from fedprune.errors import InvalidArgument

    with pytest.raises(InvalidArgument, match="--mask_aggregation=.nonzero"):
        fp_process.build_pruning_process(
            model_builder=lambda: builders.mlp((64,), 10, hidden=HIDDEN),
            input_spec=client_data[0].element_spec, masking="server", schedule=POLY,
            mask_spec=masking.MaskSpec(), num_rounds=2,
            client_optimizer=fp_process.make_optimizer("sgd", 0.1),
            server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0,
            mask_aggregation="nonzero")


def test_server_mode_uploads_are_measured_sparse(client_data):
    pp = _build(client_data, masking_mode="server", schedule=POLY)
    state = pp.process.initialize()
    for _ in range(3):
        output = pp.process.next(state, client_data)
        state = output.state
    # Round 3 trains inside the 0.7625 mask of round 2: 760 + 119 kernel weights.
    kept = _kept(3200, pp.table.sparsity[2]) + _kept(500, pp.table.sparsity[2])
    biases = 50 + 10
    sent = int(output.metrics["client_work"]["uplink_bytes"])
    # At most the values inside the known mask (4 bytes each) plus dense biases;
    # less where a whole unit got no gradient (then a bitmap is smaller).
    assert 0 < sent <= 4 * (kept + biases) * NUM_CLIENTS
    assert sent < 4 * (3700 + biases) * NUM_CLIENTS / 4  # > 4x smaller than dense
