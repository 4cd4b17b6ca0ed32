"""The registry of datasets, `DATASETS`, and the base class of its entries.

A dataset is one `DatasetLoader` subclass registered in `DATASETS` in its own
module (`digits.py`, `synthetic.py`, `tff_files.py`): a frozen dataclass
whose fields are the config fields (= driver flags) it reads, validated in
its constructor before TensorFlow is imported, with a `load()` that builds
the `FederatedData`. `ExperimentConfig.validate` builds it (the checks) and
`program.assembly.load_data` loads it; `--dataset`'s choices and help come
from the registry. See docs/extending.md for adding one.

Importing this module is cheap (no TensorFlow).
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, ClassVar

from fedprune.registry import Registry

if TYPE_CHECKING:
    from fedprune.data.datasets.container import FederatedData

DATASETS: Registry[type[DatasetLoader]] = Registry("dataset", "dataset")


class DatasetLoader(abc.ABC):
    """A dataset with its parameters, checked when constructed; `load` builds it.

    Class attributes:
      sequence: True when examples are token sequences (next-character
        prediction: `--model=rnn`); False for classification of fixed-size
        inputs (`--model=mlp|mlp2|cnn`).
    """

    sequence: ClassVar[bool] = False

    @abc.abstractmethod
    def load(self) -> FederatedData:
        """The federated dataset (may import TensorFlow)."""
