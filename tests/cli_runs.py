"""The small `python -m experiments.run` the end-to-end reliability tests share.

`Cli` runs the CLI in a subprocess and watches every `worker_binary` under it
(every 20 ms); `run_cli`/`run_ok` run it to the end; the rest compares runs
bit for bit: metrics.csv as text without the time columns, checkpoint arrays
and the exported model's weights with `np.array_equal`. Used by
`tests/test_reliability.py` and `tests/test_interrupts_random.py`.
"""

from __future__ import annotations

import csv
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import cli_util
import h5py
import numpy as np
import psutil
import pytest

from fedprune.outputs.run_files import TIME_COLUMNS
from fedprune.program import checkpoint

REPO_ROOT = Path(__file__).resolve().parents[1]
# 8 rounds: the SIGKILL case kills when round 3 starts, and the 5 rounds left
# (~0.1-0.3 s each) are the margin by which the kill lands before the run ends.
ROUNDS = 8
FLAGS = (f"--rounds={ROUNDS}", "--num_clients=4", "--clients_per_round=4", "--end_round=3",
         *cli_util.CHEAP_FLAGS)
RUN_TIMEOUT_S = 600  # a hang guard: a whole small run takes ~15 s alone
WORKER_EXIT_TIMEOUT_S = 30  # workers.STOP_GRACE_S is 3 s; the kernel's pdeathsig is immediate


# ----------------------------------------------------------------------------
# Running the CLI and watching its workers.


