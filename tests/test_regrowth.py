"""Prune and regrow at the server (`--regrow`, fedprune/pruning/regrowth.py).

The mask maths on small arrays (TF eager), the decay against its closed form,
the refusals (no TF), and the real TFF process: the number of mask entries
stays at the schedule's level after every round, grown weights are zero right
after they are grown, the broadcast pays for the moved mask, a run is
deterministic and resumes to the same bits, and `constant` with regrowth is
no longer `oneshot`. `gradient` (RigL): growth follows the largest aggregate
|gradient|, the aggregate is the example-weighted mean of the clients' top-k
sparse gradients computed directly in TF, and `bytes_up` counts exactly the
encoded (index, value) pairs in adjustment rounds and nothing in others.
"""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
from cli_util import CHEAP_OUTPUTS

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.pruning import regrowth

# ----------------------------------------------------------------------------
# The mask maths and the decay (no TFF).


@pytest.mark.parametrize("fraction, expected_k", [(0.0, 0), (0.3, 1), (0.5, 2), (0.99, 3)])
def test_drop_and_grow_moves_the_smallest_kept_to_the_best_scored_pruned(fraction, expected_k):
    import tensorflow as tf

    # 8 weights, 4 kept (|w| 4, 1, 3, 2 at positions 0, 2, 4, 6); 4 pruned (1, 3, 5, 7).
    kernel = np.array([4.0, 0, -1.0, 0, 3.0, 0, -2.0, 0], np.float32).reshape(2, 4)
    mask = (kernel != 0).astype(np.float32)
    scores = np.array([9, 0.1, 9, 0.7, 9, 0.3, 9, 0.9], np.float32).reshape(2, 4)
    survivors, grown = regrowth.drop_and_grow(tf.constant(kernel), tf.constant(mask),
                                              tf.constant(fraction), tf.constant(scores))
    survivors, grown = survivors.numpy().ravel(), grown.numpy().ravel()
    # k = floor(fraction * 4) capped at the 4 pruned: drop the k smallest |w| (1, 2, 3: at
    # positions 2, 6, 4), grow the k best scores among the pruned (0.9, 0.7, 0.3: 7, 3, 5).
    dropped = [2, 6, 4][:expected_k]
    grown_at = [7, 3, 5][:expected_k]
    assert sorted(np.flatnonzero(mask.ravel() - survivors)) == sorted(dropped)
    assert sorted(np.flatnonzero(grown)) == sorted(grown_at)
    assert survivors.sum() + grown.sum() == mask.sum()  # the level stays
    assert not np.any(grown * mask.ravel())  # only pruned coordinates grow


def test_growth_is_capped_by_the_pruned_coordinates_and_skips_the_just_dropped():
    import tensorflow as tf

    # 6 kept, 2 pruned: fraction 0.9 asks for 5 but only 2 coordinates are pruned.
    kernel = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0]], np.float32)
    mask = (kernel != 0).astype(np.float32)
    scores = np.array([[9, 9, 9, 9], [9, 9, 0.5, 0.2]], np.float32)  # the kept score highest
    survivors, grown = regrowth.drop_and_grow(kernel, mask, tf.constant(0.9), scores)
    assert survivors.numpy().tolist() == [[0, 0, 1, 1], [1, 1, 0, 0]]
    assert grown.numpy().tolist() == [[0, 0, 0, 0], [0, 0, 1, 1]]


