"""Tests for fedprune.federated.communication: measured sizes, round trips, choices, totals."""

import math

import numpy as np
import pytest

from fedprune.federated import communication as comm

DENSITIES = [0.0, 1 / 64, 1 / 32, 0.5, 31 / 32, 1.0]
# Rank 1, 2 and 4; 7, 15, 143 and 90 entries are not multiples of 8.
SHAPES = [(7,), (64,), (256,), (3, 5), (13, 11), (16, 16), (2, 3, 3, 5), (4, 4, 4, 4)]
PLAIN = [comm.DENSE, comm.BITMAP, comm.COO]


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
@pytest.mark.parametrize("encoding", comm.ENCODINGS)
class TestEveryEncoding:
    def _encode(self, x, encoding):
        mask = superset_mask(x) if encoding == comm.MASKED_VALUES else None
        written = int(np.count_nonzero(x)) if mask is None else int(mask.sum())
        return comm.encode(x, encoding, mask=mask), mask, written

    def test_measured_size_equals_closed_form(self, encoding, density, shape):
        x = sparse_tensor(shape, density)
        payload, mask, written = self._encode(x, encoding)
        assert len(payload) == comm.expected_size(x.size, written, encoding)
        assert comm.encoded_size(x, encoding, mask=mask) == len(payload)

    def test_round_trip_is_bit_exact(self, encoding, density, shape):
        x = sparse_tensor(shape, density)
        payload, mask, _ = self._encode(x, encoding)
        y = comm.decode(payload, encoding, shape, mask=mask)
        assert y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_array_equal(bits(y), bits(x))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("encoding", [comm.BITMAP, comm.COO])
def test_positions_written_from_a_mask_reach_the_receiver(encoding, density, shape):
    x = sparse_tensor(shape, density)
    mask = superset_mask(x)
    payload = comm.encode(x, encoding, mask=mask)
    assert len(payload) == comm.expected_size(x.size, int(mask.sum()), encoding)
    np.testing.assert_array_equal(comm.decode_mask(payload, encoding, shape), mask)
    np.testing.assert_array_equal(bits(comm.decode(payload, encoding, shape)), bits(x))


@pytest.mark.parametrize("encoding", comm.ENCODINGS)
def test_special_values_round_trip_and_negative_zero_is_a_zero(encoding):
    x = np.array([-0.0, np.nan, np.inf, -np.inf, 1e-45, 0.0, -3.5, 0.0, 7.0], np.float32)
    mask = x != 0
    payload = comm.encode(x, encoding, mask=mask if encoding == comm.MASKED_VALUES else None)
    # NaN, the infinities and the denormal are nonzeros; -0.0 is not.
    assert len(payload) == comm.expected_size(9, 6, encoding)
    y = comm.decode(payload, encoding, x.shape, mask=mask)
    expected = x.copy()
    if encoding != comm.DENSE:
        expected[0] = 0.0  # a written zero is +0.0; the sign of a pruned zero carries nothing
    np.testing.assert_array_equal(bits(y), bits(expected))


def test_expected_sizes_by_hand():
    # N = 100: dense 400; bitmap ceil(100/8) = 13 + 4*5 = 33; coo 8*5 = 40; masked 4*5 = 20.
    assert [comm.expected_size(100, 5, e) for e in comm.ENCODINGS] == [400, 33, 40, 20]
    with pytest.raises(ValueError):
        comm.expected_size(10, 11, comm.BITMAP)
    with pytest.raises(ValueError, match="unknown encoding"):
        comm.expected_size(10, 1, "zip")


