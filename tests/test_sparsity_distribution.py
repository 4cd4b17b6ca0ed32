"""`--sparsity_distribution`: per-layer budgets (`fedprune/pruning/layer_budgets.py`).

ERK densities against the closed form on the real kernels of the builders'
models, the global count, capping, `uniform` as today, an end-to-end run whose
measured per-layer sparsities are the ERK ones, and the refusals.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import numpy as np
import pytest
from cli_util import CHEAP_OUTPUTS, TIMEOUT_S, exit_lines

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.pruning import layer_budgets, schedules
from fedprune.pruning.masking import MaskSpec

# Digits inputs: 64 features, 10 classes.
DIGITS_SHAPE, DIGITS_CLASSES = (64,), 10


def _kernel_shapes(model_name: str) -> list[tuple[int, ...]]:
    """The kernels fedprune prunes in a builders.py model on digits (all Dense/Conv)."""
    from fedprune.model import builders
    from fedprune.pruning import wrappers

    model = builders.build_model(model_name, DIGITS_SHAPE, DIGITS_CLASSES, seed=0)
    return [k.shape for k in wrappers.pruning_layout(wrappers.wrap_for_pruning(model)).kernels]


# (model, real kernel shapes, global sparsity, the kernels ERK keeps dense).
CASES = [
    ("mlp", [(64, 128), (128, 10)], 0.8, ()),
    ("mlp", [(64, 128), (128, 10)], 0.5, (1,)),
    ("mlp2", [(64, 200), (200, 200), (200, 10)], 0.9, ()),
    ("mlp2", [(64, 200), (200, 200), (200, 10)], 0.6, (2,)),
    ("cnn", [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512), (512, 10)], 0.99, ()),
    ("cnn", [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512), (512, 10)], 0.9, (3,)),
    ("cnn", [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512), (512, 10)], 0.5, (0, 3)),
]


@pytest.mark.parametrize("model_name", ["mlp", "mlp2", "cnn"])
def test_case_shapes_are_the_builders_kernels(model_name):
    expected = {name: shapes for name, shapes, _, _ in CASES}[model_name]
    assert _kernel_shapes(model_name) == expected


@pytest.mark.parametrize(("model_name", "shapes", "sparsity", "dense"), CASES,
                         ids=[f"{m}-{s}" for m, _, s, _ in CASES])
def test_erk_densities_are_the_closed_form(model_name, shapes, sparsity, dense):
    # d_l = eps * (sum of dims) / (product of dims), dense layers at 1, with
    # eps = ((1 - s) N - N_dense) / sum over the others of (sum of dims).
    sizes = [int(np.prod(s)) for s in shapes]
    free = [i for i in range(len(shapes)) if i not in dense]
    eps = ((1 - sparsity) * sum(sizes) - sum(sizes[i] for i in dense)) / sum(
        sum(shapes[i]) for i in free)
    expected = [1.0 if i in dense else eps * sum(s) / np.prod(s) for i, s in enumerate(shapes)]
    got = layer_budgets.erk_densities(shapes, sparsity)
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert all(got[i] < 1 for i in free)
    # The kept weights are the target's: (1 - s) N.
    assert np.dot(got, sizes) == pytest.approx((1 - sparsity) * sum(sizes), rel=1e-12)


def test_dense_layer_reduces_to_erdos_renyi():
    # MLP at 0.8: eps = 0.2 * 9472 / (192 + 138); the 64x128 kernel keeps
    # eps * (64 + 128) / (64 * 128), the 128x10 one eps * 138 / 1280.
    eps = 0.2 * 9472 / 330
    np.testing.assert_allclose(layer_budgets.erk_densities([(64, 128), (128, 10)], 0.8),
                               [eps * 192 / 8192, eps * 138 / 1280], rtol=1e-12)
    assert eps * 138 / 1280 == pytest.approx(0.61891, abs=1e-5)


@pytest.mark.parametrize(("model_name", "shapes", "sparsity", "dense"), CASES,
                         ids=[f"{m}-{s}" for m, _, s, _ in CASES])
def test_kept_counts_sum_to_the_global_count(model_name, shapes, sparsity, dense):
    sizes = np.array([int(np.prod(s)) for s in shapes])
    kept = layer_budgets.kept_counts(shapes, sparsity)
    total = int(sizes.sum())
    # Exactly tfmot's count over all kernels: the target within one weight.
    assert kept.sum() == layer_budgets.global_kept(total, sparsity)
    assert abs(kept.sum() - (1 - sparsity) * total) <= 1
    # Each count is its ERK share, rounded (never off by a whole weight), dense at N.
    exact = layer_budgets.erk_densities(shapes, sparsity) * sizes
    assert np.all(np.abs(kept - exact) < 1)
    assert [i for i in range(len(shapes)) if kept[i] == sizes[i]] == list(dense)
    # The float32 levels give back those counts through tfmot's rule.
    levels = layer_budgets.layer_sparsities(shapes, sparsity)
    assert levels.dtype == np.float32
    assert [layer_budgets.global_kept(n, s) for n, s in zip(sizes, levels, strict=True)] == list(
        kept)


def test_a_tiny_layer_is_capped_and_the_others_rescale():
    # raw scores: 2000 / 1e6 for the big kernel, 4 / 4 = 1 for the 2x2 one. At
    # s = 0.5 one eps for both would give the tiny one density 249.5: it is kept
    # dense and the big kernel takes the rest, (0.5 * 1_000_004 - 4) / 1e6.
    shapes = [(1000, 1000), (2, 2)]
    uncapped_eps = 0.5 * 1_000_004 / (2000 + 4)
    assert uncapped_eps * 1.0 > 1
    got = layer_budgets.erk_densities(shapes, 0.5)
    np.testing.assert_allclose(got, [(0.5 * 1_000_004 - 4) / 1e6, 1.0], rtol=1e-12)
    np.testing.assert_array_equal(layer_budgets.kept_counts(shapes, 0.5), [499_998, 4])


@pytest.mark.parametrize("sparsity", [0.0, 0.05])
def test_low_levels_keep_small_layers_dense(sparsity):
    # At 0 everything is dense; just above, only the largest-fan kernel is pruned.
    shapes = [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512), (512, 10)]
    kept = layer_budgets.kept_counts(shapes, sparsity)
    sizes = [800, 51200, 131072, 5120]
    assert [k == n for k, n in zip(kept, sizes, strict=True)] == [
        True, sparsity == 0, True, True]


def _poly_table():
    """0 -> 0.8 over rounds 1..5, tabulated for rounds 0..6."""
    return schedules.make_schedule("polynomial", final_sparsity=0.8, begin_round=1,
                                   end_round=5).table(6)


def test_uniform_is_todays_rule():
    shapes = [(64, 128), (128, 10)]
    table = _poly_table()
    assert layer_budgets.with_layer_budgets(table, shapes, "uniform") is table
    assert table.layer_sparsity is None
    for s in (0.0, 0.3, 0.8, 0.99):
        np.testing.assert_array_equal(layer_budgets.kept_counts(shapes, s, "uniform"),
                                      [layer_budgets.global_kept(n, s) for n in (8192, 1280)])
    # The new field at its default keeps the fingerprint of every earlier run.
    assert ExperimentConfig(sparsity_distribution="uniform").fingerprint() == "cacb424d245d153f"
    assert ExperimentConfig(sparsity_distribution="erk").fingerprint() != "cacb424d245d153f"


def test_erk_table_recomputes_erk_at_each_rounds_level():
    shapes = [(64, 128), (128, 10)]
    table = _poly_table()
    erk = layer_budgets.with_layer_budgets(table, shapes, "erk")
    assert erk.layer_sparsity.shape == (7, 2) and erk.layer_sparsity.dtype == np.float32
    np.testing.assert_array_equal(erk.sparsity, table.sparsity)
    for r, level in enumerate(table.sparsity):
        np.testing.assert_array_equal(erk.layer_sparsity[r],
                                      layer_budgets.layer_sparsities(shapes, float(level)))
    np.testing.assert_array_equal(erk.layer_sparsity[0], [0, 0])
    np.testing.assert_array_equal(erk.layer_sparsity[-1], [np.float32(1 - 1102 / 8192),
                                                           np.float32(1 - 792 / 1280)])


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.8, 0.95])
def test_per_layer_vector_masks(sparsity):
    import tensorflow as tf

    from fedprune.pruning import masking

    rng = np.random.default_rng(0)
    shapes = [(5, 5, 1, 32), (5, 5, 32, 64), (256, 512), (512, 10)]
    kernels = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    spec = MaskSpec()
    # uniform levels as a vector: bit for bit the scalar path.
    scalar = masking.compute_masks(kernels, spec, tf.constant(sparsity, tf.float32))
    vector = masking.compute_masks(
        kernels, spec, tf.constant(layer_budgets.layer_sparsities(shapes, sparsity, "uniform")))
    for a, b in zip(scalar, vector, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    # ERK levels: each mask keeps its layer's count, the largest |w|.
    masks = masking.compute_masks(
        kernels, spec, tf.constant(layer_budgets.layer_sparsities(shapes, sparsity)))
    kept = [int(m.numpy().sum()) for m in masks]
    assert kept == list(layer_budgets.kept_counts(shapes, sparsity))
    for k, m in zip(kernels, masks, strict=True):
        m = m.numpy().astype(bool)
        if not m.all():
            assert np.abs(k[m]).min() >= np.abs(k[~m]).max()


def test_global_scope_refuses_a_vector():
    import tensorflow as tf

    from fedprune.pruning import masking

    with pytest.raises(InvalidArgument, match="^--mask_scope='global'"):
        masking.compute_masks([np.ones((4, 4), np.float32)], MaskSpec(mask_scope="global"),
                              tf.constant([0.5]))


REFUSED = [
    (dict(mask_scope="global"), "mask_scope", "global scope already distributes"),
    (dict(structure="2:4", final_sparsity=0.5), "structure", "unstructured with"),
    (dict(structure="block"), "structure", "unstructured with"),
    (dict(structure="neuron", masking="server", prune_output_layer=False), "structure",
     "unstructured with"),
    (dict(prune_granularity="step", masking="client"), "prune_granularity", "round with"),
    (dict(mask_criterion="threshold", threshold=0.1), "mask_criterion", "magnitude with"),
    (dict(mask_criterion="relative", relative_rate=0.1), "mask_criterion", "magnitude with"),
    (dict(masking="none", schedule="none"), "masking", "client|server|both with"),
    (dict(sparsity_distribution="lamp"), "sparsity_distribution", "one of uniform|erk"),
]


@pytest.mark.parametrize(("overrides", "flag", "phrase"), REFUSED,
                         ids=[f"{f}-{'-'.join(map(str, o.values()))}" for o, f, _ in REFUSED])
def test_refusals_are_one_line(overrides, flag, phrase):
    config = ExperimentConfig(**{"sparsity_distribution": "erk", **overrides})
    with pytest.raises(InvalidArgument) as raised:
        config.validate()
    message = str(raised.value)
    assert raised.value.name == flag and phrase in message and "\n" not in message


@pytest.mark.parametrize(("args", "flag"), [
    (["--mask_scope=global"], "mask_scope"),
    (["--masking=client", "--prune_granularity=step"], "prune_granularity"),
], ids=["global", "step"])
def test_the_driver_refuses_with_one_line(args, flag, tmp_path):
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "experiments.run", "--only_check_args",
         "--sparsity_distribution=erk", *args], cwd=tmp_path, stdin=subprocess.DEVNULL,
        capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = exit_lines(result, 2)  # and no TensorFlow imported
    assert len(lines) == 1 and lines[0].startswith(f"error: --{flag}="), lines
    assert not any(tmp_path.iterdir())


def test_the_process_builder_refuses_too():
    # A library user gets the same line before anything is built.
    from fedprune.federated import process

    with pytest.raises(InvalidArgument, match="^--mask_scope='global'"):
        process.build_pruning_process(
            model_builder=None, input_spec=None, masking="both",
            schedule=schedules.make_schedule(
                "polynomial", final_sparsity=0.8, begin_round=1, end_round=5),
            mask_spec=MaskSpec(mask_scope="global"),
            num_rounds=3, client_optimizer=None, server_optimizer=None, seed=0,
            sparsity_distribution="erk")


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("masking_mode", ["server", "both"])
def test_erk_run_measures_the_erk_sparsities(masking_mode, tmp_path):
    from fedprune.program import loop

    config = ExperimentConfig(num_clients=4, clients_per_round=4, rounds=4, begin_round=1,
                              end_round=3, final_sparsity=0.8, max_examples_per_client=32,
                              masking=masking_mode, sparsity_distribution="erk",
                              **CHEAP_OUTPUTS).validate()
    loop.run_experiment(config, tmp_path, log=lambda line: None)
    rows = _read_csv(tmp_path / "metrics.csv")
    section = json.loads((tmp_path / "config.json").read_text())["layer_budgets"]
    assert section["distribution"] == "erk"
    # Keras numbers layer names per process: read them from the run.
    names = [layer["name"] for layer in section["layers"]]
    shapes = [tuple(layer["shape"]) for layer in section["layers"]]
    assert shapes == [(64, 128), (128, 10)]
    table = config.make_schedule().table(config.rounds)
    sizes = np.array([8192, 1280])
    for r, row in enumerate(rows, 1):
        kept = layer_budgets.kept_counts(shapes, float(table.sparsity[r]))
        measured = [float(row[f"sparsity/{n}"]) for n in names]
        np.testing.assert_allclose(measured, 1 - kept / sizes, atol=1e-12)
        assert float(row["global_sparsity"]) == pytest.approx(1 - kept.sum() / sizes.sum(),
                                                              abs=1e-12)
    # After the ramp: 0.8 overall, the small output layer at 0.38 and the big one at 0.865.
    assert [float(rows[-1][f"sparsity/{n}"]) for n in names] == pytest.approx(
        [1 - 1102 / 8192, 1 - 792 / 1280], abs=1e-12)
    final = section["levels"][-1]
    assert final["target_sparsity"] == pytest.approx(0.8)
    assert final["kept"] == dict(zip(names, [1102, 792], strict=True))
    assert final["after_rounds"] == [3, 4]


def test_uniform_runs_record_their_rule():
    section = layer_budgets.budget_section(_poly_table(), ["dense"], [(64, 128)], "uniform")
    assert section == {"distribution": "uniform",
                       "rule": "every pruned kernel at the schedule's sparsity"}
