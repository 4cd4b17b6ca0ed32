"""A deployable model: TFLite flatbuffers, their sizes, and interpreter latency.

What a run's `summary.json` `deployment` section holds (`deployment_section`),
for up to three plain Keras models of the run:

  dense    the initial architecture with Keras' own fresh initialization (dense
           by construction; its weights are not the run's, so its zipped size
           varies by a few bytes between runs; the cells of a grid that share a
           traced process share one, converted once: `loop._deployment`)
  pruned   the final weights in the initial architecture (after a structured
           run's shrink: the shrunk weights put back at the kept units, zeros
           elsewhere, `surgery.unshrink`)
  shrunk   structured runs after their shrink: the final, smaller model

Each model is converted as `tf.lite.TFLiteConverter.from_keras_model` converts
it (float32, no quantization; `to_tflite`) and its flatbuffer's size is given
raw and deflated (`zipped_size`); the pruned model is also converted with
`tf.lite.Optimize.EXPERIMENTAL_SPARSITY`, which stores weight tensors with
enough zeros in TFLite's sparse format and adds a DENSIFY op before their use.
`from_keras_model` exports the model as a SavedModel on every conversion and
converts the export; `to_tflite_variants` exports once for both conversions of
a model (the same bytes, tested: ~0.35 s less CPU per pruned model).
The final model's flatbuffer (shrunk when structured) is written next to
`model.h5` as `model/model.tflite`.

Latency (`measure_latency`): `tf.lite.Interpreter` with `num_threads=1` (one
core, so numbers do not depend on the machine's load from other threads) and
TF's default op resolver, which applies the XNNPACK delegate; input resized to
batch 1 and batch 64, `WARMUP_RUNS` untimed `invoke()` calls, then
`TIMED_RUNS` timed ones (`time.perf_counter` around `invoke` alone, inputs set
once); reported as the median and interquartile range in milliseconds.

tfmot's `PruneForLatencyOnXNNPack` policy (`xnnpack_policy`) prunes only 1x1
convolutions of a MobileNet-like subgraph (from a 3x3 stride-2 `VALID` Conv2D
on 3 channels after a `ZeroPadding2D` of 1, to a `GlobalAveragePooling2D`),
the subgraph XNNPACK's sparse inference runs; on other models its
`ensure_model_supports_pruning` raises, and the section records its reason.
`mobilenet_like` builds a model it applies to and `tfmot_pruned` prunes with
it (or without it), for the benchmark's deploy section
(`experiments/benchmark_deploy.py`), which times the flatbuffers interleaved
(`measure_latencies`).

TensorFlow is imported inside the functions only.
"""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path

import numpy as np

from fedprune.outputs import atomic_files
from fedprune.runtime import tf_logging

# --deploy: measure latency too, only convert and size, or skip deployment.
DEPLOY_MODES = ("latency", "size", "none")
BATCH_SIZES = (1, 64)
WARMUP_RUNS = 10
TIMED_RUNS = 50
NUM_THREADS = 1
TFLITE_NAME = "model.tflite"


def to_tflite(model, *, sparse: bool = False) -> bytes:
    """The float32 TFLite flatbuffer of a plain Keras model.

    Args:
      model: a plain (unwrapped) Keras model.
      sparse: convert with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY` (sparse weight
        tensors followed by DENSIFY ops).
    """
    return to_tflite_variants(model, sparse=(sparse,))[0]


def to_tflite_variants(model, *, sparse=(False, True)) -> list[bytes]:
    """`to_tflite(model, sparse=s)` for each s of `sparse`, from one SavedModel export.

    The bytes `tf.lite.TFLiteConverter.from_keras_model(model)` gives (tested):
    that converter saves the model as a SavedModel with debug info and converts
    the saved graph, once per conversion. Here the model is saved once, each
    variant is converted from the export with `from_saved_model`, and the
    conversion metadata embedded in the flatbuffer records a Keras model, as
    `from_keras_model` records it (the one byte that would differ). A model
    that cannot be saved is converted by `from_keras_model` itself, which then
    freezes the Keras model instead.

    Raises:
      ConverterError (`tensorflow.lite.python.convert_phase`): TFLite's converter
        refuses the model.
    """
    import tempfile

    import tensorflow as tf
    from tensorflow.lite.python import (  # not in tf.lite's API: the metadata's schema
        conversion_metadata_schema_py_generated as metadata,
    )

    with tempfile.TemporaryDirectory(prefix="fedprune-tflite-") as export:
        try:
            tf.saved_model.save(model, export,
                                options=tf.saved_model.SaveOptions(save_debug_info=True))
        except Exception:  # noqa: BLE001 -- as from_keras_model, which then freezes the model
            export = None
        flatbuffers = []
        for variant_is_sparse in sparse:
            if export is None:
                converter = tf.lite.TFLiteConverter.from_keras_model(model)
            else:
                converter = tf.lite.TFLiteConverter.from_saved_model(export)
                converter._metadata.environment.modelType = metadata.ModelType.KERAS_MODEL
            if variant_is_sparse:
                converter.optimizations = [tf.lite.Optimize.EXPERIMENTAL_SPARSITY]
            flatbuffers.append(converter.convert())
    return flatbuffers


