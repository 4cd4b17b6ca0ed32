"""ExperimentConfig validation: every bad value names its flag; nothing imports TF."""

import dataclasses

import pytest
from cli_util import CHEAP_OUTPUTS

from fedprune.config import OUTPUT_ONLY_FIELDS, ExperimentConfig, default_output_dir
from fedprune.errors import InvalidArgument


def test_default_is_valid():
    assert ExperimentConfig().validate() == ExperimentConfig()


STRUCTURED = dict(structure="neuron", masking="server", prune_output_layer=False)


@pytest.mark.parametrize("changes, shrink_round", [
    (dict(), 0),  # unstructured: never
    (STRUCTURED, 20),  # -1: after the polynomial schedule's end_round
    (dict(STRUCTURED, shrink_at_round=0), 0),
    (dict(STRUCTURED, shrink_at_round=25), 25),
    (dict(STRUCTURED, schedule="oneshot", begin_round=5), 5),
    (dict(STRUCTURED, schedule="oneshot", begin_round=0), 1),  # the loop's first round
    (dict(STRUCTURED, schedule="constant", begin_round=5, end_round=-1), 30),  # to the end
    (dict(STRUCTURED, model="cnn", structure="filter"), 20),
])
def test_shrink_round(changes, shrink_round):
    config = dataclasses.replace(ExperimentConfig(), **changes).validate()
    assert config.shrink_round() == shrink_round


def test_fingerprint_of_configs_without_the_newer_fields_is_unchanged():
    # Computed before --unit_norm, --shrink_at_round, --client_sampling and --dp*
    # existed (commit cb42ba4).
    assert ExperimentConfig().fingerprint() == "cacb424d245d153f"
    for changed in (dict(unit_norm="l1"), dict(client_sampling="poisson"),
                    dict(dp="fixed"), dict(dp_clip=0.3)):
        assert ExperimentConfig(**changed).fingerprint() != ExperimentConfig().fingerprint()


@pytest.mark.parametrize(
    "changes, flag",
    [
        (dict(final_sparsity=1.0), "final_sparsity"),
        (dict(final_sparsity=-0.1), "final_sparsity"),
        (dict(begin_round=12, end_round=10), "end_round"),
        (dict(end_round=40), "end_round"),  # ends after --rounds=30
        (dict(clients_per_round=11), "clients_per_round"),
        (dict(num_clients=0), "num_clients"),
        (dict(num_clients=5000), "num_clients"),  # more clients than the 1,437 examples
        (dict(model="rnn"), "model"),
        (dict(masking="none"), "masking"),  # dense masking with a pruning schedule
        (dict(schedule="none"), "masking"),
        (dict(mask_criterion="threshold"), "threshold"),
        (dict(mask_criterion="relative", relative_rate=0.0), "relative_rate"),
        (dict(structure="2:4"), "final_sparsity"),  # 2:4 fixes the sparsity at 0.5
        (dict(partition="dirichlet", dirichlet_alpha=0.0), "dirichlet_alpha"),
        (dict(partition="shards", shards_per_client=0), "shards_per_client"),
        (dict(rounds=0), "rounds"),
        (dict(client_lr=0.0), "client_lr"),
        (dict(client_momentum=1.0), "client_momentum"),
        (dict(server_optimizer="yogi"), "server_optimizer"),
        (dict(eval_every=0), "eval_every"),
        (dict(schedule="polynomial", prune_every=3), "end_round"),  # (20 - 1) % 3 != 0
        # Structured (unit) pruning: server masking, no output layer, a model with units.
        (dict(STRUCTURED, masking="both"), "masking"),
        (dict(STRUCTURED, prune_output_layer=True), "prune_output_layer"),
        (dict(STRUCTURED, structure="filter"), "model"),  # the MLP has no convolutions
        (dict(STRUCTURED, mask_criterion="threshold", threshold=0.1), "mask_criterion"),
        (dict(STRUCTURED, unit_norm="linf"), "unit_norm"),
        (dict(STRUCTURED, shrink_at_round=19), "shrink_at_round"),  # before the last update
        (dict(STRUCTURED, shrink_at_round=31), "shrink_at_round"),  # after the last round
        (dict(STRUCTURED, shrink_at_round=-2), "shrink_at_round"),
        (dict(shrink_at_round=25), "shrink_at_round"),  # unstructured: nothing to cut out
    ],
)
def test_bad_values_name_their_flag(changes, flag):
    with pytest.raises(InvalidArgument, match=f"^--{flag}="):
        dataclasses.replace(ExperimentConfig(), **changes).validate()


def test_tff_dataset_without_file_fails_fast(tmp_path):
    config = ExperimentConfig(dataset="emnist", model="cnn", data_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="emnist_all.sqlite"):
        config.validate()


@pytest.mark.parametrize("changes", [{"figures": False}, {"deploy": "none"},
                                     {"deploy": "size", "figures": False},
                                     CHEAP_OUTPUTS])  # what the tests' runs leave out
def test_output_only_fields_keep_the_fingerprint(changes):
    assert set(changes) <= set(OUTPUT_ONLY_FIELDS)
    assert ExperimentConfig(**changes).validate().fingerprint() == "cacb424d245d153f"


def test_fingerprint_ignores_data_dir_only():
    base = ExperimentConfig()
    assert base.fingerprint() == dataclasses.replace(base, data_dir="/x").fingerprint()
    assert base.fingerprint() != dataclasses.replace(base, seed=1).fingerprint()
    assert default_output_dir(base) != default_output_dir(dataclasses.replace(base, seed=1))


def test_round_trip_through_dict():
    config = ExperimentConfig(block_size=(2, 2), structure="block")
    assert ExperimentConfig.from_dict(config.to_dict()) == config
