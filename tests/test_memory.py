"""fedprune.runtime.memory: free heap pages back to the OS between rounds."""

import sys

import pytest

from fedprune.runtime import memory


@pytest.fixture
def fresh_trim():
    memory._malloc_trim.cache_clear()
    yield
    memory._malloc_trim.cache_clear()


def test_release_free_heap_trims_on_glibc(fresh_trim, monkeypatch):
    monkeypatch.delenv(memory.TRIM_ENV, raising=False)
    import os

    glibc = sys.platform.startswith("linux") and "glibc" in os.confstr("CS_GNU_LIBC_VERSION")
    assert memory.release_free_heap() is glibc


def test_release_free_heap_can_be_turned_off(fresh_trim, monkeypatch):
    monkeypatch.setenv(memory.TRIM_ENV, "0")
    assert memory.release_free_heap() is False


def test_round_inputs_release_the_free_heap(monkeypatch):
    from fedprune.config import ExperimentConfig
    from fedprune.data import datasets
    from fedprune.program import assembly

    calls = []
    monkeypatch.setattr(memory, "release_free_heap", lambda: calls.append(1) or True)
    data = datasets.load_digits(num_clients=10, partition="iid", seed=0)
    assembly.round_inputs(ExperimentConfig(num_clients=10, clients_per_round=2), data, 1)
    assert calls == [1]
