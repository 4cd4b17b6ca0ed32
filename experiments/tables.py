"""The tables of RESULTS.md: the registry `TABLES` and one `TableSpec` per table.

A table is data, not code: a `TableSpec` (title, description, metrics and
their tolerances, optional parts) registered with `register_table`, plus its
flagfiles and expected values in `experiments/configs/` (`table<N>.flags`,
`table<N>_ci.flags`, `table<N>[_ci]_expected.json`).
`python -m experiments.reproduce --table=N` runs it; `--table`'s choices and
help come from `TABLES`. A table of one's own can keep its files in another
folder (`configs`) and be registered from a module passed with
`--extensions` (docs/extending.md).

Importing this module is cheap (no TensorFlow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from fedprune.registry import Registry

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "experiments" / "configs"
SIZES = ("full", "ci")

TABLES: Registry[TableSpec] = Registry("table", "table")


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One table of RESULTS.md.

    Attributes:
      number: N in `--table=N`, the markers and the file names.
      title: the section heading.
      description: Markdown shown above the table (what it compares, how to read it).
      metrics: columns, names from `grid_results.METRICS`, in order.
      tolerances: metric -> the largest accepted |value - expected| of a row's mean;
        metrics without one (e.g. machine-dependent round times) are shown, not checked.
        A paired column is checked as `delta_<metric>`.
      paired: metrics also shown as the paired difference to the dense row of the
        same seed, each right after its metric's column (`delta_<metric>`, headed
        `Δ <label> vs dense`): mean ± 95 % CI of the per-seed differences
        (`grid_results.aggregate`). A row whose seeds differ from the dense row's
        is an error, never an unpaired mean.
      baseline: key values of the dense row beside `grid.DENSE_KEY` (schedule
        dense, sparsity 0, masking none, granularity round), for tables whose
        dense rows differ from the pruned rows in another key too (e.g.
        `{"structure": "unstructured"}`); the other keys (model, noise
        multiplier) are matched with the row's own.
      parts: for a table made of several grids (e.g. one per model): their names;
        part P reads `table<N>.flags`, then `table<N>_<P>.flags` (then the ci file
        and, where it exists, `table<N>_<P>_ci.flags`), and its cells are named
        `<P>-<cell>`. Empty: one grid.
      configs: the folder of its flagfiles and expected values.
    """

    number: int
    title: str
    description: str
    metrics: tuple[str, ...]
    tolerances: dict[str, float]
    parts: tuple[str, ...] = ()
    configs: Path = CONFIGS
    paired: tuple[str, ...] = ()
    baseline: dict[str, Any] = dataclasses.field(default_factory=dict)

    def flagfiles(self, size: str, part: str | None = None) -> list[Path]:
        """The flagfiles a grid (of one part) reads, in order; later files win."""
        files = [self.configs / f"table{self.number}.flags"]
        if part is not None:
            files.append(self.configs / f"table{self.number}_{part}.flags")
        if size == "ci":
            files.append(self.configs / f"table{self.number}_ci.flags")
            if part is not None and self._part_ci(part).is_file():
                files.append(self._part_ci(part))
        return files

    def _part_ci(self, part: str) -> Path:
        return self.configs / f"table{self.number}_{part}_ci.flags"

    def all_flagfiles(self, size: str) -> list[Path]:
        """Every flagfile of the table, each once: the base, the parts', then the ci ones."""
        parts = [self.configs / f"table{self.number}_{part}.flags" for part in self.parts]
        files = self.flagfiles(size)
        part_ci = ([self._part_ci(p) for p in self.parts if self._part_ci(p).is_file()]
                   if size == "ci" else [])
        return files[:1] + parts + files[1:] + part_ci

    def expected_path(self, size: str) -> Path:
        suffix = "" if size == "full" else f"_{size}"
        return self.configs / f"table{self.number}{suffix}_expected.json"


def register_table(spec: TableSpec) -> TableSpec:
    """Adds a table to `TABLES` under its number; its help is the title after "Table N: "."""
    return TABLES.add(spec.number, spec, help=spec.title.split(": ", 1)[-1], params=())