def test_gradient_growth_picks_the_largest_aggregate_gradient_among_the_pruned():
    import tensorflow as tf

    from fedprune.federated import regrow_gradients

    # 8 weights, 4 kept (positions 0, 2, 4, 6); the pruned 1, 3, 5, 7 have aggregate
    # gradients -0.5, 0.2, 0.5, NaN: |g| ranks 1 and 5 first (a tie: both grow), then 3;
    # NaN scores 0. The kept coordinates' larger gradients are not candidates.
    kernel = np.array([4.0, 0, -1.0, 0, 3.0, 0, -2.0, 0], np.float32).reshape(2, 4)
    mask = (kernel != 0).astype(np.float32)
    gradient = np.array([9, -0.5, -9, 0.2, 9, 0.5, 9, np.nan], np.float32).reshape(2, 4)
    [scores] = regrow_gradients.gradient_scores([tf.constant(gradient)])
    for fraction, grown_at in [(0.5, [1, 5]), (0.75, [1, 3, 5]), (1.0, [1, 3, 5, 7])]:
        _, grown = regrowth.drop_and_grow(tf.constant(kernel), tf.constant(mask),
                                          tf.constant(fraction), scores)
        assert np.flatnonzero(grown.numpy().ravel()).tolist() == grown_at, fraction
    # A tie at the cut goes to the lower index: |g| = 0.5 at 1 and 5, k = 1.
    _, grown = regrowth.drop_and_grow(tf.constant(kernel), tf.constant(mask),
                                      tf.constant(0.25), scores)
    assert np.flatnonzero(grown.numpy().ravel()).tolist() == [1]


@pytest.mark.parametrize("k", [0, 1, 3, 5])
def test_client_top_k_is_the_encoded_payload(k):
    import tensorflow as tf

    from fedprune.federated import encodings

    rng = np.random.default_rng(k)
    gradient = rng.normal(size=(3, 4)).astype(np.float32)
    gradient[2, 3] = -gradient[0, 1]  # an |g| tie between two pruned coordinates
    mask = np.zeros((3, 4), np.float32)
    mask[[0, 1, 2], [0, 2, 1]] = 1.0  # 3 kept, 9 pruned
    indices, values = regrowth.top_k_pruned(tf.constant(gradient), tf.constant(mask),
                                            tf.constant(k))
    payload = encodings.encode_top_k(gradient, mask, k)
    assert len(payload) == encodings.TOP_K_ENTRY_BYTES * k == 8 * k
    assert indices.numpy().tolist() == encodings.top_k_order(gradient, mask, k).tolist()
    assert payload == (indices.numpy().astype("<i4").tobytes()
                       + values.numpy().astype("<f4").tobytes())
    dense = regrowth.scatter_dense(indices, values, (3, 4)).numpy()
    assert np.array_equal(encodings.decode_top_k(payload, (3, 4)), dense)
    chosen = np.flatnonzero(dense.ravel())
    assert not np.any(mask.ravel()[chosen])  # only pruned coordinates are sent
    others = np.setdiff1d(np.flatnonzero(mask.ravel() == 0), chosen)
    if k and others.size:
        assert np.abs(dense.ravel()[chosen]).min() >= np.abs(gradient.ravel()[others]).max()
    assert int(regrowth.grow_count(tf.constant(mask), tf.constant(0.99))) == 2  # floor(2.97)
    assert int(regrowth.grow_count(tf.constant(1.0 - mask), tf.constant(0.5))) == 3  # 9 kept


@pytest.mark.parametrize("decay, every, end, num_rounds", [
    ("cosine", 1, 8, 10), ("cosine", 2, 9, 10), ("constant", 3, 10, 12), ("cosine", 1, 4, 3)])
def test_fractions_follow_the_closed_form(decay, every, end, num_rounds):
    spec = regrowth.RegrowSpec(rule="random", fraction=0.3, decay=decay, end_round=end,
                               every=every)
    f = spec.fractions(num_rounds)
    assert f.shape == (num_rounds + 1,) and f.dtype == np.float32
    for r in range(num_rounds + 1):
        adjusts = r >= 1 and r % every == 0 and r < end
        closed = (0.15 * (1 + math.cos(math.pi * r / end)) if decay == "cosine" else 0.3)
        assert f[r] == pytest.approx(closed if adjusts else 0.0, abs=1e-7), r
    if decay == "cosine" and every == 1 and end == 8:  # RigL's alpha/2 (1 + cos(pi t/T))
        assert f[4] == pytest.approx(0.15) and f[1] == pytest.approx(0.2886, abs=1e-4)


def test_no_regrowth_has_no_adjustment_and_resolves_three_quarters():
    assert not regrowth.RegrowSpec().fractions(5).any()
    assert regrowth.resolve_end_round(-1, 30) == 22
    assert regrowth.resolve_end_round(-1, 1) == 1
    assert ExperimentConfig(regrow="random", masking="server").regrow_spec().end_round == 22


