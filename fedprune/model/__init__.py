"""The Keras model: builders, and surgery that rebuilds a unit-pruned model smaller."""