# Why these tolerances. On this machine a run is bit-deterministic: every seed is
# a pure function of (seed, round), a cell gives identical metrics.csv whether
# it runs first or after other cells in the process, or in another process.
# Another CPU (other SIMD paths in Eigen/oneDNN, another thread count) rounds
# floats differently and, after 30 rounds of training, moves the final test
# accuracy by a few of the 360 test images (1 image = 0.0028): ±0.02 absolute
# (7 images) on a row's mean over seeds accepts that and still catches a real
# regression (a broken schedule or mask costs far more). The paired difference
# to dense gets the same ±0.02: its mean is the row's mean accuracy minus the
# dense row's, both moved by the same kind of small float differences, so it
# is within ±0.02 whenever each moves by less than ±0.01 (a few images on a
# 5-seed mean); it is checked on its own because it is what the table is read
# for, and it catches a change of the dense row that every pruned row's Δ
# then shows. Sparsity, nonzeros and bytes are set by mask sizes (top-k per
# layer), so they are exact, up to 1e-6 for sparsity as a float; under client
# masking they come from the union of the clients' masks, where float noise
# could move a weight across the threshold on another CPU: re-baseline with
# --write_results there rather than widening the tolerance for everyone.
_TOLERANCES = {"accuracy": 0.02, "delta_accuracy": 0.02, "sparsity": 1e-6, "nonzeros": 0.0,
               "bytes_down": 0.0, "bytes_up": 0.0}

# Table 2's runs add unseeded DP noise, so accuracy differs between reruns on the
# same machine. Measured: rerunning the six 90 % z > 0 cells moved single seeds by
# up to 0.14 and the row means by 0.013-0.015 (per-seed spread ~0.07 at z = 1, so
# the mean of 3 seeds has ~0.04 stddev): +-0.15 on a row mean accepts that with
# margin. What pins the mechanism down is exact: epsilon (computed from the
# configuration alone, 1e-6), sparsity, nonzeros (noise makes every kept weight
# nonzero) and bytes down (set by the nonzeros and the seeded client sample).
_DP_TOLERANCES = {"accuracy": 0.15, "epsilon": 1e-6, "sparsity": 1e-6, "nonzeros": 0.0,
                  "bytes_down": 0.0}

