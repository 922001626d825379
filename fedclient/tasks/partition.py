"""Splitting a training set across clients, with ``flwr-datasets`` partitioners."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")  # flwr-datasets partitioners print tqdm bars otherwise

SCHEMES = ("iid", "dirichlet", "natural")


@dataclass(frozen=True)
class PartitionSpec:
    """How the training set is split: ``scheme`` over ``num_partitions`` clients.

    ``iid``: a seeded shuffle cut into equal shards; ``dirichlet``: label skew where each class
    is spread over clients by Dirichlet(``alpha``) proportions (Hsu et al., 2019); ``natural``:
    one client per natural id of the corpus (e.g. the medical condition of a review), or, with
    fewer clients than ids, whole ids dealt to clients by size (:func:`group_sites`).
    """

    scheme: str = "dirichlet"
    num_partitions: int = 10
    alpha: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ValueError(f"unknown partition '{self.scheme}'; choose one of: {', '.join(SCHEMES)}")
        if self.num_partitions < 1:
            raise ValueError(f"the number of clients must be at least 1, got {self.num_partitions}")
        if self.scheme == "dirichlet" and not self.alpha > 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")


def group_sites(groups: Sequence[str], sites: int) -> list[str]:
    """Each row's site when ``sites`` is fewer than the natural groups: every group goes whole to
    one site, the largest groups first, each to the site with the fewest rows so far (ties: the
    lower site number), so a site is a set of whole conditions, as a hospital would be."""
    sizes: dict[str, int] = {}
    for group in groups:
        sizes[group] = sizes.get(group, 0) + 1
    load = [0] * sites
    site_of: dict[str, int] = {}
    for group in sorted(sizes, key=lambda g: (-sizes[g], g)):
        site = min(range(sites), key=lambda s: (load[s], s))
        site_of[group] = site
        load[site] += sizes[group]
    return [f"site-{site_of[group]:04d}" for group in groups]


def partition_indices(
    labels: np.ndarray, spec: PartitionSpec, groups: Sequence[str] | None = None
) -> list[np.ndarray]:
    """Row indices of each client's share of a training set with ``labels`` (and ``groups``)."""
    from datasets import Dataset, disable_progress_bars
    from flwr_datasets.partitioner import (
        DirichletPartitioner,
        IidPartitioner,
        NaturalIdPartitioner,
    )

    disable_progress_bars()
    n = len(labels)
    columns: dict[str, list] = {"row": list(range(n)), "label": [int(x) for x in labels]}
    if spec.scheme == "natural":
        if groups is None:
            raise ValueError("this task has no natural client ids; use --partition iid or dirichlet")
        natural = sorted(set(groups))
        if spec.num_partitions > len(natural):
            raise ValueError(
                f"the natural partition of this task has {len(natural)} groups "
                f"({', '.join(natural)}); pass --clients {len(natural)} or fewer"
            )
        columns["group"] = list(groups) if spec.num_partitions == len(natural) else \
            group_sites(groups, spec.num_partitions)
    if spec.num_partitions > n:
        raise ValueError(f"cannot split {n} training examples over {spec.num_partitions} clients")
    dataset = Dataset.from_dict(columns)
    if spec.scheme == "iid":
        partitioner = IidPartitioner(num_partitions=spec.num_partitions)
        dataset = dataset.shuffle(seed=spec.seed)  # IidPartitioner cuts contiguous shards
    elif spec.scheme == "dirichlet":
        min_size = max(1, min(10, n // (4 * spec.num_partitions)))
        partitioner = DirichletPartitioner(
            num_partitions=spec.num_partitions,
            partition_by="label",
            alpha=spec.alpha,
            min_partition_size=min_size,
            self_balancing=False,
            seed=spec.seed,
        )
    else:
        partitioner = NaturalIdPartitioner(partition_by="group")
    partitioner.dataset = dataset  # NaturalIdPartitioner numbers the natural ids sorted
    try:
        return [
            np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64)
            for pid in range(spec.num_partitions)
        ]
    except ValueError as err:
        raise ValueError(
            f"could not split {n} examples into {spec.num_partitions} Dirichlet(alpha={spec.alpha}) "
            f"partitions ({err}); use fewer clients or a larger alpha"
        ) from err
