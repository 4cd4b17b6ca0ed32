"""TensorBoard scalars of a round's metrics.csv row, in one compiled call per round.

`tf.summary.scalar` called eagerly once per column costs ~0.4 ms each (~35
columns: ~13 ms a round on a 2-core machine, as much as the evaluation).
`ScalarWriter.write` writes the same scalars (float32, the round as the step)
from one `tf.function` per set of column names (a run has at most a few: rounds
that evaluate and rounds that do not), so a round pays one call.

TensorFlow is imported inside the class only.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np


class ScalarWriter:
    """Writes {name: float} at a step to TensorBoard event files under `log_dir`."""

    def __init__(self, log_dir: str | Path):
        import tensorflow as tf

        self._tf = tf
        self._writer = tf.summary.create_file_writer(str(log_dir))
        self._functions = {}  # column names -> its compiled writer

    def write(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per entry of `values` at `step` (the round)."""
        tf = self._tf
        names = tuple(values)
        function = self._functions.get(names)
        if function is None:
            writer = self._writer

            @tf.function(autograph=False)  # a Python loop over the names: nothing to convert
            def function(step, vector):
                with writer.as_default(step=step):
                    for i, name in enumerate(names):
                        tf.summary.scalar(name, vector[i])

            self._functions[names] = function
        # The step as a numpy int, not a Python int: TensorFlow 2.14 caches every
        # distinct Python int it converts to a tensor, for good (issue 18).
        function(tf.constant(np.int64(step), tf.int64),
                 tf.constant([float(values[name]) for name in names], tf.float32))

    def flush(self) -> None:
        self._writer.flush()
