r"""Regenerates a table of RESULTS.md from its checked-in flagfiles and checks it.

    python -m experiments.reproduce --table=1                  # full size, check only
    python -m experiments.reproduce --table=1 --write_results  # and rewrite RESULTS.md
    python -m experiments.reproduce --table=1 --size=ci        # the tiny variant the tests run

A table is a grid (see `experiments/grid.py`) whose base configuration and
grid flags come only from flagfiles under `experiments/configs/`: the size
`full` reads `table<N>.flags`, the size `ci` reads `table<N>.flags` and then
`table<N>_ci.flags` (a few clients, rounds and cells; the same code paths). No
experiment or grid flag is accepted on the command line, so the command in
RESULTS.md is the whole recipe; `experiments.compare_schedules
--flagfile=experiments/configs/table<N>.flags` runs the same grid.

The runs go to --output_dir (default `runs/table<N>-<size>`); complete runs
there are reused, so a second invocation only re-checks. The table is printed
and compared with the committed expected values (`table<N>_expected.json`,
`table<N>_ci_expected.json`, or --expected): exit status 1 and one line per
value outside its tolerance when they differ. --write_results instead stores
the new values as expected and, for the full size, rewrites the table's section
of RESULTS.md between `<!-- table<N>:start -->` and `<!-- table<N>:end -->`
(atomically) with the command, hardware and time. That is the only way
RESULTS.md is written.

Adding a table (e.g. 2: differential privacy, 3: structured shrinking) is
adding a `TableSpec` to `TABLES` and its flagfiles; a new grid dimension goes
into `experiments/grid.py`. A table whose rows need different base flags
(Table 3: other models, structures and sparsities) lists `parts`: each part
is its own grid over `table<N>.flags` + `table<N>_<part>.flags`, and the
table's rows gain `model`/`structure` columns when those differ.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

from absl import flags

from experiments import common, grid, grid_results, usage
from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument, check
from fedprune.outputs import atomic_files, reporting

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "experiments" / "configs"
SIZES = ("full", "ci")


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
      parts: for a table made of several grids (e.g. one per model): their names;
        part P reads `table<N>.flags`, then `table<N>_<P>.flags` (then the ci file),
        and its cells are named `<P>-<cell>`. Empty: one grid.
    """

    number: int
    title: str
    description: str
    metrics: tuple[str, ...]
    tolerances: dict[str, float]
    parts: tuple[str, ...] = ()

    def flagfiles(self, size: str, part: str | None = None) -> list[Path]:
        files = [CONFIGS / f"table{self.number}.flags"]
        if part is not None:
            files.append(CONFIGS / f"table{self.number}_{part}.flags")
        if size == "ci":
            files.append(CONFIGS / f"table{self.number}_ci.flags")
        return files

    def all_flagfiles(self, size: str) -> list[Path]:
        """Every flagfile of the table, each once, in reading order."""
        parts = [CONFIGS / f"table{self.number}_{part}.flags" for part in self.parts]
        files = self.flagfiles(size)
        return files[:1] + parts + files[1:]

    def expected_path(self, size: str) -> Path:
        suffix = "" if size == "full" else f"_{size}"
        return CONFIGS / f"table{self.number}{suffix}_expected.json"


# Why these tolerances. On this machine a run is bit-deterministic: every seed is
# a pure function of (seed, round), a cell gives identical metrics.csv whether
# it runs first or after other cells in the process, or in another process.
# Another CPU (other SIMD paths in Eigen/oneDNN, another thread count) rounds
# floats differently and, after 30 rounds of training, moves the final test
# accuracy by a few of the 360 test images (1 image = 0.0028): ±0.02 absolute
# accepts that and still catches a real regression (a broken schedule or mask
# costs far more). Sparsity, nonzeros and bytes are set by mask sizes (top-k per
# layer), so they are exact, up to 1e-6 for sparsity as a float; under client
# masking they come from the union of the clients' masks, where float noise
# could move a weight across the threshold on another CPU: re-baseline with
# --write_results there rather than widening the tolerance for everyone.
_TOLERANCES = {"accuracy": 0.02, "sparsity": 1e-6, "nonzeros": 0.0, "bytes_down": 0.0,
               "bytes_up": 0.0}

