"""flags.txt: a run's flagfile, every experiment flag's value.

Written into every run folder (`experiments/run.py`, and each grid cell by
`experiments/grid.py`); absl's `--flagfile` reads it back into the same
`ExperimentConfig` (the flags of `experiments/common.py`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from fedprune import config as config_lib
from fedprune import extensions

FLAGFILE_NAME = "flags.txt"


def _flag_line(name: str, value) -> str:
    """`--name=value` as absl's --flagfile reads it back to the same value."""
    if value is None:  # an unset optional float has no value to write
        return f"# --{name} unset"
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, tuple | list):
        return f"--{name}={','.join(map(str, value))}"
    if isinstance(value, float):
        return f"--{name}={value!r}"  # repr: the shortest text that reads back exactly
    return f"--{name}={value}"


def flagfile_text(config: config_lib.ExperimentConfig, *, tff_workers=()) -> str:
    """flags.txt: every experiment flag's value, one `--name=value` a line.

    `python -m experiments.run --flagfile=<run>/flags.txt --output_dir=<new>`
    reruns the experiment. --tff_workers (where it ran) is a comment: rerunning
    elsewhere needs other addresses, and the result does not depend on them
    beyond float rounding (README, Scaling out). The --extensions this process
    loaded (`fedprune.extensions.loaded()`) come first, when there are any.
    """
    lines = ["# Every experiment flag of this run. Rerun it with",
             "#   python -m experiments.run --flagfile=<this file> --output_dir=<new folder>",
             f"# config fingerprint {config.fingerprint()}"]
    if extensions.loaded():  # first: they register names the lines below use
        lines.append(f"--extensions={','.join(extensions.loaded())}")
    lines += [_flag_line(f.name, getattr(config, f.name))
              for f in dataclasses.fields(config_lib.ExperimentConfig)]
    lines.append(f"# ran on --tff_workers={','.join(tff_workers)} (not set here)" if tff_workers
                 else "# ran on a local TFF worker (no --tff_workers)")
    return "\n".join(lines) + "\n"


def write_flagfile(output_dir: Path, config: config_lib.ExperimentConfig, *, resume: bool,
                   tff_workers=()) -> None:
    """Writes `output_dir/flags.txt` atomically (creating the folder).

    A resumed run keeps its flags.txt: the checkpoint's fingerprint already
    says it is this configuration's (a run from before flags.txt gets one).
    """
    from fedprune.outputs import atomic_files

    path = Path(output_dir) / FLAGFILE_NAME
    if resume and path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.atomic_write_text(path, flagfile_text(config, tff_workers=tff_workers))
