"""Shared pytest configuration for fedprune."""

import os
import signal

import pytest
import scheduling

# The interrupt tests send SIGINT to the CLIs and scripts this suite starts and
# expect Python's default handling (KeyboardInterrupt). A shell that runs the
# suite as a background job without job control (`make test &` in a script, a
# CI step under `nohup ... &`) starts it with SIGINT ignored, and an ignored
# signal stays ignored across exec in every child, where fedprune rightly keeps
# it ignored (`fedprune/runtime/interrupts.py`). A handler, unlike SIG_IGN, is
# reset to the default by exec: setting Python's own one here, in the pytest
# process and in each xdist worker before it starts children, gives every child
# the default disposition.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_addoption(parser):
    parser.addoption("--write-file-seconds", action="store_true",
                     help="after the run, store each test file's seconds in "
                          "tests/file_seconds.json (the order files are handed out in)")


def pytest_collection_modifyitems(config, items):
    """The longest test files first (`scheduling.py`); xdist keeps this order
    (`--no-loadscope-reorder`, pyproject.toml)."""
    del config
    order = scheduling.longest_first([item.nodeid for item in items],
                                     scheduling.read_file_seconds())
    items[:] = [items[i] for i in order]


_durations: list[tuple[str, float]] = []


def pytest_runtest_logreport(report):
    """Collects every phase's duration (in xdist's controller, from every worker)."""
    _durations.append((report.nodeid, report.duration))


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): one test process per CPU, at most 4.

    Each process imports TensorFlow and runs its own TFF worker (~1.5 GB
    together), so more processes than cores, or than 4, only add memory.
    """
    del config
    return max(1, min(len(os.sched_getaffinity(0)), 4))


@pytest.fixture(scope="module")
def tff_local_context():
    """fedprune's own loopback TFF worker for a module's in-process TFF computations.

    Its output never reaches pytest's stdout, and it is stopped after the module.
    """
    from fedprune.runtime import contexts, workers

    contexts.set_local_context()
    yield
    workers.stop_workers()


@pytest.fixture(scope="session")
def digits_clients():
    """A function (num_clients, num_examples) -> digits client datasets, batches of 16.

    The first `num_examples` of a fixed permutation of scikit-learn's digits
    (x scaled to [0, 1], y int32 [n, 1]), split into `num_clients` even parts,
    with the options of fedprune's client datasets (`client_dataset_options`).
    """
    import collections

    import numpy as np
    import tensorflow as tf
    from sklearn.datasets import load_digits

    from fedprune.data.datasets.container import client_dataset_options

    def make(num_clients: int, num_examples: int) -> list:
        x, y = load_digits(return_X_y=True)
        x = (x / 16.0).astype(np.float32)
        y = y.astype(np.int32)[:, None]
        order = np.random.default_rng(0).permutation(len(y))[:num_examples]
        return [tf.data.Dataset.from_tensor_slices(
                    collections.OrderedDict(x=x[part], y=y[part])).batch(16)
                .with_options(client_dataset_options())
                for part in np.array_split(order, num_clients)]

    return make


def pytest_sessionfinish(session, exitstatus):
    """Stops any TFF `worker_binary` descendant of the pytest process.

    TFF's stock context, or a test that fails before stopping its workers, would
    otherwise leave a worker holding pytest's stdout open after the run, which
    hangs `pytest | tail` and CI steps. Runs on Ctrl-C too. Imports no TF.
    With --write-file-seconds, then stores the files' seconds (`scheduling.py`).
    """
    del exitstatus
    from fedprune.runtime import workers

    workers.stop_workers()
    config = session.config
    if config.getoption("--write-file-seconds") and not hasattr(config, "workerinput"):
        tests = scheduling.FILE_SECONDS.parent
        existing = [f"tests/{p.name}" for p in tests.glob("test_*.py")]
        scheduling.write_file_seconds(scheduling.merged_file_seconds(
            scheduling.read_file_seconds(), _durations, existing))
