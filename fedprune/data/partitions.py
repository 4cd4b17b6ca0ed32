"""Partitioners: which training examples each simulated client holds.

Pure numpy (no TensorFlow import), so drivers can validate partition flags and
inspect partitions before paying for `import tensorflow`. Every partitioner
returns `list[np.ndarray]`, one sorted int64 array of example indices per
client; the arrays are disjoint and together cover every example exactly once.
Each is a deterministic function of its explicit `seed`.

Partitioners (`PARTITIONERS`):
  * `iid`: a uniform random split into near-equal parts (sizes differ by <= 1).
  * `shards`: the pathological non-IID split of McMahan et al. 2017,
    "Communication-Efficient Learning of Deep Networks from Decentralized Data"
    (AISTATS), Sec. 3: sort the examples by label, cut them into
    `num_clients * shards_per_client` contiguous shards and deal
    `shards_per_client` shards to every client.
  * `dirichlet`: the label-skew split of Hsu, Qi and Brown 2019, "Measuring the
    Effects of Non-Identical Data Distribution for Federated Visual
    Classification" (arXiv:1909.06335): for every class, the class's examples
    are divided among clients in proportions drawn from Dir(alpha). Small alpha
    (e.g. 0.1) gives each client few classes; large alpha (e.g. 100) is close
    to IID.
"""

from __future__ import annotations

import math

import numpy as np

from fedprune.errors import InvalidArgument, check

PARTITIONERS = ("iid", "shards", "dirichlet")

# Redraws of the Dirichlet proportions before falling back to the repair step.
# Bounded so that tiny alphas (0.01) cannot loop for ever.
_DIRICHLET_MAX_DRAWS = 10


def validate_partition_args(
    partition: str,
    *,
    num_clients: int,
    num_examples: int | None = None,
    dirichlet_alpha: float | None = None,
    shards_per_client: int | None = None,
    min_examples_per_client: int = 1,
) -> None:
    """Checks partition arguments; safe to call before TensorFlow is imported.

    Args:
      partition: one of `PARTITIONERS` (flag `--partition`).
      num_clients: number of clients (flag `--num_clients`).
      num_examples: number of training examples to split; `None` skips the
        checks that need it.
      dirichlet_alpha: concentration of Dir(alpha) (flag `--dirichlet_alpha`);
        checked only for `partition="dirichlet"`.
      shards_per_client: shards dealt to each client (flag
        `--shards_per_client`); checked only for `partition="shards"`.
      min_examples_per_client: smallest client size the Dirichlet partitioner
        guarantees (flag `--min_examples_per_client`).

    Raises:
      fedprune.errors.InvalidArgument: (a `ValueError`) with a one-line
        message `--flag=value: expected ...`.
    """
    check(partition in PARTITIONERS, "partition", partition, f"one of {', '.join(PARTITIONERS)}")
    check_positive_int(num_clients, "num_clients")
    if num_examples is not None:
        check(
            num_clients <= num_examples,
            "num_clients",
            num_clients,
            f"at most the {num_examples} training examples",
        )
    if partition == "dirichlet":
        _validate_dirichlet(num_clients, num_examples, dirichlet_alpha, min_examples_per_client)
    elif partition == "shards":
        _validate_shards(num_clients, num_examples, shards_per_client)


def check_positive_int(value, name: str) -> None:
    """Raises `InvalidArgument` unless `value` is an int >= 1 (bools rejected)."""
    ok = isinstance(value, int | np.integer) and not isinstance(value, bool) and value >= 1
    check(ok, name, value, "a positive integer")


def _validate_dirichlet(num_clients, num_examples, alpha, min_examples_per_client) -> None:
    is_real = isinstance(alpha, int | float | np.number) and not isinstance(alpha, bool)
    check(
        is_real and math.isfinite(alpha) and alpha > 0,
        "dirichlet_alpha",
        alpha,
        "a finite float > 0 (e.g. 0.1 for strong label skew, 100 for near IID)",
    )
    check_positive_int(min_examples_per_client, "min_examples_per_client")
    if num_examples is not None and num_clients * min_examples_per_client > num_examples:
        raise InvalidArgument(
            "num_clients",
            num_clients,
            f"at most {num_examples // min_examples_per_client} clients so that each gets "
            f"--min_examples_per_client={min_examples_per_client} of {num_examples} examples",
        )