# Table 2's runs add unseeded DP noise, so accuracy differs between reruns on the
# same machine. Measured: rerunning the six 90 % z > 0 cells moved single seeds by
# up to 0.14 and the row means by 0.013-0.015 (per-seed spread ~0.07 at z = 1, so
# the mean of 3 seeds has ~0.04 stddev): +-0.15 on a row mean accepts that with
# margin. What pins the mechanism down is exact: epsilon (computed from the
# configuration alone, 1e-6), sparsity, nonzeros (noise makes every kept weight
# nonzero) and bytes down (set by the nonzeros and the seeded client sample).
_DP_TOLERANCES = {"accuracy": 0.15, "epsilon": 1e-6, "sparsity": 1e-6, "nonzeros": 0.0,
                  "bytes_down": 0.0}

TABLES = {
    1: TableSpec(
        number=1,
        title="Table 1: sparsity schedules × final sparsity × masking (digits)",
        description=(
            "FedAvg on the embedded digits data (scikit-learn's 8×8 digits: 1,437 training "
            "images split among 10 clients by Dirichlet(α = 0.5) label skew, 360 test images), "
            "the seeds' MLP, all 10 clients every round. Schedules: `dense` (no pruning, "
            "`--masking=none`), `oneshot` (prune once after round `--begin_round`, keep the "
            "mask), `constant` (re-prune to the target every round from `--begin_round` to "
            "`--end_round`), `polynomial-p1`/`-p3` (Zhu & Gupta 2017, linear/cubic from 0 at "
            "`--begin_round` to the target at `--end_round`). Masking: `client` (clients "
            "prune, the server only averages, so the average of different masks is denser "
            "than the target), `server` (the server re-masks after averaging), `both`. "
            "Cells are mean ± 95 % Student-t CI over 3 seeds (partition, initialization, "
            "sampling and shuffling all follow the seed). Accuracy and sparsity (fraction "
            "of zeros in the prunable Dense kernels) are after the last round; nonzeros count "
            "every trainable parameter, biases included; bytes are the mean per round "
            "of what an efficient encoding sends (dense, bitmap + values, coordinates, or "
            "values inside a known mask, whichever is smallest), summed over the round's "
            "10 clients."),
        metrics=("accuracy", "sparsity", "nonzeros", "bytes_down", "bytes_up"),
        tolerances=_TOLERANCES,
    ),
    2: TableSpec(
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
    ),
}

# Table 3: rounds times depend on the machine and its load: shown, never checked.
_TOLERANCES_3 = {"accuracy": 0.02, "nonzeros": 0.0, "params": 0.0, "flops": 0.0,
                 "bytes_down": 0.0, "bytes_up": 0.0}
TABLES[3] = TableSpec(
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
    metrics=("accuracy", "nonzeros", "params", "flops", "bytes_down", "bytes_up",
             "round_seconds_final"),
    tolerances=_TOLERANCES_3,
    parts=("mlp", "mlp_neuron", "cnn", "cnn_filter"),
)

_TABLE = flags.DEFINE_integer("table", None, "The table of RESULTS.md to regenerate.")
_SIZE = flags.DEFINE_enum("size", "full", SIZES, "full: the published grid; ci: a tiny "
                          "variant (few clients, rounds and cells) for the test suite.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", "", "Root of the run tree "
                                  "(default: runs/table<N>-<size>); complete runs are reused.")
_EXPECTED = flags.DEFINE_string("expected", "", "Expected-values JSON (default: "
                                "experiments/configs/table<N>[_ci]_expected.json).")
