"""`fedprune.runtime.deferred_imports`: a stand-in module runs the real one at first use.

On a probe module written for each test (its code counts its runs), then the
package's own deferral: tests/test_run_driver.py's smoke run checks, from
`python -X importtime`, that a real run imports TFF without tensorflow_probability.
"""

from __future__ import annotations

import importlib
import sys

import pytest

from fedprune.runtime import deferred_imports

PROBE = "fedprune_deferred_probe"


@pytest.fixture()
def probe(tmp_path, monkeypatch):
    """A module on sys.path whose code appends to `runs` each time it executes."""
    runs: list[int] = []
    package = tmp_path / PROBE
    package.mkdir()
    (package / "__init__.py").write_text(
        "import builtins\n"
        "builtins._fedprune_probe_runs.append(1)\n"
        "VALUE = 42\n")
    (package / "sub.py").write_text("OTHER = 7\n")
    monkeypatch.setattr("builtins._fedprune_probe_runs", runs, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield runs
    for name in (PROBE, f"{PROBE}.sub"):
        sys.modules.pop(name, None)


def _import_statement():
    import fedprune_deferred_probe as bound
    return bound


def _from_import():
    from fedprune_deferred_probe import VALUE
    return VALUE


@pytest.mark.parametrize("first_use, value", [
    (lambda: _import_statement().VALUE, 42),
    (lambda: importlib.import_module(PROBE).VALUE, 42),
    (_from_import, 42),
    (lambda: importlib.import_module(f"{PROBE}.sub").OTHER, 7),
], ids=["attribute", "import_module", "from-import", "submodule"])
def test_the_module_runs_once_at_its_first_attribute_read(probe, first_use, value):
    assert deferred_imports.defer([PROBE]) == [PROBE]
    stand_in = sys.modules[PROBE]
    assert isinstance(stand_in, deferred_imports.DeferredModule)
    assert _import_statement() is stand_in and probe == []  # imported, not run
    # What scanners of sys.modules read (AutoGraph: every module's __file__) runs nothing.
    assert stand_in.__file__.endswith("__init__.py") and stand_in.__name__ == PROBE
    assert probe == []
    assert first_use() == value
    assert probe == [1]
    real = sys.modules[PROBE]
    assert not isinstance(real, deferred_imports.DeferredModule)
    # Code that bound the stand-in keeps reading the real module's attributes.
    assert stand_in.VALUE == real.VALUE == 42 and stand_in.__file__ == real.__file__
    real.LATER = "set after the load"
    assert stand_in.LATER == "set after the load"
    assert _import_statement() is real and probe == [1]


def test_imported_and_missing_modules_are_left_alone(probe):
    importlib.import_module(PROBE)
    assert deferred_imports.defer([PROBE, "fedprune_no_such_module", "json"]) == []
    assert not isinstance(sys.modules[PROBE], deferred_imports.DeferredModule)
    assert "fedprune_no_such_module" not in sys.modules
    assert probe == [1]
