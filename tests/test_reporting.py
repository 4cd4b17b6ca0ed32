"""Tests for fedprune.outputs.reporting: atomic files, intervals, tables, plots."""

import csv
import math
import os

import numpy as np
import pytest

from fedprune.outputs import reporting

# --------------------------------------------------------------------------
# Statistics.


class TestMeanCi:
    def test_three_values_by_hand(self):
        # mean 2, s = 1, t_{0.975, 2} = 4.302652729911275: half width 4.3027 / sqrt(3) = 2.4841.
        mean, half = reporting.mean_ci([1, 2, 3])
        assert mean == 2.0
        assert half == pytest.approx(4.302652729911275 / math.sqrt(3), rel=1e-12)
        assert half == pytest.approx(2.4841, abs=1e-4)

    def test_other_confidence(self):
        # t_{0.995, 2} = 9.924843200918276 (scipy.stats.t.ppf(0.995, 2)).
        assert reporting.mean_ci([1, 2, 3], 0.99)[1] == pytest.approx(9.924843200918276 / 3**0.5)

    def test_two_values(self):
        # mean 0.91, s = 0.02 / sqrt(2), t_{0.975, 1} = 12.706204736432095: half = 12.706 * 0.01.
        mean, half = reporting.mean_ci([0.90, 0.92])
        assert (mean, half) == pytest.approx((0.91, 0.12706204736432095))

    def test_single_value_has_nan_half_width(self):
        mean, half = reporting.mean_ci([0.7])
        assert mean == 0.7 and math.isnan(half)

    def test_infinite_values_have_nan_half_width_and_no_warning(self):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mean, half = reporting.mean_ci([math.inf, math.inf, math.inf])
        assert mean == math.inf and math.isnan(half)

    def test_constant_values_have_zero_half_width(self):
        assert reporting.mean_ci([4.0, 4.0, 4.0]) == (4.0, 0.0)

    @pytest.mark.parametrize("values, confidence", [([], 0.95), ([1, 2], 1.0), ([1, 2], 0.0)])
    def test_rejects(self, values, confidence):
        with pytest.raises(ValueError):
            reporting.mean_ci(values, confidence)


class TestPairedMeanCi:
    # Seeds' values [0.90, 0.92, 0.91] against dense [0.93, 0.94, 0.92]: differences
    # [-0.03, -0.02, -0.01], mean -0.02, s = 0.01, half width t_{0.975, 2} * 0.01 / sqrt(3)
    # = 4.302652729911275 * 0.01 / 1.7320508 = 0.024841.
    VALUES = {0: 0.90, 1: 0.92, 2: 0.91}
    DENSE = {0: 0.93, 1: 0.94, 2: 0.92}

    def test_three_seeds_by_hand(self):
        mean, half = reporting.paired_mean_ci(self.VALUES, self.DENSE)
        assert mean == pytest.approx(-0.02, abs=1e-12)
        assert half == pytest.approx(4.302652729911275 * 0.01 / math.sqrt(3), rel=1e-9)
        assert half == pytest.approx(0.02484, abs=1e-5)

    def test_is_not_the_difference_of_two_intervals(self):
        # The pruned run is 0.02 below dense on every seed: the differences have no
        # spread, so the paired interval is 0, while each configuration's own interval
        # is wider than 0.12 (pairing removes the seed-to-seed spread both share).
        values, dense = {0: 0.80, 1: 0.90, 2: 0.85}, {0: 0.82, 1: 0.92, 2: 0.87}
        mean, half = reporting.paired_mean_ci(values, dense)
        assert mean == pytest.approx(-0.02) and half == pytest.approx(0.0, abs=1e-12)
        assert reporting.mean_ci(values.values())[1] > 0.12

    def test_pairs_by_unit_not_by_order(self):
        reordered = dict(reversed(list(self.DENSE.items())))
        assert reporting.paired_mean_ci(self.VALUES, reordered) == pytest.approx(
            reporting.paired_mean_ci(self.VALUES, self.DENSE))

    def test_single_unit_has_nan_half_width(self):
        mean, half = reporting.paired_mean_ci({3: 0.5}, {3: 0.75})
        assert mean == -0.25 and math.isnan(half)

    def test_unmatched_units_are_named(self):
        with pytest.raises(reporting.UnpairedError,
                           match=r"\[3\] only in the values, \[1\] only in the baseline"):
            reporting.paired_mean_ci({0: 0.9, 2: 0.9, 3: 0.9}, {0: 0.9, 1: 0.9, 2: 0.9})
        with pytest.raises(reporting.UnpairedError, match="no units"):
            reporting.paired_mean_ci({}, {})


