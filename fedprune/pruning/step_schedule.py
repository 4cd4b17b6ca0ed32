"""Schedules in client steps: the round -> step mapping of `--prune_granularity=step`.

With `--prune_granularity=round` (the default) one tfmot step is one federated
round on the server (`schedules.py`). With `step`, the clients' tfmot wrappers
carry the run's schedule in **client steps** (local batches) and tfmot's own
`conditional_mask_update` recomputes each client's mask inside local training.
The mapping is explicit, with `spr = steps_per_round`:

    begin_step = begin_round * spr
    end_step   = end_round * spr          (-1 stays -1: ConstantSparsity never stops)
    frequency  = prune_every_steps        (in steps; --prune_every must stay 1)

and the server's global step after round r is `r * spr`: the finalizer writes
it into every wrapper's `pruning_step`, so round r's clients start counting
from `(r - 1) * spr`. A client with n batches runs steps `(r-1)*spr + 1 ...
(r-1)*spr + n`: one with more batches than `spr` advances further into the
schedule within the round (and a later round starts it again from the server's
step), one with fewer stops short. `spr` defaults to the mean client's local
steps per round, `mean_local_steps` (`--steps_per_round=0`).

Only schedules whose class names a `tfmot_step_class` map (`step_schedules()`:
`polynomial` as PolynomialDecay, `constant` and `oneshot` as ConstantSparsity;
a registered extension schedule maps the same way). Only what tfmot's wrapper
computes maps: magnitude per layer, unstructured, `2:4` (`sparsity_m_by_n`) or
`block` on rank-2 kernels (`block_size`, `block_pooling_type`). Everything
else is refused with `InvalidArgument` naming the flag (`validate_step_args`,
before TensorFlow is imported).

The server still works per round: `step_table` evaluates the step schedule at
steps 0..rounds*spr and summarizes it per round (a mask update falls in round r
when one of its steps is in ((r-1)*spr, r*spr]; the level in force after round
r is tfmot's sparsity at the last update step <= r*spr), the `ScheduleTable`
the server re-mask (`--masking=both`) and the `target_sparsity` column use.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedprune.errors import check
from fedprune.pruning.schedules import SCHEDULES

GRANULARITIES = ("round", "step")
STEP_STRUCTURES = ("unstructured", "2:4", "block")
# Models whose pruned kernels are all rank 2 (tfmot's block_size needs rank 2).
RANK2_MODELS = ("mlp", "mlp2", "rnn")


def step_schedules() -> tuple[str, ...]:
    """The registered `--schedule` names with a form in client steps (a `tfmot_step_class`)."""
    return tuple(entry.name for entry in SCHEDULES.entries() if entry.target.tfmot_step_class)


def validate_step_args(*, prune_granularity: str, steps_per_round: int, prune_every_steps: int,
                       schedule, num_rounds: int, mask_criterion: str, mask_scope: str,
                       structure: str, model: str, dataset: str) -> None:
    """Checks the granularity flags and what `step` supports (no TensorFlow).

    Args:
      schedule: the run's `schedules.RoundSchedule` (validated).
      num_rounds: `--rounds`.

    Raises:
      InvalidArgument: naming the first offending flag.
    """
    check(prune_granularity in GRANULARITIES, "prune_granularity", prune_granularity,
          "one of " + "|".join(GRANULARITIES))
    check(steps_per_round >= 0, "steps_per_round", steps_per_round,
          "a whole number of client steps >= 0 (0 = the mean client's local steps)")
    check(prune_every_steps >= 1, "prune_every_steps", prune_every_steps,
          "a whole number of client steps >= 1")
    if prune_granularity == "round":
        check(steps_per_round == 0, "steps_per_round", steps_per_round,
              "0 (its default) unless --prune_granularity=step")
        check(prune_every_steps == 1, "prune_every_steps", prune_every_steps,
              "1 (its default) unless --prune_granularity=step")
        return
    step = "with --prune_granularity=step"
    check(schedule.tfmot_step_class is not None, "schedule", schedule.name,
          f"one of {'|'.join(step_schedules())} {step} (tfmot has a step schedule for them)")
    every = getattr(schedule, "prune_every", 1)
    check(every == 1, "prune_every", every,
          f"1 {step} (the frequency in steps is --prune_every_steps)")
    check(mask_criterion == "magnitude", "mask_criterion", mask_criterion,
          f"magnitude {step} (tfmot's wrapper prunes by magnitude)")
    check(mask_scope == "layer", "mask_scope", mask_scope,
          f"layer {step} (tfmot's wrapper ranks each layer's weights)")
    check(structure in STEP_STRUCTURES, "structure", structure,
          f"one of {'|'.join(STEP_STRUCTURES)} {step} (tfmot's wrapper has no unit pruning)")
    if structure == "block":
        check(model in RANK2_MODELS, "model", model,
              f"one of {'|'.join(RANK2_MODELS)} with --structure=block {step} (tfmot's "
              "block_size needs rank-2 kernels; convolutions are rank 4)")
    # Client steps start at 1 (the wrapper counts a batch before using the step),
    # so a schedule whose last mask update is at round 0 would never prune.
    last = schedule.last_mask_update_round(num_rounds)
    flag = "end_round" if getattr(schedule, "end_round", None) == last else "begin_round"
    check(last != 0, flag, last,
          f"a round >= 1 for --schedule={schedule.name} {step} (step 0 is never a client step)")
    if steps_per_round == 0:
        check(dataset != "shakespeare", "steps_per_round", steps_per_round,
              "a whole number >= 1 with --dataset=shakespeare (its client sizes count "
              "snippets, not batches)")
    elif schedule.tfmot_step_class == "PolynomialDecay":
        check_frequency(schedule.begin_round, schedule.end_round, steps_per_round,
                        prune_every_steps)


def check_frequency(begin_round: int, end_round: int, steps_per_round: int,
                    prune_every_steps: int) -> None:
    """tfmot's polynomial trap in steps: the frequency must divide end_step - begin_step."""
    span = (end_round - begin_round) * steps_per_round
    if span % prune_every_steps:
        divisors = [d for d in range(1, span + 1) if span % d == 0]
        nearest = sorted(divisors, key=lambda d: abs(d - prune_every_steps))[:2]
        check(False, "prune_every_steps", prune_every_steps,
              f"a divisor of (end_round - begin_round) * steps_per_round = {span} "
              f"(e.g. {' or '.join(map(str, sorted(nearest)))}); otherwise tfmot never "
              "reaches --final_sparsity")


