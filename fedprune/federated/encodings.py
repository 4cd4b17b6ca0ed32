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

So `bitmap` beats `dense` while the density nnz/N is below 31/32 and `coo`
beats `bitmap` only below 1/32 (docs/design.md, "Communication bytes"). Ties
go to the encoding listed first in `ENCODINGS` (the simpler one).

What is not counted: the tensor's shape and dtype (part of the model
architecture both sides agree on), the choice of encoding (2 bits per tensor),
and transport framing. Zeros are numeric zeros: -0.0 is a zero (tfmot's
`kernel * mask` produces it) and decodes as +0.0; every other value, NaN
included, round-trips bit-exactly.

Pure numpy; no TensorFlow import.
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

_VALUE = np.dtype("<f4")
_INDEX = np.dtype("<i4")
_MAX_COO_ENTRIES = np.iinfo(np.int32).max + 1  # flat indices must fit in int32


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


def candidate_sizes(array, known_mask=None, sent_mask=None) -> dict[str, int]:
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


def pick_smallest(sizes: dict[str, int]) -> tuple[str, int]:
    """(encoding, bytes) of the smallest of `candidate_sizes`; ties: the earlier in `ENCODINGS`."""
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
    return pick_smallest(candidate_sizes(array, known_mask, sent_mask))