PAIRED_ROWS = [
    {"schedule": s, "masking": m, "seed": seed, "accuracy": a}
    for s, m, values in [("dense", "none", (0.93, 0.94, 0.92)),
                         ("oneshot", "server", (0.90, 0.92, 0.91)),
                         ("oneshot", "client", (0.95, 0.91, 0.94))]
    for seed, a in zip((0, 1, 2), values, strict=True)
]
DENSE_BASELINE = {"schedule": "dense", "masking": "none", "granularity": "round"}


class TestAddPaired:
    def test_columns_are_paired_differences_by_seed(self):
        table = reporting.aggregate(PAIRED_ROWS, ["schedule", "masking"], ["accuracy"])
        paired = reporting.add_paired(table, PAIRED_ROWS, ["accuracy"], DENSE_BASELINE)
        assert paired.metrics == ("accuracy", "delta_accuracy")
        # Each paired column right after its metric's.
        two = reporting.aggregate([{**r, "loss": 1.0} for r in PAIRED_ROWS],
                                  ["schedule", "masking"], ["accuracy", "loss"])
        assert reporting.add_paired(two, [{**r, "loss": 1.0} for r in PAIRED_ROWS],
                                    ["accuracy"], DENSE_BASELINE).metrics == (
            "accuracy", "delta_accuracy", "loss")
        dense, server, client = paired.groups
        assert (dense.mean["delta_accuracy"], dense.ci["delta_accuracy"]) == (0.0, 0.0)
        # server: [-0.03, -0.02, -0.01] as in TestPairedMeanCi.
        assert server.mean["delta_accuracy"] == pytest.approx(-0.02, abs=1e-12)
        assert server.ci["delta_accuracy"] == pytest.approx(0.024841, abs=1e-6)
        # client: [+0.02, -0.03, +0.02], mean 1/300, s = 0.028868, half 0.071713.
        assert client.mean["delta_accuracy"] == pytest.approx(0.01 / 3, abs=1e-12)
        assert client.ci["delta_accuracy"] == pytest.approx(
            4.302652729911275 * np.std([0.02, -0.03, 0.02], ddof=1) / math.sqrt(3), rel=1e-9)
        # The other columns are untouched.
        assert [g.mean["accuracy"] for g in paired.groups] == [g.mean["accuracy"]
                                                               for g in table.groups]

    def test_written_like_the_other_columns(self, tmp_path):
        table = reporting.add_paired(
            reporting.aggregate(PAIRED_ROWS, ["schedule", "masking"], ["accuracy"]),
            PAIRED_ROWS, ["accuracy"], DENSE_BASELINE)
        markdown = reporting.to_markdown(table, {"accuracy": ".3f", "delta_accuracy": ".3f"})
        assert markdown.splitlines()[3] == (
            "| oneshot | server | 3 | 0.910 ± 0.025 | -0.020 ± 0.025 |")
        assert "-0.020 $\\pm$ 0.025" in reporting.to_latex(table, {"delta_accuracy": ".3f"})
        back = list(csv.DictReader(reporting.to_csv(table, tmp_path / "t.csv").open()))
        assert list(back[0])[-2:] == ["delta_accuracy_mean", "delta_accuracy_ci"]
        assert float(back[1]["delta_accuracy_mean"]) == pytest.approx(-0.02, abs=1e-12)

    def test_baseline_matches_the_other_keys(self):
        # One dense row per noise multiplier: each pruned row pairs with its own.
        rows = [{**r, "z": z, "accuracy": r["accuracy"] - z} for r in PAIRED_ROWS[:6]
                for z in (0.0, 1.0)]
        table = reporting.aggregate(rows, ["schedule", "masking", "z"], ["accuracy"])
        paired = reporting.add_paired(table, rows, ["accuracy"], DENSE_BASELINE)
        by_key = {g.key: g.mean["delta_accuracy"] for g in paired.groups}
        assert by_key[("oneshot", "server", 1.0)] == pytest.approx(-0.02, abs=1e-12)
        assert by_key[("oneshot", "server", 0.0)] == pytest.approx(-0.02, abs=1e-12)

    def test_unmatched_seed_names_the_row_and_the_seeds(self):
        rows = [r for r in PAIRED_ROWS if not (r["masking"] == "client" and r["seed"] == 1)]
        rows.append({**PAIRED_ROWS[-1], "seed": 7})
        table = reporting.aggregate(rows, ["schedule", "masking"], ["accuracy"])
        with pytest.raises(reporting.UnpairedError) as e:
            reporting.add_paired(table, rows, ["accuracy"], DENSE_BASELINE)
        assert str(e.value) == (
            "schedule=oneshot masking=client: seeds do not match its baseline row "
            "schedule=dense masking=none's: [7] only in this row, [1] only in the baseline")

    def test_missing_baseline_row_and_repeated_seed_are_errors(self):
        rows = PAIRED_ROWS[3:]
        table = reporting.aggregate(rows, ["schedule", "masking"], ["accuracy"])
        with pytest.raises(reporting.UnpairedError,
                           match="schedule=oneshot masking=server: no baseline row "
                                 "schedule=dense masking=none"):
            reporting.add_paired(table, rows, ["accuracy"], DENSE_BASELINE)
        rows = [*PAIRED_ROWS, PAIRED_ROWS[0]]
        table = reporting.aggregate(rows, ["schedule", "masking"], ["accuracy"])
        with pytest.raises(reporting.UnpairedError, match="masking=none: seed 0 appears twice"):
            reporting.add_paired(table, rows, ["accuracy"], DENSE_BASELINE)


