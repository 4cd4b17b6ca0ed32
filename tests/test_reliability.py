"""Resumable, deterministic, leak-free, interruptible runs of `python -m experiments.run`.

Every end-to-end case runs the real CLI in a subprocess with small settings
(`FLAGS`: 4 clients, 8 rounds, the polynomial schedule ending at round 3) and
sends real signals. Each CLI pays ~10 s for `import tensorflow_federated`, so
runs are shared and independent runs overlap on the 2 cores: one module-scoped
uninterrupted reference run is what the resume, determinism and concurrency
cases compare against (and the "normal exit" case of the exit paths). The
random SIGINT/SIGTERM cases are `tests/test_interrupts_random.py`; the CLI
runner they share is `tests/cli_runs.py`.

Waits are on events, never on sleeps: a line the CLI prints, or a phase it
enters (`FEDPRUNE_PHASE_LOG`, which `loop.run_experiment` appends to as it
enters each phase). Timeouts are only hang guards, far above any run's length
on a loaded 2-core machine, and every process a case starts (and every
`worker_binary` seen under it) is killed in a `finally`, so a failure cannot
hang the session or leak a worker.

"Identical" means bit-identical: metrics.csv compared as text with the time
columns (`round_seconds`, `elapsed_seconds`) left out, checkpoint arrays and
the exported model's weights compared with `np.array_equal`.
"""


from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cli_util
import pytest
from cli_runs import (
    FLAGS,
    REPO_ROOT,
    ROUNDS,
    RUN_TIMEOUT_S,
    Cli,
    assert_same_results,
    checkpoint_arrays,
    metrics_without_time,
    run_cli,
    run_ok,
    snapshot,
)

from experiments import flagfile
from fedprune.program import checkpoint

# ----------------------------------------------------------------------------
# The shared uninterrupted run.


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Cli]:
    """An uninterrupted run of FLAGS (also the normal-exit case of the exit paths)."""
    output_dir = tmp_path_factory.mktemp("reference") / "run"
    cli = run_ok(*FLAGS, f"--output_dir={output_dir}")
    return output_dir, cli


# ----------------------------------------------------------------------------
# 1. SIGKILL, then --resume.


@pytest.mark.slow
def test_sigkilled_run_resumes_to_identical_results(reference, tmp_path):
    """SIGKILL as round 3 starts, then `--resume`: the same metrics, state and model.

    Also the SIGKILL exit path: the runtime starts `worker_binary` through
    `setpriv --pdeathsig TERM`, so the kernel stops it when the CLI dies without
    running any handler; no worker seen under the killed CLI survives it.
    """
    reference_dir, _ = reference
    output_dir = tmp_path / "run"
    killed = Cli(*FLAGS, f"--output_dir={output_dir}", phase_log=tmp_path / "phases")
    try:
        # Round 2 is checkpointed once round 4 starts: a round's writes run beside the
        # next round's training (`fedprune/program/background.py`).
        killed.wait_for_phase("round 4 train")
        killed.send(signal.SIGKILL)
        assert killed.wait() == -signal.SIGKILL
        killed.assert_workers_gone()
    finally:
        killed.stop()
    assert not (output_dir / "summary.json").exists(), "the run finished before the kill"
    done, _ = checkpoint_arrays(output_dir)
    assert 2 <= done < ROUNDS
    assert [int(r["round"]) for r in metrics_without_time(output_dir)][:done] == list(
        range(1, done + 1))

    resumed = run_ok(*FLAGS, f"--output_dir={output_dir}", "--resume")
    assert any(line.startswith(f"resuming after round {done} ") for line in resumed.stdout_lines)
    rounds_printed = [line for line in resumed.stdout_lines if line.startswith("round ")]
    assert len(rounds_printed) == ROUNDS - done
    assert_same_results(output_dir, reference_dir)


# ----------------------------------------------------------------------------
# 2. Determinism, also beside a concurrent run.


