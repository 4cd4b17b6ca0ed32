"""Tests for fedprune.federated.communication: payload totals, uplink and downlink, TFF bytes."""

import math

import numpy as np
import pytest

from fedprune.federated import communication as comm
from fedprune.federated import encodings as enc

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
            chosen=((enc.DENSE, 1), (enc.MASKED_VALUES, 1)),
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
        assert got.chosen == ((enc.DENSE, 2), (enc.BITMAP, 1), (enc.MASKED_VALUES, 1))

    def test_uplink_without_known_masks(self):
        got = comm.uplink_bytes([two_tensor_model()])
        # kernel: bitmap 144 (coo 256, dense 512); bias dense 40.
        assert (got.sent, got.chosen) == (184, ((enc.DENSE, 1), (enc.BITMAP, 1)))

    def test_downlink_to_three_stateless_clients(self):
        got = comm.downlink_bytes(two_tensor_model(), [KERNEL_MASK, None], num_clients=3)
        # per client: kernel with its mask as bitmap 16 + 4*32 = 144 (coo 256);
        # bias dense 40 -> 184; times 3 clients = 552. Dense reference 3 * 552 = 1656.
        assert got.sent == 552
        assert got.dense == 1656
        assert got.chosen == ((enc.DENSE, 3), (enc.BITMAP, 3))
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
