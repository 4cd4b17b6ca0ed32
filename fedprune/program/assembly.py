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

import dataclasses

from fedprune.config import ExperimentConfig
from fedprune.data import datasets, sampling
from fedprune.federated import privacy


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
    import tensorflow_federated as tff

    return tff.aggregators.MeanFactory(no_nan_division=config.client_sampling == "poisson")


def build_process(config: ExperimentConfig, data: datasets.FederatedData, *,
                  shrunk_model=None):
    """The `PruningProcess` for a config and its data.

    With `shrunk_model` (a plain Keras model from `surgery.shrink`): the
    process that continues a structured run after its shrink, for a model of
    that architecture, dense (masking `none`, no schedule), with the config's
    optimizers; its initial weights are replaced by `shrinking.transfer_state`.
    """
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
    exactly what an uninterrupted one does.
    """
    clients = sampling.sample_round(config.client_sampling, data.client_ids,
                                    clients_per_round=config.clients_per_round,
                                    seed=config.seed, round_num=round_num)
    return RoundInputs(round_num, clients, [
        data.client_dataset(
            c, batch_size=config.batch_size, local_epochs=config.local_epochs,
            shuffle_seed=datasets.client_shuffle_seed(config.seed, round_num, c),
            max_examples=config.max_examples_per_client or None)
        for c in clients
    ])
