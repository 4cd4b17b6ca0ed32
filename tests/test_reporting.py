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
