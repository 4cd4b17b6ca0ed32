"""Assembly: a config's data, its learning process, and each round's inputs.

* `load_data`: the federated dataset a config names (`datasets.DATASETS`).
* `model_aggregator`, `build_process`: the TFF aggregator and the pruning
  process (`process.build_pruning_process`) for a config and its data.
* `round_inputs`: who is sampled in a round (`sampling.sample_round`, under the
  config's `client_sampling`) and their datasets, shuffled with
  `datasets.client_shuffle_seed`; a pure function of (config, round), used by
  the round loop (`loop.run_experiment`) and the benchmark alike.

Importing this module is cheap: TensorFlow and TFF are imported by the
functions that need them.
"""

from __future__ import annotations

import collections
import dataclasses

from fedprune.config import ExperimentConfig
from fedprune.data import datasets, sampling
from fedprune.federated import privacy
from fedprune.runtime import memory


def load_data(config: ExperimentConfig) -> datasets.FederatedData:
    """The federated dataset a config names (its registered `DatasetLoader`)."""
    return config.dataset_loader().load()


def model_aggregator(config: ExperimentConfig):
    """The weighted aggregator of plain client deltas a config asks for.

    DP: TFF's DP-FedAvg mean (uniform client weights, division by the expected
    `clients_per_round`; `privacy.build_dp_aggregator`). Otherwise the
    example-weighted mean; under Poisson sampling with `no_nan_division`, so that
    a round that sampled no client is a zero update instead of 0/0.
    """
    if config.dp != "none":
        return privacy.build_dp_aggregator(
            config.dp, noise_multiplier=config.dp_noise_multiplier, clip=config.dp_clip,
            clients_per_round=config.clients_per_round,
            target_unclipped_quantile=config.dp_target_quantile, masking=config.masking)
    from fedprune.federated import fused_mean

    return fused_mean.build_fused_mean_factory(
        no_nan_division=config.client_sampling == "poisson")


def step_mapping(config: ExperimentConfig, data: datasets.FederatedData):
    """The round -> client step mapping of `--prune_granularity=step` (None for `round`).

    `--steps_per_round=0` resolves to the mean over all training clients of
    their local steps per round, ceil(local_epochs * m / batch_size) with m
    capped by `--max_examples_per_client` (`step_schedule.mean_local_steps`).

    Raises:
      InvalidArgument: a schedule or frequency the resolved mapping rejects.
    """
    if config.prune_granularity != "step":
        return None
    from fedprune.pruning import step_schedule

    cap = config.max_examples_per_client or None
    if config.steps_per_round:
        spr, source = config.steps_per_round, "--steps_per_round"
    else:
        spr = step_schedule.mean_local_steps(
            [data.num_examples(c) for c in data.client_ids], local_epochs=config.local_epochs,
            batch_size=config.batch_size, max_examples=cap)
        source = ("mean over the training clients of ceil(local_epochs * examples / "
                  "batch_size), rounded half up (--steps_per_round=0)")
    return step_schedule.step_mapping(config.make_schedule(), steps_per_round=spr,
                                      prune_every_steps=config.prune_every_steps, source=source)


# Config fields a built process does not trace: the schedule's (data in its state,
# `PruningProcess.for_cell`; with --prune_granularity=step also the step mapping's) and
# the seed (initial weights, quantized uploads' rounding), except where noted in
# `process_key`, and fields only the round loop or the data read.
_SCHEDULE_FIELDS = ("schedule", "initial_sparsity", "final_sparsity", "begin_round",
                    "end_round", "prune_every", "power", "steps_per_round",
                    "prune_every_steps")
_UNTRACED_FIELDS = ("eval_every", "shrink_at_round", "dp_delta", "dp_accountant",
                    "max_test_examples", "num_clients", "partition", "dirichlet_alpha",
                    "shards_per_client", "synthetic_alpha", "synthetic_beta",
                    "max_examples_per_client", "data_dir")
# Built processes kept for reuse, newest last (`build_process`).
_PROCESS_CACHE_SIZE = 4
_processes: collections.OrderedDict = collections.OrderedDict()


def process_key(config: ExperimentConfig, data: datasets.FederatedData) -> str:
    """What the traced computations of `config`'s process depend on.

    Two configs with the same key share one built process (`build_process`):
    every field except the schedule's (with `--prune_granularity=step` also
    the step mapping's: the clients' tfmot wrappers read their schedule from
    the state, `step_schedule_data.py`), the seed and the untraced ones, plus
    the data's element spec. The seed stays with `--dp` (TFF's noise ops take
    their seeds from the global seed when they are traced).
    """
    return repr((process_group(config), repr(data.element_spec)))


def process_group(config: ExperimentConfig) -> str:
    """The part of `process_key` a config alone gives (no data loaded, no TensorFlow)."""
    neutral = set(_UNTRACED_FIELDS) | set(_SCHEDULE_FIELDS)
    if config.dp == "none":
        neutral.add("seed")
    return repr(sorted((k, v) for k, v in config.to_dict().items() if k not in neutral))


