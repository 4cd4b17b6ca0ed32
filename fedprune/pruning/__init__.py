"""Pruning: tfmot wrappers on the model, sparsity schedules, and the mask maths."""
