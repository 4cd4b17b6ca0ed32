"""Shared pytest configuration for fedprune."""


def pytest_sessionfinish(session, exitstatus):
    """Stops any TFF `worker_binary` descendant of the pytest process.

    TFF's stock context, or a test that fails before stopping its workers, would
    otherwise leave a worker holding pytest's stdout open after the run, which
    hangs `pytest | tail` and CI steps. Runs on Ctrl-C too. Imports no TF.
    """
    del session, exitstatus
    from fedprune import runtime

    runtime.stop_workers()
