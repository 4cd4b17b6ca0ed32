"""Which functions AutoGraph rewrites while fedprune traces its computations.

AutoGraph converts every Python function a `tf.function` calls, recursively,
into graph-building code, unless the function's module is on TensorFlow's
do-not-convert list (TensorFlow itself and Keras are). Converting is
pure-Python work (parsing, static analysis, code generation) and is paid once
per function per process: it was about half the CPU of a fresh process's first
process build (BUILD_NOTES.md, "AutoGraph: the modules left as they are").

`plain_modules()` adds the modules in `PLAIN_MODULES` to that list for the
duration of a `with` block. Their functions, reached from TFF's traced
functions, hold no Python control flow over tensors (they use `tf.cond` and
`smart_cond` themselves, or only check Python values), so running them as
written builds the same ops. A function that did need conversion would fail
loudly at trace time (`OperatorNotAllowedInGraphError`), not compute something
else. TFF's learning templates and loops are not listed: some of them do
branch on tensors in Python (e.g. `model_delta_client_work` on a non-finite
update).

Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import contextlib

# Module prefixes (AutoGraph matches a function's module by prefix).
PLAIN_MODULES = (
    "attr",  # TFF's structures (attrs classes)
    "tensorflow_federated.python.common_libs",  # TFF's struct and type checks
    "tensorflow_federated.python.learning.metrics",  # TFF's metric finalizers
    "tensorflow_model_optimization.python.core.sparsity",  # tfmot's pruning wrapper
    "tensorflow_model_optimization.python.core.keras",  # its compat helpers
)


@contextlib.contextmanager
def plain_modules(modules: tuple[str, ...] = PLAIN_MODULES):
    """Within the block, AutoGraph runs the functions of `modules` as written.

    Restores TensorFlow's own rules on exit; nested blocks restore in order.
    """
    from tensorflow.python.autograph.core import config

    saved = config.CONVERSION_RULES
    config.CONVERSION_RULES = (*(config.DoNotConvert(m) for m in modules), *saved)
    try:
        yield
    finally:
        config.CONVERSION_RULES = saved
