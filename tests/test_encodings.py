"""Tests for fedprune.federated.encodings: measured sizes, round trips, choices."""

import math

import numpy as np
import pytest

from fedprune.federated import encodings as enc

DENSITIES = [0.0, 1 / 64, 1 / 32, 0.5, 31 / 32, 1.0]
# Rank 1, 2 and 4; 7, 15, 143 and 90 entries are not multiples of 8.
SHAPES = [(7,), (64,), (256,), (3, 5), (13, 11), (16, 16), (2, 3, 3, 5), (4, 4, 4, 4)]
PLAIN = [enc.DENSE, enc.BITMAP, enc.COO]


def sparse_tensor(shape, density, seed=0):
    """float32 tensor with exactly round(density * N) nonzeros (none of them zero)."""
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    nnz = round(density * n)
    flat = np.zeros(n, np.float32)
    positions = rng.choice(n, size=nnz, replace=False)
    magnitudes = rng.uniform(0.5, 2.0, size=nnz) * rng.choice([-1.0, 1.0], size=nnz)
    flat[positions] = magnitudes.astype(np.float32)
    return flat.reshape(shape)


def superset_mask(array, extra=3, seed=1):
    """The array's support plus up to `extra` more positions (zeros inside the mask)."""
    rng = np.random.default_rng(seed)
    mask = (array != 0).ravel()
    off = np.flatnonzero(~mask)
    mask[rng.choice(off, size=min(extra, off.size), replace=False)] = True
    return mask.reshape(array.shape)


def bits(array):
    return np.ascontiguousarray(array, np.float32).view(np.uint32)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("encoding", enc.ENCODINGS)
