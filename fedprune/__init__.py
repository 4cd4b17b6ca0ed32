"""fedprune: pruning in federated learning on TensorFlow Federated.

Importing this package is cheap: no module here imports TensorFlow at package
import time except those that need it, so drivers can validate flags before
paying for `import tensorflow_federated` (~10 s).
"""

__version__ = "0.1.0"