# ----------------------------------------------------------------------------
# Flags: refusals, and the default keeps every existing fingerprint.


def test_new_fields_at_their_defaults_keep_the_fingerprint():
    assert ExperimentConfig(regrow="none", regrow_at="server", regrow_fraction=0.3,
                            regrow_decay="cosine", regrow_end_round=-1,
                            regrow_every=1).fingerprint() == "cacb424d245d153f"
    assert ExperimentConfig(regrow="random").fingerprint() != "cacb424d245d153f"


@pytest.mark.parametrize("changes, message", [
    (dict(regrow="rigl"), "--regrow='rigl': expected one of none|random|gradient"),
    (dict(regrow="gradient", masking="server", dp="fixed"),
     "--regrow='gradient': expected none or random with --dp=fixed"),
    (dict(regrow="random", masking="client"),
     "--regrow='random': expected none with --masking=client .* --masking=server|both"),
    (dict(regrow="random", structure="2:4", final_sparsity=0.5),
     "--regrow='random': expected none with --structure=2:4"),
    (dict(regrow="random", structure="block"),
     "--regrow='random': expected none with --structure=block"),
    (dict(regrow="random", prune_granularity="step"),
     "--regrow='random': expected none with --prune_granularity=step"),
    (dict(regrow="random", mask_criterion="threshold", threshold=0.1),
     "--regrow='random': expected none with --mask_criterion=threshold"),
    (dict(regrow="random", regrow_at="edge"), "--regrow_at='edge': expected one of server|client"),
    (dict(regrow="random", regrow_at="client", masking="server"),
     "--regrow_at='client': expected server with --masking=server (clients adjust the masks "
     "they prune and the server re-masks their aggregate: --masking=both)"),
    (dict(regrow="gradient", regrow_at="client", masking="client"),
     "--regrow_at='client': expected server with --masking=client .* --masking=both)"),
    (dict(regrow="random", regrow_at="client", prune_granularity="step"),
     "--regrow='random': expected none with --prune_granularity=step (clients adjust their "
     "masks at the end of local training, not inside tfmot's)"),
    (dict(regrow="random", regrow_fraction=0.0), "--regrow_fraction=0.0: expected a fraction"),
    (dict(regrow="random", regrow_decay="linear"), "--regrow_decay='linear'"),
    (dict(regrow="random", regrow_every=0), "--regrow_every=0"),
    (dict(regrow="random", regrow_end_round=31),
     "--regrow_end_round=31: expected -1 .* --rounds=30]"),
])
def test_regrowth_is_refused_where_it_makes_no_sense(changes, message):
    with pytest.raises(InvalidArgument, match="^" + message.replace("|", r"\|")
                       .replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")) as e:
        ExperimentConfig(**{"masking": "both", **changes}).validate()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("masking_mode, structure, at, message", [
    ("client", "unstructured", "server", "--regrow='random': expected none with --masking=client"),
    ("server", "block", "server", "--regrow='random': expected none with --structure=block"),
    ("server", "unstructured", "client",
     "--regrow_at='client': expected server with --masking=server"),
])
def test_the_library_refuses_what_the_config_refuses(masking_mode, structure, at, message):
    from fedprune.federated import process
    from fedprune.pruning import masking, schedules

    with pytest.raises(InvalidArgument, match=f"^{message}"):
        process.build_pruning_process(
            model_builder=None, input_spec=None, masking=masking_mode,
            schedule=schedules.make_schedule("oneshot"),
            mask_spec=masking.MaskSpec(structure=structure), num_rounds=3,
            client_optimizer=None, server_optimizer=None, seed=0,
            regrow=regrowth.RegrowSpec(rule="random", end_round=2, at=at))


# ----------------------------------------------------------------------------
# The real process, round by round.


@pytest.fixture(scope="module", autouse=True)
def _keep_every_built_process():
    """Keeps every process this module builds for reuse (`assembly.build_process`).

    Several tests run the same configs (e.g. `_config()` round by round and as the
    whole run `regrow_run`); the module's dozen distinct processes would otherwise
    evict each other from the cache of 4 and be traced again.
    """
    from fedprune.program import assembly

    size = assembly._PROCESS_CACHE_SIZE
    assembly._PROCESS_CACHE_SIZE = 32
    yield
    assembly._PROCESS_CACHE_SIZE = size
    assembly.clear_process_cache()


def _config(**changes) -> ExperimentConfig:
    base = dict(num_clients=3, clients_per_round=3, rounds=5, max_examples_per_client=32,
                masking="server", schedule="constant", begin_round=0, end_round=-1,
                final_sparsity=0.8, regrow="random", regrow_fraction=0.3, regrow_end_round=4,
                eval_every=5, **CHEAP_OUTPUTS)
    return ExperimentConfig(**{**base, **changes}).validate()


def _encoded_downlink(trainable, masks) -> int:
    """Bytes of the smallest actual encoding (`encodings.encode`) of each broadcast tensor."""
    from fedprune.federated import encodings

    total = 0
    for values, mask in zip(trainable, masks, strict=True):
        values = np.asarray(values, np.float32)
        if mask is not None and not np.all(mask):  # the receiver learns the mask
            sizes = [len(encodings.encode(values, e, mask=mask))
                     for e in (encodings.BITMAP, encodings.COO)]
        else:
            sizes = [len(encodings.encode(values, e))
                     for e in (encodings.DENSE, encodings.BITMAP, encodings.COO)]
        total += min(sizes)
    return total


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("changes", [
    dict(),  # constant from round 0: the schedule re-prunes every round, then the adjustment
    dict(masking="both", schedule="polynomial", begin_round=1, end_round=3,
         regrow_decay="constant"),  # a ramp; clients prune too
    dict(schedule="oneshot", begin_round=0, regrow_every=2),  # only adjustments move the mask
    dict(regrow="gradient"),  # RigL: clients upload top-k gradients
    dict(regrow="gradient", masking="both", schedule="polynomial", begin_round=1, end_round=3,
         regrow_decay="constant"),  # RigL on a ramp; clients prune (the mask aggregator)
])
def test_every_round_keeps_the_schedule_level_and_grows_at_zero(changes):
    from fedprune.federated import communication
    from fedprune.program import assembly, evaluation

    config = _config(**changes)
    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    fractions = config.regrow_spec().fractions(config.rounds)
    state = pp.process.initialize()
    weights = pp.process.get_model_weights(state)
    sizes = [int(np.prod(k.shape)) for k in pp.layout.kernels]
    adjusted_rounds = []
    for r in range(1, config.rounds + 1):
        old_masks = [np.asarray(weights.non_trainable[k.mask_index]) for k in pp.layout.kernels]
        output = pp.process.next(state, assembly.round_inputs(config, data, r).datasets)
        state, weights = output.state, pp.process.get_model_weights(output.state)
        diagnostics = output.metrics["finalizer"]["masks"]
        grown_all = [np.asarray(g) for g in state.finalizer["regrow"]["regrown"]]
        level = pp.table.sparsity[r]
        for n, k in enumerate(pp.layout.kernels):
            mask = np.asarray(weights.non_trainable[k.mask_index])
            kernel = np.asarray(weights.trainable[k.trainable_index])
            kept = max(int(np.round(np.float32(sizes[n]) * (np.float32(1) - level))), 1)
            assert mask.sum() == kept, (r, k)  # exactly the schedule's level, every round
            assert not np.any(kernel[mask == 0])
            if fractions[r] > 0:
                grown = grown_all[n]
                assert grown.sum() == min(math.floor(np.float32(fractions[r]) * kept),
                                          sizes[n] - kept), (r, k)
                assert np.all(mask[grown > 0] == 1)
                assert not np.any(kernel[grown > 0])  # regrown weights start at zero
        if fractions[r] > 0:
            adjusted_rounds.append(r)
        if config.schedule == "oneshot" and r >= 1:  # no schedule update: 2k moved entries
            moved = sum(2 * g.sum() for g in grown_all) if fractions[r] > 0 else 0
            assert float(diagnostics["mask_change"]) == pytest.approx(moved / sum(sizes))
            if fractions[r] > 0:
                assert not any(np.any(g * o) for g, o in zip(grown_all, old_masks, strict=True))
        assert 0.0 < float(diagnostics["itop"]) <= 1.0
        # The next broadcast pays for the moved mask: grown zeros are written as values.
        masks = evaluation.kernel_masks(pp, weights)
        down = communication.downlink_bytes(list(weights.trainable), masks, 1)
        assert down.sent == _encoded_downlink(list(weights.trainable), masks)
    assert adjusted_rounds == [r for r in range(1, 4) if r % config.regrow_every == 0]  # r < 4


def _direct_client_gradients(pp, weights, dataset):
    """A client's dense kernel gradients of its mean loss at `weights`, in eager TF, and
    its number of examples (the batch gradients weighted by batch size)."""
    import tensorflow as tf

    model = pp.keras_model_fn()
    weights.assign_weights_to(model)
    kernels = [model.trainable_weights[k.trainable_index] for k in pp.layout.kernels]
    loss_fn = tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    sums, count = [np.zeros(k.shape, np.float64) for k in kernels], 0
    for batch in dataset:
        with tf.GradientTape() as tape:
            loss = loss_fn(batch["y"], model(batch["x"], training=True))
        n = int(batch["y"].shape[0])
        sums = [s + n * g.numpy() for s, g in zip(sums, tape.gradient(loss, kernels),
                                                   strict=True)]
        count += n
    return [(s / count).astype(np.float32) for s in sums], count


@pytest.mark.usefixtures("tff_local_context")
def test_gradient_growth_uses_the_weighted_sum_of_the_clients_top_k_and_pays_for_it():
    from fedprune.federated import encodings
    from fedprune.program import assembly

    # Oneshot from round 0, so only adjustments move the mask; of the two rounds run, an
    # adjustment after round 2 only (--regrow_every=2). The random twin is the oneshot
    # case of `test_every_round_keeps_the_schedule_level_and_grows_at_zero` (one trace).
    config = _config(schedule="oneshot", regrow="gradient", regrow_every=2)
    random = dataclasses.replace(config, regrow="random").validate()
    data = assembly.load_data(config)
    pps = {c.regrow: assembly.build_process(c, data) for c in (config, random)}
    states = {rule: pp.process.initialize() for rule, pp in pps.items()}
    pp = pps["gradient"]
    for r in (1, 2):
        inputs = assembly.round_inputs(config, data, r)
        broadcast = pp.process.get_model_weights(states["gradient"])
        up = {}
        for rule, p in pps.items():
            output = p.process.next(states[rule], inputs.datasets)
            states[rule] = output.state
            up[rule] = int(output.metrics["client_work"]["uplink_bytes"])
        if r == 1:  # no adjustment: nothing extra is sent, and the runs are identical
            assert up["gradient"] == up["random"]
            continue
        fraction = np.float32(config.regrow_spec().fractions(config.rounds)[r])
        assert fraction > 0
        masks = [np.asarray(broadcast.non_trainable[k.mask_index]) for k in pp.layout.kernels]
        payload, weighted, total = 0, [np.zeros(m.shape, np.float64) for m in masks], 0
        for dataset in inputs.datasets:
            gradients, n = _direct_client_gradients(pp, broadcast, dataset)
            for j, (g, m) in enumerate(zip(gradients, masks, strict=True)):
                kept = int(m.sum())
                k = min(math.floor(fraction * np.float32(kept)), m.size - kept)
                encoded = encodings.encode_top_k(g, m, k)
                payload += len(encoded)
                weighted[j] += n * encodings.decode_top_k(encoded, m.shape)
            total += n
        # bytes_up counts exactly the encoded (index, value) pairs on top of the delta.
        assert up["gradient"] - up["random"] == payload > 0
        grown_all = [np.asarray(g) for g in states["gradient"].finalizer["regrow"]["regrown"]]
        for m, agg, grown in zip(masks, weighted, grown_all, strict=True):
            scores = np.abs(agg / total).ravel()
            candidates = m.ravel() == 0  # oneshot: the broadcast mask is the re-masked one
            chosen = grown.ravel() > 0
            kept = int(m.sum())
            assert chosen.sum() == min(math.floor(fraction * np.float32(kept)), m.size - kept)
            assert not np.any(chosen & ~candidates)
            # The grown are the candidates of largest aggregate |gradient| (up to float noise
            # between this eager computation and the clients' graphs).
            rest = scores[candidates & ~chosen]
            assert scores[chosen].min() >= rest.max() - 1e-6 * scores.max()
            assert scores[chosen].min() > 0  # every grown coordinate had a gradient


# ----------------------------------------------------------------------------
# Whole runs: deterministic, resume-identical, and not oneshot.


def _rows(path):
    """metrics.csv without times and `sparsity/<layer>` (Keras numbers layer names per
    process, so runs in one process name them differently; the final state compares masks)."""
    with open(path / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items()
                 if k not in ("round_seconds", "elapsed_seconds") and "/" not in k}
                for row in csv.DictReader(f)]


