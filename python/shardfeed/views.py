"""Views: some samples of a dataset in a fixed order, without copying any data.

A :class:`Subset` (what ``Dataset.split``, ``subset``, ``head`` and ``shard`` return) is an
index map from its positions to dataset indices: a window of a permutation of a parent's
positions (:class:`_Window`), or an explicit array (:class:`_Explicit`). The epoch orders of a
view are the permutations of :mod:`shardfeed.order`; its training entry points (``batches``,
``to_tf_dataset``) import their front ends when called.
"""

from __future__ import annotations

import math
import numbers
from collections import abc
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import numpy as np

from .order import Permutation, check_block, check_count, check_seed, epoch_permutation, split_permutation

__all__ = ["Subset", "as_subset"]


class _Window:
    """Positions ``[start, stop)`` of a permutation (or of the identity) of the positions of
    ``inner`` (or of the dataset itself when ``inner`` is None)."""

    __slots__ = ("inner", "perm", "start", "stop")

    def __init__(self, inner: Optional["_Map"], perm: Optional[Permutation], start: int, stop: int):
        self.inner, self.perm, self.start, self.stop = inner, perm, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        p = positions + self.start if self.start else positions
        if self.perm is not None:
            p = self.perm.apply(p)
        return p if self.inner is None else self.inner(p)

    def window(self, start: int, stop: int) -> "_Window":
        if self.perm is None:  # a window of a plain window is a plain window
            return _Window(self.inner, None, self.start + start, self.start + stop)
        return _Window(self.inner, self.perm, self.start + start, self.start + stop)

    def __reduce__(self):
        return (_Window, (self.inner, self.perm, self.start, self.stop))


class _Explicit:
    """An explicit array of dataset indices (what :meth:`Subset.subset` makes)."""

    __slots__ = ("indices",)

    def __init__(self, indices: np.ndarray):
        indices = np.array(indices, dtype=np.int64)
        indices.flags.writeable = False
        self.indices = indices

    def __len__(self) -> int:
        return len(self.indices)

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        return self.indices[positions]

    def window(self, start: int, stop: int) -> "_Explicit":
        return _Explicit(self.indices[start:stop])

    def __reduce__(self):
        return (_Explicit, (self.indices,))


_Map = Union[_Window, _Explicit]


def _part_sizes(parts: Sequence[Any], n: int) -> List[int]:
    """Sizes of split parts given as counts (all ints) or fractions (all floats in [0, 1])."""
    if not parts:
        raise ValueError("split needs at least one part")
    if all(isinstance(p, numbers.Integral) and not isinstance(p, bool) for p in parts):
        sizes = [int(p) for p in parts]
        if min(sizes) < 0 or sum(sizes) > n:
            raise ValueError(f"split counts {sizes} must be >= 0 and add up to at most {n} samples")
        return sizes
    if not all(isinstance(p, numbers.Real) and not isinstance(p, (bool, numbers.Integral)) for p in parts):
        raise TypeError(f"split parts must be all counts (ints) or all fractions (floats), got {list(parts)}")
    fractions = [float(p) for p in parts]
    total = math.fsum(fractions)
    if min(fractions) < 0 or not math.isfinite(total) or total > 1 + 1e-9:
        raise ValueError(f"split fractions {fractions} must be >= 0 and add up to at most 1")
    exact = [f * n for f in fractions]
    sizes = [math.floor(x) for x in exact]
    if abs(total - 1) <= 1e-9:  # the whole dataset: hand the rounding leftovers out by largest remainder
        leftover = n - sum(sizes)
        order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - sizes[i]), i))
        for i in order[:leftover]:
            sizes[i] += 1
    return sizes


def _is_dataset_like(source: Any) -> bool:
    return hasattr(source, "read") and hasattr(source, "fields") and hasattr(source, "__len__")


def as_subset(source: Any) -> "Subset":
    """A :class:`Subset` for a :class:`~shardfeed.Dataset` (all of it) or a Subset (itself)."""
    if isinstance(source, Subset):
        return source
    if _is_dataset_like(source):
        return Subset(source)
    raise TypeError(f"expected a shardfeed Dataset or Subset, got {type(source).__name__}")