class TestSmallestEncoding:
    def test_switches_where_theory_says(self):
        # N = 256 (a multiple of 8, so the thresholds are exact):
        # coo < bitmap  <=>  8 nnz < 32 + 4 nnz  <=>  nnz < 8   = N / 32;
        # bitmap < dense <=> 32 + 4 nnz < 1024   <=>  nnz < 248 = 31 N / 32;
        # ties (nnz = 8, nnz = 248) go to the simpler encoding.
        for nnz in range(257):
            x = sparse_tensor((256,), nnz / 256, seed=nnz)
            expected = comm.COO if nnz < 8 else comm.BITMAP if nnz < 248 else comm.DENSE
            name, nbytes = comm.smallest_encoding(x)
            assert name == expected, nnz
            assert nbytes == comm.expected_size(256, nnz, expected)

    @pytest.mark.parametrize(
        "density, expected",
        [
            (0.0, comm.COO),
            (1 / 64, comm.COO),
            (1 / 32, comm.BITMAP),  # tie with coo
            (0.5, comm.BITMAP),
            (31 / 32, comm.DENSE),  # tie with bitmap
            (1.0, comm.DENSE),
        ],
    )
    @pytest.mark.parametrize("shape", [(64,), (16, 16), (4, 4, 4, 4)])
    def test_named_densities(self, shape, density, expected):
        assert comm.smallest_encoding(sparse_tensor(shape, density))[0] == expected

    @pytest.mark.parametrize("shape", SHAPES)
    @pytest.mark.parametrize("density", DENSITIES)
    def test_is_the_argmin_of_the_closed_forms(self, shape, density):
        x = sparse_tensor(shape, density)
        sizes = [comm.expected_size(x.size, np.count_nonzero(x), e) for e in PLAIN]
        assert comm.smallest_encoding(x) == (PLAIN[int(np.argmin(sizes))], min(sizes))

    def test_known_mask_allows_values_only(self):
        x = sparse_tensor((16, 16), 0.5)
        mask = superset_mask(x, extra=4)
        assert comm.smallest_encoding(x, known_mask=mask) == (comm.MASKED_VALUES, 4 * (128 + 4))

    def test_known_mask_is_skipped_when_the_array_leaves_it(self):
        x = sparse_tensor((16, 16), 0.5)
        mask = x != 0
        mask[np.unravel_index(np.flatnonzero(mask)[0], mask.shape)] = False
        # Off-mask mass must be sent with the array's own positions: bitmap 32 + 4*128.
        assert comm.smallest_encoding(x, known_mask=mask) == (comm.BITMAP, 544)

    def test_all_ones_sent_mask_costs_nothing(self):
        x = sparse_tensor((13, 11), 1.0)
        ones = np.ones(x.shape, np.float32)
        assert comm.smallest_encoding(x, sent_mask=ones) == comm.smallest_encoding(x)

    def test_partial_sent_mask_writes_the_mask(self):
        x = sparse_tensor((16, 16), 0.25)
        mask = superset_mask(x, extra=10)
        # 74 mask positions: bitmap 32 + 4*74 = 328 < coo 8*74 = 592; dense cannot carry a mask.
        assert comm.smallest_encoding(x, sent_mask=mask) == (comm.BITMAP, 328)
        sparse_mask = np.zeros(x.shape, bool)
        sparse_mask[0, :3] = True
        # 3 positions: coo 24 < bitmap 32 + 12 = 44.
        assert comm.smallest_encoding(x * sparse_mask, sent_mask=sparse_mask) == (comm.COO, 24)

    def test_both_masks_are_rejected(self):
        x = np.ones(8, np.float32)
        with pytest.raises(ValueError, match="not both"):
            comm.smallest_encoding(x, known_mask=x, sent_mask=x)