def _validate_shards(num_clients, num_examples, shards_per_client) -> None:
    check_positive_int(shards_per_client, "shards_per_client")
    if num_examples is not None and num_clients * shards_per_client > num_examples:
        raise InvalidArgument(
            "shards_per_client",
            shards_per_client,
            f"at most {num_examples // num_clients} so that --num_clients={num_clients} "
            f"x --shards_per_client shards of >= 1 example fit in {num_examples} examples",
        )


def make_partition(
    partition: str,
    labels: np.ndarray,
    *,
    num_clients: int,
    seed: int,
    dirichlet_alpha: float = 0.5,
    shards_per_client: int = 2,
    min_examples_per_client: int = 1,
) -> list[np.ndarray]:
    """Runs the partitioner named `partition` (one of `PARTITIONERS`) on `labels`.

    Arguments not used by the chosen partitioner are ignored (not validated).

    Returns:
      `num_clients` sorted int64 index arrays into `labels`.

    Raises:
      fedprune.errors.InvalidArgument: for any invalid argument.
    """
    labels = np.asarray(labels)
    validate_partition_args(
        partition,
        num_clients=num_clients,
        num_examples=len(labels),
        dirichlet_alpha=dirichlet_alpha,
        shards_per_client=shards_per_client,
        min_examples_per_client=min_examples_per_client,
    )
    if partition == "iid":
        return iid(len(labels), num_clients, seed=seed)
    if partition == "shards":
        return shards(labels, num_clients, shards_per_client, seed=seed)
    return dirichlet(
        labels,
        num_clients,
        dirichlet_alpha,
        seed=seed,
        min_examples_per_client=min_examples_per_client,
    )


def iid(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """Splits `num_examples` examples uniformly at random among clients.

    Args:
      num_examples: number of examples (indices `0 .. num_examples - 1`).
      num_clients: number of clients.
      seed: seed of `np.random.default_rng`.

    Returns:
      `num_clients` sorted int64 index arrays whose sizes differ by at most 1.

    Raises:
      ValueError: for more clients than examples or a non-positive count.
    """
    validate_partition_args("iid", num_clients=num_clients, num_examples=num_examples)
    order = np.random.default_rng(seed).permutation(num_examples)
    return _sorted_parts(np.array_split(order, num_clients))


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, *, seed: int
) -> list[np.ndarray]:
    """McMahan et al. 2017's sort-and-shard split.

    Examples are sorted by label (ties in random order), cut into
    `num_clients * shards_per_client` contiguous shards whose sizes differ by at
    most 1, and each client receives `shards_per_client` shards chosen at random.
    A shard can straddle a class boundary, so a client holds at most
    `2 * shards_per_client` labels in general, and at most `shards_per_client`
    when every class size is a multiple of the shard size.

    Args:
      labels: int array [num_examples] of class labels.
      num_clients: number of clients.
      shards_per_client: shards per client (2 in McMahan et al.).
      seed: seed of `np.random.default_rng`.

    Returns:
      `num_clients` sorted int64 index arrays.

    Raises:
      ValueError: when the shards cannot be dealt (more shards than examples).
    """
    labels = np.asarray(labels)
    validate_partition_args(
        "shards",
        num_clients=num_clients,
        num_examples=len(labels),
        shards_per_client=shards_per_client,
    )
    rng = np.random.default_rng(seed)
    # Permuting before a stable sort puts same-label examples in random order.
    perm = rng.permutation(len(labels))
    by_label = perm[np.argsort(labels[perm], kind="stable")]
    shard_list = np.array_split(by_label, num_clients * shards_per_client)
    dealt = rng.permutation(len(shard_list)).reshape(num_clients, shards_per_client)
    return _sorted_parts([np.concatenate([shard_list[s] for s in row]) for row in dealt])


