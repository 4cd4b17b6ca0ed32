r"""Runs one federated pruning experiment.

    python -m experiments.run                      # the default: digits, 30 rounds
    python -m experiments.run --flagfile=experiments/configs/digits_poly90.flags
    python -m experiments.run --masking=server --schedule=oneshot --final_sparsity=0.9

Writes flags.txt, config.json, metrics.csv, summary.json, plots, TensorBoard
events and the stripped model into --output_dir (default:
runs/<dataset>-<masking>-...). flags.txt holds every experiment flag's value:
`python -m experiments.run --flagfile=<run>/flags.txt --output_dir=<new>`
reruns the experiment. Flags are validated before TensorFlow is imported
(--only_check_args stops there); bad input exits with status 2 and one line on
stderr, writing nothing.
"""

from pathlib import Path

from absl import flags

from experiments import common, flagfile, usage
from fedprune import config as config_lib
from fedprune.errors import InvalidArgument
from fedprune.program import checkpoint

common.define_experiment_flags()
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", "", "Output folder; empty: "
    "runs/<dataset>-<masking>-<schedule>-s<sparsity>-seed<seed>-<fingerprint>.")
_RESUME = flags.DEFINE_bool("resume", False, "Continue the run in --output_dir from its last "
                            "complete round, with the same experiment flags (its flags.txt).")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Delete an existing --output_dir first.")
usage.set_topic(usage.OUTPUTS, _OUTPUT_DIR, _RESUME, _OVERWRITE)
FLAGS = flags.FLAGS


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])} (flags are --name=value)")
    try:
        config = common.config_from_flags().validate()
        output_dir = Path(_OUTPUT_DIR.value or config_lib.default_output_dir(config))
        common.check_output_dir(output_dir, resume=_RESUME.value, overwrite=_OVERWRITE.value)
        common.check_tff_workers(FLAGS.tff_workers)
    except (InvalidArgument, FileNotFoundError) as e:
        common.fail(str(e))
    if _RESUME.value:  # a corrupt or foreign checkpoint fails here, before the TF import
        try:
            checkpoint.check_latest(output_dir / "checkpoints", fingerprint=config.fingerprint())
        except checkpoint.CheckpointError as e:
            common.fail(str(e), code=1)
    if FLAGS.only_check_args:
        return 0
    on_phase = common.phase_logger()
    if on_phase is not None:
        on_phase("import")
    common.start_runtime(verbose=FLAGS.verbose, tff_workers=FLAGS.tff_workers)
    from fedprune.program import loop
    from fedprune.runtime import contexts

    if _OVERWRITE.value:
        common.clear_output_dir(output_dir)
    flagfile.write_flagfile(output_dir, config, resume=_RESUME.value,
                            tff_workers=FLAGS.tff_workers)
    try:
        # Flushed per line: progress shows through pipes (`| tee`), and a killed run
        # has printed every round it finished.
        loop.run_experiment(config, output_dir, resume=_RESUME.value,
                               log=lambda line: print(line, flush=True), on_phase=on_phase,
                               provenance={"tff_workers": list(FLAGS.tff_workers)})
    except InvalidArgument as e:  # a check that needs the data (e.g. --steps_per_round=0)
        common.fail(str(e))
    except (loop.NonFiniteError, checkpoint.CheckpointError) as e:
        common.fail(str(e), code=1)
    except contexts.WorkerUnreachableError as e:
        kept = checkpoint.list_checkpoints(output_dir / "checkpoints")
        done = f"the state after round {int(kept[-1].stem.split('_')[1])}" if kept else "nothing"
        common.fail(f"{e}; {done} is kept in {output_dir}: restart the worker(s) and rerun "
                    "with --resume", code=1)


if __name__ == "__main__":
    common.run(main)