class TestEveryEncoding:
    def _encode(self, x, encoding):
        mask = superset_mask(x) if encoding == enc.MASKED_VALUES else None
        written = int(np.count_nonzero(x)) if mask is None else int(mask.sum())
        return enc.encode(x, encoding, mask=mask), mask, written

    def test_measured_size_equals_closed_form(self, encoding, density, shape):
        x = sparse_tensor(shape, density)
        payload, mask, written = self._encode(x, encoding)
        assert len(payload) == enc.expected_size(x.size, written, encoding)
        assert enc.encoded_size(x, encoding, mask=mask) == len(payload)

    def test_round_trip_is_bit_exact(self, encoding, density, shape):
        x = sparse_tensor(shape, density)
        payload, mask, _ = self._encode(x, encoding)
        y = enc.decode(payload, encoding, shape, mask=mask)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_array_equal(bits(y), bits(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("encoding", [enc.BITMAP, enc.COO])
def test_positions_written_from_a_mask_reach_the_receiver(encoding, density, shape):
    x = sparse_tensor(shape, density)
    mask = superset_mask(x)
    payload = enc.encode(x, encoding, mask=mask)
    assert len(payload) == enc.expected_size(x.size, int(mask.sum()), encoding)
    np.testing.assert_array_equal(enc.decode_mask(payload, encoding, shape), mask)
    np.testing.assert_array_equal(bits(enc.decode(payload, encoding, shape)), bits(x))


@pytest.mark.parametrize("encoding", enc.ENCODINGS)
def test_special_values_round_trip_and_negative_zero_is_a_zero(encoding):
    x = np.array([-0.0, np.nan, np.inf, -np.inf, 1e-45, 0.0, -3.5, 0.0, 7.0], np.float32)
    mask = x != 0
    payload = enc.encode(x, encoding, mask=mask if encoding == enc.MASKED_VALUES else None)
    # NaN, the infinities and the denormal are nonzeros; -0.0 is not.
    assert len(payload) == enc.expected_size(9, 6, encoding)
    y = enc.decode(payload, encoding, x.shape, mask=mask)
    expected = x.copy()
    if encoding != enc.DENSE:
        expected[0] = 0.0  # a written zero is +0.0; the sign of a pruned zero carries nothing
    np.testing.assert_array_equal(bits(y), bits(expected))


def test_expected_sizes_by_hand():
    # N = 100: dense 400; bitmap ceil(100/8) = 13 + 4*5 = 33; coo 8*5 = 40; masked 4*5 = 20.
    assert [enc.expected_size(100, 5, e) for e in enc.ENCODINGS] == [400, 33, 40, 20]
    with pytest.raises(ValueError):
        enc.expected_size(10, 11, enc.BITMAP)
    with pytest.raises(ValueError, match="unknown encoding"):
        enc.expected_size(10, 1, "zip")


class TestSmallestEncoding:
    def test_switches_where_theory_says(self):
        # N = 256 (a multiple of 8, so the thresholds are exact):
        # coo < bitmap  <=>  8 nnz < 32 + 4 nnz  <=>  nnz < 8   = N / 32;
        # bitmap < dense <=> 32 + 4 nnz < 1024   <=>  nnz < 248 = 31 N / 32;
        # ties (nnz = 8, nnz = 248) go to the simpler encoding.
        for nnz in range(257):
            x = sparse_tensor((256,), nnz / 256, seed=nnz)
            expected = enc.COO if nnz < 8 else enc.BITMAP if nnz < 248 else enc.DENSE
            name, nbytes = enc.smallest_encoding(x)
            assert name == expected, nnz
            assert nbytes == enc.expected_size(256, nnz, expected)

    @pytest.mark.parametrize(
        "density, expected",
        [
            (0.0, enc.COO),
            (1 / 64, enc.COO),
            (1 / 32, enc.BITMAP),  # tie with coo
            (0.5, enc.BITMAP),
            (31 / 32, enc.DENSE),  # tie with bitmap
            (1.0, enc.DENSE),
        ],
    )
    @pytest.mark.parametrize("shape", [(64,), (16, 16), (4, 4, 4, 4)])
    def test_named_densities(self, shape, density, expected):
        assert enc.smallest_encoding(sparse_tensor(shape, density))[0] == expected

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("density", DENSITIES)
    def test_is_the_argmin_of_the_closed_forms(self, shape, density):
        x = sparse_tensor(shape, density)
        sizes = [enc.expected_size(x.size, np.count_nonzero(x), e) for e in PLAIN]
        assert enc.smallest_encoding(x) == (PLAIN[int(np.argmin(sizes))], min(sizes))

    def test_known_mask_allows_values_only(self):
        x = sparse_tensor((16, 16), 0.5)
        mask = superset_mask(x, extra=4)
        assert enc.smallest_encoding(x, known_mask=mask) == (enc.MASKED_VALUES, 4 * (128 + 4))

    def test_known_mask_is_skipped_when_the_array_leaves_it(self):
        x = sparse_tensor((16, 16), 0.5)
        mask = x != 0
        mask[np.unravel_index(np.flatnonzero(mask)[0], mask.shape)] = False
        # Off-mask mass must be sent with the array's own positions: bitmap 32 + 4*128.
        assert enc.smallest_encoding(x, known_mask=mask) == (enc.BITMAP, 544)

    def test_all_ones_sent_mask_costs_nothing(self):
        x = sparse_tensor((13, 11), 1.0)
        ones = np.ones(x.shape, np.float32)
        assert enc.smallest_encoding(x, sent_mask=ones) == enc.smallest_encoding(x)

    def test_partial_sent_mask_writes_the_mask(self):
        x = sparse_tensor((16, 16), 0.25)
        mask = superset_mask(x, extra=10)
        # 74 mask positions: bitmap 32 + 4*74 = 328 < coo 8*74 = 592; dense cannot carry a mask.
        assert enc.smallest_encoding(x, sent_mask=mask) == (enc.BITMAP, 328)
        sparse_mask = np.zeros(x.shape, bool)
        sparse_mask[0, :3] = True
        # 3 positions: coo 24 < bitmap 32 + 12 = 44.
        assert enc.smallest_encoding(x * sparse_mask, sent_mask=sparse_mask) == (enc.COO, 24)

    def test_both_masks_are_rejected(self):
        x = np.ones(8, np.float32)
        with pytest.raises(ValueError, match="not both"):
            enc.smallest_encoding(x, known_mask=x, sent_mask=x)


class TestMaskValidation:
    @pytest.mark.parametrize("encoding", enc.ENCODINGS)
    def test_off_mask_mass_raises(self, encoding):
        x = sparse_tensor((3, 5), 0.5)
        mask = x != 0
        mask[np.unravel_index(np.flatnonzero(mask)[-1], mask.shape)] = False
        with pytest.raises(ValueError, match="1 nonzero entries lie outside the mask"):
            enc.encode(x, encoding, mask=mask)

    def test_off_sent_mask_mass_raises(self):
        x = np.array([1.0, 2.0, 0.0, 0.0], np.float32)
        with pytest.raises(ValueError, match="outside the mask"):
            enc.smallest_encoding(x, sent_mask=[1, 0, 0, 0])

    def test_masked_values_needs_the_mask(self):
        x = np.ones(4, np.float32)
        with pytest.raises(ValueError, match="needs the mask"):
            enc.encode(x, enc.MASKED_VALUES)
        payload = enc.encode(x, enc.MASKED_VALUES, mask=x)
        with pytest.raises(ValueError, match="needs the mask"):
            enc.decode(payload, enc.MASKED_VALUES, (4,))

    def test_mask_shape_must_match(self):
        with pytest.raises(ValueError, match="shape"):
            enc.encode(np.ones((2, 3), np.float32), enc.MASKED_VALUES, mask=np.ones(6))

    def test_tfmot_float_masks_are_accepted(self):
        x = np.array([0.0, 2.0, 0.0, -1.0], np.float32)
        mask = np.array([0.0, 1.0, 1.0, 1.0], np.float32)
        payload = enc.encode(x, enc.MASKED_VALUES, mask=mask)
        assert len(payload) == 12
        np.testing.assert_array_equal(enc.decode(payload, enc.MASKED_VALUES, 4, mask=mask), x)


class TestMalformedPayloads:
    def test_wrong_lengths(self):
        x = sparse_tensor((10,), 0.5)
        for encoding in enc.ENCODINGS:
            payload = enc.encode(x, encoding, mask=x != 0)
            with pytest.raises(ValueError):
                enc.decode(payload + b"\0\0\0\0", encoding, (10,), mask=x != 0)

    def test_bitmap_padding_bits(self):
        payload = bytearray(enc.encode(np.zeros(10, np.float32), enc.BITMAP))
        payload[1] |= 0x01  # bit 16 of a 10-bit bitmap
        with pytest.raises(ValueError, match="padding"):
            enc.decode(bytes(payload), enc.BITMAP, (10,))

    def test_coo_indices_out_of_range(self):
        payload = np.array([12], "<i4").tobytes() + np.array([1.0], "<f4").tobytes()
        with pytest.raises(ValueError, match="indices"):
            enc.decode(payload, enc.COO, (10,))

    def test_decode_mask_only_for_positional_encodings(self):
        with pytest.raises(ValueError, match="carry positions"):
            enc.decode_mask(b"", enc.MASKED_VALUES, (0,))
