"""Small Keras models shared by the structured-pruning tests (unit layouts, masks, surgery)."""

import tensorflow as tf

from fedprune.model import builders

L = tf.keras.layers


def bn_cnn():
    """CNN with BatchNorm after each conv (Conv -> BN -> ReLU -> MaxPool, twice)."""
    return tf.keras.Sequential([
        L.InputLayer(input_shape=(8, 8, 1)),
        L.Conv2D(8, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPool2D(2),
        L.Conv2D(16, 3, padding="same"), L.BatchNormalization(), L.ReLU(), L.MaxPool2D(2),
        L.Flatten(), L.Dense(32, activation="relu"), L.Dense(10),
    ])


MODELS = {
    "mlp": lambda: builders.mlp((64,), 10, hidden=(32, 16)),
    "cnn": lambda: builders.cnn((8, 8, 1), 10, filters=(8, 16), dense_units=32),
    "bn_cnn": bn_cnn,
}
