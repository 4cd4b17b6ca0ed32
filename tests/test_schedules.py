"""Round schedules: tfmot's schedules evaluated per round against the formulas."""

import numpy as np
import pytest

from fedprune.errors import InvalidArgument
from fedprune.pruning import schedules


def zhu_gupta(t, s_i, s_f, t0, t1, p):
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** p."""
    return s_f + (s_i - s_f) * (1 - (t - t0) / (t1 - t0)) ** p


@pytest.mark.parametrize("power", [1, 3])
@pytest.mark.parametrize("t0, t1", [(0, 10), (2, 6)])
def test_polynomial_matches_zhu_gupta(power, t0, t1):
    schedule = schedules.PolynomialDecay(0.1, 0.9, t0, t1, power=power)
    table = schedule.table(t1 + 3)
    for t in (t0, (t0 + t1) // 2, t1):
        assert table.updates[t]
        assert table.sparsity[t] == pytest.approx(zhu_gupta(t, 0.1, 0.9, t0, t1, power), abs=1e-6)
    # Outside [t0, t1] the mask is not recomputed; after t1 the final sparsity stays.
    assert not table.updates[: t0].any() and not table.updates[t1 + 1 :].any()
    assert (table.sparsity[: t0] == 0).all()
    np.testing.assert_allclose(table.sparsity[t1:], 0.9, atol=1e-7)


def test_polynomial_frequency_updates_every_k_rounds():
    table = schedules.PolynomialDecay(0.0, 0.8, 1, 7, power=1, prune_every=3).table(9)
    np.testing.assert_array_equal(np.flatnonzero(table.updates), [1, 4, 7])
    # Between updates the sparsity in force is that of the last update.
    np.testing.assert_allclose(table.sparsity, [0, 0, 0, 0, 0.4, 0.4, 0.4, 0.8, 0.8, 0.8],
                               atol=1e-6)


@pytest.mark.parametrize(
    "schedule, updates, final",
    [
        (schedules.NoPruning(), [], 0.0),
        (schedules.OneShot(0.75, begin_round=2), [2], 0.75),
        (schedules.ConstantSparsity(0.5, begin_round=1, end_round=3), [1, 2, 3], 0.5),
        (schedules.ConstantSparsity(0.5, begin_round=0, prune_every=2), [0, 2, 4], 0.5),
    ],
)
def test_other_schedules(schedule, updates, final):
    table = schedule.table(5)
    np.testing.assert_array_equal(np.flatnonzero(table.updates), updates)
    assert table.sparsity[-1] == pytest.approx(final)
    assert schedule.final_sparsity_value == final


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        (dict(schedule="cosine"), "schedule"),
        (dict(schedule="polynomial", final_sparsity=1.0, end_round=5), "final_sparsity"),
        (dict(schedule="polynomial", initial_sparsity=-0.1, end_round=5), "initial_sparsity"),
        (dict(schedule="polynomial", begin_round=4, end_round=4), "end_round"),  # tfmot: NaN
        (dict(schedule="polynomial", begin_round=0, end_round=10, prune_every=3), "end_round"),
        (dict(schedule="polynomial", begin_round=5, end_round=2), "end_round"),
        (dict(schedule="polynomial", end_round=4, power=0), "power"),
        (dict(schedule="constant", final_sparsity=0.5, begin_round=-1), "begin_round"),
        (dict(schedule="constant", final_sparsity=0.5, prune_every=0), "prune_every"),
    ],
)
def test_bad_arguments_name_the_flag(kwargs, flag):
    with pytest.raises(InvalidArgument, match=f"^--{flag}="):
        schedules.make_schedule(**kwargs)


def test_frequency_trap_message_suggests_valid_end():
    with pytest.raises(InvalidArgument, match=r"e\.g\. 9 or 12"):
        schedules.make_schedule("polynomial", begin_round=0, end_round=10, prune_every=3)


def test_validation_does_not_import_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys; from fedprune.pruning import schedules, masking;"
        "schedules.make_schedule('polynomial', final_sparsity=0.5, end_round=4);"
        "masking.MaskSpec(mask_criterion='threshold', threshold=0.1);"
        "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", schedules.SCHEDULES.names())
def test_every_schedule_table_is_its_call_per_round(name):
    # tfmot's contract, round by round: the table is `schedule(r)` for r = 0..rounds.
    schedule = schedules.make_schedule(name, final_sparsity=0.6, begin_round=1, end_round=4)
    table = schedule.table(6)
    for r in range(7):
        updates, sparsity = schedule(r)
        assert table.updates[r] == updates
        if updates:
            assert table.target[r] == pytest.approx(sparsity, abs=1e-7)
    assert table.sparsity[-1] == pytest.approx(schedule.final_sparsity_value, abs=1e-7)
    assert table.updates.any() == (not schedule.dense)


def test_a_schedule_in_plain_python_needs_no_tfmot_schedule():
    import dataclasses
    from typing import ClassVar

    @dataclasses.dataclass(frozen=True)
    class Halves(schedules.RoundSchedule):
        """0.4 after round 1, 0.6 after round 2 (registered nowhere: only `table` is used)."""

        name: ClassVar[str] = "halves"

        def __call__(self, round_num):
            return round_num in (1, 2), {1: 0.4, 2: 0.6}.get(round_num, 0.6)

        final_sparsity_value = 0.6
        last_update_round = 2

    table = Halves().table(3)
    np.testing.assert_array_equal(table.updates, [False, True, True, False])
    np.testing.assert_allclose(table.sparsity, [0, 0.4, 0.6, 0.6], atol=1e-7)


def test_schedule_rounds_reach_tensorflow_as_numpy_ints(monkeypatch):
    # TensorFlow 2.14 keeps every distinct Python int it turns into a tensor in a
    # process-wide cache, never emptied (issue 18); a table per grid cell would add
    # one entry per round each time.
    import sys

    import tensorflow as tf

    given = []
    original = tf.constant

    def recording(value, *args, **kwargs):
        given.append(type(value))
        return original(value, *args, **kwargs)

    monkeypatch.setattr(tf, "constant", recording)
    schedule = schedules.PolynomialDecay(0.0, 0.8, 1, 7, power=1)
    schedule.table(9)
    assert given == [np.int64] * 10
    round_num = int("123457")  # a fresh int object: the cache would hold a reference to it
    before = sys.getrefcount(round_num)
    assert schedule(round_num) == (False, pytest.approx(0.8))
    assert sys.getrefcount(round_num) == before