register_table(TableSpec(
    number=1,
    title="Table 1: masking mode × pruning granularity × schedule × final sparsity (digits)",
    description=(
        "FedAvg on the embedded digits data (scikit-learn's 8×8 digits: 1,437 training "
        "images split among 10 clients by Dirichlet(α = 0.5) label skew, 360 test images), "
        "the seeds' MLP, all 10 clients every round, 30 rounds; the schedules prune over "
        "rounds 1–20. Masking (`--masking`): `server`: clients train inside the broadcast "
        "mask and the server re-masks the average to the schedule's level; `client`: clients "
        "prune their trained kernels and the server only averages, so the global mask is the "
        "union of the clients' masks, as sparse as the target or denser (global sparsity ≤ "
        "final_sparsity); `both`: client pruning and the server's re-mask. Granularity "
        "(`--prune_granularity`, for the modes whose clients prune): `round`: clients prune "
        "at the end of local training, one schedule step per round; `step`: tfmot prunes "
        "inside local training with its own schedule in client steps (rounds × the mean "
        "client's local steps per round, a mask update every step); `server` and `dense` "
        "rows are `round` (no one prunes inside local training). Schedules: `dense` (no "
        "pruning, `--masking=none`), `constant` (prune to the target after round 1 and "
        "re-prune to it every round, or every client step, through round 20), "
        "`polynomial-p3` (Zhu & Gupta 2017, cubic from 0 at round 1 to the target at round "
        "20). There is no `oneshot` row: at round granularity `constant` is the same "
        "computation as `oneshot`, bit for bit (pruned weights are exact zeros that cannot "
        "regrow, so re-pruning finds the same weights; "
        "`tests/test_mode_differences.py::test_constant_equals_oneshot_at_round_granularity`), "
        "so one row stands for both. No two rows are equal by construction.\n\n"
        "Cells are mean ± 95 % Student-t CI over 5 seeds. The seed fixes the partition, the "
        "initialization and the clients' batch order, and every row runs the same 5 seeds, "
        "so any two rows can be compared seed by seed. `Δ test accuracy vs dense` is that "
        "paired comparison with the dense row: per seed, the row's accuracy minus the dense "
        "run's of the same seed, mean ± 95 % CI of the 5 differences (the mean is the "
        "difference of the two accuracy means; the interval is that of the per-seed "
        "differences, narrower than the two accuracy intervals when the seeds that are good "
        "for dense are good for the pruned row too). An interval that excludes 0 is a "
        "difference to dense on these seeds. Between two pruned rows the difference of their "
        "Δ means is the difference of their accuracy means, but the Δ intervals do not bound "
        "it (each is relative to dense): compare such rows by their accuracy intervals, or "
        "pair them seed by seed from the runs' summary.json in the run tree. `client` rows "
        "can keep more weights than the `server` and `both` rows of the same final_sparsity "
        "(the union of the clients' masks; global sparsity and nonzero params show how "
        "many), so they are compared at their own density.\n\n"
        "Accuracy and sparsity (fraction of zeros in the prunable Dense kernels) are after "
        "the last round; nonzeros count every trainable parameter, biases included; bytes "
        "are the mean per round of what an efficient encoding sends (dense, bitmap + values, "
        "coordinates, or values inside a known mask, whichever is smallest), summed over the "
        "round's 10 clients.\n\n"
        "Checks. On one machine a run is bit-reproducible given its seed. The expected "
        "values accept ±0.02 in a row's mean accuracy and in its Δ, because another CPU's "
        "float rounding moves a run's accuracy by a few of the 360 test images (1 image = "
        "0.0028), and nothing in sparsity (1e-6 as a float), nonzeros and bytes, which mask "
        "sizes fix; a broken schedule, mask or aggregation changes those exact columns, or "
        "moves accuracy by more. The tolerance is a regression check, not a significance "
        "threshold: differences between rows smaller than 0.02 are read from the intervals. "
        "The test suite checks the table's ci size (`experiments/configs/table1_ci.flags`: "
        "the same code paths on a few clients, rounds and 2 seeds) with the same tolerances."),
    metrics=("accuracy", "sparsity", "nonzeros", "bytes_down", "bytes_up"),
    tolerances=_TOLERANCES,
    paired=("accuracy",),
))
register_table(TableSpec(
    number=2,
    title="Table 2: differential privacy × sparsity (digits, 100 clients)",
    description=(
        "Client-level DP-FedAvg (McMahan et al. 2018) with TFF's "
        "`DifferentiallyPrivateFactory`: every sampled client's whole update is clipped to "
        "L2 norm 0.3, Gaussian noise of stddev z · 0.3 is added to the sum and the sum is "
        "divided by the expected 20 clients; the server multiplies the noised mean by the "
        "public broadcast mask (post-processing: the model stays exactly sparse and only "
        "the kept coordinates carry noise) and then re-masks. Digits split among 100 "
        "clients (Dirichlet 0.5), each sampled independently with probability 0.2 every "
        "round (Poisson), 50 rounds, the seeds' MLP; `dense` is unpruned DP-FedAvg, the "
        "pruned rows prune with the cubic schedule over rounds 1–30 by server masking. "
        "ε is at δ = 1e-5 by dp-accounting's PLD accountant for "
        "`PoissonSampledDpEvent(0.2, Gaussian(z))` composed 50 times (RDP: 11.3 at "
        "z = 1, 42.9 at z = 0.5; metrics.csv has both); z = 0 clips without noise: no "
        "guarantee (ε = inf). "
        "Mean ± 95 % CI over 3 seeds. TFF's DP noise is not seeded (by design: a stored "
        "seed would let anyone remove it), so reruns differ in accuracy; see the tolerances."),
    metrics=("accuracy", "epsilon", "sparsity", "nonzeros", "bytes_down"),
    tolerances=_DP_TOLERANCES,
))

