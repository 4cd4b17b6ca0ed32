"""How chatty TensorFlow, gRPC, absl and TFF's worker are.

`quiet_tensorflow_logging` is called by the drivers before TensorFlow is
imported; `tflite_info_follows_tf_level` extends its level to TFLite's native
logger. Importing this module is cheap (standard library only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

_log = logging.getLogger(__name__)

_PYTHON_LOGGERS = ("tensorflow", "tensorflow_federated", "absl")
_NOISY_PACKAGES = (
    r"(tensorflow|tensorflow_federated|tensorflow_probability|"
    r"tensorflow_model_optimization|keras|jax|ml_dtypes|tree|dp_accounting)"
)


def quiet_tensorflow_logging(verbose: bool = False) -> None:
    """Sets how chatty TensorFlow, gRPC, absl and TFF's worker are.

    Call it before TensorFlow is imported: TF's C++ logger reads
    `TF_CPP_MIN_LOG_LEVEL` once, at its first message. The worker we start
    inherits the environment, so its log file follows the same level. The
    Python-side settings (the `tensorflow` and `absl` loggers, warning filters)
    work before or after the import.

    Args:
      verbose: False: C++ logs at ERROR and above are dropped
        (`TF_CPP_MIN_LOG_LEVEL=3`, `GRPC_VERBOSITY=ERROR`), Python loggers at
        ERROR, and Deprecation/Future warnings raised inside TF, TFF, Keras and
        their dependencies are ignored. True: everything at INFO
        (`TF_CPP_MIN_LOG_LEVEL=0`, `GRPC_VERBOSITY=INFO`), warnings left to the
        interpreter's defaults.
    """
    import warnings

    if "tensorflow" in sys.modules:
        _log.debug("TensorFlow already imported; TF_CPP_MIN_LOG_LEVEL may not apply")
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "0" if verbose else "3"
    os.environ["GRPC_VERBOSITY"] = "INFO" if verbose else "ERROR"
    # The Python logger level is what `tf.get_logger()` returns, and
    # `get_logger` does not reset it, so this also holds if TF is imported later.
    level = logging.INFO if verbose else logging.ERROR
    for name in _PYTHON_LOGGERS:
        logging.getLogger(name).setLevel(level)
    from absl import logging as absl_logging  # cheap; TFF logs through it

    absl_logging.set_verbosity(absl_logging.INFO if verbose else absl_logging.ERROR)
    if not verbose:
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category, module=_NOISY_PACKAGES)


@contextlib.contextmanager
def tflite_info_follows_tf_level():
    """Drops TFLite's native INFO lines when `TF_CPP_MIN_LOG_LEVEL` drops INFO.

    TFLite's C++ minimal logger ignores `TF_CPP_MIN_LOG_LEVEL` and prints
    "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." to file
    descriptor 2 when an interpreter first applies its default delegate. With
    the level at 1 or more (`quiet_tensorflow_logging(verbose=False)` sets 3),
    this points descriptor 2 at /dev/null for the body, so wrap only interpreter
    construction and `allocate_tensors`, which report failures as Python
    exceptions (raised after descriptor 2 is restored). At level 0 the body
    runs untouched.
    """
    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") in ("", "0"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
