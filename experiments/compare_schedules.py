r"""Compares sparsity schedules × final sparsities × masking modes × seeds.

    python -m experiments.compare_schedules --output_dir=runs/compare
    python -m experiments.compare_schedules --schedules=none,polynomial --powers=1,3 \
        --final_sparsities=0.9 --maskings=server,both --seeds=0,1,2 --output_dir=runs/poly
    python -m experiments.compare_schedules --flagfile=experiments/configs/table1.flags \
        --output_dir=runs/table1

The ordinary experiment flags set the base configuration (as for
`experiments.run`); the grid flags (--schedules, --powers, --final_sparsities,
--maskings, --prune_granularities, --sparsity_distributions, --regrows,
--regrow_ats, --dp_noise_multipliers, --upload_quantizations, --seeds) set, per
cell, the flags --schedule, --power, --final_sparsity, --masking,
--prune_granularity, --sparsity_distribution, --regrow, --regrow_at,
--dp_noise_multiplier, --upload_quantization and --seed, which are therefore
not accepted here (--dp_noise_multiplier only with --dp_noise_multipliers,
--upload_quantization only with --upload_quantizations). `none` in --schedules
is dense training, run once per seed (and noise multiplier and upload
quantization); --prune_granularities crosses only the modes whose clients
prune (client, both); --regrows and --regrow_ats cross only the modes that
regrow there (server: server, both; client: both), --regrow_ats only the cells
that regrow (grid.py's docstring).

Every cell trains into
`<output_dir>/<schedule>[-p<power>]-s<sparsity>-<masking>[-step][-erk][-<regrow>[-client]][-z<noise>][-fp16|-int8]-seed<seed>`
(dense: `dense[-z<noise>][-fp16|-int8]-seed<seed>`) with the same outputs as `experiments.run`.
Cells that differ only in schedule values, final sparsity or seed share one
traced TFF process (`assembly.build_process`); --parallel_cells trains shares of
the cells in child processes at once (default: the usable cores, see
`grid.auto_parallel_cells`; 1: all here).
Complete cells (summary.json of the same configuration) are skipped and
incomplete ones resumed, so an interrupted grid continues where it stopped.
Then writes into --output_dir: comparison.md, comparison.tex, comparison.csv
(mean ± 95% CI over seeds), accuracy_vs_round.png, accuracy_vs_sparsity.png
and plots/, and prints the Markdown table.

Every cell's configuration is validated before TensorFlow is imported
(--only_check_args stops there): bad input exits with status 2 and one line on
stderr, writing nothing. Each cell's flags.txt reruns it alone with
`python -m experiments.run --flagfile=<cell>/flags.txt --output_dir=<new>`. Exit status
1 if a cell failed (e.g. NaN loss); the tables then hold the other cells.
"""

from pathlib import Path

from absl import flags

from experiments import common, grid, grid_results, usage
from fedprune.errors import InvalidArgument

common.define_experiment_flags()
grid.define_grid_flags()
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Root of the run tree (required).")
_ROUND_LOGS = flags.DEFINE_bool("round_logs", False, "Print every run's per-round lines.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "List the cells and their status; train nothing.")
usage.set_topic(usage.OUTPUTS, _OUTPUT_DIR, _ROUND_LOGS, _DRY_RUN)
usage.not_accepted([f for f in grid.CELL_FIELDS if f not in grid.OPTIONAL_CELL_FIELDS],
                   "each cell sets it from the grid flags")
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])} "
                    "(flags take the form --name=value)")
    try:
        grid.check_no_cell_flags()
        spec = grid.grid_from_flags()
        cells = spec.cells(common.config_from_flags())
        if not _OUTPUT_DIR.value:
            raise InvalidArgument("output_dir", "", "the folder of the run tree")
        root = Path(_OUTPUT_DIR.value)
        statuses = grid.statuses(cells, root)
        common.check_tff_workers(FLAGS.tff_workers)
        parallel = grid.check_parallel_cells(FLAGS.parallel_cells, tff_workers=FLAGS.tff_workers)
        if FLAGS.cell_shard:
            grid.parse_shard(FLAGS.cell_shard)
    except (InvalidArgument, FileNotFoundError) as e:
        common.fail(str(e))
    if FLAGS.only_check_args:
        return 0
    if _DRY_RUN.value:
        for cell, status in zip(cells, statuses, strict=True):
            print(f"{status.value:6}  {cell.name}  {cell.config.fingerprint()}")
        return 0
    failed = grid.run_grid(cells, root, verbose=FLAGS.verbose, tff_workers=FLAGS.tff_workers,
                           round_logs=_ROUND_LOGS.value, parallel_cells=parallel,
                           shard=FLAGS.cell_shard)
    if FLAGS.cell_shard:  # a child of --parallel_cells: the parent writes the tables
        return 1 if failed else 0
    results = grid_results.load_results(cells, root)
    if results:
        table = grid_results.write_reports(results, root)
        print(f"\n{len(results)} run(s) in {root}: comparison.md, comparison.tex, "
              "comparison.csv, accuracy_vs_round.png, accuracy_vs_sparsity.png\n")
        print(grid_results.markdown(table), end="")
    if failed:
        common.fail(f"{len(failed)} cell(s) failed: {', '.join(failed)}", code=1)
    return 0


if __name__ == "__main__":
    common.run(main)