def _final_state(path, rounds):
    with np.load(path / "checkpoints" / f"round_{rounds:06d}.npz", allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def regrow_run(tmp_path_factory):
    from fedprune.program import loop

    out = tmp_path_factory.mktemp("regrow")
    loop.run_experiment(_config(), out, log=lambda line: None)
    return out


@pytest.mark.usefixtures("tff_local_context")
def test_regrowth_columns_are_written(regrow_run):
    rows = _rows(regrow_run)
    assert list(rows[0])[-3:] == ["mask_change", "regrown_survival", "itop"]
    survival = [row["regrown_survival"] for row in rows]
    # Adjustments after rounds 1, 2, 3 (< --regrow_end_round=4): round 1 has nothing grown
    # before it, rounds 4 and 5 no adjustment.
    assert survival[0] == survival[3] == survival[4] == ""
    assert all(0.0 <= float(s) <= 1.0 for s in survival[1:3])
    itop = [float(row["itop"]) for row in rows]
    assert itop == sorted(itop) and itop[-1] > 0.2  # more than the 20 % kept at once


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("changes", [
    dict(regrow="random"), dict(regrow="gradient"),
    # FedDST: the clients' random draws come from the client work's key, the round and
    # a fingerprint of each client's update.
    dict(regrow="random", regrow_at="client", masking="both"),
], ids=["server-random", "server-gradient", "client-random"])
def test_regrowth_is_deterministic_and_resumes_identically(regrow_run, tmp_path, changes):
    from fedprune.program import loop

    config = _config(**changes)
    reference = regrow_run
    if changes != dict(regrow="random"):
        reference = tmp_path / "reference"
        loop.run_experiment(config, reference, log=lambda line: None)
    # The interrupted run is a second, independent execution of every round (1-2 before
    # the stop, 3-5 after the resume, on the process the reference left in the cache):
    # equal bits show the run deterministic and the resume identical at once.
    resumed = tmp_path / "resumed"
    loop.run_experiment(config, resumed, log=lambda line: None, stop_after_round=2)
    loop.run_experiment(config, resumed, resume=True, log=lambda line: None)
    assert len(_rows(resumed)) == 5
    assert _rows(resumed) == _rows(reference)
    expected, state = _final_state(reference, 5), _final_state(resumed, 5)
    assert state.keys() == expected.keys()
    for key in expected:
        assert np.array_equal(state[key], expected[key]), key


@pytest.mark.usefixtures("tff_local_context")
def test_constant_with_regrowth_is_not_oneshot(regrow_run, tmp_path):
    from fedprune.program import loop

    oneshot = dataclasses.replace(_config(), schedule="oneshot", regrow="none").validate()
    loop.run_experiment(oneshot, tmp_path, log=lambda line: None)
    ours, theirs = _rows(regrow_run), _rows(tmp_path)
    assert [r["test_accuracy"] for r in ours] != [r["test_accuracy"] for r in theirs]
    assert all(float(r["mask_drift"]) == 0.0 for r in theirs[1:])  # oneshot's mask is frozen
    assert all(float(r["mask_change"]) > 0.0 for r in ours[:4])


# ----------------------------------------------------------------------------
# --regrow_at=client (FedDST): clients adjust their own masks, the server re-masks.


def _kept(size: int, level) -> int:
    """tfmot's count of kept entries (`masking.num_kept`) in numpy."""
    return max(int(np.round(np.float32(size) * (np.float32(1) - np.float32(level)))), 1)


def _client_payload_bytes(result, known) -> int:
    """One pruning client's upload: each update tensor's smallest actual encoding
    (`encodings.encode`) and its kernel masks as `np.packbits` bitmaps."""
    from fedprune.federated import encodings

    total = 0
    for tensor, mask in zip([np.asarray(t) for t in result.update["delta"]], known, strict=True):
        name, size = encodings.smallest_encoding(tensor, known_mask=mask)
        payload = encodings.encode(tensor, name, mask=mask if name == encodings.MASKED_VALUES
                                   else None)
        assert len(payload) == size
        total += len(payload)
    return total + sum(len(np.packbits(np.asarray(m) > 0).tobytes())
                       for m in result.update["kept"])


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("changes", [
    dict(regrow="random"),  # constant from round 0: the level never moves, only adjustments
    dict(regrow="gradient", mask_aggregation="nonzero", schedule="polynomial", begin_round=1,
         end_round=2, regrow_decay="constant"),  # FedDST's sparse average, on a ramp
    dict(regrow="random", mask_aggregation="majority", regrow_every=2),
])
def test_clients_adjust_their_masks_at_the_level_and_the_server_remasks_to_it(changes):
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedprune.federated import client_work
    from fedprune.federated import process as process_lib
    from fedprune.program import assembly

    # Three rounds: adjustments after rounds 1 and 2 (< --regrow_end_round=3), then
    # round 3 without one (after the ramp's end in the polynomial case).
    config = _config(**{"masking": "both", "regrow_at": "client", "rounds": 3,
                        "regrow_end_round": 3, **changes})
    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    spec = config.regrow_spec()
    fractions = spec.fractions(config.rounds)

    def model_fn():
        return tff.learning.models.from_keras_model(
            pp.keras_model_fn(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=data.element_spec, metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

    # The client work alone, on each round's broadcast: what every client uploads.
    work = client_work.build_pruning_client_work(
        model_fn=model_fn, client_optimizer=process_lib.make_optimizer("sgd", config.client_lr),
        masking="both", layout=pp.layout, table=pp.table, mask_spec=config.mask_spec(),
        client_regrow=spec)
    work_state = work.initialize()
    sizes = [int(np.prod(k.shape)) for k in pp.layout.kernels]
    state = pp.process.initialize()
    changes_seen, grown_per_round = [], []
    for r in range(1, config.rounds + 1):
        broadcast = pp.process.get_model_weights(state)
        inputs = assembly.round_inputs(config, data, r).datasets
        output = pp.process.next(state, inputs)
        state, weights = output.state, pp.process.get_model_weights(output.state)
        direct = work.next(work_state, [broadcast] * len(inputs), inputs)
        work_state = direct.state
        old_masks = [np.asarray(broadcast.non_trainable[k.mask_index]) for k in pp.layout.kernels]
        level = pp.table.sparsity[r]
        known = [None] * len(broadcast.trainable)
        for k, m in zip(pp.layout.kernels, old_masks, strict=True):
            known[k.trainable_index] = m
        payload = 0
        for result in direct.result:  # every client
            for n, (mask, values, old) in enumerate(zip(result.update["kept"],
                                                        result.update["kept_values"],
                                                        old_masks, strict=True)):
                mask, values = np.asarray(mask), np.asarray(values)
                kept = _kept(sizes[n], level)
                assert mask.sum() == kept, (r, n)  # exactly the schedule's level
                assert not np.any(values[mask == 0])
                grow = min(math.floor(np.float32(fractions[r]) * kept), sizes[n] - kept)
                # The grown weights are zeros inside the mask (at least k of them).
                assert np.count_nonzero((mask > 0) & (values == 0)) >= grow, (r, n)
                if config.schedule == "constant":  # the level stays: grown = outside the old
                    assert np.count_nonzero((mask > 0) & (old == 0)) == grow, (r, n)
            payload += _client_payload_bytes(result, known)
        # bytes_up: the clients' encoded updates and mask bitmaps, as the process counts.
        assert int(direct.measurements["uplink_bytes"]) == payload
        assert int(output.metrics["client_work"]["uplink_bytes"]) == payload
        # The server's global mask holds exactly the level, kernels zero off it.
        for n, k in enumerate(pp.layout.kernels):
            mask = np.asarray(weights.non_trainable[k.mask_index])
            assert mask.sum() == _kept(sizes[n], level), (r, n)
            assert not np.any(np.asarray(weights.trainable[k.trainable_index])[mask == 0])
        diagnostics = output.metrics["finalizer"]["masks"]
        changes_seen.append(float(diagnostics["mask_change"]))
        grown_per_round.append(sum(
            min(math.floor(np.float32(fractions[r]) * _kept(n, level)), n - _kept(n, level))
            for n in sizes))
        survival = float(diagnostics["regrown_survival"])
        # Blank without an adjustment, or with nothing grown at the one before.
        assert math.isnan(survival) if fractions[r] == 0 or r == spec.every else (
            math.isnan(survival) or 0.0 <= survival <= 1.0), r
        assert 0.0 < float(diagnostics["itop"]) <= 1.0
    adjusted = [r for r in range(1, config.rounds + 1) if fractions[r] > 0]
    assert adjusted == [r for r in (1, 2) if r % spec.every == 0]  # before round 3
    for r, (change, grown) in enumerate(zip(changes_seen, grown_per_round, strict=True),
                                          start=1):
        if grown:  # adjustment rounds once the level leaves weights to move
            assert change > 0.0, r  # the clients' adjustments move the global mask
        elif not pp.table.updates[r] or config.schedule == "constant":
            # Nothing moves it without an adjustment (after --regrow_end_round), unless the
            # schedule's level does (re-pruning to the same level keeps the same mask).
            assert change == 0.0, r


@pytest.mark.usefixtures("tff_local_context")
def test_client_grow_scores_are_its_gradient_at_its_trained_model_or_seeded_draws():
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedprune.federated import client_regrowth
    from fedprune.program import assembly

    config = _config(masking="both", regrow="random", regrow_at="client", rounds=3,
                     regrow_end_round=3)  # the process of the first client case above
    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    broadcast = pp.process.get_model_weights(pp.process.initialize())
    rng = np.random.default_rng(0)
    update = [(0.05 * rng.normal(size=np.shape(w))).astype(np.float32)
              for w in broadcast.trainable]
    trained = tff.learning.models.ModelWeights(
        tuple(np.asarray(w) - u for w, u in zip(broadcast.trainable, update, strict=True)),
        tuple(broadcast.non_trainable))
    dataset = assembly.round_inputs(config, data, 1).datasets[0]
    kernels = [k.trainable_index for k in pp.layout.kernels]

    def model_fn():
        return tff.learning.models.from_keras_model(
            pp.keras_model_fn(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=data.element_spec, metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

    def scores(rule, fraction=0.3, key=(0, 1), tensors=update):
        return [s.numpy() for s in client_regrowth.grow_scores(
            rule, model_fn=model_fn, trained=trained, update=[tf.constant(t) for t in tensors],
            data=dataset, key=tf.constant(key, tf.int64), fraction=tf.constant(fraction),
            kernel_indices=kernels)]

    # gradient: |the mean-loss gradient at the trained model|, as eager Keras computes it.
    expected, _ = _direct_client_gradients(pp, trained, dataset)
    for got, g in zip(scores("gradient"), expected, strict=True):
        np.testing.assert_allclose(got, np.abs(g), rtol=1e-4, atol=1e-7)
    assert not any(s.any() for s in scores("gradient", fraction=0.0))  # nothing computed
    # random: a function of the key (seed, round) and of the client's update.
    first = scores("random")
    assert all(np.array_equal(a, b) for a, b in zip(first, scores("random"), strict=True))
    for other in (scores("random", key=(0, 2)),
                  scores("random", tensors=[u * 2.0 for u in update])):
        assert not any(np.array_equal(a, b) for a, b in zip(first, other, strict=True))
    assert all(0.0 <= s.min() and s.max() < 1.0 for s in first)
