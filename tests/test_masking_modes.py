"""Masking modes: what each implies, the registry, and each cross-flag rule from both sides.

Every rule tying `--masking` to another flag must be enforced by
`ExperimentConfig.validate()` and by the library builder, with the same
message. The builder side is checked without building anything: the rules run
before the builder imports TensorFlow/TFF, so with that import blocked an
`ImportError` means every check passed.
"""

import dataclasses
import subprocess
import sys

import pytest
from absl import flags

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.federated import masking_modes, privacy
from fedprune.federated import process as fp_process
from fedprune.federated.masking_modes import MASKING_MODES, masking_mode
from fedprune.pruning import masking, schedules

# mode: (wraps_model, client_prunes, server_remasks, dp_compatible, allows_unit_structures)
EXPECTED = {
    "none": (False, False, False, True, False),
    "client": (True, True, False, False, False),
    "server": (True, False, True, True, True),
    "both": (True, True, True, False, False),
}
PROPERTIES = ("wraps_model", "client_prunes", "server_remasks", "dp_compatible",
              "allows_unit_structures")
MODES = list(EXPECTED)


def test_registry_holds_the_modes_in_flag_order():
    assert list(MASKING_MODES) == ["none", "client", "server", "both"]
    assert all(mode.name == name for name, mode in MASKING_MODES.items())
    assert masking_modes.names() == tuple(MASKING_MODES)


@pytest.mark.parametrize("name", MODES)
def test_properties(name):
    mode = MASKING_MODES[name]
    assert tuple(getattr(mode, p) for p in PROPERTIES) == EXPECTED[name]
    assert mode.description and "\n" not in mode.description
    assert masking_mode(name) is mode
    assert masking_mode(mode) is mode
    with pytest.raises(dataclasses.FrozenInstanceError):
        mode.client_prunes = not mode.client_prunes


@pytest.mark.parametrize("name", ["everywhere", "", "None", None, 1])
def test_unknown_mode_names_the_flag_and_the_accepted_values(name):
    with pytest.raises(InvalidArgument) as e:
        masking_mode(name)
    assert (e.value.name, e.value.value) == ("masking", name)
    assert str(e.value) == f"--masking={name!r}: expected one of none|client|server|both"


def test_config_decodes_its_mode_and_keeps_the_name():
    config = ExperimentConfig(masking="server")
    assert config.masking_mode is MASKING_MODES["server"]
    assert config.to_dict()["masking"] == "server"  # config.json and the fingerprint see a string
    with pytest.raises(InvalidArgument, match="--masking='x'"):
        ExperimentConfig(masking="x").validate()


def test_flag_help_lists_every_mode_with_its_description():
    from experiments import common

    flag_values = flags.FlagValues()
    common.define_experiment_flags(flag_values)
    flag = flag_values["masking"]
    assert list(flag.parser.enum_values) == list(MASKING_MODES)
    for name, mode in MASKING_MODES.items():
        assert f"{name}: {mode.description}." in flag.help


