"""`--parallel_cells`: a grid driver's shares of cells, trained in child processes.

Each child is the driver's own command line with `--cell_shard=i/n
--parallel_cells=1` (`grid.run_grid` trains share i of n of the cells to
train, `grid.shares`, and the child exits without writing tables); it starts
its own TFF worker and stops it on every exit path like any driver. This
process passes the children's lines on as they come and, once all have
exited, writes the tables from the run tree.

Interrupts: a terminal's Ctrl-C reaches the children too (one process group),
and a SIGTERM to this process is passed on to them; either way this process
waits for every child (each stops its worker and keeps its completed rounds)
and then reports the interrupt once: the children's own interrupt lines are
not passed on.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from experiments import common

# Flags of this process the children get other values of.
_OWN_FLAGS = ("--parallel_cells", "--cell_shard")


def child_command(index: int, count: int) -> list[str]:
    """This driver's command line for share `index` of `count`."""
    module = sys.modules["__main__"].__spec__.name  # e.g. experiments.compare_schedules
    args, skip_value = [], False
    for arg in sys.argv[1:]:
        if skip_value:  # the value of `--parallel_cells N`
            skip_value = False
        elif arg.split("=", 1)[0] in _OWN_FLAGS:
            skip_value = "=" not in arg
        else:
            args.append(arg)
    return [sys.executable, "-m", module, *args, f"--cell_shard={index}/{count}",
            "--parallel_cells=1"]


def run_children(count: int, *, log: Callable[[str], None]) -> None:
    """Runs `count` children to their exit, passing their stdout lines to `log`.

    Raises:
      RuntimeError: a child exited with a status other than 0 (all its cells
        done) or 1 (some failed; `grid.run_grid` finds which from the run tree).
      KeyboardInterrupt, interrupts.Terminated: after every child has exited.
    """
    children: list[subprocess.Popen] = []
    readers: list[threading.Thread] = []
    interrupted = [common.interrupted_message(s) for s in (signal.SIGINT, signal.SIGTERM)]

    def forward(stream, write):
        for line in stream:
            line = line.rstrip("\n")
            if line not in interrupted:
                write(line)

    try:
        for index in range(count):
            child = subprocess.Popen(child_command(index, count), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, bufsize=1)
            children.append(child)
            for stream, write in ((child.stdout, log),
                                  (child.stderr, lambda line: print(line, file=sys.stderr))):
                reader = threading.Thread(target=forward, args=(stream, write), daemon=True)
                reader.start()
                readers.append(reader)
        codes = [child.wait() for child in children]
    except BaseException:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait()
        raise
    finally:
        for reader in readers:
            reader.join()
    bad = [(i, code) for i, code in enumerate(codes) if code not in (0, 1)]
    if bad:
        raise RuntimeError("--parallel_cells: " + ", ".join(
            f"child {i} of {count} exited with status {code}" for i, code in bad))