class TestMaskValidation:
    @pytest.mark.parametrize("encoding", comm.ENCODINGS)
    def test_off_mask_mass_raises(self, encoding):
        x = sparse_tensor((3, 5), 0.5)
        mask = x != 0
        mask[np.unravel_index(np.flatnonzero(mask)[-1], mask.shape)] = False
        with pytest.raises(ValueError, match="1 nonzero entries lie outside the mask"):
            comm.encode(x, encoding, mask=mask)

    def test_off_sent_mask_mass_raises(self):
        x = np.array([1.0, 2.0, 0.0, 0.0], np.float32)
        with pytest.raises(ValueError, match="outside the mask"):
            comm.smallest_encoding(x, sent_mask=[1, 0, 0, 0])

    def test_masked_values_needs_the_mask(self):
        x = np.ones(4, np.float32)
        with pytest.raises(ValueError, match="needs the mask"):
            comm.encode(x, comm.MASKED_VALUES)
        payload = comm.encode(x, comm.MASKED_VALUES, mask=x)
        with pytest.raises(ValueError, match="needs the mask"):
            comm.decode(payload, comm.MASKED_VALUES, (4,))

    def test_mask_shape_must_match(self):
        with pytest.raises(ValueError, match="shape"):
            comm.encode(np.ones((2, 3), np.float32), comm.MASKED_VALUES, mask=np.ones(6))

    def test_tfmot_float_masks_are_accepted(self):
        x = np.array([0.0, 2.0, 0.0, -1.0], np.float32)
        mask = np.array([0.0, 1.0, 1.0, 1.0], np.float32)
        payload = comm.encode(x, comm.MASKED_VALUES, mask=mask)
        assert len(payload) == 12
        np.testing.assert_array_equal(comm.decode(payload, comm.MASKED_VALUES, 4, mask=mask), x)


class TestMalformedPayloads:
    def test_wrong_lengths(self):
        x = sparse_tensor((10,), 0.5)
        for encoding in comm.ENCODINGS:
            payload = comm.encode(x, encoding, mask=x != 0)
            with pytest.raises(ValueError):
                comm.decode(payload + b"\0\0\0\0", encoding, (10,), mask=x != 0)

    def test_bitmap_padding_bits(self):
        payload = bytearray(comm.encode(np.zeros(10, np.float32), comm.BITMAP))
        payload[1] |= 0x01  # bit 16 of a 10-bit bitmap
        with pytest.raises(ValueError, match="padding"):
            comm.decode(bytes(payload), comm.BITMAP, (10,))

    def test_coo_indices_out_of_range(self):
        payload = np.array([12], "<i4").tobytes() + np.array([1.0], "<f4").tobytes()
        with pytest.raises(ValueError, match="indices"):
            comm.decode(payload, comm.COO, (10,))

    def test_decode_mask_only_for_positional_encodings(self):
        with pytest.raises(ValueError, match="carry positions"):
            comm.decode_mask(b"", comm.MASKED_VALUES, (0,))


# A hand-built two-tensor model: kernel 8x16 (128 entries) pruned to 32 entries
# (sparsity 0.75), and a dense bias of 10 entries with no mask.
KERNEL_MASK = np.zeros((8, 16), bool)
KERNEL_MASK[:, :4] = True  # 8 * 4 = 32 ones


def two_tensor_model(seed=0, off_mask=0):
    rng = np.random.default_rng(seed)
    kernel = np.where(KERNEL_MASK, rng.uniform(0.5, 1.0, (8, 16)), 0.0).astype(np.float32)
    kernel[0, 4 : 4 + off_mask] = 0.25  # mass outside the mask
    bias = rng.uniform(0.5, 1.0, 10).astype(np.float32)
    return [kernel, bias]