_RESULTS = flags.DEFINE_string("results", "", "The RESULTS.md that --write_results rewrites "
                               "for --size=full (default: the repository's RESULTS.md).")
_WRITE_RESULTS = flags.DEFINE_bool("write_results", False, "Store the new values as expected "
                                   "and, for --size=full, rewrite the table in --results.")
_ROUND_LOGS = flags.DEFINE_bool("round_logs", False, "Print every run's per-round lines.")
common.define_experiment_flags()  # the flagfiles set these; only --verbose/--tff_workers here
grid.define_grid_flags()
usage.set_topic("table", _TABLE, _SIZE)
usage.set_topic(usage.OUTPUTS, _OUTPUT_DIR, _EXPECTED, _RESULTS, _WRITE_RESULTS, _ROUND_LOGS)
usage.not_accepted([*(f.name for f in dataclasses.fields(ExperimentConfig)), *grid.GRID_FLAGS,
                    "flagfile"],
                   "the table's flagfiles in experiments/configs/ set them (python -m "
                   "experiments.compare_schedules runs a grid of your own)",
                   shown_as="--flagfile, the experiment flags (python -m experiments.run --help) "
                            "and the grid flags (--schedules, --seeds, ...)")
FLAGS = flags.FLAGS
_RUNTIME_FLAGS = ("verbose", "tff_workers")


# --------------------------------------------------------------------------
# RESULTS.md.

_RESULTS_HEADER = """# Results

Every table below is written by `python -m experiments.reproduce --table=N
--write_results` and by nothing else; edit `experiments/reproduce.py` or the
flagfiles in `experiments/configs/`, never this file. Each section names the
command that regenerates it, the flagfiles, the hardware and the time it took.
Without `--write_results` the same command re-runs (or reuses) the runs and
checks them against `experiments/configs/table<N>_expected.json`.

Each table also has a `ci` size, the one the test suite runs
(`tests/test_compare_reproduce.py`): `python -m experiments.reproduce --table=N
--size=ci` reads `experiments/configs/table<N>_ci.flags` after the table's own
flagfiles (a few clients, rounds and cells, the same code paths) and checks
`experiments/configs/table<N>_ci_expected.json`, written by the same command
with `--write_results`. The `ci` numbers are not the tables', but they mean
something: each size is chosen so the models learn (test accuracy 0.65-0.89 on
10 classes, chance 0.1; each flagfile says how and what it costs: Table 1
4 clients × 3 rounds, Table 2 ~24 of 30 clients a round × 8 rounds so that
DP noise at z = 1 still lets the model learn, Table 3 4 clients × 5 rounds
with the shrink after round 3), and the tests fail when an expected or a
rerun accuracy is not above 0.5, so a model broken down to chance cannot
match its expected values.
"""


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def record_invocation(root: Path, *, trained: int, seconds: float) -> list[dict]:
    """Appends an invocation that trained runs to `<root>/invocations.json`; returns all.

    RESULTS.md reports the time of the invocations that trained the runs, also
    when a later invocation (e.g. with --write_results) only reuses them.
    """
    path = root / "invocations.json"
    invocations = (atomic_files.read_json(path) or {}).get("invocations", [])
    if trained:
        invocations.append({"date": time.strftime("%Y-%m-%d %H:%M"), "runs_trained": trained,
                            "seconds": seconds, "load_average_1min": os.getloadavg()[0]})
        atomic_files.atomic_write_json(path, {"invocations": invocations})
    return invocations


