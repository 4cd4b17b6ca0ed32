"""Sparsity schedules expressed in federated rounds.

Users give schedules in **rounds**; fedprune hands them to tfmot's own
`PruningSchedule` classes with the explicit mapping

    one tfmot step  ==  one federated round on the server.

So `begin_round`, `end_round` and `prune_every` become tfmot's `begin_step`,
`end_step` and `frequency`, and the server's mask decision after round `r` is
tfmot's `schedule(step=r)`: `(should_prune, sparsity)`. Round 0 is the initial
model (before any training); training rounds are 1, 2, ... With the default
`--prune_granularity=round` client-side local steps never enter a schedule;
with `step` the same schedule is mapped to client steps (`step_schedule.py`).

The polynomial schedule is Zhu & Gupta (2017), "To prune, or not to prune":

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** p,   t0 <= t <= t1.

tfmot traps caught here, at the boundary (see docs/design.md, "Schedules"):
with `(end - begin) % frequency != 0` tfmot never reaches the final sparsity, and
`begin == end` yields NaN. Both are rejected with the nearest valid value.

Schedules are registered in `SCHEDULES` (`fedprune/registry.py`): one class
per schedule, its fields named like the config fields (= driver flags) it
reads, validated in its constructor, like tfmot's `PruningSchedule` classes.
`--schedule`'s choices and help come from the registry; a new schedule is one
registered `RoundSchedule` subclass (docs/extending.md).

This module does not import TensorFlow until `table()`, `__call__` or
`tfmot_schedule()` is called, so drivers can validate schedules before the slow
imports.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
from typing import ClassVar

import numpy as np

from fedprune.errors import check
from fedprune.registry import Registry

SCHEDULES: Registry[type[RoundSchedule]] = Registry("schedule", "sparsity schedule")


@dataclasses.dataclass(frozen=True)
class ScheduleTable:
    """A schedule evaluated at rounds 0..num_rounds (arrays of length num_rounds + 1).

    Attributes:
      updates: bool; `updates[r]` is True when the mask is recomputed after round r.
      target: float32; tfmot's sparsity value at step r (meaningful where `updates`).
      sparsity: float32; the sparsity of the mask in force after round r: the
        target of the last update at or before r, 0 before the first update.
      layer_sparsity: None (every pruned kernel at `sparsity[r]`), or float32 of
        shape [num_rounds + 1, pruned kernels]: each kernel's sparsity after
        round r (`--sparsity_distribution=erk`, `layer_budgets.with_layer_budgets`).
    """

    updates: np.ndarray
    target: np.ndarray
    sparsity: np.ndarray
    layer_sparsity: np.ndarray | None = None

    @property
    def num_rounds(self) -> int:
        return len(self.updates) - 1

    @property
    def started(self) -> np.ndarray:
        """bool; `started[r]` is True when a mask has been computed at or before round r."""
        return np.logical_or.accumulate(self.updates)


def schedule_data(table: ScheduleTable) -> collections.OrderedDict:
    """A table as data for the process's state (numpy arrays, R = num_rounds).

    The processes of `fedprune/federated/` read the schedule from their state,
    not from constants traced into their computations, so one built process
    serves every schedule, final sparsity and seed of a grid
    (`process.PruningProcess.for_cell`).

    Returns:
      `OrderedDict(updates=bool[R + 1], started=bool[R + 1], sparsity=float32
      [R + 1] or, with per-layer budgets, [R + 1, pruned kernels])`: the
      fields of `ScheduleTable` (`sparsity` is `layer_sparsity` when set).
    """
    sparsity = table.sparsity if table.layer_sparsity is None else table.layer_sparsity
    return collections.OrderedDict(updates=np.asarray(table.updates, bool),
                                   started=np.asarray(table.started, bool),
                                   sparsity=np.asarray(sparsity, np.float32))


def table_lookup(values, round_num):
    """`values[min(round_num, len - 1)]` as a TF tensor: rounds past a table repeat its end.

    Args:
      values: an array or tensor indexed by round along its first axis (a
        `ScheduleTable` field or a `schedule_data` entry).
      round_num: an integer scalar tensor.
    """
    import tensorflow as tf

    values = tf.convert_to_tensor(values)
    index = tf.minimum(tf.cast(round_num, tf.int32), tf.shape(values)[0] - 1)
    return tf.gather(values, index)


def kernel_sparsity(schedule, round_num):
    """The sparsity the mask rule keeps after `round_num` (TF tensor).

    Args:
      schedule: `schedule_data` (arrays or the state's tensors).

    Returns:
      A scalar (every pruned kernel alike), or with per-layer budgets a
      [pruned kernels] vector, which `masking.compute_masks` takes in place of
      the scalar.
    """
    return table_lookup(schedule["sparsity"], round_num)


class RoundSchedule(abc.ABC):
    """A sparsity schedule in rounds: tfmot's contract with one step per round.

    A subclass is a frozen dataclass whose fields are the config fields it
    reads (validated in `__post_init__`, raising `InvalidArgument`), registered
    in `SCHEDULES`. It either returns a tfmot schedule (`tfmot_schedule`), which
    `__call__` evaluates, or overrides `__call__` in plain Python. `table`
    evaluates it once per round for the process.

    Class attributes:
      name: the `--schedule` value.
      dense: True for a schedule that never prunes (`--masking=none` goes with it).
      last_update_flag: the flag that sets `last_update_round`, named when that
        round is past `--rounds`.
      tfmot_step_class: the tfmot class `tfmot_schedule` returns when the same
        class with its step arguments counted in client steps is this schedule
        at `--prune_granularity=step` (`step_schedule.py`); None: no step form.
    """

    name: ClassVar[str]
    dense: ClassVar[bool] = False
    last_update_flag: ClassVar[str] = "end_round"
    tfmot_step_class: ClassVar[str | None] = None

    def tfmot_schedule(self):
        """The tfmot schedule with one step per round, or None (`__call__` is overridden)."""
        return None

    def __call__(self, round_num: int) -> tuple[bool, float]:
        """(whether the mask is recomputed after round `round_num`, the sparsity then).

        tfmot's `PruningSchedule.__call__(step)` with step = round, as Python
        values; without a tfmot schedule, never (dense).
        """
        schedule = self.tfmot_schedule()
        if schedule is None:
            return False, 0.0
        import tensorflow as tf

        should_prune, sparsity = schedule(tf.constant(np.int64(round_num), tf.int64))
        return bool(should_prune), float(sparsity)

    @property
    def final_sparsity_value(self) -> float:
        """The sparsity this schedule ends at: its `final_sparsity` field (0 without one)."""
        return getattr(self, "final_sparsity", 0.0)

    @property
    @abc.abstractmethod
    def last_update_round(self) -> int:
        """The last round whose mask update changes the sparsity level (-1 if none)."""

    def last_mask_update_round(self, num_rounds: int) -> int:
        """The last round of a `num_rounds` run whose end recomputes the mask (0: none).

        By default the last level change; a schedule that keeps re-pruning at
        the same level (constant) overrides it.
        """
        del num_rounds
        return max(self.last_update_round, 0)

    def check_rounds(self, num_rounds: int) -> None:
        """Raises `InvalidArgument` unless the schedule completes within `num_rounds` rounds."""
        last = self.last_update_round
        check(last <= num_rounds, self.last_update_flag, last,
              f"a round <= --rounds={num_rounds}, so the schedule completes within the run")

    def table(self, num_rounds: int) -> ScheduleTable:
        """Evaluates the schedule at rounds 0..num_rounds (a tfmot one imports TensorFlow)."""
        updates = np.zeros(num_rounds + 1, bool)
        target = np.zeros(num_rounds + 1, np.float32)
        schedule = self.tfmot_schedule()
        if schedule is not None:
            import tensorflow as tf

            # Steps go in as numpy ints: TensorFlow 2.14 keeps every distinct
            # Python int it converts to a tensor in a process-wide cache (about
            # 680 bytes each, never evicted; issue 18), and a grid builds a table
            # per cell. The values, and so the schedule, are the same.
            for step in range(num_rounds + 1):
                should_prune, sparsity = schedule(tf.constant(np.int64(step), tf.int64))
                updates[step] = bool(should_prune)
                target[step] = float(sparsity)
        else:
            for step in range(num_rounds + 1):
                updates[step], target[step] = self(step)
        sparsity = np.zeros(num_rounds + 1, np.float32)
        current = np.float32(0.0)
        for r in range(num_rounds + 1):
            if updates[r]:
                current = target[r]
            sparsity[r] = current
        return ScheduleTable(updates=updates, target=target, sparsity=sparsity)

    def get_config(self) -> dict:
        """`{"schedule": name, <field>: value, ...}`; `from_config` reads it back."""
        return {"schedule": self.name, **dataclasses.asdict(self)}

    @staticmethod
    def from_config(config: dict) -> RoundSchedule:
        """The schedule `get_config` described (any registered one)."""
        return SCHEDULES.build(config["schedule"], config)


def _check_sparsity(name: str, value: float) -> None:
    check(0.0 <= value < 1.0, name, value, "a sparsity fraction in [0, 1)")


def _check_rounds(begin_round: int, end_round: int, prune_every: int, *, allow_open_end: bool):
    check(begin_round >= 0, "begin_round", begin_round, "a round >= 0 (0 prunes the initial model)")
    check(prune_every >= 1, "prune_every", prune_every, "a whole number of rounds >= 1")
    if allow_open_end and end_round == -1:
        return
    check(
        end_round >= begin_round,
        "end_round",
        end_round,
        f">= --begin_round={begin_round}" + (" or -1 (never end)" if allow_open_end else ""),
    )


@SCHEDULES.register("none", help="dense training, no mask is ever computed (with "
                    "--masking=none)")
@dataclasses.dataclass(frozen=True)
class NoPruning(RoundSchedule):
    """Dense training: no mask is ever computed."""

    name: ClassVar[str] = "none"
    dense: ClassVar[bool] = True

    @property
    def last_update_round(self) -> int:
        return -1


@SCHEDULES.register("constant", help="re-prune to --final_sparsity every --prune_every rounds "
                    "from --begin_round to --end_round (-1: to the end)")
@dataclasses.dataclass(frozen=True)
class ConstantSparsity(RoundSchedule):
    """Re-prunes to `final_sparsity` every `prune_every` rounds in [begin_round, end_round].

    `end_round=-1` keeps re-pruning until training stops (tfmot's convention).
    """

    final_sparsity: float
    begin_round: int = 0
    end_round: int = -1
    prune_every: int = 1

    name: ClassVar[str] = "constant"
    last_update_flag: ClassVar[str] = "begin_round"
    tfmot_step_class: ClassVar[str] = "ConstantSparsity"

    def __post_init__(self):
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_rounds(self.begin_round, self.end_round, self.prune_every, allow_open_end=True)

    def tfmot_schedule(self):
        import tensorflow_model_optimization as tfmot

        return tfmot.sparsity.keras.ConstantSparsity(
            target_sparsity=self.final_sparsity,
            begin_step=self.begin_round,
            end_step=self.end_round,
            frequency=self.prune_every,
        )

    @property
    def last_update_round(self) -> int:
        return self.begin_round

    def last_mask_update_round(self, num_rounds: int) -> int:
        """`--end_round`, or `num_rounds` when it re-prunes to the end (-1)."""
        return self.end_round if self.end_round >= 0 else num_rounds


@SCHEDULES.register("polynomial", help="from --initial_sparsity at --begin_round to "
                    "--final_sparsity at --end_round, exponent --power, every --prune_every "
                    "rounds (Zhu & Gupta 2017)")
@dataclasses.dataclass(frozen=True)
class PolynomialDecay(RoundSchedule):
    """Zhu & Gupta (2017) from `initial_sparsity` at begin_round to `final_sparsity` at end_round.

    The mask is recomputed every `prune_every` rounds from begin_round to
    end_round inclusive; (end_round - begin_round) must be a positive multiple
    of `prune_every`, otherwise tfmot would stop short of `final_sparsity`.
    """

    initial_sparsity: float
    final_sparsity: float
    begin_round: int
    end_round: int
    power: float = 3.0
    prune_every: int = 1

    name: ClassVar[str] = "polynomial"
    tfmot_step_class: ClassVar[str] = "PolynomialDecay"

    def __post_init__(self):
        _check_sparsity("initial_sparsity", self.initial_sparsity)
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_rounds(self.begin_round, self.end_round, self.prune_every, allow_open_end=False)
        # begin == end passes tfmot's validation but divides by zero (NaN sparsity).
        check(
            self.end_round > self.begin_round,
            "end_round",
            self.end_round,
            f"> --begin_round={self.begin_round} for a polynomial schedule "
            "(use --schedule=oneshot to prune at a single round)",
        )
        span = self.end_round - self.begin_round
        if span % self.prune_every:
            lower = self.begin_round + (span // self.prune_every) * self.prune_every
            check(
                False,
                "end_round",
                self.end_round,
                f"--begin_round + a multiple of --prune_every={self.prune_every} "
                f"(e.g. {lower} or {lower + self.prune_every}); otherwise tfmot never "
                "reaches --final_sparsity",
            )
        check(self.power > 0, "power", self.power, "a positive exponent (1 = linear, 3 = cubic)")

    def tfmot_schedule(self):
        import tensorflow_model_optimization as tfmot

        return tfmot.sparsity.keras.PolynomialDecay(
            initial_sparsity=self.initial_sparsity,
            final_sparsity=self.final_sparsity,
            begin_step=self.begin_round,
            end_step=self.end_round,
            power=self.power,
            frequency=self.prune_every,
        )

    @property
    def last_update_round(self) -> int:
        return self.end_round


@SCHEDULES.register("oneshot", help="prune once to --final_sparsity after round --begin_round "
                    "and keep that mask")
@dataclasses.dataclass(frozen=True)
class OneShot(RoundSchedule):
    """Jumps to `final_sparsity` at `begin_round` and keeps that mask.

    tfmot `ConstantSparsity` with begin_step == end_step: a single mask update.
    """

    final_sparsity: float
    begin_round: int = 0

    name: ClassVar[str] = "oneshot"
    last_update_flag: ClassVar[str] = "begin_round"
    tfmot_step_class: ClassVar[str] = "ConstantSparsity"

    def __post_init__(self):
        _check_sparsity("final_sparsity", self.final_sparsity)
        _check_rounds(self.begin_round, self.begin_round, 1, allow_open_end=False)

    def tfmot_schedule(self):
        import tensorflow_model_optimization as tfmot

        return tfmot.sparsity.keras.ConstantSparsity(
            target_sparsity=self.final_sparsity,
            begin_step=self.begin_round,
            end_step=self.begin_round,
            frequency=1,
        )

    @property
    def last_update_round(self) -> int:
        return self.begin_round


# What `make_schedule` passes for a parameter its caller leaves out.
_MAKE_SCHEDULE_DEFAULTS = dict(initial_sparsity=0.0, final_sparsity=0.0, begin_round=0,
                               end_round=-1, prune_every=1, power=3.0)


def make_schedule(schedule: str, **values) -> RoundSchedule:
    """Builds a registered schedule from flag-style arguments (names equal the driver flags).

    Each schedule takes the arguments it reads (its fields) and ignores the
    others: `constant` and `oneshot` use `final_sparsity` and `begin_round`
    (`constant` also `end_round`, `prune_every`). Left out: initial and final
    sparsity 0, begin round 0, end round -1, every round, power 3.

    Raises:
      InvalidArgument: for an unknown name or a value the schedule rejects.
    """
    return SCHEDULES.build(schedule, {**_MAKE_SCHEDULE_DEFAULTS, **values})
