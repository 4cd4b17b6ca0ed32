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
    monkeypatch.setattr(memory, "release_free_heap", lambda **kw: calls.append(kw) or True)
    data = datasets.load_digits(num_clients=10, partition="iid", seed=0)
    assembly.round_inputs(ExperimentConfig(num_clients=10, clients_per_round=2), data, 1)
    assert calls == [{"min_interval_s": memory.ROUND_TRIM_INTERVAL_S}]


@pytest.mark.parametrize("times, interval, trimmed", [
    ((0.0, 0.5, 1.0, 1.2, 2.5), 1.0, [True, False, True, False, True]),
    ((0.0, 0.0, 0.1), 0.0, [True, True, True]),  # no interval: every call trims
])
def test_min_interval_skips_a_trim_soon_after_the_last(fresh_trim, monkeypatch, times, interval,
                                                        trimmed):
    calls = []
    monkeypatch.setattr(memory, "_malloc_trim", lambda: calls.append)
    clock = iter(times)
    monkeypatch.setattr(memory, "_trims", memory.Pacer(clock=lambda: next(clock)))
    got = [memory.release_free_heap(min_interval_s=interval) for _ in times]
    assert got == trimmed
    assert calls == [0] * sum(trimmed)  # malloc_trim(0), only when not skipped