class Subset:
    """Some samples of a :class:`~shardfeed.Dataset`, in a fixed order, without copying any data:
    what :meth:`~shardfeed.Dataset.split`, ``subset``, ``head`` and ``shard`` return. It has the
    dataset's reading API (``len``, ``fields``, ``metadata``, ``read``, ``[i]``), the same view
    methods (so views compose) and the training entry points ``batches`` and ``to_tf_dataset``.

    A shard (``shard(rank, world_size)``) is not a fixed set of samples: every epoch, it is the
    ``rank``-th of ``world_size`` interleaved, disjoint, equal parts of that epoch's order of the
    parent view (``len(parent) // world_size`` samples each; the few left over differ from epoch
    to epoch). Read directly (``read``, ``[i]``, ``indices``) it shows its storage-order part."""

    def __init__(self, dataset: Any, index_map: Optional[_Map] = None, rank: int = 0, world_size: int = 1):
        self.dataset = dataset
        self._map: _Map = _Window(None, None, 0, len(dataset)) if index_map is None else index_map
        self.rank = rank
        self.world_size = world_size

    # ---- the dataset's API -------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._map) // self.world_size

    @property
    def fields(self):
        return self.dataset.fields

    @property
    def metadata(self):
        return self.dataset.metadata

    @property
    def path(self) -> str:
        return self.dataset.path

    @property
    def sharded(self) -> bool:
        return self.world_size > 1

    def __repr__(self) -> str:
        shard = f", shard {self.rank} of {self.world_size}" if self.sharded else ""
        return f"<shardfeed.Subset {len(self)} of {len(self.dataset)} samples of {self.path!r}{shard}>"

    def __reduce__(self):
        return (Subset, (self.dataset, self._map, self.rank, self.world_size))

    def _positions(self, positions: Any) -> np.ndarray:
        array = np.asarray(positions)
        if array.ndim != 1:
            raise ValueError(f"positions must be one-dimensional, got shape {array.shape}")
        if array.dtype == np.bool_:
            if len(array) != len(self):
                raise IndexError(f"boolean mask of {len(array)} for a view of {len(self)} samples")
            return np.flatnonzero(array).astype(np.int64)
        if array.dtype.kind not in "iu":
            if array.size:
                raise TypeError(f"positions must be integers, got {array.dtype}")
            array = array.astype(np.int64)
        n = len(self)
        array = array.astype(np.int64)
        if array.size:
            array = np.where(array < 0, array + n, array)
            if array.min() < 0 or array.max() >= n:
                bad = np.asarray(positions).reshape(-1)[(array < 0) | (array >= n)][0]
                raise IndexError(f"position {int(bad)} is out of range for a view of {n} samples")
        return array

    def indices(self, positions: Any = None) -> np.ndarray:
        """The dataset indices of this view's ``positions`` (default: all), in storage order."""
        local = np.arange(len(self), dtype=np.int64) if positions is None else self._positions(positions)
        if self.sharded:
            local = local * self.world_size + self.rank
        return self._map(local)

    def read(self, positions: Any, fields: Any = None, **options: Any):
        """``Dataset.read`` of this view's ``positions`` (negative ones count from the end)."""
        return self.dataset.read(self.indices(positions), fields, **options)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self.dataset.read(self.indices(np.arange(len(self), dtype=np.int64)[index]))
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"view indices must be integers or slices, not {type(index).__name__}")
        return self.dataset[int(self.indices([index])[0])]

    def _getitems(self, positions: Sequence[int]) -> List[Dict[str, Any]]:
        """grain's optional batched read: the samples at ``positions`` as ``view[i]`` gives them,
        read with one ``Dataset.read`` (see ``Dataset._getitems``). A shard read this way shows
        its storage-order part; for a shard's epoch order use ``batches`` or ``ShardSampler``."""
        return self.read(positions).samples()

    # ---- views of views ----------------------------------------------------------------------

    def _check_not_sharded(self, what: str) -> None:
        if self.sharded:
            raise ValueError(f"{what} of a shard: a shard's samples change every epoch; take {what} first, "
                             "then shard()")

    def split(self, parts: Union[Mapping[str, Any], Sequence[Any]], *, seed: int = 0,
              shuffle: bool = True) -> Union[Dict[str, "Subset"], List["Subset"]]:
        """Disjoint parts: ``split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)`` returns a dict
        of Subsets (a list for a list of parts). Parts are fractions (floats; the rounding
        leftovers go to the largest remainders when they add up to 1) or counts (ints). With
        ``shuffle`` (the default) the parts are pseudo-random samples, a deterministic function
        of ``seed``; without, consecutive ranges in storage order."""
        self._check_not_sharded("split")
        seed = check_seed(seed)
        named = isinstance(parts, abc.Mapping)
        values = list(parts.values()) if named else list(parts)
        n = len(self)
        sizes = _part_sizes(values, n)
        perm = split_permutation(n, seed) if shuffle and n else None
        base = _Window(self._map, perm, 0, n) if perm is not None else self._map
        views, start = [], 0
        for size in sizes:
            views.append(Subset(self.dataset, base.window(start, start + size)))
            start += size
        return dict(zip(parts.keys(), views)) if named else views  # type: ignore[union-attr]

    def subset(self, positions: Any) -> "Subset":
        """The samples at ``positions`` of this view (ints, negative from the end, or a boolean
        mask), in that order; duplicates are kept."""
        self._check_not_sharded("subset")
        return Subset(self.dataset, _Explicit(self.indices(positions)))

    def preload(self) -> bool:
        """Reads the whole dataset this view is of into the page cache (all its samples, not just
        the view's): :meth:`shardfeed.Dataset.preload`."""
        return self.dataset.preload()

    def head(self, n: int) -> "Subset":
        """The first ``n`` samples (all of them if there are fewer): for smoke tests."""
        self._check_not_sharded("head")
        n = min(check_count(n, "n"), len(self))
        return Subset(self.dataset, self._map.window(0, n))

    def shard(self, rank: int, world_size: int) -> "Subset":
        """This worker's part for data-parallel training (see the class docs): each epoch, the
        positions ``rank, rank + world_size, ...`` of the epoch's order, ``len(self) // world_size``
        of them, so every worker has the same number of batches."""
        world_size = check_count(world_size, "world_size", 1)
        rank = check_count(rank, "rank")
        if rank >= world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        # Sharding a shard: position t of the new shard is position t * world_size + rank of the
        # old one, i.e. (t * world_size + rank) * W + R of the parent order.
        return Subset(self.dataset, self._map, rank * self.world_size + self.rank, world_size * self.world_size)

    # ---- epoch orders ------------------------------------------------------------------------

    def epoch_permutation(self, epoch: int, *, seed: int = 0, shuffle_block: int = 1) -> Any:
        """The permutation of epoch ``epoch``'s order (of the view a shard is of, for a shard):
        :func:`shardfeed.order.epoch_permutation` over this view's positions."""
        return epoch_permutation(len(self._map), seed, epoch, check_block(shuffle_block))

    def epoch_indices(self, epoch: int, start: int, stop: int, *, shuffle: bool = True, seed: int = 0,
                      shuffle_block: int = 1, permutation: Any = None) -> np.ndarray:
        """Dataset indices at positions ``[start, stop)`` of epoch ``epoch``'s order of this view:
        a uniformly random order, a pure function of ``(seed, epoch)``, or storage order without
        ``shuffle``. ``shuffle_block`` > 1 shuffles blocks of that many consecutive positions of
        the view instead of single samples (:class:`~shardfeed.order.BlockPermutation`).
        ``permutation``: :meth:`epoch_permutation`'s result, when the caller keeps it."""
        positions = np.arange(start, stop, dtype=np.int64)
        if self.sharded:
            positions = positions * self.world_size + self.rank
        if shuffle:
            perm = permutation if permutation is not None else self.epoch_permutation(
                epoch, seed=seed, shuffle_block=shuffle_block)
            positions = perm.apply(positions)
        return self._map(positions)

    def batches(self, batch_size: int, **options: Any):
        """A prefetching generator of Keras-style batches: see :func:`shardfeed.loader.batches`."""
        from . import loader
        return loader.batches(self, batch_size, **options)

    def to_tf_dataset(self, batch_size: int, **options: Any):
        """A ``tf.data.Dataset`` of batches: see :func:`shardfeed.tf.to_tf_dataset`."""
        from . import tf as _tf
        return _tf.to_tf_dataset(self, batch_size, **options)
