"""Train/validation/test splits of one source's samples, seeded and reproducible.

* ``writer``: writer-disjoint and stratified: no writer appears in two splits, and each split
  gets close to its share of every class. This is the honest measure of reading *other
  people's* writing, and the default.
* ``random``: stratified random split of samples, ignoring writers; with ``test: 0.2`` it
  reproduces the 80/20 split that published ETL numbers use.
* ``official``: the dataset's own train/test partition (KMNIST, K49), validation carved
  out of train at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hwexp.errors import ConfigError

METHODS = ("writer", "random", "official")


@dataclass(frozen=True)
class SplitIndices:
    """Indices into one source's samples; disjoint, together covering every sample."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


def _check_fractions(val: float, test: float) -> None:
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ConfigError(
            f"split fractions val={val}, test={test}: each must be in [0, 1) and their sum "
            "below 1 (the rest is training data)"
        )


def writer_disjoint_split(
    writers: np.ndarray, labels: np.ndarray, val: float, test: float, seed: int
) -> SplitIndices:
    """Assign whole writers to splits so each split holds about its share of every class.

    Writers are visited largest first (ties in seeded random order), and each goes to the
    split whose counts of that writer's classes lag their targets the most, relatively.
    """
    _check_fractions(val, test)
    writer_ids, writer_of = np.unique(writers, return_inverse=True)
    class_ids, class_of = np.unique(labels, return_inverse=True)
    if len(writer_ids) < 3 and (val > 0 or test > 0):
        raise ConfigError(
            f"a writer-disjoint split needs at least 3 writers, the data has {len(writer_ids)}; "
            "use split=random"
        )
    # counts[w, c]: samples of class c by writer w.
    counts = np.zeros((len(writer_ids), len(class_ids)), np.int64)
    np.add.at(counts, (writer_of, class_of), 1)
    shares = np.array([1.0 - val - test, val, test])
    targets = shares[:, None] * counts.sum(axis=0)[None, :]
    assigned = np.zeros((3, len(class_ids)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(writer_ids))
    order = order[np.argsort(-counts[order].sum(axis=1), kind="stable")]
    split_of_writer = np.empty(len(writer_ids), np.int64)
    for w in order:
        deficit = (targets - assigned) / np.maximum(targets, 1.0)
        need = np.where(shares > 0, deficit @ counts[w], -np.inf)
        chosen = int(np.argmax(need))
        split_of_writer[w] = chosen
        assigned[chosen] += counts[w]
    split_of_sample = split_of_writer[writer_of]
    return SplitIndices(*(np.flatnonzero(split_of_sample == s) for s in range(3)))


def random_split(labels: np.ndarray, val: float, test: float, seed: int) -> SplitIndices:
    """Stratified random split: each class's samples are shuffled and cut by the fractions."""
    _check_fractions(val, test)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[], [], []]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(test * len(members)))
        n_val = int(round(val * len(members)))
        parts[2].append(members[:n_test])
        parts[1].append(members[n_test : n_test + n_val])
        parts[0].append(members[n_test + n_val :])
    return SplitIndices(*(np.sort(np.concatenate(p)) for p in parts))


def official_split(official: np.ndarray, labels: np.ndarray, val: float, seed: int) -> SplitIndices:
    """The dataset's own train/test partition; ``val`` of train (stratified) for validation."""
    train_pool = np.flatnonzero(official == "train")
    inner = random_split(labels[train_pool], val=val, test=0.0, seed=seed)
    return SplitIndices(
        train=train_pool[inner.train],
        val=train_pool[inner.val],
        test=np.flatnonzero(official == "test"),
    )


def split_samples(
    method: str,
    writers: np.ndarray,
    labels: np.ndarray,
    meta: dict[str, np.ndarray],
    val: float,
    test: float,
    seed: int,
    source: str = "",
) -> SplitIndices:
    """Dispatch on ``method`` (one of :data:`METHODS`)."""
    if method == "writer":
        return writer_disjoint_split(writers, labels, val, test, seed)
    if method == "random":
        return random_split(labels, val, test, seed)
    if method == "official":
        if "official_split" not in meta:
            raise ConfigError(
                f"split.method=official: source {source!r} has no official train/test "
                "partition (only kmnist and k49 do); use split=writer or split=random"
            )
        return official_split(meta["official_split"], labels, val, seed)
    raise ConfigError(f"split.method={method!r}: choose one of {list(METHODS)}")
