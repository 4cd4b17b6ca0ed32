"""Encodings of one tensor: the bytes an efficient implementation would send for it.

Every size here is measured: the encodings below are really produced as bytes
from the arrays and `len()` is taken. `expected_size` gives the closed forms,
and the tests check that the two agree exactly. `communication.py` sums them
over a model's tensors and clients (`bytes_down` / `bytes_up`).

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

**Quantized values** (`--upload_quantization`, `QUANTIZATIONS`): the same
layouts with the written values at a narrower width b: ``fp16`` writes IEEE
half floats (b = 2, a cast), ``int8`` writes signed bytes (b = 1) after one
float32 per-tensor scale, max|x| / 127, at the front of the payload
(`quantize_int8`). Every 4 above becomes b, plus 4 bytes for the scale:
dense b N (+ 4), bitmap ceil(N / 8) + b nnz (+ 4), coo 4 nnz + b nnz (+ 4),
masked values b |mask| (+ 4). The written positions are those of the
unquantized tensor (a value that rounds to 0 is still written), so the
receiver learns the same mask. `decode` returns the dequantized float32
tensor.

**Top-k gradient** (`encode_top_k`, `--regrow=gradient`): the k pruned
coordinates of a kernel with the largest |gradient|, as k int32 flat indices
(in decreasing |gradient|, ties to the lower index) followed by their k
float32 values: 8 k bytes (`TOP_K_ENTRY_BYTES` per entry).

**Mask entropy** (`entropy_bits`): a 0/1 mask of N entries with empirical
density p costs at least N H(p) bits, H the binary entropy, under any coding
that treats its entries as independent draws: the bound a bitmap (N bits) or
a coordinate list (32 bits per kept entry) can be compared with. It is a
bound, not a payload, and is never added to the byte counts.

So `bitmap` beats `dense` while the density nnz/N is below 31/32 and `coo`
beats `bitmap` only below 1/32 (docs/design.md, "Communication bytes"). Ties
go to the encoding listed first in `ENCODINGS` (the simpler one).

What is not counted: the tensor's shape and dtype (part of the model
architecture both sides agree on), the choice of encoding (2 bits per tensor),
and transport framing. Zeros are numeric zeros: -0.0 is a zero (tfmot's
`kernel * mask` produces it) and decodes as +0.0; every other value, NaN
included, round-trips bit-exactly.

Pure numpy; no TensorFlow import (the TF side of quantization is `quantization.py`).
"""

from __future__ import annotations

import math

import numpy as np

DENSE = "dense"
BITMAP = "bitmap"
COO = "coo"
MASKED_VALUES = "masked_values"
# Also the tie-break order of `smallest_encoding`: simplest first.
ENCODINGS = (DENSE, BITMAP, COO, MASKED_VALUES)

NO_QUANTIZATION = "none"
FP16 = "fp16"
INT8 = "int8"
QUANTIZATIONS = (NO_QUANTIZATION, FP16, INT8)

_VALUE = np.dtype("<f4")
_INDEX = np.dtype("<i4")
_SCALE = np.dtype("<f4")
# The wire dtype of the written values, per quantization.
_WIRE = {NO_QUANTIZATION: _VALUE, FP16: np.dtype("<f2"), INT8: np.dtype("i1")}
INT8_LEVELS = 127  # int8 values lie in [-127, 127]: symmetric around 0
_MAX_COO_ENTRIES = np.iinfo(np.int32).max + 1  # flat indices must fit in int32


def _check_encoding(encoding: str) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; expected one of {ENCODINGS}")


def _check_quantization(quantization: str) -> None:
    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {quantization!r}; expected one of {QUANTIZATIONS}")


def value_bytes(quantization: str = NO_QUANTIZATION) -> int:
    """Bytes per written value: 4 (float32), 2 (`fp16`) or 1 (`int8`)."""
    _check_quantization(quantization)
    return _WIRE[quantization].itemsize


def scale_bytes(quantization: str = NO_QUANTIZATION) -> int:
    """Bytes of per-tensor side information: the float32 scale of `int8`, else 0."""
    _check_quantization(quantization)
    return _SCALE.itemsize if quantization == INT8 else 0


def int8_scale(values) -> np.float32:
    """The per-tensor int8 scale, max|x| / 127, in float32 (0 for an all-zero tensor)."""
    values = np.asarray(values, np.float32)
    peak = np.max(np.abs(values)) if values.size else np.float32(0)
    return np.float32(peak) / np.float32(INT8_LEVELS)