def render_section(spec: TableSpec, table: reporting.Table, results: list,
                   invocations: list[dict], root: Path) -> str:
    """The Markdown of a table's RESULTS.md section (without the markers).

    Args:
      spec: the table.
      table: its aggregated values.
      results: the runs (`grid_results.load_results`), found under `root`.
      invocations: from `record_invocation`, for the time it took.
      root: the run tree; the runs' config.json name the commit they were trained at.
    """
    from fedprune.outputs import provenance

    # The code a grid runs is imported by its first run: name the commit its config.json recorded
    # (later runs record HEAD at their start, which can move while a long grid runs).
    first = (atomic_files.read_json(root / results[0].cell.name / "config.json") or {})

    flagfile = spec.flagfiles("full")[0]
    flag_lines = []
    for path in spec.all_flagfiles("full"):
        if len(spec.all_flagfiles("full")) > 1:
            flag_lines.append(f"# {path.relative_to(REPO)}")
        flag_lines += [line for line in path.read_text().splitlines()
                       if line.strip() and not line.lstrip().startswith("#")]
    files = [str(p.relative_to(REPO)) for p in spec.all_flagfiles("full")]
    if spec.parts:
        same_grid = (f"each part P of {', '.join(spec.parts)} is a grid: `python -m "
                     f"experiments.compare_schedules --flagfile={flagfile.relative_to(REPO)} "
                     f"--flagfile=experiments/configs/table{spec.number}_P.flags`")
    else:
        same_grid = (f"the same grid: `python -m experiments.compare_schedules "
                     f"--flagfile={flagfile.relative_to(REPO)} "
                     f"--output_dir=runs/table{spec.number}`")
    train_seconds = sum(r.summary["wall_seconds"] for r in results)
    took = sum(i["seconds"] for i in invocations)
    loads = ", ".join(f"{i['load_average_1min']:.1f}" for i in invocations)
    return "\n".join([
        f"## {spec.title}",
        "",
        spec.description,
        "",
        "Regenerate (add `--write_results` to rewrite this section):",
        "",
        "```sh",
        f"python -m experiments.reproduce --table={spec.number} --size=full",
        "```",
        "",
        f"Flagfile{'s' if len(files) > 1 else ''} `{'`, `'.join(files)}` ({same_grid}):",
        "",
        "<details><summary>flags</summary>",
        "",
        "```",
        *flag_lines,
        "```",
        "",
        "</details>",
        "",
        f"- Hardware: {provenance.machine_description()}; "
        f"{provenance.software_description()}.",
        f"- Time: {_minutes(took)} for the command above ({len(invocations)} invocation(s) "
        f"that trained runs; 1-minute load average at their end: {loads}); "
        f"{len(results)} runs of {train_seconds / len(results):.1f} s on average "
        f"({_minutes(train_seconds)} in total; the rest is start-up and tables).",
        f"- Code: runs trained with git commit `{first.get('git_commit')}` (`-dirty`: with "
        f"uncommitted changes); table written at `{provenance.git_commit()}`, "
        f"{time.strftime('%Y-%m-%d')}.",
        f"- Expected values and tolerances: "
        f"`{spec.expected_path('full').relative_to(REPO)}`.",
        "",
        grid_results.markdown(table).rstrip(),
        "",
        f"Plots in the run tree (`runs/table{spec.number}-full/`): "
        "`plots/accuracy_vs_sparsity-<masking>.png` and "
        "`plots/accuracy_vs_round-<masking>-s<sparsity>.png` (mean and 95 % CI band over "
        "seeds, one series per schedule).",
    ])


# --------------------------------------------------------------------------
# The driver.


def _check_command_line() -> None:
    """Rejects experiment and grid flags given to reproduce: the flagfiles set them."""
    names = [f.name for f in dataclasses.fields(ExperimentConfig)] + list(grid.GRID_FLAGS)
    for name in [*names, "flagfile"]:
        if name in FLAGS and FLAGS[name].present:
            raise InvalidArgument(name, FLAGS[name].value,
                                  "no value: reproduce reads the configuration from "
                                  "experiments/configs/table<N>*.flags (use "
                                  "experiments.compare_schedules for other settings)")


def _reset_table_flags() -> None:
    """Experiment and grid flags back to their defaults (before the next part's flagfiles)."""
    names = [f.name for f in dataclasses.fields(ExperimentConfig)] + list(grid.GRID_FLAGS)
    for name in names:
        FLAGS[name].unparse()


