"""Flags whose values are registry names, and --extensions, which adds names.

`--schedule`, `--mask_criterion`, `--dataset` (experiments/common.py) and
`--table` (experiments/reproduce.py) take their choices and their help from
a `fedprune.registry.Registry`, read when --help shows them, so entries that
users register are listed like fedprune's own. While flags are parsed any
value is accepted; the registry checks it when the configuration is
validated (`ExperimentConfig.validate`, or the driver for --table), after
every `--extensions` module has been imported, wherever that flag stands on
the command line or in a flagfile.

`--extensions=mod1,mod2` (and `$FEDPRUNE_EXTENSIONS`) imports users' modules
as soon as it is parsed (`fedprune/extensions.py`); flags.txt records it
first, so `--flagfile=<run>/flags.txt` imports them again before the run's
own names are read. Nothing here imports TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable

from absl import flags

from fedprune import extensions
from fedprune.registry import Registry

EXTENSIONS_HELP = (
    "Python modules (importable names, or .py files) to import before flags are checked; "
    "the schedules, mask criteria, datasets and tables they register become valid values "
    "of --schedule, --mask_criterion, --dataset and --table (docs/extending.md). "
    f"${extensions.ENV_VAR} names more, comma-separated.")


class RegistryParser(flags.EnumParser):
    """An enum whose choices are a registry's names at the moment they are read.

    Parsing only converts the text (`convert`); the registry rejects unknown
    names later, with `InvalidArgument` naming the flag and the accepted names.
    """

    def __init__(self, registry: Registry, convert: Callable[[str], object] = str):
        flags.ArgumentParser.__init__(self)
        self.registry = registry
        self.convert = convert
        self.case_sensitive = True

    @property
    def enum_values(self) -> list[str]:
        return [str(name) for name in self.registry]

    @enum_values.setter
    def enum_values(self, values) -> None:
        del values  # always the registry's

    def parse(self, argument):
        if not isinstance(argument, str):
            return argument
        return self.convert(argument)


class RegistryFlag(flags.Flag):
    """A flag over a registry: `--help` shows `intro` and every entry's help, as registered."""

    def __init__(self, registry: Registry, name: str, default, intro: str,
                 convert: Callable[[str], object] = str):
        self._intro = intro
        self._registry = registry
        super().__init__(RegistryParser(registry, convert), flags.ArgumentSerializer(), name,
                         default, intro)

    @property
    def help(self) -> str:
        return f"{self._intro} {self._registry.describe()}"

    @help.setter
    def help(self, value) -> None:
        del value  # composed from the registry when read


def define_registry_flag(registry: Registry, name: str, default, intro: str, *,
                         convert: Callable[[str], object] = str,
                         flag_values: flags.FlagValues = flags.FLAGS) -> flags.FlagHolder:
    """Defines `--name` over `registry` (choices and help from it); returns its holder."""
    return flags.DEFINE_flag(RegistryFlag(registry, name, default, intro, convert),
                             flag_values=flag_values)


class ExtensionsParser(flags.ListParser):
    """A comma-separated list of modules, each imported when the flag is parsed."""

    def parse(self, argument):
        names = super().parse(argument)
        if isinstance(argument, str):
            extensions.load_extensions(names)  # InvalidArgument names --extensions
        return names


def define_extensions_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines --extensions (idempotent)."""
    if "extensions" in flag_values:
        return
    flags.DEFINE(ExtensionsParser(), "extensions", [], EXTENSIONS_HELP,
                 flag_values=flag_values, serializer=flags.CsvListSerializer(","))


def load_environment_extensions() -> None:
    """Imports the modules `$FEDPRUNE_EXTENSIONS` names (raises `InvalidArgument`)."""
    extensions.load_from_environment()