def converter_reason(error: Exception) -> str:
    """The converter's own error line (after `error: `), or the message's first line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line.split("error: ", 1)[1] for line in lines if "error: " in line]
    return (errors or lines or [type(error).__name__])[0]


def zipped_size(data: bytes, arcname: str = TFLITE_NAME) -> int:
    """Bytes of a deflate zip holding `data` alone (fixed timestamp: deterministic)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
        info.compress_type = zipfile.ZIP_DEFLATED
        z.writestr(info, data)
    return len(buffer.getvalue())


def _interpreter(data: bytes, batch: int, example_shape, *, xnnpack: bool = True):
    import tensorflow as tf

    resolver = tf.lite.experimental.OpResolverType
    kind = resolver.AUTO if xnnpack else resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    with tf_logging.tflite_info_follows_tf_level():  # the XNNPACK delegate's INFO line
        interpreter = tf.lite.Interpreter(model_content=data, num_threads=NUM_THREADS,
                                          experimental_op_resolver_type=kind)
        index = interpreter.get_input_details()[0]["index"]
        interpreter.resize_tensor_input(index, [batch, *example_shape])
        interpreter.allocate_tensors()
    return interpreter, index


def predict(data: bytes, x: np.ndarray) -> np.ndarray:
    """The flatbuffer's outputs for the batch `x` ([n, *input shape]), one invoke."""
    interpreter, index = _interpreter(data, len(x), x.shape[1:])
    interpreter.set_tensor(index, np.ascontiguousarray(x))
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]).copy()


def _batch(examples: np.ndarray, size: int) -> np.ndarray:
    """`size` examples: the first ones of `examples`, cycled when there are fewer."""
    return np.ascontiguousarray(examples[np.arange(size) % len(examples)])


def measure_latency(data: bytes, examples: np.ndarray, *, batch_sizes=BATCH_SIZES,
                    warmup: int = WARMUP_RUNS, runs: int = TIMED_RUNS) -> dict:
    """Interpreter latency of one `invoke()` per batch size, in milliseconds.

    Args:
      data: a TFLite flatbuffer with one input.
      examples: [n, *input shape] inputs (n >= 1); a batch of b takes the first
        b, cycled.
      batch_sizes: batch sizes to time.
      warmup: untimed invokes first.
      runs: timed invokes.

    Returns:
      {str(batch): {median_ms, iqr_ms (75th - 25th percentile), runs}}.
    """
    return measure_latencies({"model": data}, examples, batch_sizes=batch_sizes,
                             warmup=warmup, runs=runs)["model"]


def measure_latencies(flatbuffers: dict, examples: np.ndarray, *, batch_sizes=BATCH_SIZES,
                      warmup: int = WARMUP_RUNS, runs: int = TIMED_RUNS,
                      xnnpack: bool = True) -> dict:
    """`measure_latency` of several flatbuffers, their invokes interleaved.

    Per batch size, every flatbuffer gets an interpreter and `warmup` untimed
    invokes; then the timed invokes alternate between them (run i of each
    before run i + 1 of any), so that load from other processes hits all of
    them alike.

    Args:
      flatbuffers: {name: TFLite flatbuffer with one input taking `examples`}.
      examples, batch_sizes, warmup, runs: as in `measure_latency`.
      xnnpack: TF's default resolver, which applies the XNNPACK delegate; False:
        TFLite's builtin kernels alone (`BUILTIN_WITHOUT_DEFAULT_DELEGATES`).

    Returns:
      {name: {str(batch): {median_ms, iqr_ms, runs}}}.
    """
    result = {name: {} for name in flatbuffers}
    for batch in batch_sizes:
        interpreters = {}
        for name, data in flatbuffers.items():
            interpreter, index = _interpreter(data, batch, examples.shape[1:], xnnpack=xnnpack)
            interpreter.set_tensor(index, _batch(examples, batch))
            for _ in range(warmup):
                interpreter.invoke()
            interpreters[name] = interpreter
        times = {name: np.empty(runs) for name in flatbuffers}
        for i in range(runs):
            for name, interpreter in interpreters.items():
                start = time.perf_counter()
                interpreter.invoke()
                times[name][i] = time.perf_counter() - start
        for name, seconds in times.items():
            q25, q50, q75 = np.percentile(seconds * 1e3, (25, 50, 75))
            result[name][str(batch)] = {"median_ms": float(q50), "iqr_ms": float(q75 - q25),
                                        "runs": int(runs)}
    return result


