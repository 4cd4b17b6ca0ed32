"""Users' own modules that register schedules, criteria, datasets or tables.

An extension is any Python module that, when imported, registers entries in
fedprune's registries (`fedprune/registry.py`): `schedules.SCHEDULES`,
`masking.CRITERIA`, `datasets.DATASETS`, or the drivers' `tables.TABLES`. The
drivers import the modules named by `--extensions` (or the
`FEDPRUNE_EXTENSIONS` environment variable) while they parse flags, before any
flag value is checked, so the names they register are valid values of
`--schedule`, `--mask_criterion`, `--dataset` and `--table`. A run's flags.txt
and config.json record the extensions it loaded. See docs/extending.md.

An extension is named by its module name (importable from `sys.path`, e.g.
`mypkg.schedules`) or by the path of a `.py` file (recorded as an absolute
path). Importing it should not import TensorFlow, so that `--help` and flag
checks stay fast.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections.abc import Iterable

from fedprune.errors import InvalidArgument

ENV_VAR = "FEDPRUNE_EXTENSIONS"

_LOADED: list[str] = []  # in import order, each once


def parse_names(text: str) -> list[str]:
    """`a,b, c` -> ["a", "b", "c"] (empty items dropped)."""
    return [name.strip() for name in text.split(",") if name.strip()]


def _is_path(name: str) -> bool:
    return name.endswith(".py") or os.sep in name


def _import(name: str):
    if _is_path(name):
        path = name
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file {path}")
        module_name = "fedprune_extension_" + os.path.splitext(os.path.basename(path))[0]
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[module_name]
            raise
        return module
    return importlib.import_module(name)


def load_extensions(names: Iterable[str], *, source: str = "") -> list[str]:
    """Imports each module (once per process), so that its registrations take effect.

    Args:
      names: module names or `.py` paths.
      source: where they were named, if not by `--extensions` (e.g. the
        environment variable), for the error message.

    Returns:
      Every extension loaded in this process so far, in order.

    Raises:
      InvalidArgument: one line naming `--extensions`, the module, and why it
        could not be imported (missing, an exception while importing, or a name it
        registers that is taken).
    """
    for name in names:
        if _is_path(name):  # recorded absolute, so a run's flags.txt works from anywhere
            name = os.path.abspath(name)
        if name in _LOADED:
            continue
        try:
            _import(name)
        except Exception as e:  # any failure to import is bad user input
            reason = str(e).splitlines()[0] if str(e) else ""
            where = f", named in {source}" if source else ""
            raise InvalidArgument("extensions", name, f"an importable Python module or .py "
                                  f"file ({type(e).__name__}: {reason}{where})") from e
        _LOADED.append(name)
    return loaded()


def load_from_environment() -> list[str]:
    """Loads the extensions named in `$FEDPRUNE_EXTENSIONS` (comma-separated)."""
    return load_extensions(parse_names(os.environ.get(ENV_VAR, "")), source=f"${ENV_VAR}")


def loaded() -> list[str]:
    """The extensions imported in this process, in order."""
    return list(_LOADED)