class Cli:
    """One `python -m experiments.run` (or another `module`) child: its output, exit, and
    every `worker_binary` pid under it.

    Threads read stdout and stderr to EOF (so a pipe kept open by a leaked
    worker shows up as a missing EOF rather than a hang) and poll the child's
    descendants every 20 ms, recording every `worker_binary` they ever see.
    """

    def __init__(self, *args: str, phase_log: Path | None = None,
                 module: str = "experiments.run"):
        self.args = args
        self.returncode: int | None = None  # set by `run_cli`
        self.survivors: list[int] | None = None  # set by `wait`
        self.phase_log = phase_log
        env = dict(os.environ)
        if phase_log is not None:
            phase_log.touch()
            env["FEDPRUNE_PHASE_LOG"] = str(phase_log)
        # Its own process group, as a shell gives a foreground job: `send` can
        # signal the group, as a terminal's Ctrl-C does.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            process_group=0)
        self.stdout_lines: list[str] = []
        self.stderr_lines: list[str] = []
        self.workers: dict[int, psutil.Process] = {}
        self._new_lines: queue.Queue[str | None] = queue.Queue()
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout_lines, True),
                             daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr_lines, False),
                             daemon=True),
        ]
        self._watcher = threading.Thread(target=self._watch_workers, daemon=True)
        for thread in (*self._readers, self._watcher):
            thread.start()

    def _read(self, stream, lines: list[str], announce: bool) -> None:
        for line in stream:
            lines.append(line.rstrip("\n"))
            if announce:
                self._new_lines.put(line)
        if announce:
            self._new_lines.put(None)

    def _watch_workers(self) -> None:
        try:
            parent = psutil.Process(self.proc.pid)
        except psutil.NoSuchProcess:
            return
        while self.proc.poll() is None:
            try:
                for child in parent.children(recursive=True):
                    try:
                        if child.pid not in self.workers and child.name() == "worker_binary":
                            self.workers[child.pid] = child
                    except psutil.NoSuchProcess:
                        pass
            except psutil.NoSuchProcess:
                return
            time.sleep(0.02)

    def wait_for_line(self, pattern: str, timeout_s: float = RUN_TIMEOUT_S) -> str:
        """Returns the first new stdout line matching `pattern`; fails on EOF or timeout."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self._new_lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"no line matching {pattern!r} within {timeout_s} s; "
                            f"stdout {self.stdout_lines}, stderr {self.stderr_lines[-5:]}")
            if line is None:
                pytest.fail(f"stdout closed before a line matching {pattern!r}; "
                            f"status {self.proc.poll()}, stderr {self.stderr_lines[-5:]}")
            if re.search(pattern, line):
                return line

    def wait(self, timeout_s: float = RUN_TIMEOUT_S) -> int:
        """Waits for exit, then for EOF on both pipes; returns the exit status."""
        try:
            returncode = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.args} did not exit within {timeout_s} s; "
                        f"stdout {self.stdout_lines[-3:]}")
        for reader in self._readers:
            reader.join(timeout=10)
            assert not reader.is_alive(), "a pipe of the CLI never reached EOF after it exited"
        self._watcher.join(timeout=10)
        # Decided here, before any cleanup (`stop`) could kill a leaked worker.
        deadline = time.monotonic() + WORKER_EXIT_TIMEOUT_S
        while _alive(self.workers.values()) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.survivors = [p.pid for p in _alive(self.workers.values())]
        return returncode

    def phases(self) -> list[tuple[int, str]]:
        """(CLOCK_MONOTONIC ns, phase) entered so far, from `FEDPRUNE_PHASE_LOG`."""
        return cli_util.phases(self.phase_log)

    def wait_for_phase(self, phase: str, timeout_s: float = RUN_TIMEOUT_S) -> None:
        """Returns as soon as the CLI has entered `phase`; fails if it exits first."""
        try:
            cli_util.wait_for_phase(self.phase_log, phase, self.proc, timeout_s)
        except AssertionError as e:
            pytest.fail(f"{e}; stderr {self.stderr_lines[-5:]}")

    def send(self, signum: int, *, group: bool = False) -> int:
        """Sends `signum` to the CLI (or its whole group); returns the monotonic ns it was sent."""
        sent = time.monotonic_ns()
        if group:
            os.killpg(self.proc.pid, signum)
        else:
            self.proc.send_signal(signum)
        return sent

    def assert_workers_gone(self) -> None:
        """Some worker was seen while the CLI ran, and none outlived it (checked in `wait`)."""
        assert self.workers, "no worker_binary was ever seen under the CLI (watcher broken?)"
        assert self.survivors is not None, "call wait() first"
        assert not self.survivors, f"worker_binary survived the CLI: {self.survivors}"

    def stop(self) -> None:
        """Kills the CLI and any worker seen under it (test cleanup; no-op once gone)."""
        if self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        for worker in _alive(self.workers.values()):
            try:
                worker.kill()
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + 5
        while _alive(self.workers.values()) and time.monotonic() < deadline:
            time.sleep(0.05)


def _alive(processes) -> list[psutil.Process]:
    """Those still running (same pid *and* start time), zombies counting as dead.

    A worker orphaned by a SIGKILLed CLI is re-parented; if the new parent does
    not reap it, a dead worker lingers as a zombie holding no resources.
    """
    alive = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def run_cli(*args: str, timeout_s: float = RUN_TIMEOUT_S) -> Cli:
    """Runs the CLI to completion; returns the finished `Cli` (`.returncode` set)."""
    cli = Cli(*args)
    try:
        cli.returncode = cli.wait(timeout_s)
    finally:
        cli.stop()
    return cli


def run_ok(*args: str) -> Cli:
    cli = run_cli(*args)
    assert cli.returncode == 0, f"{args}: status {cli.returncode}, stderr {cli.stderr_lines}"
    return cli


# ----------------------------------------------------------------------------
# Comparing runs.


def metrics_without_time(output_dir: Path) -> list[dict]:
    """metrics.csv rows as strings, without the wall-clock columns."""
    with open(output_dir / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return [{k: v for k, v in row.items() if k not in TIME_COLUMNS} for row in rows]


def checkpoint_arrays(output_dir: Path) -> tuple[int, list[np.ndarray]]:
    """(round, leaves) of the newest checkpoint, read with numpy only."""
    path = checkpoint.list_checkpoints(output_dir / "checkpoints")[-1]
    with np.load(path, allow_pickle=False) as data:
        header = json.loads(str(data["header"]))
        leaves = [data[f"leaf_{i:05d}"] for i in range(len(header["leaves"]))]
    return header["round"], leaves


def h5_weights(path: Path) -> dict[str, np.ndarray]:
    """Every dataset in an HDF5 file by name (the Keras model's weights)."""
    weights = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, obj: weights.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return weights


def assert_same_results(run_dir: Path, reference_dir: Path) -> None:
    """Same metrics (time columns aside), final state and exported model weights."""
    assert metrics_without_time(run_dir) == metrics_without_time(reference_dir)
    round_a, leaves_a = checkpoint_arrays(run_dir)
    round_b, leaves_b = checkpoint_arrays(reference_dir)
    assert round_a == round_b == ROUNDS
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b, strict=True):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    model_a = h5_weights(run_dir / "model" / "model.h5")
    model_b = h5_weights(reference_dir / "model" / "model.h5")
    assert model_a.keys() == model_b.keys() and model_a
    for name in model_a:
        assert np.array_equal(model_a[name], model_b[name]), name


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` (relative path -> content)."""
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}