def mobilenet_like(*, input_size: int = 32, stem_channels: int = 32,
                   pointwise_channels=(64, 64), classes: int = 10, seed: int = 0):
    """A Keras model with the subgraph `PruneForLatencyOnXNNPack` accepts.

    `ZeroPadding2D(1)`, a 3x3 stride-2 `VALID` Conv2D (ReLU) on the 3 input
    channels, one 1x1 Conv2D (ReLU) per `pointwise_channels` entry (the layers
    the policy prunes), `GlobalAveragePooling2D(keepdims=True)`, then a Dense
    classifier on the flattened [1, 1, C] map.

    Args:
      input_size: height and width of the [input_size, input_size, 3] input; the
        1x1 convolutions run on an (input_size / 2)^2 map.
      stem_channels: output channels of the 3x3 convolution.
      pointwise_channels: output channels of each 1x1 convolution, in order.
      classes: logits of the Dense output.
      seed: Keras' initialization seed.
    """
    import tensorflow as tf

    tf.keras.utils.set_random_seed(seed)
    layers = tf.keras.layers
    inputs = tf.keras.Input((input_size, input_size, 3))
    x = layers.ZeroPadding2D(1)(inputs)
    x = layers.Conv2D(stem_channels, 3, strides=2, padding="valid", activation="relu")(x)
    for channels in pointwise_channels:
        x = layers.Conv2D(channels, 1, activation="relu")(x)
    x = layers.GlobalAveragePooling2D(keepdims=True)(x)
    outputs = layers.Dense(classes)(layers.Flatten()(x))
    return tf.keras.Model(inputs, outputs)


