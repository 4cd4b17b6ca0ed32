"""The benchmark's scaleout section: one local worker vs loopback worker services.

Runs the same experiment (`python -m experiments.run`, a fresh child process per
run) in two execution modes:

    local    no --tff_workers: the child starts and stops its own local
             `worker_binary` (TFF's sync C++ context);
    remote   --tff_workers=127.0.0.1:P1,127.0.0.1:P2,...: the child sends each
             round to `--scaleout_workers` worker services on loopback (TFF's
             mergeable context: each worker trains a contiguous chunk of the
             round's clients).

The worker services are `worker_binary`s that this process starts before the
first run with `runtime.workers.start_worker_process` (what `python -m
fedprune.worker` serves) and stops after the last, on every exit path
(`workers.stop_popen` in a `finally`; the atexit hook of
`interrupts.install_worker_cleanup`; `setpriv --pdeathsig` should this process be
SIGKILLed). The runs alternate between the modes, each pair in the opposite
order of the one before (local, remote, remote, local, ...), so that a drift of
the machine's load hits both modes alike. Round times are metrics.csv's
`round_seconds` of the rounds after `--scaleout_baseline_round`, pooled over
the runs of a mode. Every run's metrics must agree with the first local run's
to `TOLERANCE` (tests/test_scale_out.py's), or the section fails.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.benchmark_grid import max_difference
from experiments.process_stats import format_seconds, median_range

if TYPE_CHECKING:
    from experiments.benchmark import Plan
    from fedprune import config as config_lib

REPO_ROOT = Path(__file__).resolve().parent.parent
MODES = ("local", "remote")
# Largest |difference| allowed between a run's metrics and the first local run's
# (tests/test_scale_out.py's tolerance): the modes add clients' updates in another order.
TOLERANCE = 1e-5


def scaleout_config(base: config_lib.ExperimentConfig, *, clients: int, per_round: int,
                    rounds: int, baseline_round: int,
                    partition: str) -> config_lib.ExperimentConfig:
    """The section's experiment: `base` on `clients` clients, `per_round` a round; validated.

    The pruning schedule ends at `baseline_round`, so the timed rounds after it
    train at the final sparsity; the test set is evaluated after the last round
    only, and nothing is deployed.

    Raises:
      InvalidArgument: the combination is not a valid experiment.
    """
    return dataclasses.replace(
        base, num_clients=clients, clients_per_round=per_round, rounds=rounds,
        partition=partition, end_round=baseline_round, eval_every=rounds,
        deploy="none").validate()


def run_order(repeats: int) -> list[str]:
    """The modes of the section's runs, in order: each pair reverses the one before."""
    order = []
    for r in range(repeats):
        order += MODES if r % 2 == 0 else MODES[::-1]
    return order


def mode_label(mode: str, num_workers: int) -> str:
    if mode == "local":
        return "1 local worker"
    return f"{num_workers} loopback worker{'s' if num_workers > 1 else ''} (mergeable context)"


def _run_experiment(flagfile: Path, output_dir: Path, tff_workers: list[str]) -> list[dict]:
    """One `python -m experiments.run` child; returns its metrics.csv rows.

    `subprocess.run` kills the child should this process be interrupted; the
    child's own local worker then dies with it (`setpriv --pdeathsig`).
    """
    from fedprune.outputs import run_files

    command = [sys.executable, "-m", "experiments.run", f"--flagfile={flagfile}",
               f"--output_dir={output_dir}"]
    if tff_workers:
        command.append("--tff_workers=" + ",".join(tff_workers))
    done = subprocess.run(command, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scaleout section: {' '.join(command[1:])} exited with status "
                           f"{done.returncode}: {done.stderr.strip()[-500:]}")
    return run_files.read_metrics(output_dir)


def scaleout_markdown(results: dict[str, dict], *, num_workers: int,
                      clients_per_round: int) -> str:
    """The table: per mode (`MODES` order) its runs, round times and metric difference.

    `results[mode]`: "runs" (how many), "seconds" (the timed rounds' seconds of
    every run) and "difference" (max |metric difference| from the first local
    run; None for the local mode run once: it is the reference).
    """
    local_median = median_range(results["local"]["seconds"])[0]
    lines = ["| execution | runs | clients per round | median round (s) | min–max (s) "
             "| vs local | max abs metric difference vs local |",
             "| :-- | --: | --: | --: | --: | --: | --: |"]
    for mode in MODES:
        r = results[mode]
        med, lo, hi = median_range(r["seconds"])
        diff = "reference" if r["difference"] is None else f"{r['difference']:.2g}"
        lines.append(f"| {mode_label(mode, num_workers)} | {r['runs']} | {clients_per_round} "
                     f"| {format_seconds(med)} | {format_seconds(lo)}–{format_seconds(hi)} "
                     f"| {med / local_median:.2f}× | {diff} |")
    return "\n".join(lines) + "\n"


