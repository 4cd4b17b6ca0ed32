"""`--regrow_at=client`: clients adjust their own masks (FedDST, Bibikar et al. 2022).

In FedDST each client trains inside the broadcast mask and, in a round that
ends with an adjustment, moves part of its own mask before uploading: it
drops its smallest-magnitude kept weights and grows as many pruned ones, at
zero. The server aggregates the clients' masks and re-masks to the target
density. Here, with `--masking=both` (clients prune, the server re-masks) and
round granularity, in round r (`client_work.py`, after local training):

1. the client prunes its trained kernels to the schedule's level for round r
   inside the mask it trained in (as every `both` client does);
2. with f_r = `RegrowSpec.fractions()[r]` > 0 (the server variant's rounds and
   decayed fraction), per pruned kernel with n kept of N it drops the
   k = min(floor(f_r n), N - n) kept weights of smallest |w| and grows k
   coordinates pruned before this step (`regrowth.drop_and_grow`, the server
   variant's maths), ranked by `grow_scores`:
     random    uniform draws from a stateless key: the run's `[seed, 0]` in
               the client work's state, folded with the round and with a
               fingerprint of the client's update (`quantization.
               fold_in_fingerprint`), so a draw is a function of (seed, round,
               client) and a resumed run draws the same;
     gradient  |the gradient of the client's mean loss over its data at its
               trained model| (`regrow_gradients.mean_kernel_gradients`; the
               model it is about to upload, before its own pruning, as FedDST
               takes it after local training), computed only when f_r > 0;
3. grown weights are 0 in its model; it uploads `mask_aggregation.
   client_payload` with the adjusted masks (n entries each: the schedule's
   level) and its kept values. Nothing else is sent: the gradient stays on
   the client, so `bytes_up` is what every pruning client pays (the update's
   smallest encoding and a bitmap per kernel, `client_work.uplink_bytes`).

The server aggregates by `--mask_aggregation` and, in adjustment rounds as
well as at the schedule's updates, re-masks to the level ranking by |w| and,
at exact zeros (grown weights nobody else kept with a value), by the number
of clients whose masks hold them (`regrowth.vote_scores`;
`server_masking.remask_weights`).
"""

from __future__ import annotations

from fedprune.federated import quantization, regrow_gradients
from fedprune.pruning import regrowth


def grow_scores(rule: str, *, model_fn, trained, update, data, key, fraction,
                kernel_indices) -> list:
    """One client's scores for growth, per pruned kernel (TF ops; float32).

    Args:
      rule: `random` or `gradient`.
      model_fn: no-arg callable returning the client's `VariableModel` (for `gradient`).
      trained: the client's trained `ModelWeights` (before its own pruning).
      update: the client's update tensors (fingerprinted for `random`).
      data: the client's dataset (for `gradient`).
      key: int64 [2], the round's key (for `random`).
      fraction: f_r; `gradient` computes nothing when it is 0.
      kernel_indices: positions of the pruned kernels among the trainable weights.
    """
    if rule == "random":
        shapes = [trained.trainable[i].shape for i in kernel_indices]
        return regrowth.random_scores(shapes, quantization.fold_in_fingerprint(key, update))
    return regrow_gradients.gradient_scores(regrow_gradients.kernel_gradients_if(
        fraction > 0, model_fn(), trained, data, kernel_indices))


def adjust_masks(kernels, masks, fraction, scores) -> tuple[list, list]:
    """A client's drop and grow inside its own masks (TF ops; `regrowth.drop_and_grow`).

    Args:
      kernels: its pruned kernels (zero off `masks`).
      masks: its 0/1 masks after pruning to the schedule's level.
      fraction: f_r (0: the masks are returned unchanged).
      scores: per kernel, `grow_scores`.

    Returns:
      (survivors, new masks): per kernel the kept weights that were not
      dropped (where the client's model keeps its values; grown weights are 0)
      and the adjusted mask, with as many entries as `masks`.
    """
    adjusted = [regrowth.drop_and_grow(k, m, fraction, s)
                for k, m, s in zip(kernels, masks, scores, strict=True)]
    return [a[0] for a in adjusted], [a[0] + a[1] for a in adjusted]
