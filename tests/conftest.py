"""Shared pytest configuration for fedprune."""

import collections

import numpy as np
import pytest


@pytest.fixture(scope="module")
def tff_local_context():
    """fedprune's own loopback TFF worker for a module's in-process TFF computations.

    Its output never reaches pytest's stdout, and it is stopped after the module.
    """
    from fedprune import runtime

    runtime.set_local_context()
    yield
    runtime.stop_workers()


@pytest.fixture(scope="module")
def digits_clients():
    """Makes federated digits for process-level tests: `make(num_clients, num_examples)`.

    Returns a list of `num_clients` datasets of batches of 16 `OrderedDict(x, y)`
    (x: float32 [batch, 64] in [0, 1]; y: int32 [batch, 1]), splitting a fixed
    random permutation's first `num_examples` digits evenly. Imports TF lazily.
    """
    import tensorflow as tf
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)[:, None]

    def make(num_clients: int, num_examples: int) -> list:
        order = np.random.default_rng(0).permutation(len(y))[:num_examples]
        return [tf.data.Dataset.from_tensor_slices(
                    collections.OrderedDict(x=x[part], y=y[part])).batch(16)
                for part in np.array_split(order, num_clients)]

    return make


def pytest_sessionfinish(session, exitstatus):
    """Stops any TFF `worker_binary` descendant of the pytest process.

    TFF's stock context, or a test that fails before stopping its workers, would
    otherwise leave a worker holding pytest's stdout open after the run, which
    hangs `pytest | tail` and CI steps. Runs on Ctrl-C too. Imports no TF.
    """
    del session, exitstatus
    from fedprune import runtime

    runtime.stop_workers()