def tfmot_pruned(model, sparsity: float, examples: np.ndarray, *, xnnpack: bool):
    """A plain copy of `model` pruned by tfmot's `prune_low_magnitude` to `sparsity`.

    The wrapped model (`ConstantSparsity(sparsity, begin_step=0, frequency=1)`; with
    `xnnpack`, `pruning_policy=PruneForLatencyOnXNNPack()`, which wraps only the
    1x1 Conv2D layers) takes one training step on `examples` with
    `UpdatePruningStep` and SGD at learning rate 0: the step computes each
    wrapped kernel's magnitude mask and multiplies the kernel by it, and the
    weights are otherwise left as they are (the wrapper counts that step as
    pruning step 1 before it checks the schedule, so the default frequency of
    100 would leave the masks all ones); `strip_pruning` then returns the
    plain model. Each wrapped kernel keeps its round(size * (1 - sparsity))
    largest magnitudes (tfmot's `Pruning`), the other weights are kept.

    Args:
      model: a plain Keras model (not modified).
      sparsity: fraction of each prunable kernel set to zero, in [0, 1).
      examples: [n, *input shape] inputs for the step (labels are zeros).
      xnnpack: use the latency policy (raises ValueError where it does not apply).
    """
    import tensorflow as tf
    import tensorflow_model_optimization as tfmot

    sparsity_api = tfmot.sparsity.keras
    copy = tf.keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    policy = {"pruning_policy": sparsity_api.PruneForLatencyOnXNNPack()} if xnnpack else {}
    wrapped = sparsity_api.prune_low_magnitude(
        copy, pruning_schedule=sparsity_api.ConstantSparsity(sparsity, begin_step=0, frequency=1),
        **policy)
    wrapped.compile(optimizer=tf.keras.optimizers.SGD(learning_rate=0.0),
                    loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = np.asarray(examples, np.float32)
    wrapped.fit(x, np.zeros(len(x), np.int64), batch_size=len(x), epochs=1, verbose=0,
                callbacks=[sparsity_api.UpdatePruningStep()])
    return sparsity_api.strip_pruning(wrapped)


def xnnpack_policy(model) -> dict:
    """Whether tfmot's `PruneForLatencyOnXNNPack` accepts `model` (a plain Keras model).

    Returns:
      {applies, prunable_layers (the 1x1 Conv2D layers it would prune), reason
      (its refusal, one line; None when it applies)}.
    """
    import tensorflow_model_optimization as tfmot

    policy = tfmot.sparsity.keras.PruneForLatencyOnXNNPack()
    prunable = [layer.name for layer in model.layers if policy.allow_pruning(layer)]
    try:
        policy.ensure_model_supports_pruning(model)
    except ValueError as e:
        return {"applies": False, "prunable_layers": prunable, "reason": str(e).splitlines()[0]}
    return {"applies": True, "prunable_layers": prunable, "reason": None}


def _nonzero(model) -> int:
    return int(sum(np.count_nonzero(w) for w in model.get_weights()))


def model_entry(model, data: bytes, examples: np.ndarray, *, latency: bool,
                sparse: bytes | None = None) -> dict:
    """One model's numbers, given its flatbuffer `data` (`to_tflite(model)`).

    Args:
      sparse: its EXPERIMENTAL_SPARSITY flatbuffer (`to_tflite(model, sparse=True)`),
        or None.

    Returns:
      {params, nonzero_params, tflite_bytes, tflite_bytes_zipped, latency_ms
      (None without `latency`), and with `sparse` `sparsity_format`: the same for
      the EXPERIMENTAL_SPARSITY conversion}.
    """
    entry = {"params": int(sum(np.size(w) for w in model.get_weights())),
             "nonzero_params": _nonzero(model),
             "tflite_bytes": len(data), "tflite_bytes_zipped": zipped_size(data),
             "latency_ms": measure_latency(data, examples) if latency else None}
    if sparse is not None:
        entry["sparsity_format"] = {
            "tflite_bytes": len(sparse), "tflite_bytes_zipped": zipped_size(sparse),
            "latency_ms": measure_latency(sparse, examples) if latency else None}
    return entry


def deployment_section(models: dict, final: str, examples: np.ndarray, output_dir: Path, *,
                       mode: str = "latency", converted: dict | None = None) -> dict:
    """Writes `model/model.tflite` of `models[final]`; returns summary.json's `deployment`.

    Args:
      models: {name: plain Keras model}, e.g. {"dense", "pruned"[, "shrunk"]}; the
        `pruned` one is also converted with EXPERIMENTAL_SPARSITY.
      final: the name of the run's final model (written as model.tflite).
      examples: [n, *input shape] test inputs: latency inputs, and the final
        flatbuffer's outputs are compared with Keras' on them.
      output_dir: the run folder (model.tflite goes into its `model/`).
      mode: `latency` (sizes and latency) or `size` (sizes only).
      converted: {name: flatbuffer} of models of `models` other than `pruned` converted
        before (`to_tflite`), not converted again; the others' are added to it. E.g. the
        dense model a grid's cells share (`loop._deployment`): converted once per grid.

    Returns:
      {mode, converted: True, num_threads, warmup_runs, timed_runs, batch_sizes, file, file_bytes,
      file_bytes_zipped, max_abs_difference (interpreter vs Keras outputs of the
      final model on `examples`), models: {name: `model_entry`}, xnnpack_policy
      (`xnnpack_policy` of the first model), conversion_seconds, latency_seconds};
      when TFLite's converter refuses a model (e.g. the LSTM of `--model=rnn`
      with builtin ops only): {mode, converted: False, reason
      (`converter_reason`), xnnpack_policy, conversion_seconds}, and no file is
      written, so the run's other outputs are kept.
    """
    if mode not in DEPLOY_MODES[:2]:
        raise ValueError(f"mode must be one of {DEPLOY_MODES[:2]}, got {mode!r}")
    from tensorflow.lite.python.convert_phase import ConverterError  # not in tf.lite's API

    latency = mode == "latency"
    start = time.time()
    converted = {} if converted is None else converted
    flatbuffers, sparse = {}, {}  # sparse: the EXPERIMENTAL_SPARSITY one of `pruned`
    try:
        for name, model in models.items():
            if name == "pruned":
                flatbuffers[name], sparse[name] = to_tflite_variants(model, sparse=(False, True))
            else:
                flatbuffers[name] = converted.get(name) or to_tflite(model)
    except ConverterError as error:  # e.g. the LSTM of --model=rnn (TFLite's builtin ops)
        return {"mode": mode, "converted": False, "reason": converter_reason(error),
                "xnnpack_policy": xnnpack_policy(next(iter(models.values()))),
                "conversion_seconds": time.time() - start}
    converted.update(flatbuffers)
    converted_at = time.time()
    entries = {name: model_entry(model, flatbuffers[name], examples, latency=latency,
                                 sparse=sparse.get(name))
               for name, model in models.items()}
    measured = time.time()
    model_dir = output_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / TFLITE_NAME
    atomic_files.atomic_write_bytes(path, flatbuffers[final])
    x = np.asarray(examples)
    difference = float(np.max(np.abs(predict(flatbuffers[final], x)
                                     - models[final](x, training=False).numpy())))
    return {
        "mode": mode, "converted": True, "num_threads": NUM_THREADS, "warmup_runs": WARMUP_RUNS,
        "timed_runs": TIMED_RUNS, "batch_sizes": list(BATCH_SIZES),
        "file": f"model/{TFLITE_NAME}", "final_model": final,
        "file_bytes": path.stat().st_size, "file_bytes_zipped": zipped_size(flatbuffers[final]),
        "max_abs_difference": difference,
        "models": entries,
        "xnnpack_policy": xnnpack_policy(next(iter(models.values()))),
        # Both conversions of `pruned` included.
        "conversion_seconds": converted_at - start,
        "latency_seconds": measured - converted_at,
    }
