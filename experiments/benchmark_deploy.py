"""The benchmark's deploy section: tfmot's latency-oriented pruning, measured in TFLite.

`PruneForLatencyOnXNNPack` applies only to a MobileNet-like subgraph
(`deployment.xnnpack_policy`), which none of fedprune's models has, so the
section builds one (`deployment.mobilenet_like`, `MOBILENET`), prunes its 1x1
convolutions with the policy to each `--deploy_sparsities` value
(`deployment.tfmot_pruned`), and times, interleaved
(`deployment.measure_latencies`), the dense flatbuffer, the pruned one
converted plainly and the pruned one converted with EXPERIMENTAL_SPARSITY
(sparse weights + DENSIFY, the form XNNPACK's sparse inference reads). One
more group does the same for fedprune's `mlp` on digits at `MLP_SPARSITY`,
pruned by tfmot without the policy (which refuses it; its reason is reported).
Every flatbuffer's outputs must equal its Keras model's within `ATOL`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from experiments.benchmark import Plan

# 64x64x3 input: the 1x1 convolutions run on a 32x32 map, 64 -> 128 -> 256
# channels, ~44 M multiply-adds per image, so batch 1 takes ~1 ms on one core
# (well above the timer's resolution) and batch 64 ~0.1 s, which keeps 50
# interleaved runs of seven flatbuffers within a couple of minutes.
MOBILENET = dict(input_size=64, stem_channels=32, pointwise_channels=(64, 128, 256))
MLP_SPARSITY = 0.9
ATOL = 1e-4
# Examples for tfmot's pruning step and the outputs check (the latency batches
# take the first ones, cycled).
PRUNE_EXAMPLES = 8
LATENCY_EXAMPLES = 64
# The smallest dense/pruned latency ratio `verdict` calls a speed-up: interleaved
# medians of identical flatbuffers differ by a few percent on a shared machine.
SPEEDUP = 1.10


def pointwise_kernels(model) -> dict[str, np.ndarray]:
    """{layer name: kernel} of the 1x1 Conv2D layers of a plain Keras model."""
    return {layer.name: layer.kernel.numpy() for layer in model.layers
            if type(layer).__name__ == "Conv2D" and tuple(layer.kernel_size) == (1, 1)}


def _group(name: str, dense, sparsities, examples: np.ndarray, *, xnnpack: bool, log):
    """Flatbuffers, pruned models and outputs check of one model; no timing yet."""
    from fedprune.outputs import deployment

    x = examples[:PRUNE_EXAMPLES]
    flatbuffers = {(name, 0.0, "dense"): deployment.to_tflite(dense)}
    keras = {(name, 0.0, "dense"): dense}
    pruned_models = {}
    for sparsity in sparsities:
        pruned = deployment.tfmot_pruned(dense, sparsity, x, xnnpack=xnnpack)
        pruned_models[sparsity] = pruned
        for variant, sparse in (("pruned", False), ("pruned, sparse format", True)):
            flatbuffers[(name, sparsity, variant)] = deployment.to_tflite(pruned, sparse=sparse)
            keras[(name, sparsity, variant)] = pruned
        log(f"deploy: {name} pruned to {sparsity:g} and converted")
    difference = 0.0
    for key, data in flatbuffers.items():
        got = deployment.predict(data, x)
        diff = float(np.max(np.abs(got - keras[key](x, training=False).numpy())))
        if not diff <= ATOL:
            raise AssertionError(f"deploy: {key} TFLite outputs differ from Keras by {diff:.3g} "
                                 f"(> {ATOL:g})")
        difference = max(difference, diff)
    return flatbuffers, pruned_models, difference


def deploy_results(sparsities, *, runs: int, warmup: int, batch_sizes=(1, 64),
                   mobilenet: dict | None = None, log=lambda line: None) -> dict:
    """Prunes, converts and times the MobileNet-like model and fedprune's MLP.

    Args:
      sparsities: fractions of each 1x1 kernel the policy prunes, each in (0, 1).
      runs, warmup: timed and untimed invokes per flatbuffer and batch size.
      batch_sizes: batch sizes to time.
      mobilenet: `deployment.mobilenet_like` arguments (default `MOBILENET`).

    Returns:
      {rows: [{model, sparsity (0 for dense), variant, tflite_bytes,
      tflite_bytes_zipped, latency_ms ({str(batch): {median_ms, iqr_ms, runs}}),
      speedup ({str(batch): dense median / this median})}], policy and
      mlp_policy (`deployment.xnnpack_policy`), pruned ({sparsity: the pruned
      MobileNet-like model}), mlp_pruned, max_abs_difference (largest |TFLite -
      Keras| output over all flatbuffers, each checked <= ATOL), mobilenet,
      without_xnnpack ([{model, sparsity, variant, latency_ms}] of the dense and
      the sparsest sparse-format MobileNet-like flatbuffers at batch 1 with
      TFLite's builtin kernels, no delegate)}.
    """
    from fedprune.model import builders
    from fedprune.outputs import deployment

    mobilenet = dict(MOBILENET if mobilenet is None else mobilenet)
    size = mobilenet["input_size"]
    dense = deployment.mobilenet_like(**mobilenet)
    policy = deployment.xnnpack_policy(dense)
    images = np.random.default_rng(0).random((LATENCY_EXAMPLES, size, size, 3), np.float32)
    groups = [("mobilenet_like", _group("mobilenet_like", dense, sparsities, images,
                                        xnnpack=True, log=log), images)]
    from sklearn.datasets import load_digits

    digits = (load_digits().data[:LATENCY_EXAMPLES] / 16.0).astype(np.float32)
    mlp = builders.build_model("mlp", (64,), 10, seed=0)
    mlp_policy = deployment.xnnpack_policy(mlp)
    groups.append(("mlp", _group("mlp", mlp, [MLP_SPARSITY], digits, xnnpack=False, log=log),
                   digits))
    rows, difference = [], 0.0
    for name, (flatbuffers, _, diff), examples in groups:
        difference = max(difference, diff)
        log(f"deploy: timing {len(flatbuffers)} {name} flatbuffers, {runs} runs each")
        latency = deployment.measure_latencies(dict(enumerate(flatbuffers.values())), examples,
                                               batch_sizes=batch_sizes, warmup=warmup, runs=runs)
        reference = latency[0]  # dense, first in each group
        for i, ((model, sparsity, variant), data) in enumerate(flatbuffers.items()):
            rows.append({
                "model": model, "sparsity": sparsity, "variant": variant,
                "tflite_bytes": len(data), "tflite_bytes_zipped": deployment.zipped_size(data),
                "latency_ms": latency[i],
                "speedup": {b: reference[b]["median_ms"] / latency[i][b]["median_ms"]
                            for b in latency[i]}})
    # Is the delegate in use at all? The same dense and sparsest sparse-format
    # flatbuffers at batch 1 with TFLite's builtin kernels alone.
    flatbuffers = groups[0][1][0]
    sparsest = (("mobilenet_like", 0.0, "dense"),
                ("mobilenet_like", max(sparsities), "pruned, sparse format"))
    builtin = deployment.measure_latencies({key: flatbuffers[key] for key in sparsest}, images,
                                           batch_sizes=(1,), warmup=warmup, runs=runs,
                                           xnnpack=False)
    return {"rows": rows, "policy": policy, "mlp_policy": mlp_policy,
            "without_xnnpack": [{"model": k[0], "sparsity": k[1], "variant": k[2],
                                 "latency_ms": builtin[k]} for k in sparsest],
            "pruned": groups[0][1][1], "mlp_pruned": groups[1][1][1][MLP_SPARSITY],
            "max_abs_difference": difference, "mobilenet": mobilenet}


def deploy_markdown(rows) -> str:
    """The deploy table: one row per flatbuffer; latency median (IQR) in ms."""
    batches = list(rows[0]["latency_ms"])
    header = (["model", "pruned 1x1 / kernels", "flatbuffer", "tflite bytes", "zipped bytes"]
              + [f"batch {b}: median (IQR) ms" for b in batches]
              + [f"speed-up vs dense, batch {b}" for b in batches])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([" :-- "] * 3 + [" --: "] * (
        len(header) - 3)) + "|"]
    for row in rows:
        cells = [row["model"], f"{100 * row['sparsity']:g} %" if row["sparsity"] else "—",
                 row["variant"], f"{row['tflite_bytes']:,}", f"{row['tflite_bytes_zipped']:,}"]
        cells += [f"{row['latency_ms'][b]['median_ms']:.4g} ({row['latency_ms'][b]['iqr_ms']:.2g})"
                  for b in batches]
        cells += [f"{row['speedup'][b]:.2f}×" for b in batches]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def verdict(rows, model: str) -> str:
    """What the pruned flatbuffers of `model` measured against dense, in words."""
    pruned = [r for r in rows if r["model"] == model and r["variant"] != "dense"]
    ratios = [(ratio, b, r) for r in pruned for b, ratio in r["speedup"].items()]
    best, batch, row = max(ratios, key=lambda t: t[0])
    low = min(ratio for ratio, _, _ in ratios)
    span = f"speed-ups {low:.2f}–{best:.2f}× over all pruned rows and batch sizes"
    if best < SPEEDUP:
        return f"**no speed-up** ({span}; below {SPEEDUP:.2f}× counts as none)"
    return (f"a speed-up of up to {best:.2f}× (batch {batch}, {row['variant']}, "
            f"{100 * row['sparsity']:g} %; {span})")


def run_deploy_section(plan: Plan, log) -> tuple[str, str]:
    """Runs `deploy_results` with the plan's settings; returns (table, notes)."""
    return deploy_section_text(plan, deploy_results(
        plan.deploy_sparsities, runs=plan.deploy_runs, warmup=plan.deploy_warmup, log=log))


def deploy_section_text(plan: Plan, result: dict) -> tuple[str, str]:
    """The section's (table, notes) for `deploy_results`' `result` under `plan`."""
    rows = result["rows"]
    m = result["mobilenet"]
    channels = " → ".join(map(str, m["pointwise_channels"]))
    size = f"{m['input_size']}x{m['input_size']}x3"
    with_delegate = {(r["model"], r["sparsity"], r["variant"]): r["latency_ms"]["1"]["median_ms"]
                     for r in rows}
    builtin = []
    for r in result["without_xnnpack"]:
        label = r["variant"] + (f" {100 * r['sparsity']:g} %" if r["sparsity"] else "")
        with_ms = with_delegate[(r["model"], r["sparsity"], r["variant"])]
        builtin.append(f"{label} {r['latency_ms']['1']['median_ms']:.3g} ms without it, "
                       f"{with_ms:.3g} ms with it")
    mobilenet_verdict = verdict(rows, "mobilenet_like")
    sparse_path = ("The sparse-format flatbuffers (their 1x1 kernels reach the interpreter "
                   "through DENSIFY ops) run no faster than dense, so this TensorFlow wheel's "
                   "XNNPACK delegate takes no sparse path for them."
                   if "no speed-up" in mobilenet_verdict else "")
    notes = f"""`mobilenet_like`: `deployment.mobilenet_like` with a {size}
input, `ZeroPadding2D(1)`, a 3x3 stride-2 VALID conv to {m['stem_channels']} channels,
1x1 convs {channels}, `GlobalAveragePooling2D(keepdims=True)`, Dense 10 (random
initial weights: latency does not depend on training). `PruneForLatencyOnXNNPack`
applies and wraps exactly its 1x1 convs ({', '.join(result['policy']['prunable_layers'])});
tfmot's `prune_low_magnitude` (`ConstantSparsity`) set each 1x1 kernel to the
sparsity of its row (`deployment.tfmot_pruned`), the stem conv and Dense stay dense.
`mlp`: fedprune's default model on digits, every Dense kernel pruned by tfmot to
{100 * MLP_SPARSITY:g} % without the policy, which refuses it: "{result['mlp_policy']['reason']}".
Flatbuffers: float32 `TFLiteConverter.from_keras_model`, `pruned` plain,
`pruned, sparse format` with `tf.lite.Optimize.EXPERIMENTAL_SPARSITY`. Latency:
`tf.lite.Interpreter(num_threads=1)` (XNNPACK delegate by default), {plan.deploy_warmup}
untimed then {plan.deploy_runs} timed `invoke()` per flatbuffer and batch size, the
flatbuffers of a model alternating run by run (`deployment.measure_latencies`);
median and IQR in ms; speed-up = dense median / row median. TFLite outputs equal
Keras' within {result['max_abs_difference']:.1g} (checked ≤ {ATOL:g}). Measured:
the MobileNet-like model shows {mobilenet_verdict}; the MLP shows
{verdict(rows, 'mlp')}. Batch 1 of the MobileNet-like model with TFLite's builtin
kernels alone instead of the XNNPACK delegate: {'; '.join(builtin)}. {sparse_path}
XNNPACK's sparse inference (Elsen et al., "Fast Sparse ConvNets") needs the
sparse-format weights and at least 2/3 zeros across the 1x1 kernels, so below
67 % it cannot apply at all."""
    return deploy_markdown(rows), notes
