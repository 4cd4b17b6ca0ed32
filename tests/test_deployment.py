"""The deployable model: TFLite flatbuffers, their sizes, interpreter latency (--deploy).

The library (`fedprune/outputs/deployment.py`) on small Keras models, then
whole runs (`loop.run_experiment`) whose summary.json `deployment` section and
model/model.tflite are checked against the run's Keras model, and the flag's
refusal of a bad value.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from cli_util import TIMEOUT_S

from fedprune.config import ExperimentConfig
from fedprune.errors import InvalidArgument
from fedprune.outputs import deployment

REPO_ROOT = Path(__file__).resolve().parents[1]


def _digits(n: int = 64) -> np.ndarray:
    from sklearn.datasets import load_digits

    return (load_digits().data[:n] / 16.0).astype(np.float32)


def _model(name: str):
    from fedprune.model import builders

    return builders.build_model(name, (64,), 10, seed=0)


def _magnitude_pruned(model, sparsity: float):
    """A copy of `model` with the smallest `sparsity` of every kernel zeroed."""
    import tensorflow as tf

    pruned = tf.keras.models.clone_model(model)
    weights = []
    for w in model.get_weights():
        w = w.copy()
        if w.ndim >= 2:
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
        weights.append(w)
    pruned.set_weights(weights)
    return pruned


# --------------------------------------------------------------------------
# The library on small models.


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_interpreter_outputs_equal_keras_outputs(name, sparse):
    model = _magnitude_pruned(_model(name), 0.8)
    x = _digits()
    flatbuffer = deployment.to_tflite(model, sparse=sparse)
    got = deployment.predict(flatbuffer, x)
    assert got.shape == (64, 10)
    np.testing.assert_allclose(got, model(x, training=False).numpy(), atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_one_export_converts_to_the_bytes_of_from_keras_model(name):
    """`to_tflite_variants` exports the model once for both conversions; each flatbuffer
    is, byte for byte, what `TFLiteConverter.from_keras_model` gives (metadata included)."""
    import tensorflow as tf

    model = _magnitude_pruned(_model(name), 0.8)

    def from_keras_model(sparse: bool) -> bytes:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if sparse:
            converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
        return converter.convert()

    plain, sparse = deployment.to_tflite_variants(model, sparse=(False, True))
    assert plain == from_keras_model(False)
    assert sparse == from_keras_model(True)
    assert len(sparse) < len(plain)
    assert deployment.to_tflite(model) == plain


def test_zipped_size_is_the_size_of_a_zip_file_holding_the_flatbuffer(tmp_path):
    flatbuffer = deployment.to_tflite(_model("mlp"))
    path = tmp_path / "model.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo(deployment.TFLITE_NAME, date_time=(1980, 1, 1, 0, 0, 0))
        z.writestr(info, flatbuffer, compress_type=zipfile.ZIP_DEFLATED)
    assert deployment.zipped_size(flatbuffer) == path.stat().st_size
    assert deployment.zipped_size(flatbuffer) == deployment.zipped_size(flatbuffer)


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9])
def test_pruned_flatbuffer_zips_smaller_than_dense(sparsity):
    dense = _model("mlp")
    pruned = _magnitude_pruned(dense, sparsity)
    dense_fb, pruned_fb = deployment.to_tflite(dense), deployment.to_tflite(pruned)
    sparse_fb = deployment.to_tflite(pruned, sparse=True)
    assert len(pruned_fb) == len(dense_fb)  # float32 either way: zeros take the same room
    # Deflate removes most of the zeros: at least half the pruned fraction of the bytes.
    assert deployment.zipped_size(pruned_fb) < (1 - sparsity / 2) * deployment.zipped_size(
        dense_fb)
    # EXPERIMENTAL_SPARSITY stores the kernels sparsely: smaller raw, too.
    assert len(sparse_fb) < len(pruned_fb)


def test_latency_has_median_and_iqr_of_at_least_50_runs_per_batch_size():
    flatbuffer = deployment.to_tflite(_model("mlp"))
    latency = deployment.measure_latency(flatbuffer, _digits(5))
    assert sorted(latency) == ["1", "64"]
    for entry in latency.values():
        assert entry["runs"] >= 50 and entry["runs"] == deployment.TIMED_RUNS
        assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0


@pytest.mark.parametrize("xnnpack", [True, False])
def test_latencies_of_several_flatbuffers_are_timed_alike(xnnpack):
    flatbuffers = {"dense": deployment.to_tflite(_model("mlp")),
                   "sparse": deployment.to_tflite(_magnitude_pruned(_model("mlp"), 0.9),
                                                  sparse=True)}
    latency = deployment.measure_latencies(flatbuffers, _digits(5), batch_sizes=(1, 8),
                                           warmup=1, runs=7, xnnpack=xnnpack)
    assert sorted(latency) == ["dense", "sparse"]
    for entries in latency.values():
        assert sorted(entries) == ["1", "8"]
        for entry in entries.values():
            assert entry["runs"] == 7 and entry["median_ms"] > 0 and entry["iqr_ms"] >= 0


@pytest.mark.parametrize("name", ["mlp", "mlp2", "cnn"])
def test_xnnpack_latency_policy_refuses_fedprunes_models(name):
    outcome = deployment.xnnpack_policy(_model(name))
    assert outcome == {"applies": False, "prunable_layers": [],
                       "reason": outcome["reason"]}
    assert outcome["reason"].startswith("Could not find `Conv2D 3x3` layer with stride 2x2")


def test_xnnpack_latency_policy_where_it_applies_prunes_the_1x1_convolutions():
    import tensorflow_model_optimization as tfmot

    model = deployment.mobilenet_like(input_size=32, stem_channels=32,
                                      pointwise_channels=(64, 64))
    outcome = deployment.xnnpack_policy(model)
    assert outcome["applies"] and outcome["reason"] is None
    # Input, ZeroPadding2D, the 3x3 Conv2D, then the two 1x1 Conv2D layers.
    assert outcome["prunable_layers"] == [layer.name for layer in model.layers[3:5]]
    assert [layer.kernel_size for layer in model.layers[3:5]] == [(1, 1), (1, 1)]
    wrapped = tfmot.sparsity.keras.prune_low_magnitude(
        model, pruning_schedule=tfmot.sparsity.keras.ConstantSparsity(0.8, 0),
        pruning_policy=tfmot.sparsity.keras.PruneForLatencyOnXNNPack())
    kinds = [type(layer).__name__ for layer in wrapped.layers]
    assert kinds.count("PruneLowMagnitude") == 2
    # Pruned 1x1 kernels, converted with sparse weights: same function, measured.
    x = np.random.default_rng(0).random((4, 32, 32, 3), np.float32)
    pruned = tf_clone_with_pruned_pointwise(model, 0.8)
    flatbuffer = deployment.to_tflite(pruned, sparse=True)
    np.testing.assert_allclose(deployment.predict(flatbuffer, x),
                               pruned(x, training=False).numpy(), atol=1e-5, rtol=0)
    latency = deployment.measure_latency(flatbuffer, x, batch_sizes=(1,))
    assert latency["1"]["median_ms"] > 0


def tf_clone_with_pruned_pointwise(model, sparsity: float):
    """`model` with the smallest `sparsity` of each 1x1 Conv2D kernel zeroed."""
    import tensorflow as tf

    pruned = tf.keras.models.clone_model(model)
    pruned.set_weights(model.get_weights())
    for layer in pruned.layers:
        if isinstance(layer, tf.keras.layers.Conv2D) and layer.kernel_size == (1, 1):
            w = layer.kernel.numpy()
            w[np.abs(w) < np.quantile(np.abs(w), sparsity)] = 0.0
            layer.kernel.assign(w)
    return pruned


# --------------------------------------------------------------------------
# Whole runs.

_RUN = dict(num_clients=3, clients_per_round=3, rounds=3, begin_round=1, end_round=2,
            max_examples_per_client=32, final_sparsity=0.8, figures=False)
_STRUCTURED = dict(structure="neuron", masking="server", prune_output_layer=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tff_local_context):
    """{kind: (config, output folder, summary)} of an unstructured and a structured run."""
    from fedprune.program import loop

    done = {}
    for kind, changes in (("unstructured", {}), ("structured", _STRUCTURED),
                          ("size", {"deploy": "size"})):
        config = ExperimentConfig(**{**_RUN, **changes}).validate()
        out = tmp_path_factory.mktemp(kind)
        done[kind] = (config, out, loop.run_experiment(config, out, log=lambda line: None))
    return done


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unstructured", "structured"])
def test_model_tflite_computes_what_model_h5_does(runs, kind):
    import tensorflow as tf

    from fedprune.program import assembly

    config, out, summary = runs[kind]
    section = summary["deployment"]
    assert json.loads((out / "summary.json").read_text())["deployment"] == section
    path = out / "model" / "model.tflite"
    assert section["file"] == "model/model.tflite"
    assert section["file_bytes"] == path.stat().st_size
    assert section["file_bytes"] == section["models"][section["final_model"]]["tflite_bytes"]
    assert section["file_bytes_zipped"] == deployment.zipped_size(path.read_bytes())
    x = assembly.load_data(config).test_x
    keras_model = tf.keras.models.load_model(out / "model" / "model.h5", compile=False)
    np.testing.assert_allclose(deployment.predict(path.read_bytes(), x),
                               keras_model(x, training=False).numpy(), atol=1e-5, rtol=0)
    assert 0 <= section["max_abs_difference"] <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["unstructured", "structured"])
def test_latency_of_every_model_is_positive_with_at_least_50_runs(runs, kind):
    section = runs[kind][2]["deployment"]
    names = ["dense", "pruned"] + (["shrunk"] if kind == "structured" else [])
    assert list(section["models"]) == names
    assert section["final_model"] == names[-1]
    timed = [section["models"][n]["latency_ms"] for n in names]
    timed.append(section["models"]["pruned"]["sparsity_format"]["latency_ms"])
    for latency in timed:
        assert sorted(latency) == ["1", "64"]
        for entry in latency.values():
            assert entry["median_ms"] > 0 and entry["iqr_ms"] >= 0 and entry["runs"] >= 50
    assert section["num_threads"] == 1 and section["conversion_seconds"] > 0
    assert section["xnnpack_policy"]["applies"] is False


@pytest.mark.slow
def test_pruned_model_zips_smaller_than_dense_at_80_percent(runs):
    config, _, summary = runs["unstructured"]
    models = summary["deployment"]["models"]
    dense, pruned = models["dense"], models["pruned"]
    assert dense["params"] == pruned["params"] == summary["model_params"]
    assert pruned["nonzero_params"] == summary["final_nonzero_params"]
    assert pruned["nonzero_params"] < 0.25 * pruned["params"]
    assert pruned["tflite_bytes_zipped"] < 0.5 * dense["tflite_bytes_zipped"]
    assert pruned["sparsity_format"]["tflite_bytes"] < pruned["tflite_bytes"]


@pytest.mark.slow
def test_shrunk_model_has_fewer_parameters_and_a_smaller_flatbuffer(runs):
    _, out, summary = runs["structured"]
    models = summary["deployment"]["models"]
    shrunk, pruned, dense = models["shrunk"], models["pruned"], models["dense"]
    assert shrunk["params"] == summary["model_params"] < pruned["params"] == dense["params"]
    assert shrunk["tflite_bytes"] < pruned["tflite_bytes"]
    assert shrunk["tflite_bytes_zipped"] < dense["tflite_bytes_zipped"]
    # The pruned model is the shrunk one put back at full size: exactly as many nonzeros.
    assert pruned["nonzero_params"] == shrunk["nonzero_params"]
    kept = json.loads((out / "shrink.json").read_text())["after"]["params"]
    assert shrunk["params"] == kept


@pytest.mark.slow
def test_size_mode_writes_sizes_without_latency(runs):
    section = runs["size"][2]["deployment"]
    assert section["mode"] == "size"
    for entry in section["models"].values():
        assert entry["latency_ms"] is None and entry["tflite_bytes"] > 0
    assert section["models"]["pruned"]["sparsity_format"]["latency_ms"] is None


@pytest.mark.slow
def test_none_writes_no_flatbuffer_and_no_section(runs, tmp_path):
    from fedprune.program import loop

    config = dataclasses.replace(runs["unstructured"][0], deploy="none")
    summary = loop.run_experiment(config, tmp_path, log=lambda line: None)
    assert "deployment" not in summary
    assert not (tmp_path / "model" / "model.tflite").exists()
    assert (tmp_path / "model" / "model.h5").exists()


# --------------------------------------------------------------------------
# The flag.


@pytest.mark.parametrize("mode", deployment.DEPLOY_MODES)
def test_deploy_is_output_only_and_keeps_the_fingerprint(mode):
    assert ExperimentConfig(deploy=mode).validate().fingerprint() == "cacb424d245d153f"


@pytest.mark.parametrize("value", ["fast", "LATENCY", ""])
def test_bad_deploy_value_is_refused_in_one_line(value):
    with pytest.raises(InvalidArgument, match="^--deploy="):
        ExperimentConfig(deploy=value).validate()
    result = subprocess.run([sys.executable, "-m", "experiments.run", f"--deploy={value}"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"error: flag --deploy={value}: value should be one of <latency|size|none>"]


_INTERPRETER_SCRIPT = """
import sys
from fedprune.runtime import tf_logging
tf_logging.quiet_tensorflow_logging(verbose=sys.argv[1] == "verbose")
import numpy as np
from fedprune.model import builders
from fedprune.outputs import deployment
data = deployment.to_tflite(builders.build_model("mlp", (64,), 10, seed=0))
print(deployment.predict(data, np.zeros((2, 64), np.float32)).shape)
"""


@pytest.mark.parametrize("verbosity, info_lines", [("quiet", 0), ("verbose", 1)])
def test_tflite_delegate_info_line_follows_the_tf_log_level(verbosity, info_lines):
    """Quiet (the CLI's default): no TFLite INFO line on stderr; --verbose keeps it."""
    result = subprocess.run([sys.executable, "-c", _INTERPRETER_SCRIPT, verbosity],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.splitlines()[-1] == "(2, 10)"
    delegate = [line for line in result.stderr.splitlines()
                if line.startswith("INFO: Created TensorFlow Lite XNNPACK delegate")]
    assert len(delegate) == info_lines, result.stderr[-2000:]
    if verbosity == "quiet":
        assert result.stderr == ""


def test_a_model_the_converter_refuses_is_recorded_without_a_file(tmp_path):
    """The LSTM of --model=rnn needs TF ops TFLite's builtins lack: the run keeps going."""
    from fedprune.model import builders

    model = builders.build_model("rnn", (12,), 20, seed=0, units=8)
    examples = np.zeros((64, 12), np.int32)
    section = deployment.deployment_section({"dense": model, "pruned": model}, "pruned",
                                            examples, tmp_path, mode="latency")
    assert section["converted"] is False
    # The converter's own line, e.g. "'tf.TensorListReserve' op requires element_shape ...".
    assert "tensorlist" in section["reason"].lower().replace(" ", "")
    assert "\n" not in section["reason"]
    assert section["xnnpack_policy"]["applies"] is False
    assert not (tmp_path / "model" / deployment.TFLITE_NAME).exists()


def test_a_flatbuffer_converted_before_is_not_converted_again(tmp_path, monkeypatch):
    """`converted` carries the dense model's flatbuffer from one grid cell to the next."""
    model = _model("mlp")
    examples = _digits()
    converted = {}
    first = deployment.deployment_section({"dense": model, "pruned": model}, "pruned",
                                          examples, tmp_path / "a", mode="size",
                                          converted=converted)
    assert set(converted) == {"dense", "pruned"}
    dense = converted["dense"]
    calls = []
    for function in ("to_tflite", "to_tflite_variants"):
        real = getattr(deployment, function)
        monkeypatch.setattr(deployment, function, lambda m, real=real, function=function, **kw:
                            calls.append((function, kw)) or real(m, **kw))
    second = deployment.deployment_section({"dense": model, "pruned": model}, "pruned",
                                           examples, tmp_path / "b", mode="size",
                                           converted={"dense": dense})
    # The pruned model and its sparse format only, from one export.
    assert calls == [("to_tflite_variants", {"sparse": (False, True)})]
    for key in ("file_bytes", "file_bytes_zipped", "models", "max_abs_difference"):
        assert second[key] == first[key]
