"""Quantized uploads (`--upload_quantization`) and the mask entropy bound.

Codecs (`encodings.py`): exact sizes, round trips, int8 error and
unbiasedness; the TF side (`quantization.py`): the same bounds, the byte
count of `client_work.uplink_bytes` against the encoded payloads, TFF runs
per mode; the entropy bound against its closed form.
"""

import dataclasses
import math

import numpy as np
import pytest
from cli_util import CHEAP_OUTPUTS

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.federated import communication
from fedprune.federated import encodings as enc

QUANTIZED = [enc.FP16, enc.INT8]
DENSITIES = [0.0, 1 / 64, 0.2, 0.5, 1.0]
SHAPES = [(7,), (13, 11), (2, 3, 3, 5)]


def sparse_tensor(shape, density, seed=0):
    rng = np.random.default_rng(seed)
    n = math.prod(shape)
    flat = np.zeros(n, np.float32)
    positions = rng.choice(n, size=round(density * n), replace=False)
    flat[positions] = rng.normal(0.0, 0.05, size=positions.size).astype(np.float32)
    return flat.reshape(shape)


def _mask_for(x, encoding):
    if encoding != enc.MASKED_VALUES:
        return None
    mask = x != 0
    mask.ravel()[:3] = True  # zeros inside the mask are written too
    return mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("encoding", enc.ENCODINGS)