# Table 3: rounds times depend on the machine and its load: shown, never checked. The
# CNN's convolutions round differently on another CPU (oneDNN picks its kernels by the
# instruction set), enough to move a few of its 84,426 weights to or off exactly zero: on
# a second machine of this workplace the ci CNN rows differed by 1-2 nonzeros and by
# 1,623-2,236 of ~1.85 MB of bytes up (a zero in a client's update is not sent). 4
# nonzeros and 4 KiB up accept that; params, mult-adds and bytes down (set by the
# server's masks) stay exact.
_TOLERANCES_3 = {"accuracy": 0.02, "nonzeros": 4.0, "params": 0.0, "macs": 0.0,
                 "bytes_down": 0.0, "bytes_up": 4096.0}
register_table(TableSpec(
    number=3,
    title="Table 3: unstructured vs neuron/filter pruning at equal parameter budgets (digits)",
    description=(
        "FedAvg on the embedded digits data as in Table 1 (10 clients, Dirichlet(α = 0.5), "
        "30 rounds, all clients every round), server masking, the cubic polynomial schedule "
        "over rounds 1..20; the output layer is never pruned. `neuron` removes units of the "
        "MLP's hidden layer (64-128-10: 32 of 128 units kept, sparsity 0.75), `filter` removes "
        "channels of both convolutions of the CNN (Conv 5×5 32 → MaxPool → Conv 5×5 64 → "
        "MaxPool → Dense 512 → Dense 10 on the 8×8 images: half the filters kept, sparsity "
        "0.5), scored by the L2 norm of their incoming weights; after round 20 the global "
        "model is physically shrunk (`--shrink_at_round=-1`) and trains 10 more rounds dense "
        "on the smaller model. `unstructured` prunes the same layers' kernels (global "
        "magnitude ranking) to the sparsity that leaves exactly the same number of nonzero "
        "parameters: MLP 1 − 992/8,192 = 0.87890625 (992 + 128 + 1,290 = 2,410 = 32·64 + 32 + "
        "32·10 + 10), CNN 1 − 78,688/183,072 (78,688 + 5,738 = 84,426 = the shrunk CNN). "
        "`dense` is the unpruned model. Mean ± 95 % CI over 3 seeds. Accuracy after the last "
        "round; nonzeros: nonzero trainable parameters; params: parameters of the model as "
        "stored (unstructured zeros are still stored and computed); mult-adds/example: "
        "multiply-adds of one forward pass of the stored model (Dense and Conv layers); "
        "bytes per round of the efficient encodings, summed over the round's 10 clients; "
        "round after pruning: median seconds of the rounds after round 20 (machine- and "
        "load-dependent, not checked against the expected values)."),
    metrics=("accuracy", "nonzeros", "params", "macs", "bytes_down", "bytes_up",
             "round_seconds_final"),
    tolerances=_TOLERANCES_3,
    parts=("mlp", "mlp_neuron", "cnn", "cnn_filter"),
))

# Table 4: accuracy as Table 1's; sparsity, nonzeros and bytes as Table 1's (the both
# rows' masks come from the clients' votes, exact on one machine); rounds to 90 % of
# dense: a row's mean over 5 seeds moves by 0.2 for each seed whose run crosses the
# target a round earlier or later on another CPU, so 1.0 accepts that for a few seeds;
# the fraction of seeds reaching it, 0.2: one of the 5 runs crossing the target.
# Round time depends on the machine and its load: shown, never checked.
_TOLERANCES_4 = {"accuracy": 0.02, "delta_accuracy": 0.02, "sparsity": 1e-6, "nonzeros": 0.0,
                 "total_bytes_down": 0.0, "total_bytes_up": 0.0, "rounds_to_90": 1.0,
                 "reached_90": 0.2}