@pytest.mark.slow
def test_same_seed_gives_identical_results_beside_another_run(reference, tmp_path):
    """A second seed-0 run, while a seed-1 run competes for the cores, is bit-identical.

    Identical to the reference, time columns aside: so runs are deterministic,
    and two concurrent runs (own folders, own workers) do not interfere. The
    seed-1 run differs (the seed matters). The second run is started from the
    reference's `flags.txt` alone: a run's flagfile
    reproduces it (the same flagfile, fingerprint and provenance).

    Nothing had to be switched on for this: every random choice is a pure
    function of (--seed, round[, client]) -- the partition, the initial weights
    (`tf.keras.utils.set_random_seed` before the model is built), client
    sampling (`sampling.sample_clients`) and tf.data shuffle seeds
    (`datasets.client_shuffle_seed`, op-level seeds with
    `reshuffle_each_iteration=False`) -- and, measured here on CPU, TF's kernels
    and the TFF C++ worker's aggregation give the same bits run after run (also
    with 6 of 10 clients, a CNN, client masking and server Adam). If this ever
    fails on other hardware, the suspects are multi-threaded float reductions
    (try `tf.config.experimental.enable_op_determinism()`) and the order in
    which the worker sums client updates.
    """
    reference_dir, _ = reference
    dir_a, dir_b = tmp_path / "a", tmp_path / "b"
    runs = [Cli(f"--flagfile={reference_dir / flagfile.FLAGFILE_NAME}", f"--output_dir={dir_a}"),
            Cli(*FLAGS, "--seed=1", f"--output_dir={dir_b}")]
    try:
        for cli in runs:
            assert cli.wait() == 0, cli.stderr_lines
            cli.assert_workers_gone()
    finally:
        for cli in runs:
            cli.stop()
    assert not set(runs[0].workers) & set(runs[1].workers)
    assert_same_results(dir_a, reference_dir)
    assert metrics_without_time(dir_a) != metrics_without_time(dir_b)  # the seed matters
    assert ((dir_a / flagfile.FLAGFILE_NAME).read_text()
            == (reference_dir / flagfile.FLAGFILE_NAME).read_text())
    first, second = (json.loads((d / "config.json").read_text()) for d in (reference_dir, dir_a))
    assert second["fingerprint"] == first["fingerprint"]
    assert second["provenance"] == first["provenance"]


# ----------------------------------------------------------------------------
# 3. Exit paths: no worker outlives the CLI, and its stdout reaches EOF.
# Normal exit: the reference run. Exception: the diverging run of test 4 (its
# error is raised in the round loop, long after the worker started). SIGKILL:
# test 1.


@pytest.mark.slow
def test_normal_exit_leaves_no_worker(reference):
    _, cli = reference
    assert cli.returncode == 0
    assert cli.stdout_lines[-1].startswith("done: ")
    cli.assert_workers_gone()


def test_round_loop_stops_on_a_swallowed_interrupt(tmp_path, tff_local_context):
    """A SIGINT whose KeyboardInterrupt is swallowed still stops the run at the next phase.

    In process, with the runtime's handlers (installed by the local context): the
    `on_phase` hook swallows the interrupt as a finalizer would; the loop's own
    check raises it again before the round's evaluation, round 1 stays the last
    one written, and the recorded interrupt is cleared as it leaves.
    """
    from fedprune.config import ExperimentConfig
    from fedprune.program import loop
    from fedprune.runtime import interrupts

    config = ExperimentConfig(rounds=ROUNDS, num_clients=4, clients_per_round=4,
                              end_round=3, **cli_util.CHEAP_OUTPUTS).validate()
    phases = []

    def on_phase(name: str) -> None:
        phases.append(name)
        if name == "round 2 train":
            try:
                with interrupts.interruptible():  # raise at once, to be swallowed
                    os.kill(os.getpid(), signal.SIGINT)
                    for _ in range(10**6):  # the handler raises in here
                        pass
            except KeyboardInterrupt:
                pass

    output_dir = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        loop.run_experiment(config, output_dir, log=lambda line: None, on_phase=on_phase)
    assert phases == ["build", "initialize", "round 1 train", "round 1 evaluate",
                      "round 1 checkpoint", "round 2 train"]
    assert checkpoint_arrays(output_dir)[0] == 1
    assert [r["round"] for r in metrics_without_time(output_dir)] == ["1"]
    assert interrupts.interrupt_signal() is None