@pytest.mark.parametrize("quantization", QUANTIZED)
def test_codec_size_and_round_trip(quantization, encoding, density, shape):
    x = sparse_tensor(shape, density)
    mask = _mask_for(x, encoding)
    written = int(np.count_nonzero(x)) if mask is None else int(mask.sum())
    if encoding == enc.DENSE:
        written = x.size
    payload = enc.encode(x, encoding, mask=mask, quantization=quantization)
    b = {enc.FP16: 2, enc.INT8: 1}[quantization]
    side = 4 if quantization == enc.INT8 else 0
    n = x.size
    closed = {enc.DENSE: side + b * n, enc.BITMAP: side + -(-n // 8) + b * written,
              enc.COO: side + (4 + b) * written, enc.MASKED_VALUES: side + b * written}
    assert len(payload) == closed[encoding]
    assert len(payload) == enc.expected_size(n, written, encoding, quantization)
    y = enc.decode(payload, encoding, shape, mask=mask, quantization=quantization)
    assert y.dtype == np.float32 and y.shape == x.shape
    assert not y[x == 0].any()  # zeros stay zeros: the mask survives quantization
    if quantization == enc.FP16:
        np.testing.assert_array_equal(y, x.astype(np.float16).astype(np.float32))
    else:  # round to nearest without a generator: off by at most half a step
        codes, scale = enc.quantize_int8(x)
        np.testing.assert_array_equal(y, codes.astype(np.float32) * scale)
        assert scale == np.float32(np.abs(x).max(initial=0)) / np.float32(127)
        assert np.all(np.abs(y - x) <= scale / 2 * (1 + 1e-5))


def test_fp16_payload_is_half_floats_and_int8_starts_with_its_scale():
    x = np.array([0.0, 0.5, -0.25, 0.0, 1.0], np.float32)
    fp16 = enc.encode(x, enc.DENSE, quantization=enc.FP16)
    np.testing.assert_array_equal(np.frombuffer(fp16, "<f2"), x.astype(np.float16))
    int8 = enc.encode(x, enc.COO, quantization=enc.INT8)
    assert np.frombuffer(int8[:4], "<f4")[0] == np.float32(1.0) / np.float32(127)
    np.testing.assert_array_equal(np.frombuffer(int8[4:16], "<i4"), [1, 2, 4])
    np.testing.assert_array_equal(np.frombuffer(int8[16:], "i1"), [64, -32, 127])  # 63.5 -> 64


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_int8_stochastic_rounding_is_within_a_step_and_unbiased(density):
    x = sparse_tensor((64,), density, seed=3)
    rng = np.random.default_rng(7)
    draws = 4000
    decoded = np.stack([enc.decode(enc.encode(x, enc.BITMAP, quantization=enc.INT8, rng=rng),
                                   enc.BITMAP, x.shape, quantization=enc.INT8)
                        for _ in range(draws)])
    scale = enc.int8_scale(x)
    assert np.all(np.abs(decoded - x) < scale * (1 + 1e-5))  # within one quantization step
    assert not decoded[:, x == 0].any()
    mean = decoded.mean(axis=0, dtype=np.float64)  # float32 sums drift by ~1e-7
    stderr = decoded.std(axis=0, dtype=np.float64) / math.sqrt(draws)
    # Unbiased: every entry's mean within 4.5 standard errors (exact where the
    # value is on the grid and the draws never vary).
    assert np.all(np.abs(mean - x) <= 4.5 * stderr + 1e-9)
    # Nearest rounding of the same values is biased beyond that for some entries.
    nearest = enc.decode(enc.encode(x, enc.BITMAP, quantization=enc.INT8), enc.BITMAP, x.shape,
                         quantization=enc.INT8)
    assert np.any(np.abs(nearest - x) > 4.5 * stderr + 1e-9)


def test_unknown_quantization_is_refused():
    with pytest.raises(ValueError, match="unknown quantization"):
        enc.encode(np.zeros(3, np.float32), enc.DENSE, quantization="int4")


@pytest.mark.parametrize(("n", "kept"), [(100, 0), (100, 100), (100, 50), (3200, 640),
                                         (500, 1), (7, 3)])
def test_entropy_bound_is_the_closed_form(n, kept):
    p = kept / n
    closed = 0.0 if p in (0, 1) else -n * (p * math.log2(p) + (1 - p) * math.log2(1 - p))
    assert enc.entropy_bits(n, kept) == pytest.approx(closed, rel=1e-12)
    assert enc.entropy_bits(n, kept) <= n  # never above the bitmap's bit per entry


def test_mask_coding_sums_tensors_and_skips_dense_ones():
    first = np.zeros((64, 128), np.float32)
    first.ravel()[:1638] = 1  # the default MLP's kernel at sparsity 0.8
    second = np.ones((10,), np.float32)  # all ones: flagged dense, costs nothing
    coding = communication.mask_coding([first, None, second])
    assert (coding.params, coding.kept) == (8192 + 10, 1638 + 10)
    assert coding.bitmap_bits == 8192 and coding.coo_bits == 32 * 1638
    p = 1638 / 8192
    assert coding.entropy_bits == pytest.approx(
        -8192 * (p * math.log2(p) + (1 - p) * math.log2(1 - p)))
    assert coding.entropy_bits == pytest.approx(0.7221 * 8192, rel=1e-3)  # H(0.2) ~ 0.7219


# ----------------------------------------------------------------------------
# Config: default fingerprint, refusals.


def test_default_keeps_the_fingerprint_and_other_values_change_it():
    assert ExperimentConfig().fingerprint() == "cacb424d245d153f"
    assert ExperimentConfig(upload_quantization="none") == ExperimentConfig()
    server = ExperimentConfig(masking="server")
    prints = {dataclasses.replace(server, upload_quantization=q).validate().fingerprint()
              for q in enc.QUANTIZATIONS}
    assert len(prints) == 3


@pytest.mark.parametrize("quantization", QUANTIZED)
def test_refused_with_dp_and_accepted_with_pruning_clients(quantization):
    with pytest.raises(InvalidArgument) as dp:
        ExperimentConfig(masking="server", dp="fixed",
                         upload_quantization=quantization).validate()
    assert str(dp.value) == (f"--upload_quantization={quantization!r}: expected none with "
                             "--dp=fixed (the DP accounting does not cover quantization noise)")
    for changes in [dict(masking="client"), dict(masking="both"),
                    dict(masking="both", regrow="random", regrow_at="client"),
                    dict(masking="both", prune_granularity="step")]:
        config = ExperimentConfig(upload_quantization=quantization, **changes).validate()
        assert config.fingerprint() != ExperimentConfig(**changes).validate().fingerprint()


def test_command_line_refuses_dp_with_one_line():
    import subprocess
    import sys
    from pathlib import Path

    args = ["--masking=server", "--dp=fixed", "--upload_quantization=int8"]
    accepted = "none with --dp=fixed (the DP accounting does not cover quantization noise)"
    result = subprocess.run([sys.executable, "-m", "experiments.run", "--only_check_args", *args],
                            cwd=Path(__file__).resolve().parents[1], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --upload_quantization="), lines
    assert accepted in lines[0]


# ----------------------------------------------------------------------------
# TensorFlow side and TFF runs.


@pytest.mark.parametrize("density", [0.2, 1.0])
def test_tf_int8_is_within_a_step_and_unbiased_over_seeds(density):
    import tensorflow as tf

    from fedprune.federated import quantization

    x = sparse_tensor((64,), density, seed=5)
    draws = 2000
    decoded = np.stack([quantization.quantize_dequantize(
        tf.constant(x), enc.INT8, tf.constant([11, d], tf.int64)).numpy() for d in range(draws)])
    scale = enc.int8_scale(x)
    codes = decoded / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)  # on the int8 grid
    assert np.abs(codes).max() <= 127 + 1e-3
    assert np.all(np.abs(decoded - x) < scale * (1 + 1e-5))
    assert not decoded[:, x == 0].any()
    stderr = decoded.std(axis=0, dtype=np.float64) / math.sqrt(draws)
    assert np.all(np.abs(decoded.mean(axis=0, dtype=np.float64) - x) <= 4.5 * stderr + 1e-9)
    fp16 = quantization.quantize_dequantize(tf.constant(x), enc.FP16).numpy()
    np.testing.assert_array_equal(fp16, x.astype(np.float16).astype(np.float32))


def test_quantize_update_rounds_the_float_fields_and_passes_the_masks():
    """The seed scheme of module `quantization`: tensor i of the chosen fields (in field
    order) uses fold_in(client_seed(seed, round, <those tensors>), i); masks pass as bits."""
    import collections

    import tensorflow as tf

    from fedprune.federated import quantization

    delta = (sparse_tensor((13, 11), 0.4, seed=1), sparse_tensor((11,), 1.0, seed=2))
    mask = (delta[0] != 0).astype(np.float32)
    payload = collections.OrderedDict(delta=delta, kept=(mask,), kept_values=(0.5 * delta[0],))
    round_num = tf.constant(2, tf.int32)
    ours = quantization.quantize_update(payload, enc.INT8, 3, round_num,
                                        quantization.QUANTIZED_PAYLOAD_FIELDS)
    assert list(ours) == ["delta", "kept", "kept_values"]
    np.testing.assert_array_equal(ours["kept"][0], mask)  # bits, untouched
    chosen = [*delta, payload["kept_values"][0]]
    base = quantization.client_seed(3, round_num, [tf.constant(t) for t in chosen])
    decoded = [*ours["delta"], *ours["kept_values"]]
    for i, (x, y) in enumerate(zip(chosen, decoded, strict=True)):
        expected = quantization.quantize_dequantize(
            tf.constant(x), enc.INT8, tf.random.experimental.stateless_fold_in(base, i))
        np.testing.assert_array_equal(y, expected)
        assert not np.asarray(y)[x == 0].any()
        assert np.abs(np.asarray(y) - x).max() < enc.int8_scale(x) * (1 + 1e-5)
        assert not np.array_equal(y, x)
    # A plain delta (no fields): every tensor, the seed fingerprinting all of them.
    plain = quantization.quantize_update(delta, enc.INT8, 3, round_num)
    base = quantization.client_seed(3, round_num, [tf.constant(t) for t in delta])
    for i, (x, y) in enumerate(zip(delta, plain, strict=True)):
        np.testing.assert_array_equal(y, quantization.quantize_dequantize(
            tf.constant(x), enc.INT8, tf.random.experimental.stateless_fold_in(base, i)))
    # The kept values' seed differs from the delta's: another fingerprint.
    assert not np.array_equal(plain[0], ours["delta"][0])


@pytest.mark.parametrize("quantization", [enc.NO_QUANTIZATION, *QUANTIZED])
def test_tf_uplink_bytes_equal_the_encoded_payloads(quantization):
    import tensorflow as tf

    from fedprune.federated.client_work import uplink_bytes

    kernel = sparse_tensor((13, 11), 0.2, seed=1)
    mask = (kernel != 0).astype(np.float32)
    leaky = kernel.copy()
    leaky.ravel()[np.flatnonzero(mask.ravel() == 0)[:2]] = 0.5  # mass off the mask
    tensors = [kernel, sparse_tensor((11,), 1.0), sparse_tensor((300,), 0.01), leaky]
    known = [mask, None, None, mask]
    ours = int(uplink_bytes([tf.constant(t) for t in tensors],
                            [None if m is None else tf.constant(m) for m in known],
                            quantization))
    measured = communication.payload_bytes(tensors, known_masks=known,
                                           quantization=quantization).sent
    assert ours == measured
    by_hand = sum(len(enc.encode(t, e, mask=m if e == enc.MASKED_VALUES else None,
                                 quantization=quantization))
                  for t, m, e in zip(tensors, known, [enc.MASKED_VALUES, enc.DENSE, enc.COO,
                                                      enc.BITMAP], strict=True))
    assert ours == by_hand


NUM_CLIENTS = 4


@pytest.fixture(scope="module")
def client_data(digits_clients):
    return digits_clients(NUM_CLIENTS, 640)


# Built server-side processes, one per (quantization, masking) (tracing takes
# seconds; a process's rounds are pure functions of its state and data, and the
# module's `client_data` is one list of datasets). Emptied after the module.
_SERVER_PROCESSES: dict = {}


@pytest.fixture(scope="module", autouse=True)
def _forget_server_processes():
    yield
    _SERVER_PROCESSES.clear()


def _server_process(client_data, quantization=None, masking_mode="server"):
    """The process for these arguments, built once per module (`_SERVER_PROCESSES`)."""
    key = (quantization, masking_mode)
    if key not in _SERVER_PROCESSES:
        _SERVER_PROCESSES[key] = _build_server_process(client_data, quantization, masking_mode)
    return _SERVER_PROCESSES[key]


def _build_server_process(client_data, quantization, masking_mode):
    from fedprune.federated import process as fp_process
    from fedprune.model import builders
    from fedprune.pruning import masking, schedules

    kwargs = {} if quantization is None else {"upload_quantization": quantization}
    schedule = (schedules.PolynomialDecay(0.5, 0.8, begin_round=1, end_round=3, power=3)
                if masking_mode == "server" else schedules.make_schedule("none"))
    return fp_process.build_pruning_process(
        model_builder=lambda: builders.mlp((64,), 10, hidden=(50,)),
        input_spec=client_data[0].element_spec, masking=masking_mode, schedule=schedule,
        mask_spec=masking.MaskSpec(), num_rounds=4,
        client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0, **kwargs)


def _weights_after(pp, client_data, rounds):
    state = pp.process.initialize()
    for _ in range(rounds):
        output = pp.process.next(state, client_data)
        state = output.state
    return pp.process.get_model_weights(state), output


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("masking_mode", ["server", "none"])
def test_none_is_bit_identical_and_quantized_runs_are_deterministic(client_data, masking_mode):
    plain, _ = _weights_after(_server_process(client_data, masking_mode=masking_mode),
                              client_data, 2)
    explicit, _ = _weights_after(_server_process(client_data, "none", masking_mode),
                                 client_data, 2)
    for a, b in zip(plain.trainable, explicit.trainable, strict=True):
        np.testing.assert_array_equal(a, b)
    # Two runs of one int8 process, each from its initial state (as the pruning-client
    # cases below): the rounding seeds are stateless, so the runs must agree bit for bit.
    int8_process = _server_process(client_data, enc.INT8, masking_mode)
    int8 = [_weights_after(int8_process, client_data, 2)[0] for _ in range(2)]
    for a, b, c in zip(int8[0].trainable, int8[1].trainable, plain.trainable, strict=True):
        np.testing.assert_array_equal(a, b)  # stateless seeds: same run, same noise
        # Close to unquantized, except where a weight at the pruning threshold
        # is kept in one run and pruned in the other (2 of 3,200 on this seed).
        assert np.mean(np.abs(a - c) > 0.02) < 0.01
    assert any(not np.array_equal(a, c) for a, c in zip(int8[0].trainable, plain.trainable,
                                                         strict=True))


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("quantization", QUANTIZED)
def test_client_work_bytes_equal_the_encoded_client_updates(client_data, quantization):
    """The uplink count of a TFF round is the sum of the clients' encoded payload lengths."""
    import tensorflow_federated as tff


    pp = _server_process(client_data, quantization)
    weights, _ = _weights_after(pp, client_data, 2)  # masks at sparsity 0.7625

    work = _client_work(pp, client_data, "server", quantization)
    model_weights = tff.learning.models.ModelWeights(tuple(weights.trainable),
                                                     tuple(weights.non_trainable))
    output = work.next(work.initialize(), [model_weights] * NUM_CLIENTS, client_data)
    known = [None] * len(weights.trainable)
    for k in pp.layout.kernels:
        known[k.trainable_index] = np.asarray(weights.non_trainable[k.mask_index])
    payloads = []
    for result in output.result:
        update = [np.asarray(t) for t in result.update]
        for tensor, mask in zip(update, known, strict=True):
            name, size = enc.smallest_encoding(tensor, known_mask=mask,
                                               quantization=quantization)
            payload = enc.encode(tensor, name, mask=mask if name == enc.MASKED_VALUES else None,
                                 quantization=quantization)
            assert len(payload) == size
            payloads.append(payload)
    assert int(output.measurements["uplink_bytes"]) == sum(len(p) for p in payloads)
    # Dense float32 would be 4 bytes x 3,760 parameters per client; masked float32
    # values ~4x less; at 2 or 1 byte per value 8x or ~16x less.
    dense = 4 * 3760 * NUM_CLIENTS
    assert sum(len(p) for p in payloads) < dense / {enc.FP16: 7, enc.INT8: 14}[quantization]


def _run_config(**kwargs):
    return ExperimentConfig(masking="server", rounds=12, end_round=8, final_sparsity=0.8,
                            **CHEAP_OUTPUTS, **kwargs).validate()


@pytest.mark.slow
@pytest.mark.usefixtures("tff_local_context")
def test_end_to_end_runs_count_their_payload_and_keep_accuracy(tmp_path):
    from fedprune.outputs import run_files
    from fedprune.program import loop

    results = {}
    for quantization in enc.QUANTIZATIONS:
        out = tmp_path / quantization
        summary = loop.run_experiment(_run_config(upload_quantization=quantization), out,
                                      log=lambda line: None)
        results[quantization] = (summary, run_files.read_metrics(out))
    base_summary, base_rows = results["none"]
    for quantization in QUANTIZED:
        summary, rows = results[quantization]
        accuracies = (summary["final_test_accuracy"], base_summary["final_test_accuracy"])
        assert abs(accuracies[0] - accuracies[1]) <= {
            enc.FP16: 0.02, enc.INT8: 0.05}[quantization], accuracies
        # The values shrink by the width (2x, 4x); the bitmaps of updates with
        # zero rows (the digits' always-blank pixels) and coordinates do not.
        ratio = base_summary["total_bytes_up"] / summary["total_bytes_up"]
        assert {enc.FP16: 1.7, enc.INT8: 3.0}[quantization] < ratio <= {
            enc.FP16: 2.0, enc.INT8: 4.0}[quantization], ratio
        assert [r["mask_entropy_bits"] for r in rows][:1] == [base_rows[0]["mask_entropy_bits"]]
    coding = base_summary["mask_coding"]
    assert coding["entropy_bits_per_param"] == pytest.approx(0.7219, abs=2e-3)  # H(0.2)
    assert coding["entropy_bytes"] < coding["bitmap_bytes"] < coding["coo_index_bytes"]
    assert float(base_rows[0]["mask_entropy_bits"]) == 0.0  # round 1 starts dense


@pytest.mark.slow
@pytest.mark.usefixtures("tff_local_context")
def test_int8_run_resumes_to_the_uninterrupted_numbers(tmp_path):
    """The rounding seeds' round counter lives in the checkpointed aggregator state."""
    from fedprune.outputs import run_files
    from fedprune.program import loop

    config = ExperimentConfig(masking="server", rounds=4, end_round=3,
                              upload_quantization=enc.INT8, **CHEAP_OUTPUTS).validate()
    loop.run_experiment(config, tmp_path / "whole", log=lambda line: None)
    loop.run_experiment(config, tmp_path / "cut", log=lambda line: None, stop_after_round=2)
    loop.run_experiment(config, tmp_path / "cut", resume=True, log=lambda line: None)
    whole, cut = (run_files.read_metrics(tmp_path / name) for name in ("whole", "cut"))
    assert len(whole) == len(cut) == 4
    # Per-layer columns are left out: Keras numbers layer names per process.
    columns = set(run_files.METRIC_COLUMNS) - set(run_files.TIME_COLUMNS)
    for a, b in zip(whole, cut, strict=True):
        for key in columns:
            assert a[key] == b[key], (a["round"], key)
    assert float(whole[-1]["mask_entropy_bits"]) > 0  # round 4 broadcasts round 3's masks


# ----------------------------------------------------------------------------
# Pruning clients (`--masking=client|both`): quantized payloads.

# Each pruning mode and each quantization once: the payload differs per mode, the
# error bound per quantization; the quantizer is one function for all of them.
PRUNING_CASES = [("client", "fp16"), ("both", "int8")]
PRUNING_ROUNDS = 2


def _pruning_process(client_data, masking_mode, quantization):
    from fedprune.federated import process as fp_process
    from fedprune.model import builders
    from fedprune.pruning import masking, schedules

    return fp_process.build_pruning_process(
        model_builder=lambda: builders.mlp((64,), 10, hidden=(50,)), num_rounds=3,
        input_spec=client_data[0].element_spec, masking=masking_mode,
        schedule=schedules.PolynomialDecay(0.5, 0.8, begin_round=1, end_round=2, power=3),
        mask_spec=masking.MaskSpec(), client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0,
        upload_quantization=quantization)


def _kept(size, sparsity):
    # tfmot's count of kept weights: max(round(N * (1 - s)), 1), in float32.
    return max(int(np.round(np.float32(size) * (np.float32(1) - np.float32(sparsity)))), 1)


def _encoded_payload_bytes(payload, known, quantization):
    """One pruning client's upload, encoded: each delta tensor in its smallest
    quantized encoding (`encodings.encode`) plus its kernel masks as bitmaps."""
    total = 0
    for tensor, mask in zip([np.asarray(t) for t in payload["delta"]], known, strict=True):
        name, size = enc.smallest_encoding(tensor, known_mask=mask, quantization=quantization)
        encoded = enc.encode(tensor, name, mask=mask if name == enc.MASKED_VALUES else None,
                             quantization=quantization)
        assert len(encoded) == size
        total += len(encoded)
    return total + sum(len(np.packbits(np.asarray(m) > 0).tobytes()) for m in payload["kept"])


def _client_work(pp, client_data, masking_mode, quantization):
    """The client work of `pp`'s process, alone: its clients' payloads and byte counts."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from fedprune.federated import process as fp_process
    from fedprune.federated.client_work import build_pruning_client_work
    from fedprune.pruning import masking

    def model_fn():
        return tff.learning.models.from_keras_model(
            pp.keras_model_fn(),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            input_spec=client_data[0].element_spec,
            metrics=[tf.keras.metrics.SparseCategoricalAccuracy()])

    return build_pruning_client_work(
        model_fn=model_fn, client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        masking=masking_mode, layout=pp.layout, table=pp.table, mask_spec=masking.MaskSpec(),
        upload_quantization=quantization)


def _two_identical_runs(pp, client_data):
    """Runs `pp` twice for PRUNING_ROUNDS rounds and asserts the runs are bit-identical
    (weights and masks every round, uplink bytes): the same seed, the same run.

    Returns:
      (global ModelWeights after rounds 0..PRUNING_ROUNDS, uplink bytes of rounds
      1..PRUNING_ROUNDS, the process's metrics of rounds 1..PRUNING_ROUNDS).
    """
    runs = []
    for _ in range(2):
        state = pp.process.initialize()
        weights, sent, metrics = [pp.process.get_model_weights(state)], [], []
        for _ in range(PRUNING_ROUNDS):
            output = pp.process.next(state, client_data)
            state = output.state
            weights.append(pp.process.get_model_weights(state))
            sent.append(int(output.metrics["client_work"]["uplink_bytes"]))
            metrics.append(output.metrics)
        runs.append((weights, sent, metrics))
    (weights, sent, metrics), (again, sent_again, _) = runs
    assert sent == sent_again
    for a, b in zip(weights, again, strict=True):
        for x, y in zip([*a.trainable, *a.non_trainable], [*b.trainable, *b.non_trainable],
                        strict=True):
            np.testing.assert_array_equal(x, y)
    return weights, sent, metrics


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize(("masking_mode", "quantization"), PRUNING_CASES)
def test_pruning_clients_upload_quantized_values_and_bit_masks(client_data, masking_mode,
                                                               quantization):
    """bytes_up is the encoded payload, the masks are exact, the run deterministic, and the
    aggregate within the quantization error of the unquantized one."""
    import tensorflow_federated as tff

    from fedprune.federated import quantization as quantization_lib
    from fedprune.pruning import mask_aggregation

    pp = _pruning_process(client_data, masking_mode, quantization)
    sizes = [k.size for k in pp.layout.kernels]
    history, sent, metrics = _two_identical_runs(pp, client_data)  # (d)
    for r, round_metrics in enumerate(metrics, 1):
        # Every client keeps exactly the level's count: the masks are bits, not quantized.
        kept = sum(_kept(n, pp.table.sparsity[r]) for n in sizes)
        assert float(round_metrics["finalizer"]["masks"]["client_sparsity"]) == pytest.approx(
            1 - kept / sum(sizes), abs=1e-6)

    work = _client_work(pp, client_data, masking_mode, quantization)
    work_state = work.initialize()
    for r in range(1, PRUNING_ROUNDS + 1):
        broadcast, server = history[r - 1], history[r]
        direct = work.next(work_state, [broadcast] * NUM_CLIENTS, client_data)
        work_state = direct.state
        known = [None] * len(broadcast.trainable)
        for k in pp.layout.kernels:
            known[k.trainable_index] = np.asarray(broadcast.non_trainable[k.mask_index])
        # (a) bytes_up: the clients' encoded quantized payloads and mask bitmaps.
        payload = sum(_encoded_payload_bytes(c.update, known, quantization)
                      for c in direct.result)
        assert int(direct.measurements["uplink_bytes"]) == payload == sent[r - 1], r
        # (b) the server's model: zero off its mask; in `both` the mask holds the
        # schedule's level exactly, in `client` the union of the clients' masks.
        level = pp.table.sparsity[r]
        for j, k in enumerate(pp.layout.kernels):
            mask = np.asarray(server.non_trainable[k.mask_index])
            kernel = np.asarray(server.trainable[k.trainable_index])
            assert np.count_nonzero(kernel) == mask.sum(), (r, k.name)
            if masking_mode == "both":
                assert mask.sum() == _kept(k.size, level), (r, k.name)
            else:
                union = np.any([np.asarray(c.update["kept"][j]) > 0 for c in direct.result], 0)
                np.testing.assert_array_equal(mask, union.astype(np.float32))
                assert _kept(k.size, level) < mask.sum() < k.size

    # (c) The aggregate of round 2's payloads: quantized vs not.
    payloads = [c.update for c in direct.result]
    weights = [float(c.update_weight) for c in direct.result]
    value_type = work.next.type_signature.result.result.member.update
    weight_type = tff.TensorType(np.float32)
    plain = mask_aggregation.build_mask_aggregator("nonzero").create(value_type, weight_type)
    quantized = quantization_lib.build_quantized_mean_factory(
        quantization, seed=0, inner=mask_aggregation.build_mask_aggregator("nonzero"),
        fields=quantization_lib.QUANTIZED_PAYLOAD_FIELDS).create(value_type, weight_type)
    exact = plain.next(plain.initialize(), payloads, weights).result
    ours = quantized.next(quantized.initialize(), payloads, weights).result
    assert float(ours["num_clients"]) == float(exact["num_clients"]) == NUM_CLIENTS
    for a, b in zip(ours["kept_count"], exact["kept_count"], strict=True):
        np.testing.assert_array_equal(a, b)  # keep counts: unchanged
    for a, b in zip(ours["mean"]["kept"], exact["mean"]["kept"], strict=True):
        np.testing.assert_array_equal(a, b)  # the masks are not quantized
    differ = 0
    for field in quantization_lib.QUANTIZED_PAYLOAD_FIELDS:
        for i, (a, b) in enumerate(zip(ours["mean"][field], exact["mean"][field], strict=True)):
            a, b = np.asarray(a), np.asarray(b)
            peak = max(np.abs(np.asarray(p[field][i])).max() for p in payloads)
            # A weighted mean is off by at most its clients' largest error: int8
            # below one step max|x| / 127 of the client's tensor; fp16 a relative
            # 2^-11 (2^-25 absolute for half subnormals); plus float32 sums.
            bound = peak / 127 if quantization == enc.INT8 else peak * 2.0**-11 + 2.0**-25
            assert np.abs(a - b).max() <= bound * (1 + 1e-3) + 1e-9, (field, i)
            everyone_zero = np.all([np.asarray(p[field][i]) == 0 for p in payloads], 0)
            assert not a[everyone_zero].any()  # zeros stay zeros
            differ += int(np.count_nonzero(a != b))
    assert differ > 0


@pytest.mark.usefixtures("tff_local_context")
@pytest.mark.parametrize("variant", ["regrow_at_client", "step"])
def test_quantized_pruning_uploads_compose_with_client_regrowth_and_step_pruning(client_data,
                                                                                 variant):
    """`--regrow_at=client` (FedDST) and `--prune_granularity=step` clients upload the same
    payload: int8 runs are deterministic, exactly at the level, and count 1 byte per value."""
    from fedprune.federated import process as fp_process
    from fedprune.model import builders
    from fedprune.pruning import masking, regrowth, schedules, step_schedule

    schedule = schedules.PolynomialDecay(0.5, 0.8, begin_round=1, end_round=2, power=3)
    extra = {}
    if variant == "step":  # 160 examples per client in batches of 16: 10 steps per round
        extra["step_mapping"] = step_schedule.step_mapping(schedule, steps_per_round=10,
                                                           prune_every_steps=5)
    else:
        extra["regrow"] = regrowth.RegrowSpec(rule="random", end_round=3, at="client")
    pp = fp_process.build_pruning_process(
        model_builder=lambda: builders.mlp((64,), 10, hidden=(50,)), num_rounds=3,
        input_spec=client_data[0].element_spec, masking="both", schedule=schedule,
        mask_spec=masking.MaskSpec(), client_optimizer=fp_process.make_optimizer("sgd", 0.1),
        server_optimizer=fp_process.make_optimizer("sgd", 1.0), seed=0,
        upload_quantization=enc.INT8, **extra)
    weights, sent, _ = _two_identical_runs(pp, client_data)
    for r in range(1, PRUNING_ROUNDS + 1):
        for k in pp.layout.kernels:
            mask = np.asarray(weights[r].non_trainable[k.mask_index])
            kernel = np.asarray(weights[r].trainable[k.trainable_index])
            assert mask.sum() == _kept(k.size, pp.table.sparsity[r]), (r, k.name)
            assert np.count_nonzero(kernel) == mask.sum(), (r, k.name)
        # A client's payload at most: every tensor as its 4-byte scale and one byte
        # per value inside the broadcast mask (dense for the biases), and the masks'
        # bitmaps; at float32 each value would take 4 bytes.
        broadcast = weights[r - 1]
        masks = {k.trainable_index: np.asarray(broadcast.non_trainable[k.mask_index])
                 for k in pp.layout.kernels}
        values = sum(int(masks[i].sum()) if i in masks else int(np.size(t))
                     for i, t in enumerate(broadcast.trainable))
        bitmaps = sum(-(-k.size // 8) for k in pp.layout.kernels)
        most = 4 * len(broadcast.trainable) + values + bitmaps
        assert most * 0.9 < sent[r - 1] / NUM_CLIENTS <= most, (r, sent[r - 1], most)
