"""Scale-out on TFF's remote executor service: two loopback workers vs the local worker."""

import csv
import os
import subprocess
import sys
from pathlib import Path

import cli_util
import numpy as np
import pytest

from fedprune.runtime import workers

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ["--rounds=4", "--end_round=3", "--num_clients=6", "--clients_per_round=6",
         "--masking=both", "--final_sparsity=0.75", *cli_util.CHEAP_FLAGS]
TIME_COLUMNS = {"round_seconds", "elapsed_seconds"}


HANG_GUARD_S = 600  # timeouts only stop a hung test; a run takes ~15 s


def _cli(*args, python_flags=(), **kwargs):
    return subprocess.Popen([sys.executable, *python_flags, "-m", "experiments.run", *FLAGS,
                             *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kwargs)


def _run(*args, timeout=HANG_GUARD_S):
    process = _cli(*args)
    out, err = process.communicate(timeout=timeout)
    assert process.returncode == 0, err[-2000:]
    return out


def _metrics(run_dir):
    with open(Path(run_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def _assert_same_run(a, b, atol=1e-5):
    rows_a, rows_b = _metrics(a), _metrics(b)
    assert len(rows_a) == len(rows_b) == 4
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra.keys() == rb.keys()
        for key in ra:
            if ra[key] != rb[key]:
                assert float(ra[key]) == pytest.approx(float(rb[key]), abs=atol), key
    final_a = np.load(Path(a) / "checkpoints" / "round_000004.npz")
    final_b = np.load(Path(b) / "checkpoints" / "round_000004.npz")
    leaves = [k for k in final_a.files if k.startswith("leaf_")]
    for key in leaves:
        np.testing.assert_allclose(final_a[key], final_b[key], atol=atol)


@pytest.fixture
def two_workers():
    ports = [workers.pick_unused_port(), workers.pick_unused_port()]
    started = [workers.start_worker_process(port) for port in ports]
    yield started, ",".join(f"127.0.0.1:{port}" for port in ports)
    for worker in started:
        worker.kill()
        worker.wait()


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "run"
    _run(f"--output_dir={out}")
    return out


@pytest.mark.slow
def test_two_workers_match_the_local_run(local_run, two_workers, tmp_path):
    _, addresses = two_workers
    _run(f"--output_dir={tmp_path / 'remote'}", f"--tff_workers={addresses}")
    _assert_same_run(local_run, tmp_path / "remote")


@pytest.mark.slow
def test_worker_killed_mid_run_then_resume(local_run, two_workers, tmp_path):
    """A worker killed as round 3 starts: one line naming the kept round, then --resume.

    The kill is aimed at the start of round 3 (`FEDPRUNE_PHASE_LOG`); rounds 3
    and 4 are the margin, so the failing round is 3, or 4 if round 3 finished
    before the kill landed.
    """
    workers, addresses = two_workers
    out, phase_log = tmp_path / "remote", tmp_path / "phases"
    phase_log.touch()
    process = _cli(f"--output_dir={out}", f"--tff_workers={addresses}",
                   env={**os.environ, "FEDPRUNE_PHASE_LOG": str(phase_log)})
    try:
        cli_util.wait_for_phase(phase_log, "round 3 train", process, HANG_GUARD_S)
        workers[1].kill()
        _, err = process.communicate(timeout=HANG_GUARD_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 1
    kept = len(_metrics(out))
    assert kept in (2, 3)
    assert err.count("\n") == 1 and "unreachable" in err and f"after round {kept}" in err
    # Resume locally (restarted workers work the same way) to the same result.
    _run(f"--output_dir={out}", "--resume")
    _assert_same_run(local_run, out)


def test_unreachable_worker_fails_before_training(tmp_path):
    """One line, status 2, nothing written, TensorFlow never imported (after a 10 s probe)."""
    port = workers.pick_unused_port()  # nothing listens there
    process = _cli(f"--output_dir={tmp_path / 'x'}", f"--tff_workers=127.0.0.1:{port}",
                   python_flags=("-X", "importtime"))
    _, err = process.communicate(timeout=HANG_GUARD_S)
    modules, lines = cli_util.split_importtime(err)
    err = "".join(f"{line}\n" for line in lines)
    assert process.returncode == 2
    assert err.startswith("error: --tff_workers=") and f"127.0.0.1:{port}" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "x").exists()
    assert not cli_util.tensorflow_modules(modules)
