"""Communication accounting: the bytes an efficient implementation would send.

A payload (a model, a model update) is a list of tensors, each sent in its
smallest valid encoding (`encodings.py`: dense, bitmap, coo, masked values,
with their exact sizes); `payload_bytes` sums them, and the round's totals
add up the clients.

Uplink vs downlink:

* **Uplink** (`uplink_bytes`): clients that train inside the server's broadcast
  mask send only the values at the mask's positions (`masked_values`): the
  server knows the mask it sent. An update with mass off that mask (e.g. TFF's
  stock client work, whose last optimizer step is not re-masked) cannot use
  `masked_values` and is counted with its own nonzeros instead, so the numbers
  stay honest rather than the mass being dropped. With `--regrow=gradient`,
  in rounds that end with a topology adjustment, each client also sends its
  top-k pruned gradient entries per kernel as (int32 index, float32 value)
  pairs (`encodings.encode_top_k`, 8 bytes each; counted on the clients in
  `client_work.py`, see `regrow_gradients.py`).
* **Downlink** (`downlink_bytes`): clients are stateless, so each sampled
  client must learn the mask with the weights. A pruned tensor is sent as
  `bitmap` or `coo` whose written positions are the *mask's* (zeros inside the
  mask included), i.e. ceil(N/8) + 4|mask| or 8|mask| bytes, never dense
  values plus a separate bitmap, which would cost more. A tensor without a
  mask, or whose mask is all ones, is flagged as a dense layer (part of the
  2-bit choice of encoding, see `encodings.py`): no mask bits are sent and it
  takes the smallest encoding of its own values. The broadcast is counted once
  per sampled client (unicast).

These are what fedprune reports as `bytes_down` / `bytes_up`. They are NOT what
TFF's simulation moves: in this design TFF broadcasts every wrapper's float32
mask, float32 threshold and int64 pruning step as non-trainable weights next to
dense float32 weights, and uploads dense float32 deltas (and TFF's local runtime
does not measure wire bytes at all). `tff_simulation_bytes` counts those dense
tensors so reports can show both numbers side by side.

Pure numpy; no TensorFlow import.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from fedprune.federated import encodings
from fedprune.federated.encodings import BITMAP, COO, DENSE, ENCODINGS, MASKED_VALUES


@dataclasses.dataclass(frozen=True)
class PayloadBytes:
    """Byte totals, in bytes, of a list of tensors (possibly summed over clients).

    Attributes:
      dense: every tensor as raw float32 (4 bytes per entry): what plain FedAvg
        sends, the reference for `compression_ratio`.
      bitmap: every tensor as `bitmap` (written at the sent mask's positions
        where the downlink carries a mask).
      coo: every tensor as `coo` (likewise).
      masked_values: every tensor as values inside its known mask; None unless
        that is valid for every tensor.
      sent: each tensor in its own smallest valid encoding: the number reported.
      chosen: (encoding, number of tensors that took it), in `ENCODINGS` order,
        encodings never chosen left out.
    """

    dense: int
    bitmap: int
    coo: int
    masked_values: int | None
    sent: int
    chosen: tuple[tuple[str, int], ...] = ()

    @classmethod
    def empty(cls) -> PayloadBytes:
        """Zero bytes; the start value for summing (`masked_values` trivially valid)."""
        return cls(dense=0, bitmap=0, coo=0, masked_values=0, sent=0)

    @property
    def compression_ratio(self) -> float:
        """`dense / sent`; see `compression_ratio()`."""
        return compression_ratio(self.dense, self.sent)

    def __add__(self, other: PayloadBytes) -> PayloadBytes:
        counts = dict(self.chosen)
        for name, count in other.chosen:
            counts[name] = counts.get(name, 0) + count
        masked = (
            None
            if self.masked_values is None or other.masked_values is None
            else self.masked_values + other.masked_values
        )
        return PayloadBytes(
            dense=self.dense + other.dense,
            bitmap=self.bitmap + other.bitmap,
            coo=self.coo + other.coo,
            masked_values=masked,
            sent=self.sent + other.sent,
            chosen=tuple((e, counts[e]) for e in ENCODINGS if counts.get(e)),
        )

    def times(self, k: int) -> PayloadBytes:
        """The same payload sent `k` times (e.g. to each of k sampled clients)."""
        if k < 0 or int(k) != k:
            raise ValueError(f"k must be a whole number >= 0, got {k!r}")
        k = int(k)
        return PayloadBytes(
            dense=k * self.dense,
            bitmap=k * self.bitmap,
            coo=k * self.coo,
            masked_values=None if self.masked_values is None else k * self.masked_values,
            sent=k * self.sent,
            chosen=tuple((name, k * count) for name, count in self.chosen if k),
        )


def _aligned_masks(masks, arrays: Sequence, name: str) -> Sequence:
    if masks is None:
        return [None] * len(arrays)
    if len(masks) != len(arrays):
        raise ValueError(f"{name} has {len(masks)} entries for {len(arrays)} tensors")
    return masks


def payload_bytes(arrays: Sequence, *, known_masks=None, sent_masks=None,
                  quantization: str = encodings.NO_QUANTIZATION) -> PayloadBytes:
    """Byte totals of a list of tensors, each taking its smallest valid encoding.

    Args:
      arrays: the tensors (float32), e.g. a model's trainable weights.
      known_masks: optional list aligned with `arrays`; entry i (or None) is a
        mask the receiver holds for tensor i (see `smallest_encoding`).
      sent_masks: optional list aligned with `arrays`; entry i (or None) is a
        mask the receiver must learn for tensor i.
      quantization: the values' wire format (`encodings.QUANTIZATIONS`); the
        `dense` reference stays float32.

    Returns:
      A `PayloadBytes`.

    Raises:
      ValueError: mask lists of the wrong length, or as in `smallest_encoding`.
    """
    arrays = list(arrays)
    known = _aligned_masks(known_masks, arrays, "known_masks")
    sent = _aligned_masks(sent_masks, arrays, "sent_masks")
    total = PayloadBytes.empty()
    for array, known_mask, sent_mask in zip(arrays, known, sent, strict=True):
        sizes = encodings.candidate_sizes(array, known_mask, sent_mask, quantization)
        name, nbytes = encodings.pick_smallest(sizes)
        total += PayloadBytes(
            dense=encodings.expected_size(np.size(array), 0, DENSE),
            bitmap=sizes[BITMAP],
            coo=sizes[COO],
            masked_values=sizes.get(MASKED_VALUES),
            sent=nbytes,
            chosen=((name, 1),),
        )
    return total


def downlink_bytes(
    global_weights: Sequence, masks: Sequence | None, num_clients: int
) -> PayloadBytes:
    """Bytes to broadcast the global model and its masks to `num_clients` stateless clients.

    Args:
      global_weights: the server's tensors (float32), zero off their masks.
      masks: list aligned with `global_weights`; None (or a None entry) for
        tensors without a mask. A pruned tensor goes as `bitmap`/`coo` at its
        mask's positions; an all-ones mask costs nothing extra (dense layer).
      num_clients: the number of sampled clients; each receives its own copy.

    Returns:
      `PayloadBytes` totals over all clients (bytes).

    Raises:
      ValueError: a weight is nonzero outside its mask, or as in `payload_bytes`.
    """
    return payload_bytes(global_weights, sent_masks=masks).times(num_clients)


def uplink_bytes(
    client_updates: Sequence[Sequence], broadcast_masks: Sequence | None = None,
    quantization: str = encodings.NO_QUANTIZATION,
) -> PayloadBytes:
    """Bytes the clients upload: each update tensor in its smallest valid encoding.

    Args:
      client_updates: one list of tensors (float32 deltas) per client. Only the
        tensors given are counted: append the aggregation weight (a scalar,
        4 bytes dense) if it should be.
      broadcast_masks: optional list aligned with each update: the masks the
        server broadcast this round, known to it, so `masked_values` is
        allowed for updates that are zero off them.
      quantization: the values' wire format (`--upload_quantization`).

    Returns:
      `PayloadBytes` totals over all clients (bytes).
    """
    total = PayloadBytes.empty()
    for update in client_updates:
        total += payload_bytes(update, known_masks=broadcast_masks, quantization=quantization)
    return total


@dataclasses.dataclass(frozen=True)
class TffSimulationBytes:
    """Dense tensor bytes TFF's simulation moves in this design (bytes, all clients).

    Attributes:
      down: trainable + non-trainable weights (masks, thresholds, pruning
        steps) broadcast to every client.
      up: dense trainable deltas uploaded by every client.
    """

    down: int
    up: int


def tff_simulation_bytes(
    trainable_arrays: Sequence, non_trainable_arrays: Sequence, *, num_clients: int = 1
) -> TffSimulationBytes:
    """What TFF moves: every tensor dense at its dtype's itemsize.

    Args:
      trainable_arrays: the model's trainable weights (broadcast, and uploaded
        as dense deltas of the same dtype).
      non_trainable_arrays: the non-trainable weights (tfmot's float32 `mask`
        and `threshold`, int64 `pruning_step`; broadcast only: never aggregated).
      num_clients: sampled clients per round.

    Returns:
      `TffSimulationBytes` for one round, totals over clients. Client weights
      and metrics that TFF also uploads are not counted, nor the payload
      fields beside the delta (the masks of modes `client`/`both`, the dense
      `regrow_gradient` tensors of `--regrow=gradient`).
    """

    def nbytes(arrays: Sequence) -> int:
        return sum(int(np.asarray(a).nbytes) for a in arrays)

    trainable = nbytes(trainable_arrays)
    return TffSimulationBytes(
        down=num_clients * (trainable + nbytes(non_trainable_arrays)),
        up=num_clients * trainable,
    )


@dataclasses.dataclass(frozen=True)
class MaskCoding:
    """Sizes of one copy of a model's 0/1 masks under each mask coding.

    Attributes:
      params: entries of the masked tensors (N, summed).
      kept: ones among them.
      bitmap_bits: one bit per entry, each tensor padded to whole bytes.
      coo_bits: a 32-bit index per kept entry.
      entropy_bits: the entropy bound, sum over tensors of N H(p) with p the
        tensor's density (`encodings.entropy_bits`); a bound, not a payload.
    """

    params: int
    kept: int
    bitmap_bits: int
    coo_bits: int
    entropy_bits: float


def mask_coding(masks: Sequence) -> MaskCoding:
    """`MaskCoding` of the masks given (None entries and all-ones masks cost nothing).

    An all-ones mask is flagged dense (see `downlink_bytes`), and its entropy is 0 too.
    """
    params = kept = bitmap = coo = 0
    entropy = 0.0
    for mask in masks:
        if mask is None:
            continue
        n, k = int(np.size(mask)), int(np.count_nonzero(mask))
        params, kept = params + n, kept + k
        entropy += encodings.entropy_bits(n, k)
        if k < n:
            bitmap += 8 * -(-n // 8)
            coo += 32 * k
    return MaskCoding(params, kept, bitmap, coo, entropy)


def compression_ratio(dense_bytes: int, sent_bytes: int) -> float:
    """`dense_bytes / sent_bytes`: how many times smaller than dense float32 the payload is.

    Returns `inf` when nothing is sent but the dense payload is not empty, and
    1.0 when both are zero.
    """
    if sent_bytes == 0:
        return 1.0 if dense_bytes == 0 else math.inf
    return dense_bytes / sent_bytes