def clear_process_cache() -> None:
    """Forgets the built processes `build_process` keeps."""
    _processes.clear()


def build_process(config: ExperimentConfig, data: datasets.FederatedData, *,
                  shrunk_model=None, reuse: bool = True):
    """The `PruningProcess` for a config and its data.

    Reuses the process built for an earlier config with the same
    `process_key` (one trace per grid: cells that differ only in schedule
    values, final sparsity or seed), set to this config's schedule and seed
    with `PruningProcess.for_cell`; rounds run exactly as in a process built
    for it (tested to 1e-6). The last `_PROCESS_CACHE_SIZE` processes are kept.

    With `shrunk_model` (a plain Keras model from `surgery.shrink`): the
    process that continues a structured run after its shrink, for a model of
    that architecture, dense (masking `none`, no schedule), with the config's
    optimizers; its initial weights are replaced by `shrinking.transfer_state`.
    Runs whose shrunk models have the same weight shapes (the seeds of a
    structured cell keep as many units) share it, as above.

    With `reuse=False` the process is traced anew and not kept for later
    configs (the benchmark's ablation section, whose variants are traced with
    computations taken out, `experiments/benchmark_speed.py`).
    """
    key = process_key(config, data)
    schedule, regrow = config.make_schedule(), config.regrow_spec()
    mapping = step_mapping(config, data)
    if shrunk_model is not None:
        from fedprune.pruning import schedules

        key = repr((key, "shrunk", [tuple(w.shape) for w in shrunk_model.weights]))
        schedule, regrow, mapping = schedules.make_schedule("none"), None, None
    built = _processes.pop(key, None) if reuse else None
    if built is None:
        built = _build_process(config, data, shrunk_model=shrunk_model, mapping=mapping)
    if reuse:
        _processes[key] = built
        while len(_processes) > _PROCESS_CACHE_SIZE:
            _processes.popitem(last=False)
    return built.for_cell(schedule, seed=config.seed, regrow=regrow, step_mapping=mapping)


def _build_process(config: ExperimentConfig, data: datasets.FederatedData, *,
                   shrunk_model=None, mapping=None):
    """Builds (and traces) the process of `build_process`; `mapping`: its `step_mapping`."""
    from fedprune.federated import process as process_lib
    from fedprune.model import builders
    from fedprune.pruning import masking, schedules

    def model_builder():
        if shrunk_model is not None:
            import tensorflow as tf

            return tf.keras.models.clone_model(shrunk_model)
        return builders.build_model(config.model, data.input_shape, data.num_classes)

    dense = shrunk_model is not None
    return process_lib.build_pruning_process(
        model_aggregator=model_aggregator(config),
        model_builder=model_builder,
        input_spec=data.element_spec,
        masking="none" if dense else config.masking,
        schedule=schedules.make_schedule("none") if dense else config.make_schedule(),
        mask_spec=masking.MaskSpec() if dense else config.mask_spec(),
        num_rounds=config.rounds,
        client_optimizer=process_lib.make_optimizer("sgd", config.client_lr,
                                                    momentum=config.client_momentum),
        server_optimizer=process_lib.make_optimizer(config.server_optimizer, config.server_lr),
        seed=config.seed,
        prune_output_layer=config.prune_output_layer,
        mask_aggregation=config.mask_aggregation,
        step_mapping=mapping,
        sparsity_distribution="uniform" if dense else config.sparsity_distribution,
        regrow=None if dense else config.regrow_spec(),
        upload_quantization=config.upload_quantization,
    )


@dataclasses.dataclass(frozen=True)
class RoundInputs:
    """One round's inputs.

    Attributes:
      round_num: the round (drives client sampling and shuffling).
      clients: the sampled client ids (possibly empty under Poisson sampling).
      datasets: their `tf.data` datasets of batches, in the same order.
    """

    round_num: int
    clients: list[str]
    datasets: list


def round_inputs(config: ExperimentConfig, data: datasets.FederatedData,
                 round_num: int) -> RoundInputs:
    """The clients of round `round_num` and their training datasets.

    A pure function of (config, data, round_num), so a resumed run trains on
    exactly what an uninterrupted one does. First hands the free heap pages
    of the rounds before back to the OS, at most once a second
    (`memory.release_free_heap`, `memory.ROUND_TRIM_INTERVAL_S`; issue 18).
    """
    memory.release_free_heap(min_interval_s=memory.ROUND_TRIM_INTERVAL_S)
    clients = sampling.sample_round(config.client_sampling, data.client_ids,
                                    clients_per_round=config.clients_per_round,
                                    seed=config.seed, round_num=round_num)
    return RoundInputs(round_num, clients, data.client_datasets(
        clients, batch_size=config.batch_size, local_epochs=config.local_epochs,
        shuffle_seeds=[datasets.client_shuffle_seed(config.seed, round_num, c) for c in clients],
        max_examples=config.max_examples_per_client or None))
