"""SIGINT and SIGTERM at random moments of every phase of `python -m experiments.run`.

6 seeded signals (one per aimed phase, SIGINT and SIGTERM alternating), aimed
at the phases the CLI enters (`FEDPRUNE_PHASE_LOG`) with a random delay, sent
to CLIs of the small run of `tests/cli_runs.py`, two at a time; two of the
interrupted runs (one per signal) are then resumed to the end. Each
must exit with 130/143 and one stderr line, leave no worker and no half-written
file, and keep the outputs of its last completed round.
"""

from __future__ import annotations

import dataclasses
import random
import re
import signal
import time
from pathlib import Path

import pytest
from cli_runs import (
    FLAGS,
    Cli,
    checkpoint_arrays,
    metrics_without_time,
    run_cli,
)

from fedprune.program import checkpoint

INTERRUPTED_ROUNDS = 20  # aims stop at round 3: 17 rounds (> 1.5 s) of margin before the end
# Where signals are aimed, and which: a phase the CLI enters (`loop.PHASES`,
# plus the driver's `import`; per-round phases in rounds 2-3, after a
# checkpoint, so each signal has a run to resume), the signal (SIGINT, as a
# terminal sends it to the worker too, where a worker is running from the build
# on, alternating with SIGTERM), and the longest random delay
# after entering it, in seconds. On an idle machine the import takes ~8 s, the
# build ~3 s, initialize ~1 s, a round's training ~0.1 s, its evaluation and
# checkpoint ~15 ms each: a delay stays inside its phase or lands in a later one.
# The phase a signal really landed in is read back from the phase log.
AIMS = (("import", signal.SIGTERM, 4.0), ("build", signal.SIGINT, 2.0),
        ("initialize", signal.SIGTERM, 0.5), ("train", signal.SIGINT, 0.08),
        ("evaluate", signal.SIGTERM, 0.004), ("checkpoint", signal.SIGINT, 0.004))
NUM_INTERRUPTS = len(AIMS)  # one signal per aim
EXPECTED_EXIT = {signal.SIGINT: -signal.SIGINT, signal.SIGTERM: 128 + signal.SIGTERM}


@dataclasses.dataclass
class Interrupt:
    index: int
    signum: int
    aim: str
    delay_s: float
    output_dir: Path | None = None
    cli: Cli | None = None
    landed: str | None = None  # the last phase entered before the signal was sent
    # The outputs right after the exit (before any resume).
    checkpointed: int = 0  # the newest checkpoint's round (0: none)
    metrics_rounds: list[int] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)  # temporary files
    finished: bool = False  # summary.json written
    resumed: Cli | None = None


def _interrupt_plan(seed: int = 9) -> list[Interrupt]:
    """6 signals, seeded: one per aimed phase, at a random round (2-3) and delay.

    With one signal per phase, seed 9 draws delays well inside the phases'
    idle-machine lengths above (import 1.9 s, build 0.75 s, initialize 0.07 s,
    train 0.03 s), so every phase is hit on a fast machine too.
    """
    rng = random.Random(seed)
    plan = []
    for index, (aim, signum, max_delay_s) in enumerate(AIMS):
        if aim in ("train", "evaluate", "checkpoint"):
            aim = f"round {rng.randint(2, 3)} {aim}"
        plan.append(Interrupt(index, signum, aim, rng.uniform(0.0, max_delay_s)))
    return plan


def _interrupt(interrupt: Interrupt, root: Path) -> None:
    """Runs the CLI, sends the planned signal, waits for the exit."""
    interrupt.output_dir = root / f"run{interrupt.index}"
    cli = interrupt.cli = Cli(*FLAGS, f"--rounds={INTERRUPTED_ROUNDS}",
                              f"--output_dir={interrupt.output_dir}",
                              phase_log=root / f"phases{interrupt.index}")
    try:
        cli.wait_for_phase(interrupt.aim)
        time.sleep(interrupt.delay_s)  # the random moment, not a wait for anything
        # SIGINT to the whole group, as a terminal's Ctrl-C; SIGTERM to the CLI, as `kill`.
        sent = cli.send(interrupt.signum, group=interrupt.signum == signal.SIGINT)
        cli.returncode = cli.wait()
        entered = [name for t, name in cli.phases() if t <= sent]
        interrupt.landed = entered[-1] if entered else "start"
    finally:
        cli.stop()
    output_dir = interrupt.output_dir
    interrupt.checkpointed = _checkpointed_round(output_dir)
    if (output_dir / "metrics.csv").exists():
        interrupt.metrics_rounds = [int(r["round"]) for r in metrics_without_time(output_dir)]
    if output_dir.exists():
        interrupt.leftovers = [str(p) for p in output_dir.rglob("*") if p.name.startswith(".tmp")]
    interrupt.finished = (output_dir / "summary.json").exists()


