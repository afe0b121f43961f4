"""tf.data input pipelines over ``SplitArrays``.

Images stay where they are (a possibly read-only ``np.memmap`` of several GB): the datasets
carry sample *indices*, and each batch is gathered from the arrays by a numpy call, so only
one batch at a time is copied into memory. Shuffled orders are computed index by index
(``tf.random.experimental.index_shuffle``), never held in a shuffle buffer, so the pipeline's
memory does not grow with the number of samples. Batches are ``(images, labels)`` with images
``(b, S, S, 1)`` uint8 (the model rescales) and labels ``(b,)`` int32.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import tensorflow as tf

if TYPE_CHECKING:
    from hwexp.data.dataset import SplitArrays

log = logging.getLogger(__name__)


_SHUFFLE_CHUNK = 1024  # positions shuffled at once when drawing one sample at a time


@dataclass(frozen=True)
class Batches:
    """A batched dataset and the number of batches that make one epoch.

    ``infinite`` datasets (weighted sampling across sources) repeat forever; pass
    ``steps_per_epoch`` to ``model.fit``. Finite ones end after ``steps_per_epoch`` batches.
    """

    dataset: tf.data.Dataset
    steps_per_epoch: int
    infinite: bool
    batch_size: int  # samples in a full batch


def _gather_fn(split: SplitArrays) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """numpy: sorted indices -> (images (b, S, S, 1) uint8, labels (b,) int32)."""

    def gather(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = np.sort(indices)  # ascending reads are kinder to a memmap
        images = np.asarray(split.images[indices], dtype=np.uint8)[..., np.newaxis]
        return images, np.asarray(split.labels[indices], dtype=np.int32)

    return gather


def _loaded(batched_indices: tf.data.Dataset, split: SplitArrays) -> tf.data.Dataset:
    """Gather each batch of indices from ``split``; prefetch."""
    size = split.images.shape[1]
    gather = _gather_fn(split)

    def load(batch_indices: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        images, labels = tf.numpy_function(gather, [batch_indices], (tf.uint8, tf.int32))
        images.set_shape((None, size, size, 1))
        labels.set_shape((None,))
        return images, labels

    return batched_indices.map(
        load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True
    ).prefetch(tf.data.AUTOTUNE)


def _batches_of(
    indices: tf.data.Dataset, split: SplitArrays, batch_size: int, drop_remainder: bool
) -> tf.data.Dataset:
    """Batch an index dataset and gather each batch from ``split``; prefetch."""
    return _loaded(indices.batch(batch_size, drop_remainder=drop_remainder), split)


def permuted_positions(
    n: int, seed: int, chunk: int, passes: int | None = 1, drop_remainder: bool = True
) -> tf.data.Dataset:
    """``0..n-1`` in a pseudo-random order, in batches of ``chunk`` (the last partial one
    dropped unless ``drop_remainder`` is False), for ``passes`` passes (None: forever).

    Every pass has its own order, and iterating the dataset again draws new ones; all of it
    follows from ``seed``. Each position is computed on its own (``index_shuffle``), so memory
    does not grow with ``n`` (a shuffle buffer of ``n`` indices took ~200 bytes a sample).
    """
    pass_seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
    if passes is not None:
        pass_seeds = pass_seeds.take(passes)

    def one_pass(pass_seed: tf.Tensor) -> tf.data.Dataset:
        key = tf.stack([pass_seed, tf.constant(seed, tf.int64)])
        return (
            tf.data.Dataset.range(n)
            .batch(chunk, drop_remainder=drop_remainder)
            .map(lambda positions: tf.random.experimental.index_shuffle(positions, key, n - 1))
        )

    per_pass = n // chunk if drop_remainder else -(-n // chunk)
    # flat_map hides the length, and Keras warns that a dataset of unknown length "ran out"
    length = tf.data.INFINITE_CARDINALITY if passes is None else passes * per_pass
    return pass_seeds.flat_map(one_pass).apply(tf.data.experimental.assert_cardinality(length))


def sampling_weights(split: SplitArrays, source_weights: Mapping[str, float]) -> dict[str, float]:
    """Normalised sampling weight per source present in ``split`` (sum 1).

    Sources present in the split but missing from ``source_weights`` (or weighted 0) are not
    sampled; a warning says so. Raises ValueError when no present source has a positive weight.
    """
    present = sorted(set(np.unique(split.sources).tolist()))
    unweighted = [s for s in present if source_weights.get(s, 0.0) <= 0]
    if unweighted:
        log.warning("training sources without a positive weight are not sampled: %s", unweighted)
    weights = {s: float(source_weights[s]) for s in present if s not in unweighted}
    total = sum(weights.values())
    if total <= 0:
        raise ValueError(f"no training source has a positive weight: {dict(source_weights)}")
    return {s: w / total for s, w in weights.items()}


def training_batches(
    split: SplitArrays,
    batch_size: int,
    seed: int,
    source_weights: Mapping[str, float] | None = None,
    replicas: int = 1,
) -> Batches:
    """Shuffled training batches, reshuffled every epoch from ``seed``.

    With more than one weighted source, samples are drawn per source (each source reshuffled
    on every pass through it) with probabilities ``sampling_weights``, forever; an epoch is
    then ``len(split) // batch_size`` batches. Otherwise an epoch is one pass over the split.
    The last partial batch is dropped (batch-norm dislikes tiny batches); a split smaller than
    one batch is one batch of all its samples, or, for ``replicas`` devices (``batch_size``
    is then the global batch), of the largest multiple of ``replicas`` of them, so that
    every batch splits into equal parts.
    """
    n = len(split.labels)
    if n == 0:
        raise ValueError("the training split is empty")
    if n < replicas:
        raise ValueError(f"the training split has {n} samples, fewer than {replicas} replicas")
    batch_size = min(batch_size, n - n % replicas)
    steps = n // batch_size
    weights = sampling_weights(split, source_weights) if source_weights else {}
    if len(weights) > 1:
        per_source = []
        for offset, source in enumerate(weights, start=1):
            members = tf.constant(np.flatnonzero(split.sources == source), tf.int64)
            positions = permuted_positions(
                len(members), seed + offset, _SHUFFLE_CHUNK, passes=None, drop_remainder=False
            )
            per_source.append(
                positions.unbatch().map(
                    lambda position, members=members: tf.gather(members, position)
                )
            )
        mixed = tf.data.Dataset.sample_from_datasets(
            per_source, weights=list(weights.values()), seed=seed
        )
        return Batches(
            _batches_of(mixed, split, batch_size, drop_remainder=True), steps, True, batch_size
        )
    batches = _loaded(permuted_positions(n, seed, batch_size), split)
    return Batches(batches, steps, False, batch_size)


def evaluation_batches(split: SplitArrays, batch_size: int, replicas: int = 1) -> Batches:
    """All samples of ``split`` once, in order, in batches (the last may be partial).

    For ``replicas`` devices (``batch_size`` a multiple of it), the last ``len % replicas``
    samples are left out, so that every batch splits into equal, non-empty parts (Keras
    builds a distributed model from the first batch's parts, and an empty part fails).
    """
    n = len(split.labels)
    n -= n % replicas
    steps = -(-n // batch_size)
    dataset = _batches_of(tf.data.Dataset.range(n), split, batch_size, False)
    return Batches(dataset, steps, False, batch_size)