def table_cells(spec: TableSpec, size: str) -> list[grid.Cell]:
    """The validated cells of a table: its grid, or the union of its parts' grids."""
    cells = []
    for part in spec.parts or (None,):
        if part is not None:
            _reset_table_flags()
        grid.parse_flagfiles(spec.flagfiles(size, part))
        grid.check_no_cell_flags()
        part_cells = grid.grid_from_flags().cells(common.config_from_flags())
        if part is not None:
            part_cells = [dataclasses.replace(c, name=f"{part}-{c.name}") for c in part_cells]
        cells += part_cells
    return cells


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])} "
                    "(flags take the form --name=value)")
    try:
        check(_TABLE.value in TABLES, "table", _TABLE.value,
              "one of " + ", ".join(map(str, TABLES)) + " (the tables of RESULTS.md)")
        _check_command_line()
        spec, size = TABLES[_TABLE.value], _SIZE.value
        cells = table_cells(spec, size)
        root = Path(_OUTPUT_DIR.value or REPO / "runs" / f"table{spec.number}-{size}")
        expected_path = Path(_EXPECTED.value or spec.expected_path(size))
        check(_WRITE_RESULTS.value or expected_path.is_file(), "expected", str(expected_path),
              "an existing expected-values JSON (create it with --write_results)")
        results_path = Path(_RESULTS.value or REPO / "RESULTS.md")
        check(not (_WRITE_RESULTS.value and size == "full") or results_path.parent.is_dir(),
              "results", str(results_path), "a file in an existing folder")
        expected = None
        if expected_path.is_file():
            expected = atomic_files.read_json(expected_path)
            check(expected is not None and "rows" in expected, "expected", str(expected_path),
                  "an expected-values JSON written by --write_results")
        statuses = grid.statuses(cells, root)
        common.check_tff_workers(FLAGS.tff_workers)
    except (InvalidArgument, FileNotFoundError) as e:
        common.fail(str(e))
    if FLAGS.only_check_args:
        return 0
    start = time.time()
    trained = sum(s is not grid.Status.DONE for s in statuses)
    failed = grid.run_grid(cells, root, verbose=FLAGS.verbose, tff_workers=FLAGS.tff_workers,
                           round_logs=_ROUND_LOGS.value)
    invocations = record_invocation(root, trained=trained, seconds=time.time() - start)
    if failed:
        common.fail(f"{len(failed)} run(s) failed: {', '.join(failed)}", code=1)
    results = grid_results.load_results(cells, root)
    table = grid_results.write_reports(results, root, spec.metrics)
    print(f"\nTable {spec.number} ({size}), {len(results)} runs in {root}:\n")
    print(grid_results.markdown(table), end="")
    problems = grid_results.compare(table, expected) if expected is not None else []
    for line in problems:
        print(f"differs: {line}", file=sys.stderr)
    if _WRITE_RESULTS.value:
        atomic_files.atomic_write_json(expected_path, grid_results.expected_values(
            table, spec.tolerances,
            {"table": spec.number, "size": size,
             "flagfiles": [str(p.relative_to(REPO)) for p in spec.all_flagfiles(size)]}))
        print(f"\nwrote {expected_path}")
        if size == "full":
            old = results_path.read_text() if results_path.exists() else _RESULTS_HEADER
            section = render_section(spec, table, results, invocations, root)
            atomic_files.atomic_write_text(results_path,
                                        grid_results.replace_section(old, f"table{spec.number}",
                                                             section))
            print(f"wrote table {spec.number} into {results_path}")
        return 0
    if problems:
        common.fail(f"{len(problems)} value(s) of table {spec.number} ({size}) differ from "
                    f"{expected_path} beyond their tolerance (listed above)", code=1)
    values = len(table.groups) * len(expected["tolerances"])
    print(f"\nall {values} values of {len(table.groups)} rows within tolerance of {expected_path}")
    return 0


if __name__ == "__main__":
    common.run(main)
