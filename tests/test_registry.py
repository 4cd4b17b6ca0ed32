"""Registries: the generic `Registry`, and every registered schedule, criterion, dataset, table.

The parameterized cases run over whatever is registered when this file is
collected, so a new entry is checked by them without being named here: its
spec (help, params), its flag's error for an unknown name, and that it is
built (validated) from config values without TensorFlow.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import pytest

from experiments import tables
from fedprune.config import ExperimentConfig
from fedprune.data import datasets
from fedprune.errors import InvalidArgument
from fedprune.pruning import masking, schedules
from fedprune.registry import Registry

CONFIG_FIELDS = {f.name for f in dataclasses.fields(ExperimentConfig)}
MASK_SPEC_FIELDS = {f.name for f in dataclasses.fields(masking.MaskSpec)}
REGISTRIES = {"schedule": schedules.SCHEDULES, "mask_criterion": masking.CRITERIA,
              "dataset": datasets.DATASETS, "table": tables.TABLES}
ENTRIES = [(flag, entry) for flag, registry in REGISTRIES.items() for entry in registry.entries()]
ENTRY_IDS = [f"{flag}={entry.name}" for flag, entry in ENTRIES]


# --------------------------------------------------------------------------
# The Registry class.


def _toy_registry() -> Registry:
    registry = Registry("thing", "thing")

    @registry.register("a", help="the first")
    @dataclasses.dataclass(frozen=True)
    class A:
        x: int
        y: int = 2

    def b(*, x, z=3):
        return ("b", x, z)

    registry.add("b", b, help="the second")
    return registry


def test_names_iterate_in_registration_order_with_their_spec():
    registry = _toy_registry()
    assert registry.names() == ("a", "b") and list(registry) == ["a", "b"] and len(registry) == 2
    assert "a" in registry and "c" not in registry
    assert registry.entry("a").params == ("x", "y")  # a dataclass's fields
    assert registry.entry("b").params == ("x", "z")  # a function's keywords
    assert registry.describe() == "a: the first; b: the second."


def test_build_passes_the_params_present_and_ignores_other_values():
    registry = _toy_registry()
    assert registry.build("a", {"x": 1, "unrelated": 0}) == registry["a"](x=1, y=2)
    assert registry.build("b", {"x": 1, "z": 5, "y": 9}) == ("b", 1, 5)


def test_unknown_name_is_one_line_naming_the_flag_and_every_name():
    with pytest.raises(InvalidArgument, match=r"^--thing='c': expected one of a\|b$"):
        _toy_registry()["c"]


@pytest.mark.parametrize("name, help_", [("", "h"), ("a,b", "h"), ("a|b", "h"), ("a b", "h"),
                                         ("ok", ""), ("ok", "two\nlines"), (1.5, "h")])
def test_malformed_names_and_help_are_refused(name, help_):
    with pytest.raises(ValueError):
        Registry("thing", "thing").add(name, lambda: None, help=help_)


def test_a_name_taken_by_another_target_is_refused_the_same_target_is_a_no_op():
    registry = _toy_registry()
    target = registry["b"]
    registry.add("b", target, help="again")  # e.g. a module imported twice
    with pytest.raises(ValueError, match="registered already"):
        registry.add("b", lambda: None, help="another")


# --------------------------------------------------------------------------
# Every registered entry.


@pytest.mark.parametrize("flag, entry", ENTRIES, ids=ENTRY_IDS)
def test_every_entry_has_a_spec(flag, entry):
    assert entry.help and entry.help == entry.help.strip() and "\n" not in entry.help
    assert not entry.help.endswith(".")  # `describe` joins them into one sentence
    readable = {"mask_criterion": MASK_SPEC_FIELDS, "table": set()}.get(flag, CONFIG_FIELDS)
    assert set(entry.params) <= readable, f"{entry.name} reads fields that are not flags"
    if flag == "schedule":
        assert issubclass(entry.target, schedules.RoundSchedule)
        assert entry.target.name == entry.name
    elif flag == "mask_criterion":
        assert issubclass(entry.target, masking.MaskCriterion)
    elif flag == "dataset":
        assert issubclass(entry.target, datasets.DatasetLoader)
    else:
        assert isinstance(entry.target, tables.TableSpec) and entry.target.number == entry.name


@pytest.mark.parametrize("flag", REGISTRIES)
def test_unknown_name_of_every_registry_is_one_invalid_argument_line(flag):
    registry = REGISTRIES[flag]
    unknown = 999 if flag == "table" else "no_such_name"
    with pytest.raises(InvalidArgument) as info:
        registry[unknown]
    message = str(info.value)
    assert message.startswith(f"--{flag}={unknown!r}: expected one of ") and "\n" not in message
    assert message.endswith("|".join(map(str, registry)))
    assert info.value.name == flag


@pytest.mark.parametrize("name", schedules.SCHEDULES.names())
def test_every_schedule_is_built_from_the_default_config_and_round_trips(name):
    config = dataclasses.replace(ExperimentConfig(), schedule=name)
    schedule = config.make_schedule()
    assert isinstance(schedule, schedules.SCHEDULES[name])
    assert schedules.RoundSchedule.from_config(schedule.get_config()) == schedule
    assert 0 <= schedule.final_sparsity_value < 1
    assert schedule.last_mask_update_round(config.rounds) >= 0


@pytest.mark.parametrize("name", masking.CRITERIA.names())
def test_every_criterion_is_built_from_a_mask_spec(name):
    config = ExperimentConfig(mask_criterion=name, threshold=0.1, relative_rate=0.5)
    spec = config.mask_spec()
    criterion = spec.criterion
    assert isinstance(criterion, masking.CRITERIA[name])
    # The values it does not read are not set.
    for optional in ("threshold", "relative_rate"):
        assert (getattr(spec, optional) is not None) == (
            optional in masking.CRITERIA.entry(name).params)


@pytest.mark.parametrize("name", datasets.DATASETS.names())
def test_every_dataset_is_checked_from_config_values(name, tmp_path):
    loader = datasets.DATASETS[name]
    model = "rnn" if loader.sequence else "mlp"
    config = ExperimentConfig(dataset=name, model=model, data_dir=str(tmp_path))
    try:
        built = config.dataset_loader()
    except FileNotFoundError as e:  # TFF's files are not in an empty folder
        assert str(tmp_path) in str(e) and "\n" not in str(e)
    else:
        assert isinstance(built, loader)
        config.validate()


def test_registries_import_and_build_without_tensorflow():
    code = textwrap.dedent("""
        import sys
        from experiments import tables
        from fedprune.config import ExperimentConfig
        from fedprune.data import datasets
        from fedprune.pruning import masking, schedules
        for name in schedules.SCHEDULES:
            ExperimentConfig(schedule=name).make_schedule()
        for name in masking.CRITERIA:
            ExperimentConfig(mask_criterion=name, threshold=0.1, relative_rate=0.5).mask_spec()
        ExperimentConfig(dataset="synthetic").validate()
        assert len(tables.TABLES) >= 3
        heavy = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "keras",
                 "tensorflow_federated", "tensorflow_model_optimization")]
        assert not heavy, heavy[:5]
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