# --------------------------------------------------------------------------
# Tables.

ROWS = [
    dict(zip(["schedule", "final_sparsity", "seed", "accuracy", "bytes_up"], values, strict=True))
    for values in [
        ("constant", 0.5, 0, 0.90, 100 * 1024),
        ("poly_decay", 0.8, 0, 0.85, 50 * 1024),
        ("constant", 0.5, 1, 0.92, 102 * 1024),
    ]
]
# constant: accuracy 0.91 +- 12.706 * 0.01 = 0.127; bytes_up 101 KiB +- 12.706 * 1 KiB.
# poly_decay: a single seed, so no interval.


@pytest.fixture
def table():
    return reporting.aggregate(ROWS, ["schedule", "final_sparsity"], ["accuracy", "bytes_up"])


class TestAggregate:
    def test_groups_in_order_of_first_appearance(self, table):
        assert [g.key for g in table.groups] == [("constant", 0.5), ("poly_decay", 0.8)]
        assert [g.n for g in table.groups] == [2, 1]
        constant = table.groups[0]
        assert constant.mean["accuracy"] == pytest.approx(0.91)
        assert constant.ci["accuracy"] == pytest.approx(0.12706204736432095)
        assert constant.mean["bytes_up"] == 101 * 1024
        assert constant.ci["bytes_up"] == pytest.approx(12.706204736432095 * 1024)
        assert math.isnan(table.groups[1].ci["accuracy"])

    def test_numeric_strings_from_csv(self):
        rows = [{k: str(v) for k, v in r.items()} for r in ROWS]
        got = reporting.aggregate(rows, ["schedule"], ["accuracy"])
        assert got.groups[0].mean["accuracy"] == pytest.approx(0.91)

    def test_missing_metric(self):
        with pytest.raises(KeyError, match="lacks"):
            reporting.aggregate([{"schedule": "x"}], ["schedule"], ["accuracy"])


