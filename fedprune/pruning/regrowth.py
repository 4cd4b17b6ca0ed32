"""Prune-and-regrow (dynamic sparse training): magnitude drop, then regrowth.

After the schedule's mask decision of a round, an *adjustment* moves part of
the topology without changing its size, per pruned kernel:

    n  = |mask|                  (kept weights, the schedule's level)
    k  = min(floor(f_r * n), N - n)
    drop:  the k kept weights of smallest |w| leave the mask
    grow:  k coordinates that were pruned before the adjustment join it, at 0

so every layer keeps exactly n mask entries (the schedule's level) and the
mask changes in 2k places. Regrown weights start at zero (as in RigL); clients
train them from the next round on. Candidates for growth are the coordinates
pruned *before* the adjustment; the k just dropped are not candidates, so an
adjustment never undoes itself.

Rules (`--regrow`):

  none    no adjustment (the default; the process is unchanged).
  random  SET (Mocanu et al. 2018): the k grown coordinates are uniformly
          random among the candidates, from a stateless TF RNG whose key is
          part of the server state (split once per round), so a resumed run
          draws exactly what an uninterrupted one does.
  gradient  RigL (Evci et al. 2020): the k grown coordinates are the candidates
          where the magnitude of the round's aggregate dense gradient is
          largest (ties: lower index). In an adjustment round every client
          computes the gradient of its mean loss over its data at the broadcast
          model, and uploads, per pruned kernel, its k' largest |gradient|
          among the coordinates pruned in the broadcast mask as (int32 index,
          float32 value) pairs, k' = `client_grow_count` (>= the server's k
          whenever the level does not fall); the server scores candidates by
          |example-weighted mean of the clients' sparse gradients|
          (`fedprune/federated/regrow_gradients.py`).

Adjustments happen after rounds r = every, 2 every, ... < end_round (RigL's
ΔT in rounds, and its T_end: no adjustment from `end_round` on, so the last
topology is fine-tuned). The fraction f_r decays from `fraction` (RigL's
alpha) with `decay`:

  cosine    f_r = fraction / 2 * (1 + cos(pi * r / end_round))   (RigL)
  constant  f_r = fraction

Where (`--regrow_at`):

  server  the server adjusts the global mask after its re-mask
          (`fedprune/federated/server_masking.py`; FedTiny, jaxpruner).
  client  FedDST (Bibikar et al. 2022): in adjustment rounds each client, after
          local training and its own pruning to the schedule's level, drops
          and grows inside its own mask (random: SET; gradient: its own dense
          gradient), uploads that mask, and the server re-masks the aggregate
          to the level, ranking by |w| and then by the clients' votes
          (`vote_scores`; `fedprune/federated/client_regrowth.py`).

This module is the mask maths.
Importing it is cheap: TensorFlow is imported by the functions that need it.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from fedprune.errors import check

RULES = ("none", "random", "gradient")
DECAYS = ("cosine", "constant")
# Where the topology is adjusted: by the server after aggregation, or by each
# client after local training (FedDST), the server re-masking their aggregate.
PLACES = ("server", "client")
# --regrow_end_round=-1: RigL's default T_end, three quarters of training.
END_AT_THREE_QUARTERS = -1


@dataclasses.dataclass(frozen=True)
class RegrowSpec:
    """What an adjustment does and when. Units: rounds.

    Attributes:
      rule: one of `RULES`.
      fraction: alpha, the fraction of each layer's kept weights moved at the
        first adjustment, in (0, 1).
      decay: one of `DECAYS`.
      end_round: no adjustment after rounds >= end_round (resolved, >= 1).
      every: adjust after every this many rounds (>= 1).
      seed: seeds the RNG key for `random` (the server's, or the clients' with `at`
        `client`).
      at: one of `PLACES`, who adjusts the topology.
    """

    rule: str = "none"
    fraction: float = 0.3
    decay: str = "cosine"
    end_round: int = 1
    every: int = 1
    seed: int = 0
    at: str = "server"

    @property
    def enabled(self) -> bool:
        return self.rule != "none"

    def fractions(self, num_rounds: int) -> np.ndarray:
        """f_r for r = 0..num_rounds (float32; 0 at rounds without an adjustment)."""
        f = np.zeros(num_rounds + 1, np.float32)
        if not self.enabled:
            return f
        for r in range(self.every, min(self.end_round, num_rounds + 1), self.every):
            f[r] = decayed_fraction(self.fraction, self.decay, r, self.end_round)
        return f


def decayed_fraction(fraction: float, decay: str, round_num: int, end_round: int) -> float:
    """f_r of `decay` (see the module docstring) for 0 <= round_num <= end_round."""
    if decay == "constant":
        return fraction
    return fraction / 2.0 * (1.0 + math.cos(math.pi * round_num / end_round))


def resolve_end_round(end_round: int, num_rounds: int) -> int:
    """`--regrow_end_round`, with -1 resolved to floor(0.75 * num_rounds) (at least 1)."""
    if end_round == END_AT_THREE_QUARTERS:
        return max(int(0.75 * num_rounds), 1)
    return end_round


def validate_args(*, regrow: str, regrow_at: str, fraction: float, decay: str,
                  end_round: int, every: int, num_rounds: int, structure: str,
                  prune_granularity: str, mask_criterion: str) -> None:
    """The regrowth flags and their rules with other flags (not `--masking`: that is
    `masking_modes.check_regrowth`).

    Raises:
      InvalidArgument: naming the first offending flag.
    """
    check(regrow in RULES, "regrow", regrow, "one of " + "|".join(RULES))
    check(regrow_at in PLACES, "regrow_at", regrow_at, "one of " + "|".join(PLACES))
    check(decay in DECAYS, "regrow_decay", decay, "one of " + "|".join(DECAYS))
    check(0 < fraction < 1, "regrow_fraction", fraction, "a fraction in (0, 1)")
    check(every >= 1, "regrow_every", every, "a whole number of rounds >= 1")
    check(end_round == END_AT_THREE_QUARTERS or 1 <= end_round <= num_rounds,
          "regrow_end_round", end_round,
          f"-1 (three quarters of --rounds) or a round in [1, --rounds={num_rounds}]")
    check_combination(regrow, structure=structure, prune_granularity=prune_granularity,
                      mask_criterion=mask_criterion, at=regrow_at)


def check_combination(regrow: str, *, structure: str, prune_granularity: str,
                      mask_criterion: str, at: str = "server") -> None:
    """What a regrowth rule other than `none` needs of the mask rule and granularity.

    Shared by `validate_args` (flags) and `process.build_pruning_process` (library).

    Raises:
      InvalidArgument: naming `--regrow` and what it needs.
    """
    if regrow == "none":
        return
    check(structure == "unstructured", "regrow", regrow,
          f"none with --structure={structure} (regrowth moves single weights: "
          "--structure=unstructured)")
    who = ("the server adjusts masks once per round" if at == "server" else
           "clients adjust their masks at the end of local training, not inside tfmot's")
    check(prune_granularity == "round", "regrow", regrow,
          f"none with --prune_granularity=step ({who})")
    check(mask_criterion == "magnitude", "regrow", regrow,
          f"none with --mask_criterion={mask_criterion} (the drop is by magnitude at the "
          "schedule's level: --mask_criterion=magnitude)")


def drop_and_grow(kernel, mask, fraction, grow_scores):
    """One layer's adjustment (TF ops).

    Args:
      kernel: the layer's kernel after the schedule's re-mask (zero off `mask`).
      mask: its 0/1 mask, same shape and dtype.
      fraction: f_r, a float scalar tensor.
      grow_scores: same shape; growth picks the k largest among the candidates
        (`random`: uniform draws; `gradient`: |aggregate gradient|), ties to
        the lower index.

    Returns:
      (survivors, grown): 0/1 masks of the kept weights that were not dropped,
      and of the k grown coordinates. The new mask is `survivors + grown`,
      with as many entries as `mask`.
    """
    import tensorflow as tf

    from fedprune.pruning.masking import keep_top_k

    kept = tf.cast(tf.reduce_sum(mask), tf.int32)
    k = grow_count(mask, fraction)
    minus_inf = tf.fill(tf.shape(kernel), tf.constant(-np.inf, kernel.dtype))
    # The kept - k largest |w| among kept weights survive (ties: lower index).
    survivors = keep_top_k(tf.where(mask > 0, tf.abs(kernel), minus_inf), kept - k)
    grown = keep_top_k(tf.where(mask > 0, minus_inf, tf.cast(grow_scores, kernel.dtype)), k)
    return survivors, grown


def vote_scores(kernels, votes):
    """Scores whose top k is the server's re-mask of clients' adjusted masks (TF ops).

    |w| where w != 0; at exact zeros (weights grown at 0, or that nobody kept)
    -1 / (1 + votes), in [-1, 0): so the largest |w| go first, then zeros by how
    many of the round's clients keep them, then (`masking.keep_top_k`) the lower
    index.

    Args:
      kernels: the aggregated kernels.
      votes: per kernel, how many clients kept each weight (float, same shapes).
    """
    import tensorflow as tf

    return [tf.where(tf.not_equal(k, 0.0), tf.abs(k), -1.0 / (1.0 + tf.cast(v, k.dtype)))
            for k, v in zip(kernels, votes, strict=True)]


def random_scores(shapes, key):
    """Uniform [0, 1) scores, one tensor per shape, from a stateless RNG key (TF ops).

    Args:
      shapes: the kernels' static shapes.
      key: int64 tensor of shape [2], the round's key.
    """
    import tensorflow as tf

    keys = tf.random.experimental.stateless_split(key, num=max(len(shapes), 1))
    return [tf.random.stateless_uniform(shape, seed=keys[i], dtype=tf.float32)
            for i, shape in enumerate(shapes)]


def grow_count(mask, fraction):
    """k = min(floor(fraction * |mask|), N - |mask|) for one 0/1 mask (TF ops; int32)."""
    import tensorflow as tf

    kept = tf.cast(tf.reduce_sum(mask), tf.int32)
    return tf.minimum(tf.cast(tf.math.floor(fraction * tf.cast(kept, tf.float32)), tf.int32),
                      tf.size(mask) - kept)


def top_k_pruned(gradient, mask, k):
    """The k pruned coordinates (mask == 0) of largest |gradient| (TF ops).

    Args:
      gradient: a kernel's dense gradient.
      mask: its 0/1 mask, same shape.
      k: int32 scalar, at most the number of pruned coordinates.

    Returns:
      (indices, values): int32 [k] flat (row-major) indices, ordered by
      decreasing |gradient| and then increasing index, and float32 [k] the
      gradient there.
    """
    import tensorflow as tf

    flat = tf.reshape(tf.cast(gradient, tf.float32), [-1])
    pruned = tf.reshape(mask, [-1]) <= 0
    scores = tf.where(pruned, tf.abs(flat), tf.fill(tf.shape(flat), -np.inf))
    _, indices = tf.math.top_k(scores, k=k, sorted=True)
    return indices, tf.gather(flat, indices)


def scatter_dense(indices, values, shape):
    """The dense tensor of `shape` holding `values` at flat `indices`, zero elsewhere (TF)."""
    import tensorflow as tf

    size = int(np.prod(shape))
    flat = tf.scatter_nd(tf.reshape(indices, [-1, 1]), values, [size])
    return tf.reshape(flat, shape)