class TestPayloadTotals:
    def test_uplink_of_one_client_inside_the_broadcast_mask(self):
        got = comm.payload_bytes(two_tensor_model(), known_masks=[KERNEL_MASK, None])
        # kernel: dense 4*128 = 512; bitmap 128/8 + 4*32 = 144; coo 8*32 = 256;
        #         masked_values 4*32 = 128  -> masked_values, 128.
        # bias:   dense 4*10 = 40; bitmap ceil(10/8) + 4*10 = 42; coo 8*10 = 80;
        #         no mask                   -> dense, 40.
        assert got == comm.PayloadBytes(
            dense=552,
            bitmap=186,
            coo=336,
            masked_values=None,  # the bias has no mask
            sent=168,
            chosen=((comm.DENSE, 1), (comm.MASKED_VALUES, 1)),
        )
        assert got.compression_ratio == pytest.approx(552 / 168)

    def test_uplink_sums_clients_and_counts_off_mask_mass(self):
        updates = [two_tensor_model(seed=1), two_tensor_model(seed=2, off_mask=1)]
        got = comm.uplink_bytes(updates, broadcast_masks=[KERNEL_MASK, None])
        # client 1 as above: 168 sent. client 2's kernel has 33 nonzeros, one off the
        # mask: bitmap 16 + 4*33 = 148 (coo 264, dense 512) -> 148; bias 40 -> 188.
        assert got.sent == 168 + 188
        assert got.dense == 2 * 552
        assert (got.bitmap, got.coo) == (186 + 190, 336 + 344)
        assert got.masked_values is None
        assert got.chosen == ((comm.DENSE, 2), (comm.BITMAP, 1), (comm.MASKED_VALUES, 1))

    def test_uplink_without_known_masks(self):
        got = comm.uplink_bytes([two_tensor_model()])
        # kernel: bitmap 144 (coo 256, dense 512); bias dense 40.
        assert (got.sent, got.chosen) == (184, ((comm.DENSE, 1), (comm.BITMAP, 1)))

    def test_downlink_to_three_stateless_clients(self):
        got = comm.downlink_bytes(two_tensor_model(), [KERNEL_MASK, None], num_clients=3)
        # per client: kernel with its mask as bitmap 16 + 4*32 = 144 (coo 256);
        # bias dense 40 -> 184; times 3 clients = 552. Dense reference 3 * 552 = 1656.
        assert got.sent == 552
        assert got.dense == 1656
        assert got.chosen == ((comm.DENSE, 3), (comm.BITMAP, 3))
        assert got.compression_ratio == pytest.approx(3.0)

    def test_downlink_keeps_zeros_inside_the_mask(self):
        kernel, bias = two_tensor_model()
        kernel[0, 0] = 0.0  # inside the mask: still written, so the client learns the mask
        got = comm.downlink_bytes([kernel, bias], [KERNEL_MASK, None], num_clients=1)
        assert got.sent == 184

    def test_downlink_with_an_all_ones_mask_is_dense(self):
        model = two_tensor_model()
        ones = [np.ones((8, 16), np.float32), np.ones(10, np.float32)]
        got = comm.downlink_bytes(model, ones, num_clients=2)
        # kernel: 32 nonzeros, no mask to send -> bitmap 144; bias dense 40.
        assert got.sent == 2 * 184

    def test_mask_list_length_is_checked(self):
        with pytest.raises(ValueError, match="1 entries for 2 tensors"):
            comm.payload_bytes(two_tensor_model(), known_masks=[KERNEL_MASK])

    def test_times_and_add(self):
        one = comm.payload_bytes(two_tensor_model(), known_masks=[KERNEL_MASK, np.ones(10, bool)])
        assert one.masked_values == 128 + 40
        assert one.times(2) == one + one
        assert one.times(0) == comm.PayloadBytes(0, 0, 0, 0, 0)
        with pytest.raises(ValueError):
            one.times(-1)


def test_tff_simulation_bytes_counts_everything_dense():
    trainable = two_tensor_model()
    non_trainable = [
        KERNEL_MASK.astype(np.float32),  # tfmot mask: 4 * 128 = 512
        np.float32(0.3),  # threshold: 4
        np.int64(5),  # pruning_step: 8
    ]
    got = comm.tff_simulation_bytes(trainable, non_trainable, num_clients=3)
    # down: 3 * (552 + 524) = 3228; up: dense float32 deltas 3 * 552 = 1656.
    assert got == comm.TffSimulationBytes(down=3228, up=1656)


def test_compression_ratio():
    assert comm.compression_ratio(1000, 250) == 4.0
    assert comm.compression_ratio(1000, 0) == math.inf
    assert comm.compression_ratio(0, 0) == 1.0