def test_markdown(table):
    got = reporting.to_markdown(table, {"accuracy": reporting.ACCURACY, "bytes_up": reporting.KIB})
    assert got == (
        "| schedule | final_sparsity | n | accuracy | bytes_up (KiB) |\n"
        "| :-- | :-- | --: | --: | --: |\n"
        "| constant | 0.5 | 2 | 0.910 ± 0.127 | 101.0 ± 12.7 |\n"
        "| poly_decay | 0.8 | 1 | 0.850 | 50.0 |\n"
    )


def test_markdown_bare_spec_default_format_and_pipes():
    rows = [{"masking": "a|b", "loss": 1234.5678, "accuracy": 0.5}]
    got = reporting.to_markdown(
        reporting.aggregate(rows, ["masking"], ["loss", "accuracy"]), {"loss": ".1f"}
    )
    assert got.splitlines()[2] == r"| a\|b | 1 | 1234.6 | 0.5 |"


def test_unknown_format_metric_is_rejected(table):
    with pytest.raises(ValueError, match="not in the table"):
        reporting.to_markdown(table, {"acc": ".3f"})


def test_latex(table):
    got = reporting.to_latex(table, {"accuracy": reporting.PERCENT, "bytes_up": reporting.KIB})
    assert got == (
        "\\begin{tabular}{llrrr}\n"
        "\\toprule\n"
        "schedule & final\\_sparsity & n & accuracy (\\%) & bytes\\_up (KiB) \\\\\n"
        "\\midrule\n"
        "constant & 0.5 & 2 & 91.0 $\\pm$ 12.7 & 101.0 $\\pm$ 12.7 \\\\\n"
        "poly\\_decay & 0.8 & 1 & 85.0 & 50.0 \\\\\n"
        "\\bottomrule\n"
        "\\end{tabular}\n"
    )


def test_latex_escape():
    assert reporting.latex_escape("a_b 5% R&D $x #1 {y} ~^\\") == (
        r"a\_b 5\% R\&D \$x \#1 \{y\} \textasciitilde{}\textasciicircum{}\textbackslash{}"
    )


def test_csv_round_trip(table, tmp_path):
    path = reporting.to_csv(table, tmp_path / "table.csv")
    back = list(csv.DictReader(path.open()))
    assert list(back[0]) == [
        "schedule", "final_sparsity", "n",
        "accuracy_mean", "accuracy_ci", "bytes_up_mean", "bytes_up_ci",
    ]  # fmt: skip
    for row, group in zip(back, table.groups, strict=True):
        assert (row["schedule"], float(row["final_sparsity"])) == group.key
        assert int(row["n"]) == group.n
        for m in table.metrics:
            np.testing.assert_array_equal(float(row[f"{m}_mean"]), group.mean[m])
            np.testing.assert_array_equal(float(row[f"{m}_ci"]), group.ci[m])  # nan == nan
    assert back[1]["accuracy_ci"] == "nan"
    assert os.listdir(tmp_path) == ["table.csv"]


def test_importing_does_not_load_heavy_modules():
    import subprocess
    import sys

    code = (
        "import sys, fedprune.outputs.reporting, fedprune.outputs.plots, "
        "fedprune.federated.communication; "
        "print(sorted(m for m in ('tensorflow', 'matplotlib', 'scipy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_replace_marked_sections_keeps_the_rest_and_places_new_sections_in_order():
    def markers(name):
        return f"<!-- {name} -->", f"<!-- /{name} -->"

    text = reporting.replace_marked_sections("# Title\n", {"c": "C1", "a": "A1"}, markers,
                                             order=("a", "b", "c"))
    assert text == "# Title\n\n<!-- a -->\nA1\n<!-- /a -->\n\n<!-- c -->\nC1\n<!-- /c -->\n"
    text = reporting.replace_marked_sections(text + "notes\n", {"b": "B", "a": r"A2 \1"},
                                             markers, order=("a", "b", "c"))
    assert text == ("# Title\n\n<!-- a -->\nA2 \\1\n<!-- /a -->\n\n<!-- b -->\nB\n<!-- /b -->"
                    "\n\n<!-- c -->\nC1\n<!-- /c -->\nnotes\n")