def test_importing_masking_modes_does_not_import_tensorflow():
    code = ("import sys, fedprune.federated.masking_modes; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tensorflow_federated', 'tensorflow_model_optimization')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True)
    assert result.stdout.strip() == "[]"


# ----------------------------------------------------------------------------
# Cross-flag rules: config validation and the library builder agree.

POLY = schedules.PolynomialDecay(0.5, 0.8, begin_round=1, end_round=3, power=3)


def _config(name: str, **changes) -> ExperimentConfig:
    """A config of mode `name` that is valid apart from `changes` (dense modes: no schedule)."""
    schedule = "polynomial" if MASKING_MODES[name].wraps_model else "none"
    return ExperimentConfig(**{"masking": name, "schedule": schedule, **changes})


def _config_error(config: ExperimentConfig) -> InvalidArgument | None:
    try:
        config.validate()
    except InvalidArgument as e:
        return e
    return None


@pytest.fixture
def blocked_tf(monkeypatch):
    """Makes `import tensorflow`/`tensorflow_federated` fail: builders stop after their checks."""
    for module in ("tensorflow", "tensorflow_federated"):
        monkeypatch.setitem(sys.modules, module, None)


def _builder_error(**changes) -> InvalidArgument | None:
    """The error of `build_pruning_process` (None: its checks pass and it starts building)."""
    kwargs = dict(model_builder=None, input_spec=None, masking="server", schedule=POLY,
                  mask_spec=masking.MaskSpec(), num_rounds=3, client_optimizer=None,
                  server_optimizer=None, seed=0)
    try:
        fp_process.build_pruning_process(**{**kwargs, **changes})
    except InvalidArgument as e:
        return e
    except ImportError:
        return None
    raise AssertionError("the builder got past the blocked TensorFlow import")


def _assert_same_rule(config_error, builder_error, allowed: bool, flag: str, accepted: str):
    if allowed:
        assert config_error is None and builder_error is None, (config_error, builder_error)
        return
    assert config_error is not None and builder_error is not None
    assert config_error.name == builder_error.name == flag
    assert str(config_error) == str(builder_error)
    assert "\n" not in str(config_error) and accepted in str(config_error)


@pytest.mark.parametrize("schedule", ["none", "polynomial"])
@pytest.mark.parametrize("name", MODES)
def test_a_mode_masks_exactly_when_there_is_a_schedule(blocked_tf, name, schedule):
    config_error = _config_error(ExperimentConfig(masking=name, schedule=schedule))
    builder_error = _builder_error(
        masking=name, schedule=POLY if schedule == "polynomial" else schedules.NoPruning())
    _assert_same_rule(config_error, builder_error,
                      allowed=MASKING_MODES[name].wraps_model == (schedule != "none"),
                      flag="masking", accepted="none exactly when --schedule=none")


@pytest.mark.parametrize("rule", ["nonzero", "majority"])
@pytest.mark.parametrize("name", MODES)
def test_mask_aggregation_rules_need_pruning_clients(blocked_tf, name, rule):
    mode = MASKING_MODES[name]
    config_error = _config_error(_config(name, mask_aggregation=rule))
    builder_error = _builder_error(
        masking=mode, schedule=POLY if mode.wraps_model else schedules.NoPruning(),
        mask_aggregation=rule)
    _assert_same_rule(config_error, builder_error, allowed=mode.client_prunes,
                      flag="mask_aggregation",
                      accepted="average unless clients prune (--masking=client|both)")


@pytest.mark.parametrize("structure", ["neuron", "filter"])
@pytest.mark.parametrize("name", MODES)
def test_unit_structures_need_a_mode_that_allows_them(blocked_tf, name, structure):
    mode = MASKING_MODES[name]
    config_error = _config_error(_config(name, structure=structure, prune_output_layer=False,
                                         model="mlp" if structure == "neuron" else "cnn"))
    builder_error = _builder_error(
        masking=name, schedule=POLY if mode.wraps_model else schedules.NoPruning(),
        mask_spec=masking.MaskSpec(structure=structure))
    _assert_same_rule(config_error, builder_error, allowed=mode.allows_unit_structures,
                      flag="masking", accepted=f"server with --structure={structure}")


@pytest.mark.parametrize("dp", ["fixed", "adaptive"])
@pytest.mark.parametrize("name", MODES)
def test_dp_needs_a_mode_whose_clients_do_not_prune(blocked_tf, name, dp):
    # Adaptive clipping's count noise needs noise_multiplier < 0.1 * clients_per_round.
    dp_args = dict(noise_multiplier=0.5, clip=1.0, clients_per_round=10)
    config_error = _config_error(_config(name, dp=dp, dp_noise_multiplier=0.5))
    try:
        privacy.build_dp_aggregator(dp, **dp_args, masking=name)
        builder_error = None
    except InvalidArgument as e:
        builder_error = e
    except ImportError:  # the checks passed; TFF would build the aggregator now
        builder_error = None
    _assert_same_rule(config_error, builder_error, allowed=MASKING_MODES[name].dp_compatible,
                      flag="dp", accepted="use --masking=none|server")

