"""Communication accounting: the bytes an efficient implementation would send.

Every size here is measured: the encodings below are really produced as bytes
from the arrays and `len()` is taken. `expected_size` gives the closed forms,
and the tests check that the two agree exactly.

For a float32 tensor of N entries, of which `nnz` positions are written
(its nonzeros, or the positions of a mask when one is given):

=================  ===========================  ==================================
encoding           bytes                        layout (little-endian)
=================  ===========================  ==================================
``dense``          4 N                          all values, float32, C order
``bitmap``         ceil(N / 8) + 4 nnz          `np.packbits` presence bitmap,
                                                then the written values
``coo``            8 nnz                        int32 flat indices (ascending),
                                                then the written values
``masked_values``  4 |mask|                     the values at the mask's
                                                positions; the receiver already
                                                holds the mask
=================  ===========================  ==================================

So `bitmap` beats `dense` while the density nnz/N is below 31/32 and `coo`
beats `bitmap` only below 1/32 (docs/design.md, "Communication bytes"). Ties
go to the encoding listed first in `ENCODINGS` (the simpler one).

What is not counted: the tensor's shape and dtype (part of the model
architecture both sides agree on), the choice of encoding (2 bits per tensor),
and transport framing. Zeros are numeric zeros: -0.0 is a zero (tfmot's
`kernel * mask` produces it) and decodes as +0.0; every other value, NaN
included, round-trips bit-exactly.

Uplink vs downlink:

* **Uplink** (`uplink_bytes`): clients that train inside the server's broadcast
  mask send only the values at the mask's positions (`masked_values`): the
  server knows the mask it sent. An update with mass off that mask (e.g. TFF's
  stock client work, whose last optimizer step is not re-masked) cannot use
  `masked_values` and is counted with its own nonzeros instead, so the numbers
  stay honest rather than the mass being dropped.
* **Downlink** (`downlink_bytes`): clients are stateless, so each sampled
  client must learn the mask with the weights. A pruned tensor is sent as
  `bitmap` or `coo` whose written positions are the *mask's* (zeros inside the
  mask included), i.e. ceil(N/8) + 4|mask| or 8|mask| bytes, never dense
  values plus a separate bitmap, which would cost more. A tensor without a
  mask, or whose mask is all ones, is flagged as a dense layer (part of the
  2-bit tag above): no mask bits are sent and it takes the smallest encoding of
  its own values. The broadcast is counted once per sampled client (unicast).

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

DENSE = "dense"
BITMAP = "bitmap"
COO = "coo"
MASKED_VALUES = "masked_values"
# Also the tie-break order of `smallest_encoding`: simplest first.
ENCODINGS = (DENSE, BITMAP, COO, MASKED_VALUES)

_VALUE = np.dtype("<f4")
_INDEX = np.dtype("<i4")
_MAX_COO_ENTRIES = np.iinfo(np.int32).max + 1  # flat indices must fit in int32


# --------------------------------------------------------------------------
# One tensor.


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def _as_mask(mask, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask of `shape` (tfmot masks are float32 0/1)."""
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"mask shape {mask.shape} != tensor shape {shape}")
    return mask != 0


