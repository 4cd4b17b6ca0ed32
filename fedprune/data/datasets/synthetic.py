"""Synthetic(alpha, beta): the heterogeneous synthetic data of FedProx.

Li et al. 2020, "Federated Optimization in Heterogeneous Networks" (FedProx,
MLSys), Sec. 5.1 and the data generator of their code release.

Registered as `--dataset=synthetic` (`Synthetic`).

Importing this module is cheap (NumPy only).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from fedprune.data import partitions
from fedprune.data.datasets.catalog import DATASETS, DatasetLoader
from fedprune.data.datasets.container import FederatedData, array_data
from fedprune.data.partitions import check_positive_int
from fedprune.errors import check

# FedProx's generator: client sizes are int(LogNormal(4, 2)) + 50 and each
# client keeps the first 90% of its examples for training.
_SYNTHETIC_SIZE_LOGNORMAL = (4.0, 2.0)
_SYNTHETIC_MIN_CLIENT_SIZE = 50


@DATASETS.register("synthetic", help="Synthetic(--synthetic_alpha, --synthetic_beta) of Li et "
                   "al. 2020, generated per client")
@dataclasses.dataclass(frozen=True)
class Synthetic(DatasetLoader):
    """`load_synthetic` with the config's alpha and beta.

    The clients are generated, not partitioned; the partition flags are still
    checked as for digits (they are shared flags, and a run's config.json
    records them).
    """

    num_clients: int
    seed: int
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2

    def __post_init__(self):
        check(self.num_clients >= 1, "num_clients", self.num_clients, "a whole number >= 1")
        check(self.synthetic_alpha >= 0, "synthetic_alpha", self.synthetic_alpha, "a float >= 0")
        check(self.synthetic_beta >= 0, "synthetic_beta", self.synthetic_beta, "a float >= 0")
        # No limit from the data: client sizes are generated per client.
        partitions.validate_partition_args(
            self.partition, num_clients=self.num_clients, num_examples=10**9,
            dirichlet_alpha=self.dirichlet_alpha, shards_per_client=self.shards_per_client)

    def load(self) -> FederatedData:
        return load_synthetic(num_clients=self.num_clients, seed=self.seed,
                              alpha=self.synthetic_alpha, beta=self.synthetic_beta)


def load_synthetic(
    *,
    num_clients: int,
    alpha: float,
    beta: float,
    seed: int,
    dim: int = 60,
    num_classes: int = 10,
    iid: bool = False,
    test_fraction: float = 0.1,
) -> FederatedData:
    """Synthetic(alpha, beta) of Li et al. 2020 (FedProx), Sec. 5.1.

    For client k: u_k ~ N(0, alpha^2), B_k ~ N(0, beta^2); W_k [dim, classes]
    and b_k [classes] have i.i.d. N(u_k, 1) entries; v_k has i.i.d. N(B_k, 1)
    entries; x ~ N(v_k, Sigma) with diagonal Sigma_jj = j^-1.2 (j = 1..dim);
    y = argmax(softmax(W_k^T x + b_k)). Client sizes are
    int(LogNormal(4, 2)) + 50 and each client keeps its first
    `1 - test_fraction` examples for training (FedProx's code: 90%); the other
    examples of all clients are pooled into the global test set. `iid=True`
    gives FedProx's Synthetic-IID: one shared (W, b) ~ N(0, 1) and v_k = B_k.

    As in the reference generator, N(., s) takes s as the standard deviation.
    Note that u_k shifts every logit of client k by the same amount, so the
    label function's heterogeneity comes from the per-client noise of (W_k,
    b_k) and, through x, from beta.

    Args:
      num_clients: number of clients (flag `--num_clients`; FedProx uses 30).
      alpha: model heterogeneity (flag `--synthetic_alpha`), >= 0.
      beta: feature heterogeneity (flag `--synthetic_beta`), >= 0.
      seed: generator seed; the data are a pure function of all arguments.
      dim: features per example (60 in FedProx).
      num_classes: classes (10 in FedProx).
      iid: generate Synthetic-IID instead.
      test_fraction: per-client fraction held out for the pooled test set.

    Returns:
      A `FederatedData` with `input_shape=(dim,)`. Does not import TensorFlow.

    Raises:
      fedprune.errors.InvalidArgument: for invalid arguments.
    """
    check_positive_int(num_clients, "num_clients")
    check(alpha >= 0, "synthetic_alpha", alpha, "a float >= 0")
    check(beta >= 0, "synthetic_beta", beta, "a float >= 0")
    check(0 < test_fraction < 1, "test_fraction", test_fraction, "a fraction in (0, 1)")
    rng = np.random.default_rng(seed)
    sizes = rng.lognormal(*_SYNTHETIC_SIZE_LOGNORMAL, num_clients).astype(np.int64)
    sizes += _SYNTHETIC_MIN_CLIENT_SIZE
    u = rng.normal(0.0, alpha, num_clients)
    big_b = rng.normal(0.0, beta, num_clients)
    feature_std = np.arange(1, dim + 1) ** -0.6  # sqrt of Sigma_jj = j^-1.2
    shared = (rng.normal(0, 1, (dim, num_classes)), rng.normal(0, 1, num_classes))
    xs, ys = [], []
    for k in range(num_clients):
        if iid:
            w, b = shared
            v = np.full(dim, big_b[k])
        else:
            w = rng.normal(u[k], 1.0, (dim, num_classes))
            b = rng.normal(u[k], 1.0, num_classes)
            v = rng.normal(big_b[k], 1.0, dim)
        x = v + rng.standard_normal((sizes[k], dim)) * feature_std
        xs.append(x.astype(np.float32))
        ys.append(np.argmax(x @ w + b, axis=1))  # softmax is monotone
    return _split_synthetic(xs, ys, test_fraction, num_classes)


def _split_synthetic(xs, ys, test_fraction, num_classes) -> FederatedData:
    """Keeps each client's first examples for training and pools the rest for test.

    Example ids count the generated examples client by client.
    """
    num_train = [int((1 - test_fraction) * len(y)) for y in ys]
    bounds = np.concatenate([[0], np.cumsum(num_train)])
    parts = [np.arange(bounds[k], bounds[k + 1]) for k in range(len(ys))]
    starts = np.concatenate([[0], np.cumsum([len(y) for y in ys])])
    train_ids = np.concatenate([starts[k] + np.arange(n) for k, n in enumerate(num_train)])
    test_ids = np.concatenate([starts[k] + np.arange(n, len(ys[k]))
                               for k, n in enumerate(num_train)])
    return array_data(
        "synthetic",
        np.concatenate([x[:n] for x, n in zip(xs, num_train, strict=True)]),
        np.concatenate([y[:n] for y, n in zip(ys, num_train, strict=True)]),
        parts,
        np.concatenate([x[n:] for x, n in zip(xs, num_train, strict=True)]),
        np.concatenate([y[n:] for y, n in zip(ys, num_train, strict=True)]),
        num_classes=num_classes,
        train_ids=train_ids,
        test_ids=test_ids,
    )