register_table(TableSpec(
    number=4,
    title="Table 4: federated dynamic sparse training: static vs SET vs RigL, at the server "
          "and at the clients, uniform and ERK budgets (digits)",
    description=(
        "FedAvg on the embedded digits data as in Table 1 (10 clients, Dirichlet(α = 0.5), "
        "30 rounds, all clients every round, the seeds' MLP 64-128-10). Every pruned row is "
        "pruned by magnitude to its sparsity after round 1 (`oneshot`). `static` (`regrow` "
        "none) keeps that topology; the others adjust it after every round up to round 22: "
        "they drop the smallest-magnitude fraction f_r of each layer's kept weights and "
        "grow as many pruned ones, at zero, f_r = 0.3 decaying by a cosine to 0 at round 22 "
        "(RigL's schedule; rounds 23–30 train the last topology), so every layer stays "
        "exactly at its level. `random` is SET (Mocanu et al. 2018: grow at random), "
        "`gradient` RigL (Evci et al. 2020: grow where the dense gradient's magnitude is "
        "largest). `regrow_at` server: the server adjusts the global mask after its re-mask "
        "(FedTiny / jaxpruner style); for RigL every client uploads, per pruned kernel, its "
        "largest dense-gradient coordinates among the pruned ones as (index, value) pairs, "
        "counted in the bytes up. `client` (FedDST, Bibikar et al. 2022; masking `both` "
        "only): each client drops and grows inside its own mask with its own gradient, "
        "uploads that mask, and the server re-masks the aggregate to the level. "
        "`sparsity_distribution` `erk`: Erdős–Rényi-kernel per-layer densities (RigL), "
        "scaled so the global sparsity is the target; `uniform`: every layer at the target. "
        "`server` rows: clients train inside the broadcast mask and the server re-masks; "
        "`both`: clients also prune their own kernels (`docs/design.md`, masking modes). "
        "Every row aggregates with `--mask_aggregation=average` (Table 1's), FedDST's sparse "
        "average (`nonzero`) included, so that rows differ only in their topology rule.\n\n"
        "Global sparsity counts exact zeros of the pruned kernels. Every mask holds exactly "
        "its level's count after every adjustment (`tests/test_regrowth.py`), but a weight "
        "grown at zero stays zero while its gradient is zero, e.g. when its hidden unit is "
        "inactive (ReLU) on all of the clients' data, so a regrowing row can end slightly "
        "sparser than its target (here by at most 0.0007).\n\n"
        "Mean ± 95 % CI over 5 seeds; `Δ test accuracy vs dense` is paired with the dense "
        "run of the same seed (mean ± 95 % CI of the per-seed differences). Down/up total: "
        "everything sent over the 30 rounds, all clients, in the efficient encodings "
        "(masks, RigL's gradient coordinates and the clients' masks included). Rounds to "
        "90 % of dense: the first round whose test accuracy reaches 0.9 × the final test "
        "accuracy of the dense run of the same seed (`experiments/grid_results.py`, "
        "`rounds_to_target`); `inf` when a seed's run never reaches it in the 30 rounds (a "
        "row's mean is then inf). Seeds reaching 90 % of dense: the fraction of the row's "
        "5 runs that reach it at all (1.0: all five; mean ± CI of their 0/1 values). "
        "Median round: the median wall seconds of a run's 30 rounds "
        "(the round's inputs, `process.next` and the evaluation; 21 of the 30 are "
        "adjustment rounds), so it holds the cost of the adjustments and of RigL's "
        "dense-gradient pass; "
        "measured while the grid trained two runs at a time on the 2 cores, so comparable "
        "between rows, machine- and load-dependent, and not checked."),
    metrics=("accuracy", "sparsity", "nonzeros", "total_bytes_down", "total_bytes_up",
             "rounds_to_90", "reached_90", "round_seconds"),
    tolerances=_TOLERANCES_4,
    paired=("accuracy",),
))

