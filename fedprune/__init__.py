"""fedprune: pruning in federated learning on TensorFlow Federated.

Importing this package is cheap: no module here imports TensorFlow at package
import time except those that need it, so drivers can validate flags before
paying for `import tensorflow_federated` (~10 s).
"""

from fedprune.runtime import deferred_imports

__version__ = "0.1.0"

# Modules TFF's import would load and fedprune never runs: loaded at first use instead.
deferred_imports.defer()