def dirichlet(
    labels: np.ndarray,
    num_clients: int,
    alpha: float,
    *,
    seed: int,
    min_examples_per_client: int = 1,
) -> list[np.ndarray]:
    """Hsu et al. 2019's Dirichlet label-skew split with a guaranteed minimum size.

    For each class, proportions p ~ Dir(alpha * 1_{num_clients}) are drawn and
    the class's (shuffled) examples are cut at `cumsum(p) * n_class`. If some
    client ends up with fewer than `min_examples_per_client` examples, all
    proportions are redrawn, at most `_DIRICHLET_MAX_DRAWS` times; after that a
    deterministic repair moves examples from the currently largest clients to
    the small ones. The running time is therefore bounded for any alpha.

    Args:
      labels: int array [num_examples] of class labels.
      num_clients: number of clients.
      alpha: Dirichlet concentration (> 0).
      seed: seed of `np.random.default_rng`.
      min_examples_per_client: smallest allowed client size.

    Returns:
      `num_clients` sorted int64 index arrays, each of size >=
      `min_examples_per_client`.

    Raises:
      ValueError: for alpha <= 0 or when `num_clients * min_examples_per_client`
        exceeds the number of examples.
    """
    labels = np.asarray(labels)
    validate_partition_args(
        "dirichlet",
        num_clients=num_clients,
        num_examples=len(labels),
        dirichlet_alpha=alpha,
        min_examples_per_client=min_examples_per_client,
    )
    rng = np.random.default_rng(seed)
    for _ in range(_DIRICHLET_MAX_DRAWS):
        parts = _dirichlet_draw(labels, num_clients, alpha, rng)
        if min(len(p) for p in parts) >= min_examples_per_client:
            return _sorted_parts(parts)
    return _sorted_parts(_repair_min_size(parts, min_examples_per_client))


def _dirichlet_draw(labels, num_clients, alpha, rng) -> list[np.ndarray]:
    chunks = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(np.int64)
        for client, piece in enumerate(np.split(members, cuts)):
            chunks[client].append(piece)
    return [np.concatenate(c) for c in chunks]


def _repair_min_size(parts: list[np.ndarray], min_size: int) -> list[np.ndarray]:
    """Moves examples from the largest clients until every client has `min_size`.

    Deterministic given `parts`. Each move takes the tail of the largest
    client's array (a donor never drops below `min_size`), so at most
    `num_clients` moves per small client are needed; feasibility
    (`num_clients * min_size <= total`) is checked by the caller.
    """
    parts = list(parts)
    sizes = np.array([len(p) for p in parts])
    for small in np.flatnonzero(sizes < min_size):
        while sizes[small] < min_size:
            donor = int(np.argmax(sizes))
            moved = min(min_size - sizes[small], sizes[donor] - min_size)
            parts[small] = np.concatenate([parts[small], parts[donor][-moved:]])
            parts[donor] = parts[donor][:-moved]
            sizes[small] += moved
            sizes[donor] -= moved
    return parts


def _sorted_parts(parts) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_stats(labels: np.ndarray, partition: list[np.ndarray], num_classes: int) -> dict:
    """Summarizes how labels are spread over clients.

    Args:
      labels: int array [num_examples] of class labels in [0, num_classes).
      partition: per-client index arrays, as returned by a partitioner.
      num_classes: number of classes (columns of the count matrix).

    Returns:
      A dict with
        * `count_matrix`: int64 [num_clients, num_classes], examples of each
          class held by each client;
        * `examples_per_client`: int64 [num_clients];
        * `labels_per_client`: int64 [num_clients], distinct labels held;
        * scalars `num_clients`, `num_examples`, `examples_min`,
          `examples_max`, `examples_mean`, `examples_std`, `labels_min`,
          `labels_max`, `labels_mean`, and `label_tv_mean`: the mean over
          clients of the total-variation distance between the client's label
          distribution and the pooled one (0 = IID labels, near 1 = disjoint).
    """
    labels = np.asarray(labels)
    counts = np.stack(
        [np.bincount(labels[idx], minlength=num_classes) for idx in partition]
    ).astype(np.int64)
    sizes = counts.sum(axis=1)
    distinct = (counts > 0).sum(axis=1)
    pooled = counts.sum(axis=0) / max(counts.sum(), 1)
    client_dist = counts / np.maximum(sizes, 1)[:, None]
    tv = 0.5 * np.abs(client_dist - pooled).sum(axis=1)
    return {
        "count_matrix": counts,
        "examples_per_client": sizes,
        "labels_per_client": distinct,
        "num_clients": len(partition),
        "num_examples": int(sizes.sum()),
        "examples_min": int(sizes.min()),
        "examples_max": int(sizes.max()),
        "examples_mean": float(sizes.mean()),
        "examples_std": float(sizes.std()),
        "labels_min": int(distinct.min()),
        "labels_max": int(distinct.max()),
        "labels_mean": float(distinct.mean()),
        "label_tv_mean": float(tv.mean()),
    }