# Table 5: bytes are set by the masks and the updates' zeros (int8 rounding is seeded: a
# pure function of the run's seed and round); the up compression is their ratio. A
# flatbuffer's raw size is set by the architecture and the names of its tensors, which
# carry Keras' layer names (`dense_7` or `dense_116`, by how many models the process
# built before): 128 bytes
# accept that (measured: 6 bytes between two runs). The zipped size also depends on the
# final weights' bits, which another CPU's float rounding moves: 512 bytes (~1.4 % of
# the dense MLP zipped) accept that and catch a model that lost its zeros (the 90 %
# model zips to about a third). Latency depends on the machine and its load: shown,
# never checked.
# Bytes up count the nonzeros of each client's update (a zero is not sent), and another
# CPU's float rounding moves a few coordinates to or off exactly zero (features that are
# zero in a client's data leave their weights' updates exactly zero): on a third machine
# of this workplace the ci int8 dense row's bytes up per round moved by 1 of 35,572 (its
# compression by 1.2e-4). 64 bytes and 0.01 accept that and catch an upload that lost
# its sparsity or its quantization (kilobytes; a factor of 2 or more).
_TOLERANCES_5 = {"accuracy": 0.02, "delta_accuracy": 0.02, "nonzeros": 0.0, "bytes_up": 64.0,
                 "compression_up": 0.01, "tflite_bytes": 128.0, "tflite_zipped": 512.0,
                 "tflite_sparse": 128.0}
register_table(TableSpec(
    number=5,
    title="Table 5: quantized uploads × sparsity, and the deployed model's size and latency "
          "(digits)",
    description=(
        "FedAvg on the embedded digits data as in Table 1 (10 clients, Dirichlet(α = 0.5), "
        "30 rounds, all clients every round, the cubic schedule over rounds 1–20), the "
        "seeds' MLP 64-128-10. `upload_quantization` (`--upload_quantization`) is the wire "
        "format of the values every client uploads: `none` float32, `fp16` IEEE half "
        "precision, `int8` a per-tensor scale max|x|/127 and unbiased stochastic rounding "
        "(`fedprune/federated/quantization.py`); the server dequantizes before averaging, "
        "inside TFF's aggregator. Only kept values are sent: under `server` masking the "
        "values inside the broadcast mask, under `both` the client's own kept values plus "
        "its mask as a bitmap or coordinates, which quantization does not shrink. Dense "
        "rows (`masking` none) upload the whole update at that width. The `neuron` row "
        "keeps 13 of the 128 hidden units (sparsity 0.9, the output layer unpruned, "
        "float32 uploads) and is shrunk after round 20 to a 64-13-10 MLP, which it deploys; "
        "the other rows deploy the final weights at full size.\n\n"
        "Mean ± 95 % CI over 5 seeds; `Δ test accuracy vs dense` is paired with the dense "
        "float32 run of the same seed (mean ± 95 % CI of the per-seed differences), so the "
        "quantized dense rows show what quantizing alone costs: here nothing measurable "
        "(their runs differ from float32's, in the test loss from the 4th-5th digit, but "
        "reach the same final test accuracy on every seed; not equal by construction). "
        "Up/round: bytes all 10 "
        "clients upload in a round, the mean over the 30 rounds; up compression: what "
        "float32 dense uploads would have been over what was sent, all rounds. The "
        "deployed model (`--deploy`, `fedprune/outputs/deployment.py`): `model/model.tflite` "
        "of the final model (float32; quantization here is of the uploads only), its size "
        "raw and deflate-zipped, the pruned model at full size in TFLite's sparse format "
        "(`EXPERIMENTAL_SPARSITY`), and the TFLite interpreter's latency (one thread, "
        "median of 50 invokes after 10 warm-up ones; each run measured after its training, "
        "so machine- and load-dependent and not checked). A float32 flatbuffer keeps "
        "its zeros: pruning shrinks it only zipped or in the sparse format, and the "
        "latency of these small Dense layers does not fall with unstructured sparsity; "
        "the neuron row's shrunk model is smaller raw and faster."),
    metrics=("accuracy", "nonzeros", "bytes_up", "compression_up", "tflite_bytes",
             "tflite_zipped", "tflite_sparse", "latency_1", "latency_64"),
    tolerances=_TOLERANCES_5,
    parts=("unstructured", "neuron"),
    paired=("accuracy",),
    baseline={"upload_quantization": "none", "structure": "unstructured"},
))