def run_scaleout_section(plan: Plan, log) -> tuple[str, str]:
    """Starts the worker services, runs both modes alternately, stops them; (table, notes)."""
    from experiments import flagfile as flagfile_lib
    from fedprune.runtime import interrupts, workers

    config = plan.scaleout
    interrupts.install_worker_cleanup()  # the atexit hook: no worker outlives us
    order = run_order(plan.scaleout_repeats)
    seconds = {mode: [] for mode in MODES}
    metrics_dirs = {mode: [] for mode in MODES}
    started = []
    with tempfile.TemporaryDirectory(prefix="fedprune-scaleout-") as tmp:
        flagfile = Path(tmp) / "flags.txt"
        flagfile.write_text(flagfile_lib.flagfile_text(config))
        try:
            # Each port is picked after the previous worker listens, so they differ.
            addresses = []
            for i in range(plan.scaleout_workers):
                port = workers.pick_unused_port()
                started.append(workers.start_worker_process(
                    port, log_path=Path(tmp) / f"worker{i}.log"))
                addresses.append(f"127.0.0.1:{port}")
            log(f"scaleout: worker services on {','.join(addresses)}")
            for i, mode in enumerate(order):
                out = Path(tmp) / f"run{i}-{mode}"
                rows = _run_experiment(flagfile, out,
                                       addresses if mode == "remote" else [])
                timed = [float(r["round_seconds"]) for r in rows
                         if int(r["round"]) > plan.scaleout_baseline]
                seconds[mode] += timed
                metrics_dirs[mode].append(out)
                log(f"scaleout: run {i + 1}/{len(order)} ({mode}): median timed round "
                    f"{median_range(timed)[0]:.2f} s")
        finally:
            for process in started:
                workers.stop_popen(process, workers.STOP_GRACE_S)
        reference, *other_local = metrics_dirs["local"]
        differences = {mode: max((max_difference(reference, d) for d in dirs), default=None)
                       for mode, dirs in (("local", other_local),
                                          ("remote", metrics_dirs["remote"]))}
    worst = max(d for d in differences.values() if d is not None)
    if worst > TOLERANCE:
        raise RuntimeError(f"scaleout section: metrics differ between the runs by {worst:g} "
                           f"(> {TOLERANCE:g})")
    results = {mode: {"runs": len(metrics_dirs[mode]), "seconds": seconds[mode],
                      "difference": differences[mode]} for mode in MODES}
    table = scaleout_markdown(results, num_workers=plan.scaleout_workers,
                              clients_per_round=config.clients_per_round)
    n = plan.scaleout_workers
    first = plan.scaleout_baseline + 1
    timed = (f"round {first}" if first == config.rounds
             else f"rounds {first}–{config.rounds}")
    notes = f"""Setting: {config.dataset} ({config.partition} partition) over
{config.num_clients} clients, {config.clients_per_round} per round, {config.rounds} rounds,
model `{config.model}`, batch {config.batch_size}, {config.local_epochs} local epoch(s),
masking {config.masking}, {config.schedule} schedule to {config.final_sparsity:g} ending at
round {config.end_round}, test set evaluated after the last round only (that round's time
includes it). Each run is a fresh `python -m experiments.run` with this flagfile, with its
own local worker or with `--tff_workers` set to {n} `worker_binary` service{'s' if n > 1 else ''}
on 127.0.0.1, started by the benchmark as `python -m fedprune.worker` starts them
(`runtime.workers.start_worker_process`) and kept up for all remote runs. The
{len(order)} runs alternate ({', '.join(order)}); round time is metrics.csv's
`round_seconds` (building the round's client datasets, `process.next`, accounting and
outputs) of {timed} of every run of a mode.
Metrics: every metrics.csv value but the wall-clock columns, compared with the first
local run's (the section fails beyond {TOLERANCE:g}). On loopback the workers share this
machine's cores with each other and with the run's own process, so they add no compute:
the difference between the rows is the mergeable context's split, transfer and merge, the
workers' threads against one worker's, and the load of the machine. More workers pay off
with more machines, each training its chunk of the round's clients."""
    return table, notes
