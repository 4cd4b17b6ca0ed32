"""One trace per grid: a process built for one cell runs another cell exactly.

`assembly.build_process` reuses a built process for every config with the same
`assembly.process_key` (`PruningProcess.for_cell` writes the cell's schedule
table, initial weights and regrowth key into the state). Each case builds cell
A's process, runs cell B on it, and compares with B on a process built for B:
every metrics.csv value and every final weight to 1e-6.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from cli_runs import checkpoint_arrays
from cli_util import CHEAP_OUTPUTS

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.outputs import run_files
from fedprune.program import assembly

# Three rounds: the ramps (rounds 1-3, or to 2) run to their end, and regrowth adjusts
# after rounds 1 and 2 (< --regrow_end_round=3); every metric row and the final weights
# of the two runs are compared.
BASE = ExperimentConfig(rounds=3, num_clients=3, clients_per_round=3,
                        max_examples_per_client=32, begin_round=1, end_round=3, eval_every=3,
                        **CHEAP_OUTPUTS)


def _config(**changes) -> ExperimentConfig:
    return dataclasses.replace(BASE, **changes).validate()


# (cell A, which builds the process; cell B, which runs on it)
PAIRS = {
    "both: schedule, sparsity, seed, pruned initial model": (
        dict(masking="both"),
        dict(masking="both", schedule="constant", final_sparsity=0.5, begin_round=0, seed=1)),
    "client: polynomial power and sparsity, seed": (
        dict(masking="client", power=1.0),
        dict(masking="client", final_sparsity=0.9, power=3.0, seed=2)),
    "server, erk budgets": (
        dict(masking="server", sparsity_distribution="erk"),
        dict(masking="server", sparsity_distribution="erk", final_sparsity=0.9,
             schedule="oneshot", end_round=2, seed=1)),
    "server, random regrowth: the rng key": (
        dict(masking="server", regrow="random", regrow_end_round=3),
        dict(masking="server", regrow="random", regrow_end_round=3, final_sparsity=0.9,
             seed=3)),
    "both, client regrowth (FedDST): the clients' rng key": (
        dict(masking="both", regrow="random", regrow_at="client", regrow_end_round=3),
        dict(masking="both", regrow="random", regrow_at="client", regrow_end_round=3,
             final_sparsity=0.9, seed=3)),
    "both at step granularity: schedule class, sparsity, seed": (
        dict(masking="both", prune_granularity="step"),
        dict(masking="both", prune_granularity="step", schedule="constant", begin_round=1,
             end_round=-1, final_sparsity=0.6, seed=1)),
    "client at step granularity: power, sparsity, steps per round, frequency, seed": (
        dict(masking="client", prune_granularity="step", power=1.0),
        dict(masking="client", prune_granularity="step", final_sparsity=0.9, power=3.0,
             steps_per_round=3, prune_every_steps=2, seed=2)),
    "both at step granularity, 2:4: oneshot, seed": (
        dict(masking="both", prune_granularity="step", structure="2:4", final_sparsity=0.5),
        dict(masking="both", prune_granularity="step", structure="2:4", final_sparsity=0.5,
             schedule="oneshot", end_round=2, seed=1)),
    "dense: seed": (
        dict(masking="none", schedule="none"),
        dict(masking="none", schedule="none", seed=4)),
}


@pytest.mark.parametrize("pair", list(PAIRS), ids=list(PAIRS))
def test_a_cell_on_another_cells_process_equals_its_own(tff_local_context, tmp_path, pair):
    from fedprune.program import loop

    first, second = (_config(**changes) for changes in PAIRS[pair])
    data = assembly.load_data(first)
    assert assembly.process_key(first, data) == assembly.process_key(second, data)
    assembly.clear_process_cache()
    built = assembly.build_process(first, data)
    loop.run_experiment(second, tmp_path / "reused", log=lambda line: None)
    reused = assembly.build_process(second, data)
    assert reused.process.next is built.process.next  # one traced process served both
    assert len(assembly._processes) == 1

    assembly.clear_process_cache()
    loop.run_experiment(second, tmp_path / "own", log=lambda line: None)
    _assert_same_run(tmp_path / "own", tmp_path / "reused", second.rounds)


def test_a_process_built_without_reuse_is_traced_anew_and_not_kept(tff_local_context):
    config = _config(masking="server")
    data = assembly.load_data(config)
    assembly.clear_process_cache()
    kept = assembly.build_process(config, data)
    fresh = assembly.build_process(config, data, reuse=False)
    assert fresh.process.next is not kept.process.next
    assert len(assembly._processes) == 1
    assert assembly.build_process(config, data).process.next is kept.process.next


def test_kept_initial_weights_of_a_seed_train_as_on_its_own_process(tff_local_context,
                                                                     tmp_path):
    """A built process keeps each seed's initial weights (`for_cell`). A cell that reuses
    them right after a cell of another seed (which set TensorFlow's global seed, read
    by the clients' shuffles) trains exactly as on a process built for it."""
    from fedprune.program import loop

    first, other = _config(masking="server"), _config(masking="server", seed=1)
    second = _config(masking="server", final_sparsity=0.5)  # seed 0, as `first`
    data = assembly.load_data(first)
    assembly.clear_process_cache()
    assembly.build_process(first, data)
    assembly.build_process(other, data)
    loop.run_experiment(second, tmp_path / "reused", log=lambda line: None)
    assert len(assembly._processes) == 1
    assembly.clear_process_cache()
    loop.run_experiment(second, tmp_path / "own", log=lambda line: None)
    _assert_same_run(tmp_path / "own", tmp_path / "reused", second.rounds)


def test_a_shrunk_run_on_another_seeds_processes_equals_its_own(tff_local_context, tmp_path,
                                                                 monkeypatch):
    """The seeds of a structured cell shrink to the same architecture: the second seed
    reuses the first one's full and shrunk processes (int8 uploads: the rounding's seed
    too) and trains as on processes built for it, before and after its shrink."""
    from fedprune.program import loop

    structured = dict(rounds=4, end_round=2, structure="neuron", masking="server",
                      prune_output_layer=False, final_sparsity=0.5, upload_quantization="int8")
    first, second = _config(**structured), _config(**structured, seed=1)
    builds = []
    build = assembly._build_process
    monkeypatch.setattr(assembly, "_build_process",
                        lambda *args, **kwargs: builds.append(1) or build(*args, **kwargs))
    assembly.clear_process_cache()
    loop.run_experiment(first, tmp_path / "first", log=lambda line: None)
    assert len(builds) == 2  # the full model's process, then the shrunk model's
    loop.run_experiment(second, tmp_path / "reused", log=lambda line: None)
    assert len(builds) == 2
    assembly.clear_process_cache()
    loop.run_experiment(second, tmp_path / "own", log=lambda line: None)
    assert len(builds) == 4
    # The same shrink (Keras' layer names and the seconds aside).
    own, reused = (json.loads((tmp_path / run / "shrink.json").read_text())
                   for run in ("own", "reused"))
    for info in (own, reused):
        del info["layers"], info["shrink_seconds"]
    assert own == reused and own["round"] == 2 and own["after"]["params"] == 4810
    _assert_same_run(tmp_path / "own", tmp_path / "reused", second.rounds)


def _assert_same_run(own_dir, reused_dir, rounds: int) -> None:
    """Every metrics.csv value and every final weight of two runs equal to 1e-6."""
    own = run_files.metric_values(own_dir)
    shared = run_files.metric_values(reused_dir)
    assert len(own) == rounds
    for own_row, shared_row in zip(own, shared, strict=True):
        assert own_row.keys() == shared_row.keys()
        for key, value in own_row.items():
            if value is None:
                assert shared_row[key] is None, key
            else:
                assert shared_row[key] == pytest.approx(value, abs=1e-6), (own_row["round"], key)
    for a, b in zip(checkpoint_arrays(own_dir)[1], checkpoint_arrays(reused_dir)[1],
                    strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)


INT8 = dict(upload_quantization="int8", masking="server")
STEP = dict(prune_granularity="step", masking="both")
DP = dict(dp="fixed", dp_noise_multiplier=1.0, masking="server")


@pytest.mark.parametrize("base, changes, shares", [
    ({}, dict(final_sparsity=0.5), True),
    ({}, dict(schedule="constant", begin_round=0, end_round=-1), True),
    ({}, dict(seed=7), True),
    ({}, dict(eval_every=1, num_clients=4, dirichlet_alpha=0.1), True),
    ({}, dict(masking="server"), False),
    ({}, dict(rounds=6), False),
    ({}, dict(model="cnn"), False),
    ({}, dict(client_lr=0.05), False),
    # The seed is data with quantized uploads (their rounding's seed) and traced with DP;
    # at step granularity the clients' step schedule and the steps per round are data too.
    (INT8, dict(INT8, seed=1), True),
    (DP, dict(DP, seed=1), False),
    ({}, dict(prune_granularity="step"), False),
    (STEP, dict(STEP, schedule="constant", end_round=-1, final_sparsity=0.5,
                steps_per_round=3, prune_every_steps=3, seed=1), True),
    (STEP, dict(STEP, structure="2:4", final_sparsity=0.5), False),
])
def test_process_key_shares_exactly_what_is_not_traced(base, changes, shares):
    data = assembly.load_data(BASE)
    first, second = _config(**base), _config(**changes)
    assert (assembly.process_key(first, data) == assembly.process_key(second, data)) is shares


def test_for_cell_refuses_what_the_traced_process_fixes(tff_local_context):
    config = _config(masking="server", regrow="random", regrow_end_round=3)
    data = assembly.load_data(config)
    assembly.clear_process_cache()
    built = assembly.build_process(config, data)
    other = dataclasses.replace(config, regrow_end_round=2).validate()
    with pytest.raises(InvalidArgument, match="^--regrow='?random"):  # the traced fractions
        built.for_cell(config.make_schedule(), seed=1, regrow=other.regrow_spec())


def test_for_cell_maps_a_step_schedule_with_the_built_steps_per_round(tff_local_context):
    """Without a mapping, a cell's step schedule keeps the built process's steps per
    round and frequency; a polynomial span they do not divide is refused."""
    from fedprune.pruning import schedules

    config = _config(**STEP, schedule="constant", end_round=-1, steps_per_round=4,
                     prune_every_steps=3)
    data = assembly.load_data(config)
    assembly.clear_process_cache()
    built = assembly.build_process(config, data)
    cell = built.for_cell(schedules.make_schedule("constant", final_sparsity=0.5,
                                                  begin_round=2), seed=1)
    assert (cell.step_mapping.steps_per_round, cell.step_mapping.frequency) == (4, 3)
    assert (cell.step_mapping.begin_step, cell.step_mapping.end_step) == (8, -1)
    assert cell.step_mapping.schedule_class == "ConstantSparsity"
    assert cell.table.updates.tolist() == [False, False, True, True]  # steps 8 and 11
    state = cell.process.initialize()
    assert state.finalizer["steps_per_round"] == 4
    assert state.client_work["step_schedule"]["begin_step"] == 8
    assert not state.client_work["step_schedule"]["decays"]
    odd = schedules.make_schedule("polynomial", final_sparsity=0.5, begin_round=1,
                                  end_round=3)  # a span of 8 client steps
    with pytest.raises(InvalidArgument, match="^--prune_every_steps=3"):
        built.for_cell(odd, seed=0)
