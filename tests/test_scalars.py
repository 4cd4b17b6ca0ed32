"""fedprune.outputs.scalars: TensorBoard scalars of a round."""

import sys

from fedprune.outputs.scalars import ScalarWriter


def test_write_keeps_no_reference_to_the_step(tmp_path):
    # TensorFlow 2.14 keeps every distinct Python int it turns into a tensor in a
    # process-wide cache, holding a reference to it, never emptied (issue 18): the
    # round goes in as a numpy int.
    writer = ScalarWriter(tmp_path)
    step = int("1234568")  # a fresh int object
    before = sys.getrefcount(step)
    writer.write(step, {"loss": 1.0, "accuracy": 0.5})
    writer.flush()
    assert sys.getrefcount(step) == before
    assert list(tmp_path.iterdir())
