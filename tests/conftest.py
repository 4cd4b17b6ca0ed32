"""Shared pytest configuration for fedprune."""

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


def pytest_sessionfinish(session, exitstatus):
    """Stops any TFF `worker_binary` descendant of the pytest process.

    TFF's stock context, or a test that fails before stopping its workers, would
    otherwise leave a worker holding pytest's stdout open after the run, which
    hangs `pytest | tail` and CI steps. Runs on Ctrl-C too. Imports no TF.
    """
    del session, exitstatus
    from fedprune import runtime

    runtime.stop_workers()
