"""flags.txt (`experiments/flagfile.py`): every experiment flag, read back as the same config."""

import dataclasses

import pytest
from cli_util import parse_flagfile

from experiments import flagfile
from fedprune.config import ExperimentConfig

# Every field off its default, with floats that only repr writes exactly.
NON_DEFAULT = ExperimentConfig(
    dataset="synthetic", data_dir="/data/tff files", partition="shards", dirichlet_alpha=0.3,
    shards_per_client=3, synthetic_alpha=0.5, synthetic_beta=1 / 3, num_clients=7,
    clients_per_round=5, client_sampling="poisson", max_examples_per_client=11,
    max_test_examples=13, rounds=9, local_epochs=2, batch_size=8, model="mlp2",
    client_lr=0.1 + 0.2, client_momentum=0.9, server_optimizer="adam", server_lr=1e-3,
    masking="server", schedule="constant", initial_sparsity=0.1, final_sparsity=0.7,
    begin_round=2, end_round=-1, prune_every=3, power=2.5, mask_criterion="threshold",
    mask_scope="global", threshold=1e-7, relative_rate=None, structure="block",
    block_size=(2, 8), block_pooling="MAX", unit_norm="l1", shrink_at_round=0,
    prune_output_layer=False, mask_aggregation="majority", dp="adaptive",
    dp_noise_multiplier=0.75, dp_clip=0.05, dp_target_quantile=0.25, dp_delta=1e-9,
    dp_accountant="pld", seed=12345, eval_every=4)


@pytest.mark.parametrize("config", [ExperimentConfig(), NON_DEFAULT,
                                    dataclasses.replace(NON_DEFAULT, mask_criterion="relative",
                                                        threshold=None, relative_rate=0.05)],
                         ids=["defaults", "non-default", "relative"])
def test_flags_txt_reads_back_as_the_same_config(tmp_path, config):
    flagfile.write_flagfile(tmp_path, config, resume=False, tff_workers=["h1:8000", "h2:8000"])
    text = (tmp_path / flagfile.FLAGFILE_NAME).read_text()
    flag_lines = [line for line in text.splitlines() if line.startswith("--")]
    assert len(flag_lines) == sum(getattr(config, f.name) is not None
                                  for f in dataclasses.fields(ExperimentConfig))
    assert "--tff_workers" not in "".join(flag_lines)  # where it ran is a comment
    parsed = parse_flagfile(tmp_path / flagfile.FLAGFILE_NAME)
    assert parsed == config
    assert parsed.fingerprint() == config.fingerprint()


def test_flags_txt_of_a_resumed_run_is_kept(tmp_path):
    flagfile.write_flagfile(tmp_path / "run", NON_DEFAULT, resume=True)  # a run without one
    first = (tmp_path / "run" / flagfile.FLAGFILE_NAME).read_bytes()
    flagfile.write_flagfile(tmp_path / "run", NON_DEFAULT, resume=True, tff_workers=["h:1"])
    assert (tmp_path / "run" / flagfile.FLAGFILE_NAME).read_bytes() == first
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [flagfile.FLAGFILE_NAME]
