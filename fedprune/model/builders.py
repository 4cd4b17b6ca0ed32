"""Plain Keras model builders (no pruning: `wrappers.py` decides what is prunable).

Every builder takes the per-example input shape and the number of classes and
returns an uncompiled Sequential model that outputs logits. Weights are drawn
from Keras' default initializers under `tf.keras.utils.set_random_seed(seed)`,
so the same seed gives the same initial model.
"""

from __future__ import annotations

from collections.abc import Callable

MODELS = ("mlp", "mlp2", "cnn", "rnn")


def mlp(input_shape, num_classes, *, hidden=(128,)):
    """The seeds' model: Flatten -> Dense(128, ReLU) -> Dense(num_classes) logits."""
    import tensorflow as tf

    layers = [tf.keras.layers.InputLayer(input_shape=input_shape), tf.keras.layers.Flatten()]
    layers += [tf.keras.layers.Dense(units, activation="relu") for units in hidden]
    layers.append(tf.keras.layers.Dense(num_classes))
    return tf.keras.Sequential(layers)


def mlp2(input_shape, num_classes):
    """Two hidden ReLU layers of 200 units (McMahan et al. 2017's "2NN")."""
    return mlp(input_shape, num_classes, hidden=(200, 200))


def cnn(input_shape, num_classes, *, filters=(32, 64), dense_units=512, kernel_size=5):
    """The CNN used on federated EMNIST (McMahan et al. 2017; Reddi et al. 2021).

    Conv(5x5, 32) -> MaxPool(2) -> Conv(5x5, 64) -> MaxPool(2) -> Dense(512) ->
    Dense(num_classes). With 28x28x1 inputs it has 1,690,046 parameters for 62 classes
    (1,663,370 for 10); on 8x8 digits the same layers see 2x2x64 features.
    """
    import tensorflow as tf

    layers = [tf.keras.layers.InputLayer(input_shape=input_shape)]
    if len(input_shape) == 1:  # flat vectors (e.g. digits): reshape to a square image
        side = int(round(input_shape[0] ** 0.5))
        layers.append(tf.keras.layers.Reshape((side, side, 1)))
    for f in filters:
        layers.append(tf.keras.layers.Conv2D(f, kernel_size, padding="same", activation="relu"))
        layers.append(tf.keras.layers.MaxPool2D(2, padding="same"))
    layers += [
        tf.keras.layers.Flatten(),
        tf.keras.layers.Dense(dense_units, activation="relu"),
        tf.keras.layers.Dense(num_classes),
    ]
    return tf.keras.Sequential(layers)


def rnn(input_shape, num_classes, *, embedding_dim=8, units=256):
    """Character LSTM for Shakespeare (TFF's text-generation model, one LSTM layer).

    Input: [seq_len] int ids; output: [seq_len, num_classes] next-character logits.
    """
    import tensorflow as tf

    return tf.keras.Sequential(
        [
            tf.keras.layers.InputLayer(input_shape=input_shape, dtype=tf.int32),
            tf.keras.layers.Embedding(num_classes, embedding_dim),
            tf.keras.layers.LSTM(units, return_sequences=True),
            tf.keras.layers.Dense(num_classes),
        ]
    )


_BUILDERS: dict[str, Callable] = {"mlp": mlp, "mlp2": mlp2, "cnn": cnn, "rnn": rnn}


def build_model(name: str, input_shape, num_classes: int, *, seed: int | None = None, **kwargs):
    """Builds model `name` (one of MODELS); with `seed`, its initial weights are reproducible."""
    import tensorflow as tf

    from fedprune.errors import check

    check(name in _BUILDERS, "model", name, "one of " + "|".join(MODELS))
    if seed is not None:
        tf.keras.utils.set_random_seed(seed)
    return _BUILDERS[name](tuple(int(d) for d in input_shape), int(num_classes), **kwargs)


def count_params(model) -> int:
    """Total number of parameters (trainable + non-trainable) of a Keras model."""
    return int(sum(w.shape.num_elements() for w in model.weights))