@pytest.fixture(scope="module")
def interrupted_runs(tmp_path_factory) -> list[Interrupt]:
    """The 6 interrupted runs, two at a time; then 2 of them resumed to the end."""
    from concurrent.futures import ThreadPoolExecutor

    root = tmp_path_factory.mktemp("interrupted")
    plan = _interrupt_plan()
    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(_interrupt, interrupt, root) for interrupt in plan]:
            future.result()
    # Resume one run per signal that had checkpointed a round (one that had not
    # starts afresh, which is an ordinary run).
    checkpointed = [i for i in plan if i.checkpointed >= 1]
    chosen = [next(i for i in checkpointed if i.signum == signal.SIGINT),
              next(i for i in checkpointed if i.signum == signal.SIGTERM)]

    def resume(interrupt: Interrupt) -> None:
        interrupt.resumed = run_cli(*FLAGS, f"--rounds={INTERRUPTED_ROUNDS}",
                                    f"--output_dir={interrupt.output_dir}", "--resume")

    with ThreadPoolExecutor(max_workers=2) as pool:
        for future in [pool.submit(resume, interrupt) for interrupt in chosen]:
            future.result()
    return plan


def _checkpointed_round(output_dir: Path) -> int:
    """The newest checkpoint's round, or 0 without one (or without the folder)."""
    if not checkpoint.list_checkpoints(output_dir / "checkpoints"):
        return 0
    return checkpoint_arrays(output_dir)[0]


@pytest.mark.slow
@pytest.mark.parametrize("index", range(NUM_INTERRUPTS))
def test_interrupt_at_a_random_moment(interrupted_runs, index):
    """Status 130/143, one line on stderr, no worker left, the outputs of the last round intact."""
    interrupt = interrupted_runs[index]
    cli, name = interrupt.cli, signal.Signals(interrupt.signum).name
    where = f"{name} aimed at {interrupt.aim!r} +{interrupt.delay_s:.3f} s, landed in " \
            f"{interrupt.landed!r}"
    assert cli.returncode == EXPECTED_EXIT[interrupt.signum], (where, cli.stderr_lines[-5:])
    assert cli.stderr_lines == [
        f"interrupted ({name}); completed rounds are kept: rerun with --resume to continue"
    ], where
    assert cli.survivors == [], where  # `Cli.wait` also asserted EOF on stdout and stderr
    if interrupt.landed not in ("start", "import"):
        assert cli.workers, f"{where}: no worker_binary was ever seen"
    assert not interrupt.finished, f"{where}: the run had finished"
    assert not interrupt.leftovers, f"{where}: half-written files {interrupt.leftovers}"
    done = interrupt.checkpointed
    # metrics.csv holds every checkpointed round, and at most the one after.
    assert interrupt.metrics_rounds in (list(range(1, done + 1)), list(range(1, done + 2))), where
    printed = [line for line in cli.stdout_lines if line.startswith("round ")]
    assert len(printed) <= done, f"{where}: printed a round that was not checkpointed"


@pytest.mark.slow
def test_interrupts_landed_in_every_phase(interrupted_runs):
    """The aims cover the import, the build, tracing, rounds, evaluation and checkpoints."""
    landed = {re.sub(r"^round \d+ ", "", i.landed) for i in interrupted_runs}
    assert {"import", "build", "train"} <= landed, landed
    assert landed & {"initialize"}, landed
    assert landed & {"evaluate", "checkpoint"}, landed


@pytest.mark.slow
def test_interrupted_runs_resume_to_the_end(interrupted_runs):
    resumed = [i for i in interrupted_runs if i.resumed is not None]
    assert {i.signum for i in resumed} == {signal.SIGINT, signal.SIGTERM}
    for interrupt in resumed:
        cli = interrupt.resumed
        assert cli.returncode == 0, cli.stderr_lines[-5:]
        cli.assert_workers_gone()
        resuming = [line for line in cli.stdout_lines if line.startswith("resuming after round")]
        assert resuming[0].startswith(f"resuming after round {interrupt.checkpointed} ")
        printed = [line for line in cli.stdout_lines if line.startswith("round ")]
        assert len(printed) == INTERRUPTED_ROUNDS - interrupt.checkpointed
        rounds = [int(r["round"]) for r in metrics_without_time(interrupt.output_dir)]
        assert rounds == list(range(1, INTERRUPTED_ROUNDS + 1))
        assert (interrupt.output_dir / "summary.json").is_file()