def _support(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The positions to write: `mask` if given (checked to cover all nonzeros), else nonzeros."""
    nonzero = values != 0
    if mask is None:
        return nonzero
    off_mask = np.count_nonzero(nonzero & ~mask)
    if off_mask:
        # Writing only the mask's positions would silently drop this mass.
        raise ValueError(f"{off_mask} nonzero entries lie outside the mask")
    return mask


def encode(array, encoding: str, *, mask=None) -> bytes:
    """Encodes a tensor as float32 bytes.

    Args:
      array: the tensor; cast to float32 (the wire format), so pass float32 for
        an exact round trip.
      encoding: one of `ENCODINGS`.
      mask: positions that may hold nonzeros (bool or 0/1 array of the array's
        shape). Required for `masked_values` (the receiver holds it; only the
        values at its positions are written). For `bitmap`/`coo` the mask's
        positions are written instead of the nonzeros', so the receiver learns
        the mask (zeros inside it included). `dense` only checks it.

    Returns:
      The payload; its length in bytes is `expected_size(array.size, nnz,
      encoding)` with nnz the number of written positions.

    Raises:
      ValueError: unknown encoding; `masked_values` without a mask; a mask of
        the wrong shape; nonzeros outside the mask; `coo` on a tensor of more than 2**31
        entries (int32 indices).
    """
    _check_encoding(encoding)
    values = np.asarray(array, dtype=np.float32)
    if mask is not None:
        mask = _as_mask(mask, values.shape)
    elif encoding == MASKED_VALUES:
        raise ValueError("masked_values needs the mask the receiver holds")
    flat = values.ravel()
    support = _support(values, mask).ravel()
    if encoding == DENSE:
        return flat.astype(_VALUE).tobytes()
    written = flat[support].astype(_VALUE).tobytes()
    if encoding == MASKED_VALUES:
        return written
    if encoding == BITMAP:
        return np.packbits(support).tobytes() + written
    if flat.size > _MAX_COO_ENTRIES:
        raise ValueError(f"coo uses int32 indices; a tensor of {flat.size} entries is too large")
    return np.flatnonzero(support).astype(_INDEX).tobytes() + written


def _as_shape(shape) -> tuple[int, ...]:
    """A shape tuple from a tuple, list or int."""
    return tuple(int(d) for d in np.atleast_1d(np.asarray(shape, dtype=np.int64)))


def _split_sparse(payload: bytes, encoding: str, n: int) -> tuple[np.ndarray, bytes]:
    """(written positions as a flat bool array, value bytes) of a bitmap or coo payload."""
    if encoding == BITMAP:
        num_bitmap_bytes = -(-n // 8)
        if len(payload) < num_bitmap_bytes:
            raise ValueError(f"bitmap payload of {len(payload)} bytes is shorter than its bitmap")
        bits = np.unpackbits(np.frombuffer(payload[:num_bitmap_bytes], np.uint8))
        if bits[n:].any():
            raise ValueError("bitmap payload has padding bits set")
        return bits[:n].astype(bool), payload[num_bitmap_bytes:]
    if len(payload) % 8:
        raise ValueError(f"coo payload of {len(payload)} bytes is not a multiple of 8")
    nnz = len(payload) // 8
    indices = np.frombuffer(payload[: 4 * nnz], _INDEX)
    if nnz and (indices[0] < 0 or indices[-1] >= n or np.any(np.diff(indices) <= 0)):
        raise ValueError("coo indices are not strictly increasing within the tensor")
    support = np.zeros(n, bool)
    support[indices] = True
    return support, payload[4 * nnz :]


def _values_from(value_bytes: bytes, count: int, encoding: str) -> np.ndarray:
    if len(value_bytes) != 4 * count:
        raise ValueError(
            f"{encoding} payload carries {len(value_bytes)} value bytes; expected {4 * count}"
        )
    return np.frombuffer(value_bytes, _VALUE).astype(np.float32)


def decode(payload: bytes, encoding: str, shape, *, mask=None) -> np.ndarray:
    """Rebuilds the float32 tensor of `shape` from `encode`'s payload.

    Args:
      payload: bytes from `encode`.
      encoding: the encoding it was produced with.
      shape: the tensor's shape (known to the receiver from the model).
      mask: required for `masked_values` (the mask it was encoded with);
        ignored otherwise.

    Returns:
      A new float32 array equal to the encoded one (zeros come back as +0.0).

    Raises:
      ValueError: the payload does not fit the shape or encoding.
    """
    _check_encoding(encoding)
    shape = _as_shape(shape)
    n = math.prod(shape)
    if encoding == DENSE:
        return _values_from(payload, n, encoding).reshape(shape)
    if encoding == MASKED_VALUES:
        if mask is None:
            raise ValueError("masked_values needs the mask the receiver holds")
        support = _as_mask(mask, shape).ravel()
        value_bytes = payload
    else:
        support, value_bytes = _split_sparse(payload, encoding, n)
    out = np.zeros(n, np.float32)
    out[support] = _values_from(value_bytes, int(np.count_nonzero(support)), encoding)
    return out.reshape(shape)


def decode_mask(payload: bytes, encoding: str, shape) -> np.ndarray:
    """The positions a `bitmap` or `coo` payload writes, as a bool array of `shape`.

    For a payload encoded with a mask this is the mask: how a stateless client
    learns the server's mask from the downlink.

    Raises:
      ValueError: for another encoding, or a malformed payload.
    """
    if encoding not in (BITMAP, COO):
        raise ValueError(f"only bitmap and coo payloads carry positions, not {encoding!r}")
    shape = _as_shape(shape)
    return _split_sparse(payload, encoding, math.prod(shape))[0].reshape(shape)


def encoded_size(array, encoding: str, *, mask=None) -> int:
    """Measured size in bytes: `len(encode(array, encoding, mask=mask))`."""
    return len(encode(array, encoding, mask=mask))


def expected_size(n: int, nnz: int, encoding: str) -> int:
    """Closed-form size in bytes of a float32 tensor of `n` entries, `nnz` of them written.

    For `masked_values`, `nnz` is the mask's number of ones.
    """
    _check_encoding(encoding)
    if not 0 <= nnz <= n:
        raise ValueError(f"need 0 <= nnz <= n, got nnz={nnz}, n={n}")
    if encoding == DENSE:
        return 4 * n
    if encoding == BITMAP:
        return -(-n // 8) + 4 * nnz
    if encoding == COO:
        return 8 * nnz
    return 4 * nnz


def _candidate_sizes(array, known_mask=None, sent_mask=None) -> dict[str, int]:
    """Measured bytes of every valid encoding of one tensor, in `ENCODINGS` order."""
    if known_mask is not None and sent_mask is not None:
        raise ValueError("a mask is either known to the receiver or sent to it, not both")
    values = np.asarray(array, dtype=np.float32)
    if sent_mask is not None:
        sent_mask = _as_mask(sent_mask, values.shape)
        if not sent_mask.all():
            # The mask must reach the client, so only encodings that write positions qualify.
            return {e: encoded_size(values, e, mask=sent_mask) for e in (BITMAP, COO)}
        # All ones: flag a dense layer, no mask bits; fall through to the plain encodings.
    sizes = {e: encoded_size(values, e) for e in (DENSE, BITMAP, COO)}
    if known_mask is not None:
        known_mask = _as_mask(known_mask, values.shape)
        if not np.any((values != 0) & ~known_mask):
            sizes[MASKED_VALUES] = encoded_size(values, MASKED_VALUES, mask=known_mask)
    return sizes


def _pick_smallest(sizes: dict[str, int]) -> tuple[str, int]:
    # `min` keeps the first of equal sizes, and `sizes` is in ENCODINGS order.
    return min(sizes.items(), key=lambda item: item[1])


def smallest_encoding(array, *, known_mask=None, sent_mask=None) -> tuple[str, int]:
    """The smallest valid encoding of one tensor and its measured size in bytes.

    Args:
      array: the tensor (float32).
      known_mask: a mask the receiver already holds (uplink inside the
        broadcast mask): makes `masked_values` a candidate when the array is
        zero off it; otherwise it is ignored.
      sent_mask: a mask the receiver must learn (downlink to stateless
        clients): unless it is all ones, only `bitmap`/`coo` written at the
        mask's positions qualify.

    Returns:
      (encoding name, bytes); ties go to the earlier name in `ENCODINGS`.

    Raises:
      ValueError: both masks given, a mask of the wrong shape, or nonzeros
        outside `sent_mask`.
    """
    return _pick_smallest(_candidate_sizes(array, known_mask, sent_mask))


# --------------------------------------------------------------------------
# A payload: a list of tensors (a model or a model update).


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


def payload_bytes(arrays: Sequence, *, known_masks=None, sent_masks=None) -> PayloadBytes:
    """Byte totals of a list of tensors, each taking its smallest valid encoding.

    Args:
      arrays: the tensors (float32), e.g. a model's trainable weights.
      known_masks: optional list aligned with `arrays`; entry i (or None) is a
        mask the receiver holds for tensor i (see `smallest_encoding`).
      sent_masks: optional list aligned with `arrays`; entry i (or None) is a
        mask the receiver must learn for tensor i.

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
        sizes = _candidate_sizes(array, known_mask, sent_mask)
        name, nbytes = _pick_smallest(sizes)
        total += PayloadBytes(
            dense=expected_size(np.size(array), 0, DENSE),
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
    client_updates: Sequence[Sequence], broadcast_masks: Sequence | None = None
) -> PayloadBytes:
    """Bytes the clients upload: each update tensor in its smallest valid encoding.

    Args:
      client_updates: one list of tensors (float32 deltas) per client. Only the
        tensors given are counted: append the aggregation weight (a scalar,
        4 bytes dense) if it should be.
      broadcast_masks: optional list aligned with each update: the masks the
        server broadcast this round, known to it, so `masked_values` is
        allowed for updates that are zero off them.

    Returns:
      `PayloadBytes` totals over all clients (bytes).
    """
    total = PayloadBytes.empty()
    for update in client_updates:
        total += payload_bytes(update, known_masks=broadcast_masks)
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
      and metrics that TFF also uploads are not counted.
    """

    def nbytes(arrays: Sequence) -> int:
        return sum(int(np.asarray(a).nbytes) for a in arrays)

    trainable = nbytes(trainable_arrays)
    return TffSimulationBytes(
        down=num_clients * (trainable + nbytes(non_trainable_arrays)),
        up=num_clients * trainable,
    )


def compression_ratio(dense_bytes: int, sent_bytes: int) -> float:
    """`dense_bytes / sent_bytes`: how many times smaller than dense float32 the payload is.

    Returns `inf` when nothing is sent but the dense payload is not empty, and
    1.0 when both are zero.
    """
    if sent_bytes == 0:
        return 1.0 if dense_bytes == 0 else math.inf
    return dense_bytes / sent_bytes
