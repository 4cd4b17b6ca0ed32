"""The benchmark's scale section: round time and memory with many clients.

Each setting runs in a fresh child process (`python -m experiments.benchmark
--scale_child=N`), which reports its measurements as one `SCALE_RESULT_PREFIX`
line of JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from experiments.process_stats import (
    anon_rss,
    format_seconds,
    malloc_settings,
    median_range,
    peak_rss,
    worker_processes,
)
from experiments.process_stats import rss as current_rss
from fedprune.program.assembly import round_inputs

if TYPE_CHECKING:
    from experiments.benchmark import Plan

REPO_ROOT = Path(__file__).resolve().parent.parent
# Allocator settings of the scale section's workers: fedprune's defaults, or glibc's own.
WORKER_MALLOC_MODES = ("fedprune", "glibc")
# MiB per round (issue 18): the most RSS may grow per round over the last rounds of a run,
# for the Python process and for the worker alike; more suggests a per-round leak.
MAX_RSS_SLOPE = 0.05
MIN_SLOPE_ROUNDS = 10  # the fewest rounds a slope is fitted over
# Rounds per block of `minima_slope`: the slope of each block's minimum RSS.
MINIMA_BLOCK_ROUNDS = 10
SCALE_RESULT_PREFIX = "SCALE_RESULT "
# The control's data: every client gets 1-2 of digits' 1,437 training examples.
CONTROL_FLAGS = ("--scale_dataset=digits", "--partition=iid")


def _check_window(rss_bytes: Sequence[float], rounds: int) -> None:
    if not 2 <= rounds <= len(rss_bytes):
        raise ValueError(f"rounds={rounds}: expected 2..{len(rss_bytes)} (the samples given)")


def rss_slope(rss_bytes: Sequence[float], rounds: int) -> float:
    """Least-squares slope, in MiB per round, of the last `rounds` RSS samples.

    Args:
      rss_bytes: RSS in bytes sampled after each round, one per round in order.
      rounds: how many of the last samples to fit (>= 2, at most `len(rss_bytes)`).

    A per-round leak shows as a positive slope however the first rounds went;
    a one-off rise before the window (e.g. after the largest client so far) does not.
    """
    _check_window(rss_bytes, rounds)
    first = len(rss_bytes) - rounds
    return statistics.linear_regression(
        range(first + 1, len(rss_bytes) + 1), [b / 2**20 for b in rss_bytes[first:]]).slope


def minima_slope(rss_bytes: Sequence[float], rounds: int,
                block: int = MINIMA_BLOCK_ROUNDS) -> float | None:
    """Slope, in MiB per round, of the minima of blocks of the last `rounds` RSS samples.

    The last `rounds` samples are cut into blocks of `block` rounds, aligned to
    the last round (a remainder at the start of the window is left out); the
    result is the least-squares slope of each block's minimum against the
    block's middle round, or None if fewer than two blocks fit. A leak raises
    every block's minimum; memory held for a few rounds after a large client
    (a spike) does not, though it can move `rss_slope` by as much as a leak.
    """
    _check_window(rss_bytes, rounds)
    if block < 1:
        raise ValueError(f"block={block}: expected a whole number >= 1")
    blocks = rounds // block
    if blocks < 2:
        return None
    ends = range(len(rss_bytes) - (blocks - 1) * block, len(rss_bytes) + 1, block)
    middles = [end - (block - 1) / 2 for end in ends]  # rounds are numbered from 1
    minima = [min(rss_bytes[end - block:end]) / 2**20 for end in ends]
    return statistics.linear_regression(middles, minima).slope


def _minima_cell(slope: float | None) -> str:
    return "—" if slope is None else f"{slope:+.3f}"


def _slope_cell(slope: float) -> str:
    return f"{slope:+.3f} " + ("✓" if slope <= MAX_RSS_SLOPE else "✗")


def scale_markdown(results: Sequence[dict]) -> str:
    """The scale table, one row per child process (from `run_scale_child`).

    Slopes are of the anonymous RSS of the last `slope_rounds` rounds of each
    result, for the Python process also less its client-data cache (the
    result's `client_cache` bytes); ✓ marks a slope of at most `MAX_RSS_SLOPE`
    MiB per round, ✗ a larger one.
    """
    mib = 1024**2
    lines = ["| dataset | clients | per round | worker malloc (its MALLOC_ variables; heap trim) "
             "| rounds "
             "| median round (s) | min–max (s) | peak RSS Python (MiB) | peak RSS worker (MiB) "
             "| anon. RSS slope Python (MiB/round) | the same less the client-data cache "
             "| anon. RSS slope worker (MiB/round) | slope rounds "
             f"| slope of {MINIMA_BLOCK_ROUNDS}-round minima Python "
             f"| slope of {MINIMA_BLOCK_ROUNDS}-round minima worker "
             "| client-data cache (MiB) | largest client so far (examples) |",
             "| :-- | --: | --: | :-- | --: | --: | --: | --: | --: | --: | --: | --: | --: "
             "| --: | --: | --: | --: |"]
    for r in results:
        med, lo, hi = median_range(r["round_seconds"][r["baseline_round"]:])
        window, largest = r["slope_rounds"], r["largest_client"]
        first = r["rounds"] - window + 1
        cache = [s["client_cache"] for s in r["rss"]]
        python, worker = ([s[k] for s in r["rss"]] for k in ("python_anon", "worker_anon"))
        slopes = [_slope_cell(rss_slope(samples, window)) for samples in (
            python, [p - c for p, c in zip(python, cache, strict=True)], worker)]
        minima = [_minima_cell(minima_slope(samples, window)) for samples in (python, worker)]
        # The samples after round first - 1, just before the slope's rounds.
        cache_before, largest_before = ((cache[first - 2], largest[first - 2]) if first > 1
                                        else (0, 0))
        lines.append(
            f"| {r['dataset']} | {r['num_clients']} | {r['clients_per_round']} "
            f"| {r['worker_malloc']} ({r['malloc_env']}) | {r['rounds']} "
            f"| {format_seconds(med)} | {format_seconds(lo)}–{format_seconds(hi)} "
            f"| {r['peak_rss']['python'] / mib:.0f} | {r['peak_rss']['worker'] / mib:.0f} "
            f"| {' | '.join(slopes)} | {first}–{r['rounds']} | {' | '.join(minima)} "
            f"| {cache_before / mib:.1f} → {cache[-1] / mib:.1f} "
            f"| {largest_before:,} → {largest[-1]:,} |")
    return "\n".join(lines) + "\n"


def run_scale_child(config, *, rounds: int, baseline_round: int, slope_rounds: int,
                    log) -> dict:
    """Runs fedprune (a) for `rounds` rounds, sampling RSS after every round.

    `baseline_round` and `slope_rounds` are only recorded, for `scale_markdown`.

    Returns:
      A JSON-able dict: round seconds; RSS and anonymous RSS (bytes) of the
      Python process and of the worker, and the bytes of client data the Python
      process keeps for later rounds (`FederatedData.cached_client_bytes`),
      after every round (the Python process's once it has handed its free heap
      pages back, `runtime.memory.release_free_heap`); their peak RSS (bytes);
      the size of the largest client trained so far after every round.
    """
    import psutil

    from fedprune.program import assembly
    from fedprune.runtime import memory, worker_heap, workers

    data = assembly.load_data(config)
    pp = assembly.build_process(config, data)
    state = pp.process.initialize()
    me = psutil.Process()
    round_seconds, rss, largest = [], [], []
    for round_num in range(1, rounds + 1):
        start = time.perf_counter()
        batches = round_inputs(config, data, round_num)
        state = pp.next(state, batches.datasets).state
        round_seconds.append(time.perf_counter() - start)
        # Memory that malloc keeps after the largest client so far is not a leak.
        largest.append(max([*largest[-1:], *(data.num_examples(c) for c in batches.clients)]))
        # What the Python process keeps, not the round's freed heap pages that the
        # next round's `round_inputs` would hand back first anyway (BUILD_NOTES.md).
        memory.release_free_heap()
        procs = worker_processes()
        # The worker's too, as `loop.py` does after each round (`runtime.worker_heap`);
        # here it waits for the trim to finish.
        worker_heap.release_worker_heaps([w.pid for w in procs], wait_s=10.0)
        rss.append({"python": current_rss(me), "worker": sum(current_rss(w) for w in procs),
                    "python_anon": anon_rss(me), "worker_anon": sum(anon_rss(w) for w in procs),
                    "client_cache": data.cached_client_bytes()})
        if round_num % 10 == 0 or round_num == rounds:
            log(f"round {round_num}/{rounds}: {round_seconds[-1]:.3f} s, RSS python "
                f"{rss[-1]['python'] / 2**20:.0f} MiB, worker {rss[-1]['worker'] / 2**20:.0f} MiB")
    procs = worker_processes()
    peak = {"python": peak_rss(me), "worker": sum(peak_rss(w) for w in procs)}
    return {"num_clients": len(data.client_ids), "clients_per_round": config.clients_per_round,
            "malloc_env": malloc_settings(procs) + (
                "; heap trimmed after each round" if procs and all(
                    worker_heap.trim_count(w.pid) is not None for w in procs) else ""),
            "worker_malloc": os.environ.get(workers.WORKER_MALLOC_ENV) or "fedprune",
            "dataset": config.dataset + ("" if config.dataset == "synthetic"
                                         else f" {config.partition}"),
            "rounds": rounds, "baseline_round": baseline_round, "slope_rounds": slope_rounds,
            "round_seconds": round_seconds, "rss": rss, "peak_rss": peak,
            "largest_client": largest}


def _child_env(malloc: str) -> dict[str, str]:
    """This process's environment, for a child whose worker gets `malloc`'s settings.

    The glibc variables are removed, so the child (Python) runs with glibc's
    defaults either way and its worker with `runtime.workers.worker_environment`'s.
    """
    from fedprune.runtime import workers

    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.pop("GLIBC_TUNABLES", None)
    env[workers.WORKER_MALLOC_ENV] = malloc
    return env


def run_scale(plan: Plan, log) -> tuple[str, str]:
    """Runs each scale setting in a child process (clean peak RSS); returns (table, notes).

    glibc gives each thread that allocates concurrently its own malloc arena (up
    to 8 per core) and rarely returns their free space, so a multi-threaded
    process such as TFF's worker can grow without leaking. fedprune caps the
    worker's arenas (`runtime.workers.WORKER_MALLOC_DEFAULTS`); the `glibc` rows start
    it with glibc's defaults (`FEDPRUNE_WORKER_MALLOC=glibc`). The child Python
    process runs with glibc's defaults in every row.
    """
    results = []
    for cpr, malloc, control in plan.scale_runs:
        log(f"scale: {plan.scale_clients} clients, {cpr} per round, worker malloc {malloc}"
            f"{', control' if control else ''}, in a child process")
        args = [sys.executable, "-m", "experiments.benchmark", *sys.argv[1:],
                f"--scale_child={cpr}", *(CONTROL_FLAGS if control else ())]
        child = subprocess.Popen(args, cwd=REPO_ROOT, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, text=True, env=_child_env(malloc))
        result = None
        try:
            for line in child.stdout:
                if line.startswith(SCALE_RESULT_PREFIX):
                    result = json.loads(line[len(SCALE_RESULT_PREFIX):])
                else:
                    log(f"  [{cpr}/round] {line.rstrip()}")
            status = child.wait()
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
        if status != 0 or result is None:
            raise RuntimeError(f"scale child (--scale_child={cpr}) failed with status {status}")
        results.append(result)
    config = next(iter(plan.scale.values()))
    if config.dataset == "synthetic":
        dataset = (f"Synthetic(α={config.synthetic_alpha:g}, β={config.synthetic_beta:g}) "
                   "(Li et al. 2020; log-normal client sizes)")
    else:
        dataset = f"{config.dataset} ({config.partition} partition)"
    notes = f"""Setting: {dataset} with {config.num_clients} clients, model `{config.model}`,
batch {config.batch_size}, {config.local_epochs} local epoch(s), fedprune masking both,
polynomial (power {config.power:g}) {config.initial_sparsity:g} →
{config.final_sparsity:g} over rounds
{config.begin_round}–{config.end_round}. Each setting runs in a fresh child process
(its own `worker_binary`), one after another, so their round times compare only as well as
the machine's load allowed (the load averages above); the speed section interleaves its
variants. Round time includes building the round's client datasets and
`PruningProcess.next`, medians over rounds {plan.scale_baseline + 1}–{plan.scale_rounds}. Peak
RSS is the kernel's high-water mark (VmHWM) of each process. The RSS slopes are
least-squares fits of the anonymous RSS (RssAnon: RSS less file-backed pages such as
TensorFlow's code, which the kernel drops and reloads at will, swinging the Python
process's RSS by 100 MiB or more from round to round on a machine that reclaims cold
pages) sampled after each of the last {plan.scale_slope_rounds}
rounds (rounds {plan.scale_rounds - plan.scale_slope_rounds + 1}–{plan.scale_rounds}), of
the Python process and of the worker; each first hands its free heap pages back to the OS
(the Python process with `runtime.memory.release_free_heap`, which `assembly.round_inputs`
also does, at most once a second; the worker, where "heap trimmed after each round" says
so, with `runtime.worker_heap.release_worker_heaps`, which `loop.py` also sends after a
round, at most once a second, waiting here for it to finish), so the samples show what
each process keeps rather than how much of the round's freed memory is still resident
(which scattered the Python process's by ~15 MiB at 100 clients per round). The trimmed
worker's samples still move by tens of MiB from round to round at 100 clients per round:
memory still in use in the worker when it is sampled (BUILD_NOTES.md, "Worker memory").
A per-round leak keeps the slopes positive, while a one-off rise earlier does not, such as malloc
keeping the memory of the largest client trained so far (last column: its size before the slope's
rounds → at the end). The slopes of minima fit the minimum of each block of {MINIMA_BLOCK_ROUNDS} of
those rounds instead of every sample (`minima_slope`; "—" with fewer than
{2 * MINIMA_BLOCK_ROUNDS} of them): a leak raises every block's minimum, while memory a
process holds for a few rounds after a large client raises only the samples of those
rounds, which can move the least-squares slope by ±0.1 MiB per round at 100 clients per
round depending on where such rounds fall
(BUILD_NOTES.md, "Worker memory"); the limit applies to the least-squares slopes.
The Python process also keeps each client's rows once the client has been sampled,
for its later rounds
(`ArraySource.examples`, `fedprune/data/datasets/container.py`): that cache grows
whenever a client is sampled for the first time, up to one copy of the training set, so it
can still grow in the slope's rounds when few clients take part per round. "The same less
the client-data cache" fits the Python process's anonymous RSS less the bytes in that
cache ("client-data cache": before the slope's rounds → at the end). The limit (issue 18) is
a slope of at most {MAX_RSS_SLOPE:g} MiB per round for each process (✓ met, ✗ not). "worker
malloc" is how the worker was started: `fedprune`, with fedprune's defaults
(`runtime.workers.WORKER_MALLOC_DEFAULTS`, and the heap-trim library preloaded,
`runtime.worker_heap`), or `glibc`, with glibc's own
(`FEDPRUNE_WORKER_MALLOC=glibc`, rows only with `--scale_worker_malloc=fedprune,glibc`);
in brackets, the glibc MALLOC_ variables read from the running worker's environment
("none": glibc's defaults, up to 8 arenas per core and a sliding mmap threshold); the
Python process runs with glibc's defaults in every row and hands its free heap pages
back to the OS after every round here (a fedprune run does so at most once a second:
`runtime.memory.release_free_heap`, from `assembly.round_inputs`; off with
`FEDPRUNE_MALLOC_TRIM=0`). The `digits iid` rows are a control, not the workload:
the same rounds, model and worker on digits split iid over the same number of clients (1-2
examples each), so no round brings a larger client than before; a per-round leak of the
round machinery (TFF calls, masks, server state) would grow there too, while memory kept
after the largest client so far does not."""
    return scale_markdown(results), notes
