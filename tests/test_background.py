"""The background thread of the round loop (fedprune/program/background.py, loop.py)."""

from __future__ import annotations

import threading
import time

import pytest
from cli_util import CHEAP_OUTPUTS

from fedprune.program.background import Background


def test_jobs_run_in_order_on_one_other_thread():
    ran = []
    with Background() as later:
        for i in range(5):
            # The first jobs are the slowest: order is submission order, not finish time.
            later.submit(lambda i=i: (time.sleep(0.02 * (5 - i)),
                                      ran.append((i, threading.get_ident()))))
    assert [i for i, _ in ran] == [0, 1, 2, 3, 4]
    threads = {t for _, t in ran}
    assert len(threads) == 1 and threading.get_ident() not in threads


def _fail():
    raise OSError("disk full")


@pytest.mark.parametrize("surfaces_at", ["submit", "check", "drain", "exit"])
def test_a_failed_job_raises_in_the_caller(surfaces_at):
    later = Background()
    failed = later.submit(_fail)
    with pytest.raises(OSError, match="disk full"):
        if surfaces_at == "exit":
            with later:
                pass
        else:
            failed.exception()  # finished (and failed) before the caller looks
            if surfaces_at == "submit":
                later.submit(lambda: None)
            elif surfaces_at == "check":
                later.check()
            else:
                later.drain()
    later.drain()  # reported once: nothing is left to raise
    later.__exit__(None, None, None)


@pytest.mark.parametrize("error", [KeyboardInterrupt, ValueError])
def test_leaving_by_an_exception_waits_for_the_jobs_and_keeps_it(error):
    """Ctrl-C or an error in the loop: queued writes still finish; the caller's exception wins."""
    written = []
    with pytest.raises(error):
        with Background() as later:
            later.submit(lambda: (time.sleep(0.2), written.append(1)))
            later.submit(_fail)  # not raised over the caller's exception
            later.submit(lambda: written.append(2))
            raise error
    assert written == [1, 2]


@pytest.mark.slow
def test_round_loop_builds_inputs_and_writes_off_the_main_thread(tmp_path, monkeypatch):
    """Each round's datasets are built, and its outputs written, by the background thread.

    Every round once and in order; metrics.csv and the checkpoints are
    complete when `run_experiment` returns.
    """
    from fedprune.config import ExperimentConfig
    from fedprune.outputs import run_files
    from fedprune.program import assembly, checkpoint, loop

    main = threading.get_ident()
    events = []
    round_inputs, write_round = assembly.round_inputs, loop._write_round

    def recording_inputs(config, data, round_num):
        events.append(("inputs", round_num, threading.get_ident() != main))
        return round_inputs(config, data, round_num)

    def recording_write(metrics, rows, *args, **kwargs):
        events.append(("write", rows[-1]["round"], threading.get_ident() != main))
        return write_round(metrics, rows, *args, **kwargs)

    monkeypatch.setattr(assembly, "round_inputs", recording_inputs)
    monkeypatch.setattr(loop, "_write_round", recording_write)
    config = ExperimentConfig(rounds=4, num_clients=4, clients_per_round=4, end_round=2,
                              **CHEAP_OUTPUTS).validate()
    loop.run_experiment(config, tmp_path, log=lambda line: None)
    assert all(off_main for _, _, off_main in events)
    # Round r + 1's datasets are queued as round r starts, round r's writes as it
    # ends: so the thread builds them before it writes round r, after round r - 1.
    assert [e[:2] for e in events] == [
        ("inputs", 1), ("inputs", 2), ("write", 1), ("inputs", 3), ("write", 2),
        ("inputs", 4), ("write", 3), ("write", 4)]
    assert [int(r["round"]) for r in run_files.read_metrics(tmp_path)] == [1, 2, 3, 4]
    assert checkpoint.check_latest(tmp_path / "checkpoints", fingerprint=config.fingerprint()) == 4