def quantize_int8(values, rng: np.random.Generator | None = None):
    """Int8 codes and scale of a float32 tensor: x ~ codes * scale.

    Args:
      values: the tensor.
      rng: draws the stochastic rounding: y = x / scale is rounded up with
        probability y - floor(y), so E[codes * scale] = x (unbiased) and the
        error is below one step (`scale`). None rounds to the nearest code
        (error at most scale / 2, biased).

    Returns:
      (int8 array of the tensor's shape, float32 scale). Zeros stay exactly 0.
    """
    values = np.asarray(values, np.float32)
    scale = int8_scale(values)
    scaled = np.zeros_like(values) if scale == 0 else values / scale
    if rng is None:
        codes = np.rint(scaled)
    else:
        low = np.floor(scaled)
        codes = low + (rng.random(values.shape, dtype=np.float32) < scaled - low)
    return np.clip(codes, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


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


def encode(array, encoding: str, *, mask=None, quantization: str = NO_QUANTIZATION,
           rng: np.random.Generator | None = None) -> bytes:
    """Encodes a tensor as bytes (float32 values unless quantized).

    Args:
      array: the tensor; cast to float32 (the wire format), so pass float32 for
        an exact round trip.
      encoding: one of `ENCODINGS`.
      mask: positions that may hold nonzeros (bool or 0/1 array of the array's
        shape). Required for `masked_values` (the receiver holds it; only the
        values at its positions are written). For `bitmap`/`coo` the mask's
        positions are written instead of the nonzeros', so the receiver learns
        the mask (zeros inside it included). `dense` only checks it.
      quantization: the wire format of the values, one of `QUANTIZATIONS`:
        `fp16` casts them to half floats; `int8` writes the float32 scale first,
        then `quantize_int8` codes (positions are the unquantized tensor's).
      rng: for `int8`, the generator of the stochastic rounding (None: round
        to nearest); ignored otherwise.

    Returns:
      The payload; its length in bytes is `expected_size(array.size, nnz,
      encoding, quantization)` with nnz the number of written positions.

    Raises:
      ValueError: unknown encoding; `masked_values` without a mask; a mask of
        the wrong shape; nonzeros outside the mask; `coo` on a tensor of more than 2**31
        entries (int32 indices).
    """
    _check_encoding(encoding)
    _check_quantization(quantization)
    values = np.asarray(array, dtype=np.float32)
    if mask is not None:
        mask = _as_mask(mask, values.shape)
    elif encoding == MASKED_VALUES:
        raise ValueError("masked_values needs the mask the receiver holds")
    flat = values.ravel()
    support = _support(values, mask).ravel()
    header = b""
    wire = flat
    if quantization == INT8:
        wire, scale = quantize_int8(flat, rng)
        header = np.asarray(scale, _SCALE).tobytes()
    wire = wire.astype(_WIRE[quantization])
    if encoding == DENSE:
        return header + wire.tobytes()
    written = wire[support].tobytes()
    if encoding == MASKED_VALUES:
        return header + written
    if encoding == BITMAP:
        return header + np.packbits(support).tobytes() + written
    if flat.size > _MAX_COO_ENTRIES:
        raise ValueError(f"coo uses int32 indices; a tensor of {flat.size} entries is too large")
    return header + np.flatnonzero(support).astype(_INDEX).tobytes() + written


def _as_shape(shape) -> tuple[int, ...]:
    """A shape tuple from a tuple, list or int."""
    return tuple(int(d) for d in np.atleast_1d(np.asarray(shape, dtype=np.int64)))


def _split_sparse(payload: bytes, encoding: str, n: int,
                  width: int = 4) -> tuple[np.ndarray, bytes]:
    """(written positions as a flat bool array, value bytes) of a bitmap or coo payload.

    `width` is the bytes per written value (`value_bytes`); a coo entry is a
    4-byte index and one value.
    """
    if encoding == BITMAP:
        num_bitmap_bytes = -(-n // 8)
        if len(payload) < num_bitmap_bytes:
            raise ValueError(f"bitmap payload of {len(payload)} bytes is shorter than its bitmap")
        bits = np.unpackbits(np.frombuffer(payload[:num_bitmap_bytes], np.uint8))
        if bits[n:].any():
            raise ValueError("bitmap payload has padding bits set")
        return bits[:n].astype(bool), payload[num_bitmap_bytes:]
    entry = _INDEX.itemsize + width
    if len(payload) % entry:
        raise ValueError(f"coo payload of {len(payload)} bytes is not a multiple of {entry}")
    nnz = len(payload) // entry
    indices = np.frombuffer(payload[: 4 * nnz], _INDEX)
    if nnz and (indices[0] < 0 or indices[-1] >= n or np.any(np.diff(indices) <= 0)):
        raise ValueError("coo indices are not strictly increasing within the tensor")
    support = np.zeros(n, bool)
    support[indices] = True
    return support, payload[4 * nnz :]


def _values_from(value_bytes: bytes, count: int, encoding: str,
                 quantization: str = NO_QUANTIZATION, scale: float = 1.0) -> np.ndarray:
    wire = _WIRE[quantization]
    if len(value_bytes) != wire.itemsize * count:
        raise ValueError(f"{encoding} payload carries {len(value_bytes)} value bytes; "
                         f"expected {wire.itemsize * count}")
    values = np.frombuffer(value_bytes, wire).astype(np.float32)
    return values * np.float32(scale) if quantization == INT8 else values


def decode(payload: bytes, encoding: str, shape, *, mask=None,
           quantization: str = NO_QUANTIZATION) -> np.ndarray:
    """Rebuilds the float32 tensor of `shape` from `encode`'s payload.

    Args:
      payload: bytes from `encode`.
      encoding: the encoding it was produced with.
      shape: the tensor's shape (known to the receiver from the model).
      mask: required for `masked_values` (the mask it was encoded with);
        ignored otherwise.
      quantization: the quantization it was encoded with.

    Returns:
      A new float32 array equal to the encoded one (zeros come back as +0.0);
      quantized: the dequantized values (`fp16` widened, `int8` codes * scale).

    Raises:
      ValueError: the payload does not fit the shape or encoding.
    """
    _check_encoding(encoding)
    _check_quantization(quantization)
    shape = _as_shape(shape)
    n = math.prod(shape)
    scale = np.float32(1)
    if quantization == INT8:
        if len(payload) < _SCALE.itemsize:
            raise ValueError(f"int8 payload of {len(payload)} bytes has no scale")
        scale = np.frombuffer(payload[: _SCALE.itemsize], _SCALE)[0]
        payload = payload[_SCALE.itemsize :]
    if encoding == DENSE:
        return _values_from(payload, n, encoding, quantization, scale).reshape(shape)
    if encoding == MASKED_VALUES:
        if mask is None:
            raise ValueError("masked_values needs the mask the receiver holds")
        support = _as_mask(mask, shape).ravel()
        value_payload = payload
    else:
        support, value_payload = _split_sparse(payload, encoding, n,
                                               value_bytes(quantization))
    out = np.zeros(n, np.float32)
    out[support] = _values_from(value_payload, int(np.count_nonzero(support)), encoding,
                                quantization, scale)
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


def encoded_size(array, encoding: str, *, mask=None,
                 quantization: str = NO_QUANTIZATION) -> int:
    """Measured size in bytes: `len(encode(array, encoding, mask=mask, quantization=...))`."""
    return len(encode(array, encoding, mask=mask, quantization=quantization))


def expected_size(n: int, nnz: int, encoding: str,
                  quantization: str = NO_QUANTIZATION) -> int:
    """Closed-form size in bytes of a tensor of `n` entries, `nnz` of them written.

    For `masked_values`, `nnz` is the mask's number of ones. Values take
    `value_bytes(quantization)` each, plus `scale_bytes(quantization)` per tensor.
    """
    _check_encoding(encoding)
    if not 0 <= nnz <= n:
        raise ValueError(f"need 0 <= nnz <= n, got nnz={nnz}, n={n}")
    b = value_bytes(quantization)
    side = scale_bytes(quantization)
    if encoding == DENSE:
        return side + b * n
    if encoding == BITMAP:
        return side + -(-n // 8) + b * nnz
    if encoding == COO:
        return side + (_INDEX.itemsize + b) * nnz
    return side + b * nnz


TOP_K_ENTRY_BYTES = _INDEX.itemsize + _VALUE.itemsize  # one (int32 index, float32 value)


def top_k_order(gradient, mask, k: int) -> np.ndarray:
    """Flat indices of the k entries off `mask` with the largest |gradient|.

    Ordered by decreasing |gradient|, ties to the lower index (the order of
    `regrowth.top_k_pruned`, which computes the same in TF on the client).

    Raises:
      ValueError: k is negative or larger than the number of entries off the mask.
    """
    flat = np.asarray(gradient, np.float32).ravel()
    pruned = np.flatnonzero(np.asarray(mask).ravel() == 0)
    if not 0 <= k <= pruned.size:
        raise ValueError(f"need 0 <= k <= {pruned.size} pruned entries, got k={k}")
    order = np.argsort(-np.abs(flat[pruned]), kind="stable")  # stable: ties by index
    return pruned[order[:k]]


def encode_top_k(gradient, mask, k: int) -> bytes:
    """A client's `--regrow=gradient` upload for one kernel: `TOP_K_ENTRY_BYTES` * k bytes.

    Args:
      gradient: the kernel's dense gradient.
      mask: the broadcast 0/1 mask (the candidates are its zeros).
      k: how many entries to send (`regrowth.grow_count` of the mask).

    Returns:
      k int32 flat indices (`top_k_order`), then the k float32 gradient values there.
    """
    indices = top_k_order(gradient, mask, k)
    values = np.asarray(gradient, np.float32).ravel()[indices]
    return indices.astype(_INDEX).tobytes() + values.astype(_VALUE).tobytes()


def decode_top_k(payload: bytes, shape) -> np.ndarray:
    """The dense float32 tensor of `shape` an `encode_top_k` payload holds (zeros elsewhere)."""
    shape = _as_shape(shape)
    if len(payload) % TOP_K_ENTRY_BYTES:
        raise ValueError(f"a top-k payload is a multiple of {TOP_K_ENTRY_BYTES} bytes, "
                         f"not {len(payload)}")
    k = len(payload) // TOP_K_ENTRY_BYTES
    indices = np.frombuffer(payload[:_INDEX.itemsize * k], _INDEX)
    values = np.frombuffer(payload[_INDEX.itemsize * k:], _VALUE)
    dense = np.zeros(math.prod(shape), np.float32)
    dense[indices] = values
    return dense.reshape(shape)


def binary_entropy(p: float) -> float:
    """H(p) = -p log2 p - (1 - p) log2(1 - p) in bits, with H(0) = H(1) = 0."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"need a probability in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return -p * math.log2(p) - (1.0 - p) * math.log2(1.0 - p)


def entropy_bits(n: int, kept: int) -> float:
    """Entropy bound in bits of a 0/1 mask of `n` entries with `kept` ones: n H(kept / n)."""
    if not 0 <= kept <= n:
        raise ValueError(f"need 0 <= kept <= n, got kept={kept}, n={n}")
    return n * binary_entropy(kept / n) if n else 0.0


def candidate_sizes(array, known_mask=None, sent_mask=None,
                    quantization: str = NO_QUANTIZATION) -> dict[str, int]:
    """Measured bytes of every valid encoding of one tensor, in `ENCODINGS` order."""
    q = quantization
    if known_mask is not None and sent_mask is not None:
        raise ValueError("a mask is either known to the receiver or sent to it, not both")
    values = np.asarray(array, dtype=np.float32)
    if sent_mask is not None:
        sent_mask = _as_mask(sent_mask, values.shape)
        if not sent_mask.all():
            # The mask must reach the client, so only encodings that write positions qualify.
            return {e: encoded_size(values, e, mask=sent_mask, quantization=q)
                    for e in (BITMAP, COO)}
        # All ones: flag a dense layer, no mask bits; fall through to the plain encodings.
    sizes = {e: encoded_size(values, e, quantization=q) for e in (DENSE, BITMAP, COO)}
    if known_mask is not None:
        known_mask = _as_mask(known_mask, values.shape)
        if not np.any((values != 0) & ~known_mask):
            sizes[MASKED_VALUES] = encoded_size(values, MASKED_VALUES, mask=known_mask,
                                                quantization=q)
    return sizes


def pick_smallest(sizes: dict[str, int]) -> tuple[str, int]:
    """(encoding, bytes) of the smallest of `candidate_sizes`; ties: the earlier in `ENCODINGS`."""
    # `min` keeps the first of equal sizes, and `sizes` is in ENCODINGS order.
    return min(sizes.items(), key=lambda item: item[1])


def smallest_encoding(array, *, known_mask=None, sent_mask=None,
                      quantization: str = NO_QUANTIZATION) -> tuple[str, int]:
    """The smallest valid encoding of one tensor and its measured size in bytes.

    Args:
      array: the tensor (float32).
      known_mask: a mask the receiver already holds (uplink inside the
        broadcast mask): makes `masked_values` a candidate when the array is
        zero off it; otherwise it is ignored.
      sent_mask: a mask the receiver must learn (downlink to stateless
        clients): unless it is all ones, only `bitmap`/`coo` written at the
        mask's positions qualify.
      quantization: the values' wire format (`QUANTIZATIONS`).

    Returns:
      (encoding name, bytes); ties go to the earlier name in `ENCODINGS`.

    Raises:
      ValueError: both masks given, a mask of the wrong shape, or nonzeros
        outside `sent_mask`.
    """
    return pick_smallest(candidate_sizes(array, known_mask, sent_mask, quantization))