# ----------------------------------------------------------------------------
# 4. NaN/Inf (also the exception exit path: the error is raised inside the
# round loop, long after the worker started).


@pytest.mark.slow
def test_divergence_stops_keeping_the_last_good_round(tmp_path):
    """--server_lr=1e15 diverges in round 2: one-line error, status 1, round 1 kept.

    Round 1 stays finite (train loss 1.68, test loss ~6e28); round 2's weights
    are still finite floats but give NaN logits, so only the test loss shows it
    (TFF drops clients' non-finite updates and then reports a train loss of 0).
    """
    output_dir = tmp_path / "run"
    cli = run_cli(*FLAGS, "--server_lr=1e15", f"--output_dir={output_dir}")
    assert cli.returncode == 1, cli.stderr_lines
    assert len(cli.stderr_lines) == 1, cli.stderr_lines
    message = cli.stderr_lines[0]
    assert message.startswith("error: round 2:") and "NaN/Inf" in message
    assert "--server_lr" in message and "after round 1" in message
    cli.assert_workers_gone()
    assert [r["round"] for r in metrics_without_time(output_dir)] == ["1"]
    assert checkpoint_arrays(output_dir)[0] == 1
    assert not (output_dir / "summary.json").exists()
    assert not (output_dir / "model").exists()


# ----------------------------------------------------------------------------
# 5. Corrupt and foreign checkpoints: refused before TensorFlow is imported.


def _resume_failing_fast(output_dir: Path, *extra: str):
    """`--resume`s FLAGS (+ `extra`) into `output_dir` under `python -X importtime`.

    Checks that it exited with status 1 before importing TensorFlow
    (`cli_util.exit_lines`).

    Returns:
      (CompletedProcess, stderr lines that are not import-time lines).
    """
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "experiments.run", *FLAGS, *extra,
         f"--output_dir={output_dir}", "--resume"],
        cwd=REPO_ROOT, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=RUN_TIMEOUT_S)
    return result, cli_util.exit_lines(result, 1)


@pytest.mark.slow
def test_resume_from_truncated_checkpoint_fails_clearly(reference, tmp_path):
    """Truncated newest checkpoint + --resume: one-line error, status 1, nothing rewritten.

    Never a silent restart from round 0 (and no fallback to the older
    checkpoint either: the user decides, the message says how).
    """
    output_dir = tmp_path / "run"
    shutil.copytree(reference[0], output_dir)
    newest = checkpoint.list_checkpoints(output_dir / "checkpoints")[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    before = snapshot(output_dir)
    result, stderr_lines = _resume_failing_fast(output_dir)  # status 1, no TensorFlow
    assert len(stderr_lines) == 1, stderr_lines
    assert f"{newest.name} is unreadable" in stderr_lines[0], stderr_lines
    assert "--overwrite" in stderr_lines[0]
    assert result.stdout == ""
    assert snapshot(output_dir) == before


@pytest.mark.slow
def test_resume_with_other_flags_fails_clearly(reference, tmp_path):
    output_dir = tmp_path / "run"
    shutil.copytree(reference[0], output_dir)
    before = snapshot(output_dir)
    result, stderr_lines = _resume_failing_fast(output_dir, "--final_sparsity=0.7")
    assert len(stderr_lines) == 1, stderr_lines
    assert "different flags" in stderr_lines[0] and "--overwrite" in stderr_lines[0]
    assert result.stdout == ""
    assert snapshot(output_dir) == before
