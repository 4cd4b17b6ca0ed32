"""Modules that `import tensorflow_federated` loads but fedprune never runs, loaded on first use.

TFF's `aggregators.differential_privacy` imports tensorflow_privacy, whose
discrete Gaussian query imports tensorflow_probability (about 1 s of CPU, a
sixth of the import) for two samplers that run only when that query is built;
fedprune's `--dp` builds Gaussian queries, which do not. `defer` puts a stand-in
module in `sys.modules` for each such name: `import tensorflow_probability`
then binds the stand-in without running the module, and the first attribute
read on it (`tensorflow_probability.distributions`, `from ... import`, a
submodule import, which reads `__path__`) imports the real module, which then
replaces the stand-in in `sys.modules`; the stand-in keeps answering for the
code that bound it. The package's `__init__` calls `defer`, so every process
that imports fedprune before TensorFlow (the drivers, the tests, the workers of
`fedprune/worker.py`) skips the load (BUILD_NOTES.md, "What TFF's import loads").

`importlib.util.LazyLoader` does not do this under Python 3.11: an import
statement reads the module's `__spec__`, which runs a lazy module at once. The
stand-in holds its `__spec__`, `__loader__` and `__file__` (AutoGraph reads every
loaded module's `__file__` when it converts a function) and runs nothing until
an attribute it lacks is read.

Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

# Imported by TFF's import, used only inside functions fedprune does not call.
DEFERRED = ("tensorflow_probability",)


class DeferredModule(types.ModuleType):
    """Stands in for a module until an attribute it does not hold is read."""

    def __getattr__(self, attr: str):  # only for attributes the stand-in lacks
        name = self.__spec__.name
        if sys.modules.get(name) is self:
            del sys.modules[name]
        module = importlib.import_module(name)
        self.__dict__.update(module.__dict__)
        return getattr(module, attr)


def defer(names=DEFERRED) -> list[str]:
    """Puts a `DeferredModule` in `sys.modules` for each of `names` not imported yet.

    Args:
      names: top-level module names.

    Returns:
      The names deferred now (installed, and not in `sys.modules` before).
    """
    deferred = []
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        module = DeferredModule(name)
        # What scanners of sys.modules read (AutoGraph's `inspect_utils` reads every
        # module's `__file__`); not `__path__`, which a submodule import needs loaded.
        module.__spec__, module.__loader__, module.__file__ = spec, spec.loader, spec.origin
        sys.modules[name] = module
        deferred.append(name)
    return deferred