def local_steps(num_examples: int, *, local_epochs: int, batch_size: int,
                max_examples: int | None = None) -> int:
    """A client's local steps in one round: ceil(local_epochs * m / batch_size), m capped.

    The client pipeline repeats the (capped) examples `local_epochs` times and
    then batches (`datasets.preprocess_client_dataset`).
    """
    m = min(num_examples, max_examples) if max_examples else num_examples
    return -(-local_epochs * m // batch_size)


def mean_local_steps(sizes, *, local_epochs: int, batch_size: int,
                     max_examples: int | None = None) -> int:
    """The default `steps_per_round`: the clients' mean local steps, rounded half up, >= 1."""
    steps = [local_steps(m, local_epochs=local_epochs, batch_size=batch_size,
                         max_examples=max_examples) for m in sizes]
    return max(int(math.floor(float(np.mean(steps)) + 0.5)), 1)


@dataclasses.dataclass(frozen=True)
class StepMapping:
    """The round -> step mapping of one run (recorded in config.json).

    Attributes:
      steps_per_round: client steps one round stands for; the server's global
        step after round r is `r * steps_per_round`.
      begin_step, end_step, frequency: the step schedule's tfmot arguments.
      schedule_class: the tfmot class, `PolynomialDecay` or `ConstantSparsity`.
      source: how `steps_per_round` was chosen.
    """

    steps_per_round: int
    begin_step: int
    end_step: int
    frequency: int
    schedule_class: str
    source: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def step_mapping(schedule, *, steps_per_round: int, prune_every_steps: int,
                 source: str = "--steps_per_round") -> StepMapping:
    """Maps a round schedule's tfmot arguments to client steps.

    Args:
      schedule: a `schedules.RoundSchedule` backed by tfmot's `PolynomialDecay`
        or `ConstantSparsity`.
      steps_per_round: >= 1.
      prune_every_steps: the step schedule's frequency.
      source: recorded with the mapping.

    Raises:
      InvalidArgument: for a schedule tfmot has no class for, or a frequency
        that does not divide a polynomial schedule's span.
    """
    check(schedule.tfmot_step_class is not None, "schedule", schedule.name,
          f"one of {'|'.join(step_schedules())} with --prune_granularity=step")
    check(steps_per_round >= 1, "steps_per_round", steps_per_round, "a whole number >= 1")
    config = schedule.tfmot_schedule().get_config()
    kind, args = config["class_name"], config["config"]
    check(kind == schedule.tfmot_step_class, "schedule", schedule.name,
          f"a schedule whose tfmot_schedule() is its tfmot_step_class "
          f"{schedule.tfmot_step_class} (it returned {kind})")
    end = args["end_step"]
    if kind == "PolynomialDecay":
        check_frequency(args["begin_step"], end, steps_per_round, prune_every_steps)
    return StepMapping(steps_per_round=steps_per_round,
                       begin_step=args["begin_step"] * steps_per_round,
                       end_step=end * steps_per_round if end >= 0 else -1,
                       frequency=prune_every_steps, schedule_class=kind, source=source)


def tfmot_step_schedule(schedule, mapping: StepMapping):
    """The tfmot schedule of `schedule` in client steps (`mapping`'s steps, same sparsities)."""
    import tensorflow_model_optimization as tfmot

    config = schedule.tfmot_schedule().get_config()["config"]
    config.update(begin_step=mapping.begin_step, end_step=mapping.end_step,
                  frequency=mapping.frequency)
    return getattr(tfmot.sparsity.keras, mapping.schedule_class)(**config)


def step_table(step_schedule, *, num_rounds: int, steps_per_round: int):
    """The per-round `ScheduleTable` of a schedule in steps (imports TensorFlow).

    `updates[r]`: a mask update at some step in ((r-1)*spr, r*spr] (step 0 for
    r = 0); `target[r]` and `sparsity[r]`: tfmot's sparsity at the last update
    step <= r*spr (0 before the first).
    """
    import tensorflow as tf

    from fedprune.pruning.schedules import ScheduleTable

    steps = np.arange(num_rounds * steps_per_round + 1, dtype=np.int64)
    should, level = step_schedule(tf.constant(steps))
    should = np.asarray(should, bool)
    level = np.broadcast_to(np.asarray(level, np.float32), steps.shape)
    updates = np.zeros(num_rounds + 1, bool)
    sparsity = np.zeros(num_rounds + 1, np.float32)
    current = np.float32(0.0)
    for r in range(num_rounds + 1):
        window = slice(max((r - 1) * steps_per_round + 1, 0), r * steps_per_round + 1)
        hits = np.flatnonzero(should[window])
        if hits.size:
            updates[r] = True
            current = level[window][hits[-1]]
        sparsity[r] = current
    return ScheduleTable(updates=updates, target=sparsity.copy(), sparsity=sparsity)


def wrapper_params(mask_spec) -> dict:
    """tfmot `prune_low_magnitude` arguments for a mask rule (`block_size`, `sparsity_m_by_n`).

    Raises:
      InvalidArgument: for a rule tfmot's wrapper does not compute.
    """
    check(mask_spec.mask_criterion == "magnitude" and mask_spec.mask_scope == "layer",
          "mask_criterion", mask_spec.mask_criterion,
          "magnitude with --mask_scope=layer and --prune_granularity=step")
    check(mask_spec.structure in STEP_STRUCTURES, "structure", mask_spec.structure,
          f"one of {'|'.join(STEP_STRUCTURES)} with --prune_granularity=step")
    if mask_spec.structure == "2:4":
        return {"sparsity_m_by_n": (2, 4)}
    if mask_spec.structure == "block":
        return {"block_size": tuple(mask_spec.block_size),
                "block_pooling_type": mask_spec.block_pooling}
    return {}
