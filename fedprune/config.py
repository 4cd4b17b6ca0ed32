"""One experiment's configuration, validated before TensorFlow is imported.

`ExperimentConfig` field names equal the driver flags, and its defaults are the
flag defaults: the drivers in `experiments/` define flags from these fields and
the library never reads flags. `validate()` checks every value and every
combination and raises `fedprune.errors.InvalidArgument` (one line naming the
flag, the value and what is accepted); it imports neither TensorFlow nor TFF.

The dataset, schedule and mask criterion are looked up in their registries
(`datasets.DATASETS`, `schedules.SCHEDULES`, `masking.CRITERIA`) and built
from the fields they read, which validates them; nothing here depends on
their names.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

from fedprune.data import datasets, sampling
from fedprune.errors import check
from fedprune.federated import masking_modes, privacy
from fedprune.federated.process import SERVER_OPTIMIZERS
from fedprune.model import builders
from fedprune.outputs import deployment
from fedprune.pruning import layer_budgets, masking, regrowth, schedules, step_schedule

# --shrink_at_round sentinels: shrink after the schedule's last mask update, or never.
SHRINK_AT_SCHEDULE_END = -1
SHRINK_NEVER = 0
# Fields that change what is written after training, never a result: not in the
# fingerprint, and accepted by drivers whose other experiment flags are fixed.
OUTPUT_ONLY_FIELDS = ("deploy", "figures")
# Fields added after runs were recorded; `fingerprint` leaves them out at their
# defaults, so earlier runs (e.g. of Table 1) keep their fingerprints.
_FINGERPRINT_OPTIONAL = ("unit_norm", "shrink_at_round", "client_sampling", "dp",
                         "dp_noise_multiplier", "dp_clip", "dp_target_quantile", "dp_delta",
                         "dp_accountant", "prune_granularity", "steps_per_round",
                         "prune_every_steps", "sparsity_distribution", "regrow", "regrow_at",
                         "regrow_fraction", "regrow_decay", "regrow_end_round", "regrow_every",
                         "upload_quantization")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything that determines an experiment's result. Units are in the names.

    Attributes mirror the flags of `experiments/run.py`; see its `--help`.
    """

    # Data.
    dataset: str = "digits"
    data_dir: str = ""
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    num_clients: int = 10
    clients_per_round: int = 10
    client_sampling: str = "fixed"
    max_examples_per_client: int = 0  # 0 = no cap
    max_test_examples: int = 0  # 0 = the whole test split
    # Training.
    rounds: int = 30
    local_epochs: int = 1
    batch_size: int = 16
    model: str = "mlp"
    client_lr: float = 0.1
    client_momentum: float = 0.0
    server_optimizer: str = "sgd"
    server_lr: float = 1.0
    # Pruning.
    masking: str = "both"
    schedule: str = "polynomial"
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.8
    begin_round: int = 1
    end_round: int = 20
    prune_every: int = 1
    power: float = 3.0
    # Clients prune at the end of local training (round) or inside it with
    # tfmot's schedule in client steps (step; see fedprune/pruning/step_schedule.py).
    prune_granularity: str = "round"
    steps_per_round: int = 0  # client steps per round; 0 = the mean client's local steps
    prune_every_steps: int = 1  # the step schedule's frequency, in client steps
    mask_criterion: str = "magnitude"
    mask_scope: str = "layer"
    # How the schedule's sparsity is split among layers: uniform, or erk
    # (Erdős–Rényi-kernel budgets, fedprune/pruning/layer_budgets.py).
    sparsity_distribution: str = "uniform"
    threshold: float | None = None
    relative_rate: float | None = None
    structure: str = "unstructured"
    block_size: tuple[int, int] = (1, 4)
    block_pooling: str = "AVG"
    unit_norm: str = "l2"
    shrink_at_round: int = SHRINK_AT_SCHEDULE_END
    prune_output_layer: bool = True
    mask_aggregation: str = "average"
    # Prune and regrow (fedprune/pruning/regrowth.py): SET or RigL, at the server or
    # at the clients (FedDST).
    regrow: str = "none"
    regrow_at: str = "server"
    regrow_fraction: float = 0.3  # of each layer's kept weights, at the first adjustment
    regrow_decay: str = "cosine"
    regrow_end_round: int = regrowth.END_AT_THREE_QUARTERS  # no adjustment from this round on
    regrow_every: int = 1  # rounds between adjustments
    # Client-level differential privacy (DP-FedAvg, see fedprune/federated/privacy.py).
    dp: str = "none"
    dp_noise_multiplier: float = 1.0
    dp_clip: float = 1.0
    dp_target_quantile: float = 0.5
    dp_delta: float = 1e-5
    dp_accountant: str = "rdp"
    # Wire format of the clients' uploaded values (fedprune/federated/quantization.py).
    upload_quantization: str = "none"
    # Reproducibility and evaluation.
    seed: int = 0
    eval_every: int = 1
    # Outputs only (never in the fingerprint): the TFLite export and its latency
    # (fedprune/outputs/deployment.py): latency, size (no timing) or none.
    deploy: str = "latency"
    # Outputs only: the run's figures (curves, bytes, label_heatmap; PNG and PDF,
    # fedprune/outputs/plots.py); False skips them.
    figures: bool = True

    def validate(self) -> ExperimentConfig:
        """Checks every field and combination; returns self.

        Raises:
          InvalidArgument: naming the first offending flag.
        """
        dataset = datasets.DATASETS[self.dataset]
        check(self.model in builders.MODELS, "model", self.model,
              "one of " + "|".join(builders.MODELS))
        sequence = [e.name for e in datasets.DATASETS.entries() if e.target.sequence]
        check((self.model == "rnn") == dataset.sequence, "model", self.model,
              f"rnn for --dataset={'|'.join(sequence)}, and mlp|mlp2|cnn for the other "
              "datasets")
        self.dataset_loader()  # the dataset's own checks (its files, clients, partition)
        check(1 <= self.clients_per_round <= (self.num_clients or float("inf")),
              "clients_per_round", self.clients_per_round,
              f"a whole number in [1, --num_clients={self.num_clients}]")
        check(self.deploy in deployment.DEPLOY_MODES, "deploy", self.deploy,
              "one of " + "|".join(deployment.DEPLOY_MODES))
        for name in ("rounds", "local_epochs", "batch_size", "eval_every"):
            check(getattr(self, name) >= 1, name, getattr(self, name), "a whole number >= 1")
        for name in ("max_examples_per_client", "max_test_examples"):
            check(getattr(self, name) >= 0, name, getattr(self, name),
                  "a whole number >= 0 (0 = no cap)")
        check(self.client_lr > 0, "client_lr", self.client_lr, "a learning rate > 0")
        check(self.server_lr > 0, "server_lr", self.server_lr, "a learning rate > 0")
        check(0 <= self.client_momentum < 1, "client_momentum", self.client_momentum,
              "a momentum in [0, 1)")
        check(self.server_optimizer in SERVER_OPTIMIZERS, "server_optimizer",
              self.server_optimizer, "one of " + "|".join(SERVER_OPTIMIZERS))
        mode = self.masking_mode
        schedule = self.make_schedule()
        masking_modes.check_schedule(mode, schedule)
        schedule.check_rounds(self.rounds)
        masking_modes.check_mask_aggregation(mode, self.mask_aggregation)
        check(self.client_sampling in sampling.SAMPLING_MODES, "client_sampling",
              self.client_sampling, "one of " + "|".join(sampling.SAMPLING_MODES))
        privacy.validate_dp_args(
            self.dp, noise_multiplier=self.dp_noise_multiplier, clip=self.dp_clip,
            clients_per_round=self.clients_per_round, target_quantile=self.dp_target_quantile,
            delta=self.dp_delta, num_clients=self.num_clients or None,
            client_sampling=self.client_sampling, accountant=self.dp_accountant,
            masking=self.masking)
        masking_modes.check_upload_quantization(self.upload_quantization)
        check(self.upload_quantization == "none" or self.dp == "none", "upload_quantization",
              self.upload_quantization, f"none with --dp={self.dp} (the DP accounting does not "
              "cover quantization noise)")
        if self.prune_granularity == "step":  # the mode's rule first, as the builder checks it
            masking_modes.check_step_granularity(mode)
        step_schedule.validate_step_args(
            prune_granularity=self.prune_granularity, steps_per_round=self.steps_per_round,
            prune_every_steps=self.prune_every_steps, schedule=schedule,
            num_rounds=self.rounds, mask_criterion=self.mask_criterion,
            mask_scope=self.mask_scope, structure=self.structure, model=self.model,
            dataset=self.dataset)
        spec = self.mask_spec()
        if spec.structure == "2:4" and not schedule.dense:
            check(self.final_sparsity == 0.5, "final_sparsity", self.final_sparsity,
                  "0.5 with --structure=2:4 (2 of every 4 weights are zero)")
        self._validate_unit_structure(spec)
        layer_budgets.check_distribution(
            self.sparsity_distribution, masking=self.masking, prunes=mode.wraps_model,
            mask_criterion=self.mask_criterion,
            mask_scope=self.mask_scope, structure=self.structure,
            prune_granularity=self.prune_granularity)
        regrowth.validate_args(
            regrow=self.regrow, regrow_at=self.regrow_at, fraction=self.regrow_fraction,
            decay=self.regrow_decay, end_round=self.regrow_end_round, every=self.regrow_every,
            num_rounds=self.rounds, structure=self.structure,
            prune_granularity=self.prune_granularity, mask_criterion=self.mask_criterion)
        masking_modes.check_regrowth(mode, self.regrow, self.regrow_at)
        check(self.regrow != "gradient" or self.dp == "none", "regrow", self.regrow,
              f"none or random with --dp={self.dp} (the clients' gradient upload for "
              "regrowth is not privatized)")
        return self

    def regrow_spec(self) -> regrowth.RegrowSpec:
        """The prune-and-regrow spec (`--regrow*`), its end round resolved."""
        return regrowth.RegrowSpec(
            rule=self.regrow, fraction=self.regrow_fraction, decay=self.regrow_decay,
            end_round=regrowth.resolve_end_round(self.regrow_end_round, self.rounds),
            every=self.regrow_every, seed=self.seed, at=self.regrow_at)

    def _validate_unit_structure(self, spec: masking.MaskSpec) -> None:
        """The combinations `--structure=neuron|filter` and `--shrink_at_round` support."""
        if not spec.is_unit_structure:
            check(self.shrink_at_round in (SHRINK_AT_SCHEDULE_END, SHRINK_NEVER),
                  "shrink_at_round", self.shrink_at_round,
                  "-1 or 0 unless --structure=neuron|filter (only removed units can be cut out)")
            return
        models_with_units = {"neuron": ("mlp", "mlp2", "cnn"), "filter": ("cnn",)}[
            self.structure]
        check(self.model in models_with_units, "model", self.model,
              f"one of {'|'.join(models_with_units)} with --structure={self.structure} "
              f"({'Dense hidden layers' if self.structure == 'neuron' else 'convolutions'} "
              "to remove units from)")
        masking_modes.check_unit_structure(self.masking_mode, self.structure)
        check(not self.prune_output_layer, "prune_output_layer", self.prune_output_layer,
              f"False (--noprune_output_layer) with --structure={self.structure}: the output "
              "layer's units are the classes and are never removed")
        last = self.last_mask_update_round()
        check(self.shrink_at_round in (SHRINK_AT_SCHEDULE_END, SHRINK_NEVER)
              or last <= self.shrink_at_round <= self.rounds, "shrink_at_round",
              self.shrink_at_round,
              f"-1 (after the last mask update, round {last}), 0 (never) or a round in "
              f"[{last}, --rounds={self.rounds}]")

    @property
    def masking_mode(self) -> masking_modes.MaskingMode:
        """The `MaskingMode` `masking` names (raises `InvalidArgument` for an unknown name)."""
        return masking_modes.masking_mode(self.masking)

    def last_mask_update_round(self) -> int:
        """The last round whose end recomputes the mask (0 for no pruning).

        For `constant` that is `--end_round`, or `--rounds` when it re-prunes to
        the end (-1); otherwise the schedule's last level change
        (`RoundSchedule.last_mask_update_round`).
        """
        return self.make_schedule().last_mask_update_round(self.rounds)

    def shrink_round(self) -> int:
        """After which round the global model is physically shrunk (0 = never).

        Only `--structure=neuron|filter`: `--shrink_at_round`, with -1 resolved
        to `last_mask_update_round()`.
        """
        if not self.mask_spec().is_unit_structure or self.shrink_at_round == SHRINK_NEVER:
            return 0
        if self.shrink_at_round == SHRINK_AT_SCHEDULE_END:
            # A schedule that only prunes the initial model (round 0) shrinks after round 1.
            return max(self.last_mask_update_round(), 1)
        return self.shrink_at_round

    def _values(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def dataset_loader(self) -> datasets.DatasetLoader:
        """The registered dataset `--dataset` names, built (and so checked) from its fields."""
        return datasets.DATASETS.build(self.dataset, self._values())

    def make_schedule(self) -> schedules.RoundSchedule:
        """The registered schedule `--schedule` names, built (and checked) from its fields."""
        return schedules.SCHEDULES.build(self.schedule, self._values())

    def mask_spec(self) -> masking.MaskSpec:
        """The mask rule; of the criterion's optional values, only those it reads are set."""
        reads = masking.CRITERIA.entry(self.mask_criterion).params
        return masking.MaskSpec(
            mask_criterion=self.mask_criterion, mask_scope=self.mask_scope,
            threshold=self.threshold if "threshold" in reads else None,
            relative_rate=self.relative_rate if "relative_rate" in reads else None,
            structure=self.structure, block_size=tuple(self.block_size),
            block_pooling=self.block_pooling, unit_norm=self.unit_norm)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["block_size"] = list(self.block_size)
        return d

    @classmethod
    def from_dict(cls, values: dict) -> ExperimentConfig:
        """Builds a config from a dict (e.g. `config.json`), ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in values.items() if k in names}
        if "block_size" in kwargs:
            kwargs["block_size"] = tuple(kwargs["block_size"])
        return cls(**kwargs)

    def fingerprint(self) -> str:
        """A short hash of every field except `data_dir` (a path, not a setting) and
        `OUTPUT_ONLY_FIELDS` (what is written after training, not what is trained)."""
        d = self.to_dict()
        for name in ("data_dir", *OUTPUT_ONLY_FIELDS):
            d.pop(name)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in _FINGERPRINT_OPTIONAL:
            if d[name] == defaults[name]:
                d.pop(name)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def default_output_dir(config: ExperimentConfig, root: str = "runs") -> str:
    """`runs/<dataset>-<masking>-<schedule>-s<sparsity>-seed<seed>-<fingerprint>`."""
    name = (f"{config.dataset}-{config.masking}-{config.schedule}-"
            f"s{config.final_sparsity:g}-seed{config.seed}-{config.fingerprint()[:8]}")
    return os.path.join(root, name)
