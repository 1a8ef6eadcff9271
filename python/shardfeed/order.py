"""Epoch orders: which samples each training step reads, as pure functions of (seed, epoch, position).

Nothing here stores a per-epoch order. A :class:`Permutation` is a keyed bijection of ``[0, n)``
evaluated at any positions (vectorised over numpy arrays), so batch ``b`` of epoch ``e`` can be
computed on its own, by any thread or process, for billions of samples, and a run can be resumed
at any batch. :class:`Sampler` cuts the epoch orders of a view (:mod:`shardfeed.views`) into
batches and converts between a global step number and a resumable ``{"epoch", "batch"}`` position.

This module imports nothing of shardfeed but the native core (which runs the Feistel network): the
views build on its permutations, and ``Sampler(dataset)`` wraps a whole dataset in a view on demand.
"""

from __future__ import annotations

import math
import numbers
import threading
from collections import abc
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core

# Up to this many elements a permutation is an explicit table (a Fisher-Yates shuffle from numpy's
# generator): exactly uniform, and at most 512 KiB. Above it, a Feistel network (O(1) memory).
TABLE_MAX = 1 << 16
FEISTEL_ROUNDS = 6
# A Sampler computes the order of an epoch this many positions at a time (64 KiB of indices).
BLOCK = 8192

# Key derivation tags: the permutation of an epoch and the one that splits a dataset never share a key.
_TAG_EPOCH = 0x45504F43  # "EPOC"
_TAG_SPLIT = 0x53504C54  # "SPLT"
_TAG_BLOCKS = 0x424C4B53  # "BLKS"



def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    return int(seed)


def check_count(value: Any, what: str, minimum: int = 0) -> int:
    if type(value) is int and value >= minimum:  # every step of a loader: no ABC check
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


class Permutation:
    """A keyed pseudo-random permutation of ``range(n)``: ``perm(positions)`` returns the element
    at each position (int64), for any positions, without materialising the order.

    Different keys (tuples of ints >= 0) give independent-looking permutations. Up to
    :data:`TABLE_MAX` elements the permutation is an explicit uniform shuffle. Above, it is a
    6-round Feistel network over ``Z_a x Z_b`` (``a * b >= n``, ``a ~ sqrt(n)``) with a
    splitmix-style round function and modular addition, restricted to ``[0, n)`` by cycle
    walking (re-encrypting the rare values ``>= n``, fewer than ``1 / sqrt(n)`` of them): O(1)
    memory, 15-25 ns a position in C (``_core.FeistelPermutation``), the GIL released."""

    __slots__ = ("n", "key", "_table", "_feistel")

    def __init__(self, n: int, key: Sequence[int]):
        self.n = check_count(n, "n")
        self.key = tuple(int(k) for k in key)
        seeds = np.random.SeedSequence(list(self.key) + [self.n])
        self._table: Optional[np.ndarray] = None
        if self.n <= TABLE_MAX:
            table = np.random.Generator(np.random.PCG64(seeds)).permutation(self.n).astype(np.int64)
            table.flags.writeable = False
            self._table = table
            return
        a = math.isqrt(self.n - 1) + 1
        b = -(-self.n // a)
        state = seeds.generate_state(2 * FEISTEL_ROUNDS, np.uint64)
        moduli = [a, b] * (FEISTEL_ROUNDS // 2)
        # round i: (add, mul, modulus); the network runs in C (ext/permutation.c), position by position
        self._feistel = _core.FeistelPermutation(self.n, b, [(int(state[i]), int(state[FEISTEL_ROUNDS + i] | 1), moduli[i])
                                                             for i in range(FEISTEL_ROUNDS)])

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"Permutation(n={self.n}, key={self.key})"

    def __reduce__(self):
        return (Permutation, (self.n, self.key))

    def __call__(self, positions: Any) -> np.ndarray:
        """The elements at ``positions`` (array-like of ints in ``[0, n)``), as an int64 array."""
        array = np.asarray(positions)
        if array.dtype.kind not in "iu":
            if array.size:
                raise TypeError(f"positions must be integers, got {array.dtype}")
            array = array.astype(np.int64)
        if array.size and (array.min() < 0 or array.max() >= self.n):
            bad = array[(array < 0) | (array >= self.n)].flat[0]
            raise IndexError(f"position {int(bad)} is out of range for a permutation of {self.n}")
        return self.apply(array)

    def apply(self, positions: np.ndarray) -> np.ndarray:
        """:meth:`__call__` without the checks: ``positions`` must be an integer array in range."""
        if self._table is not None:
            return self._table[positions]
        return self._feistel.apply(positions)


def split_permutation(n: int, seed: int) -> Permutation:
    """The permutation that ``split(..., seed=seed, shuffle=True)`` deals a view of ``n`` samples
    by (never the permutation of an epoch: the keys are tagged apart)."""
    return Permutation(n, (_TAG_SPLIT, seed))


def epoch_permutation(n: int, seed: int, epoch: int, block: int = 1) -> Union[Permutation, "BlockPermutation"]:
    """The permutation of epoch ``epoch`` of a view of ``n`` samples shuffled with ``seed``, in
    blocks of ``block`` consecutive samples (see :class:`BlockPermutation`; 1: every sample on
    its own)."""
    if block == 1:
        return Permutation(n, (_TAG_EPOCH, seed, epoch))
    return BlockPermutation(n, block, (_TAG_BLOCKS, seed, epoch))


def check_block(block: Any) -> int:
    return check_count(block, "shuffle_block", 1)


class BlockPermutation:
    """A block shuffle of ``range(n)``: the elements cut into blocks of ``block`` consecutive ones
    (the last block shorter when ``block`` does not divide ``n``), the blocks in a uniformly random
    order, the elements of a block consecutive and ascending. For slow disks: a batch then reads
    runs of records that are adjacent in the shard files, which the reader fetches with one
    system call per run.

    O(1) memory: the full blocks are ordered by a :class:`Permutation` of the block numbers, and
    the short block, if any, goes in at a uniformly random slot among them (uniform order of the
    full blocks + uniform slot = uniform order of all the blocks). ``apply(positions)`` returns
    the elements at ``positions`` (an int64 array in ``[0, n)``)."""

    __slots__ = ("n", "block", "key", "_full", "_short", "_short_at", "_perm")

    def __init__(self, n: int, block: int, key: Sequence[int]):
        self.n = check_count(n, "n")
        self.block = check_block(block)
        self.key = tuple(int(k) for k in key)
        self._full, self._short = divmod(self.n, self.block)  # full blocks; elements of the short one
        self._perm = Permutation(self._full, self.key + (self.block,))
        slot = 0
        if self._short:
            seeds = np.random.SeedSequence(list(self.key) + [self.block, self.n])
            slot = int(np.random.Generator(np.random.PCG64(seeds)).integers(0, self._full + 1))
        self._short_at = slot * self.block  # position of the short block's first element

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"BlockPermutation(n={self.n}, block={self.block}, key={self.key})"

    def __reduce__(self):
        return (BlockPermutation, (self.n, self.block, self.key))

    def apply(self, positions: np.ndarray) -> np.ndarray:
        p = np.asarray(positions, dtype=np.int64)
        if not self._short:
            blocks, within = np.divmod(p, self.block)
            return self._perm.apply(blocks) * self.block + within
        start, stop = self._short_at, self._short_at + self._short
        in_short = (p >= start) & (p < stop)
        out = np.empty(p.shape, dtype=np.int64)
        out[in_short] = self._full * self.block + (p[in_short] - start)
        rest = p[~in_short]
        rest = np.where(rest >= stop, rest - self._short, rest)  # as if the short block were not there
        blocks, within = np.divmod(rest, self.block)
        out[~in_short] = self._perm.apply(blocks) * self.block + within
        return out


class Sampler:
    """Cuts the epoch orders of a view into batches. Batch ``b`` of epoch ``e`` is a pure function
    of ``(seed, e, b)``; a *step* numbers batches across epochs (``step = e * len(sampler) + b``)
    and :meth:`position` / :meth:`step_of` convert to and from the resumable state
    ``{"epoch": e, "batch": b, ...}``.

    ``shuffle_block=k`` (k > 1) makes each epoch's order a block shuffle: the view's positions cut
    into blocks of ``k`` consecutive ones, the blocks in a uniformly random order, the samples of a
    block together and in storage order (:class:`BlockPermutation`). Still every sample once per
    epoch, a pure function of ``(seed, epoch)``. For slow disks: records adjacent on disk are read
    with one system call per run, not one per sample, at the price of a coarser shuffle (a batch
    holds about ``batch_size / k`` blocks)."""

    def __init__(self, source: Any, batch_size: int, *, shuffle: bool = True, seed: int = 0,
                 drop_remainder: bool = False, shuffle_block: int = 1):
        from .views import as_subset  # the views build on this module's permutations
        self.view = as_subset(source)
        self.batch_size = check_count(batch_size, "batch_size", 1)
        self.shuffle = bool(shuffle)
        self.seed = check_seed(seed)
        self.shuffle_block = check_block(shuffle_block)
        self.drop_remainder = bool(drop_remainder)
        self.samples = len(self.view)
        full, rest = divmod(self.samples, self.batch_size)
        self.batches_per_epoch = full + (1 if rest and not self.drop_remainder else 0)
        self._perms: Dict[int, Any] = {}
        self._blocks: Dict[Tuple[int, int], np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.batches_per_epoch

    def __repr__(self) -> str:
        block = f", shuffle_block={self.shuffle_block}" if self.shuffle_block != 1 else ""
        return (f"Sampler({self.view!r}, batch_size={self.batch_size}, shuffle={self.shuffle}{block}, seed={self.seed}, "
                f"drop_remainder={self.drop_remainder}): {len(self)} batches per epoch")

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_perms"], state["_blocks"] = {}, {}
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _permutation(self, epoch: int) -> Any:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = self.view.epoch_permutation(epoch, seed=self.seed, shuffle_block=self.shuffle_block)
            with self._lock:  # keep the last few epochs (a resumed Keras epoch straddles two)
                if len(self._perms) >= 4:
                    self._perms.pop(min(self._perms))
                self._perms[epoch] = perm
        return perm

    def batch(self, epoch: int, batch: int) -> np.ndarray:
        """Dataset indices of batch ``batch`` of epoch ``epoch`` (a read-only array)."""
        if not 0 <= batch < self.batches_per_epoch:
            raise IndexError(f"batch {batch} is out of range: an epoch has {self.batches_per_epoch} batches")
        start = batch * self.batch_size
        stop = min(start + self.batch_size, self.samples)
        first, last = start // BLOCK, (stop - 1) // BLOCK
        if first == last:
            return self._block(epoch, first)[start - first * BLOCK:stop - first * BLOCK]
        pieces = [self._block(epoch, k) for k in range(first, last + 1)]
        joined = np.concatenate(pieces)[start - first * BLOCK:stop - first * BLOCK]
        joined.flags.writeable = False
        return joined

    def _block(self, epoch: int, block: int) -> np.ndarray:
        """Dataset indices of the epoch's positions ``[block * BLOCK, (block + 1) * BLOCK)``, computed
        at once (a numpy call costs about a microsecond whatever its size, and a Feistel pass is about
        fifty calls) and kept for the next batches: a few of them, so memory stays O(1) per epoch."""
        key = (epoch, block)
        indices = self._blocks.get(key)
        if indices is None:
            start = block * BLOCK
            perm = self._permutation(epoch) if self.shuffle else None
            indices = self.view.epoch_indices(epoch, start, min(start + BLOCK, self.samples), shuffle=self.shuffle,
                                              seed=self.seed, permutation=perm)
            indices.flags.writeable = False
            with self._lock:
                if len(self._blocks) >= 8:
                    self._blocks.pop(min(self._blocks))
                self._blocks[key] = indices
        return indices

    def indices(self, step: int) -> np.ndarray:
        """Dataset indices of global step ``step`` (batch ``step % len`` of epoch ``step // len``)."""
        epoch, batch = self.split_step(step)
        return self.batch(epoch, batch)

    def split_step(self, step: int) -> Tuple[int, int]:
        if self.batches_per_epoch == 0:
            raise ValueError(f"no batches: {self.samples} samples, batch_size {self.batch_size}, "
                             f"drop_remainder={self.drop_remainder}")
        return divmod(check_count(step, "step"), self.batches_per_epoch)

    def position(self, step: int) -> Dict[str, Any]:
        """The resumable state of the stream just before global step ``step``: a small JSON-able dict."""
        epoch, batch = self.split_step(step)
        return {"epoch": epoch, "batch": batch, "batches_per_epoch": self.batches_per_epoch,
                "samples": self.samples, "seed": self.seed, "shuffle": self.shuffle,
                "shuffle_block": self.shuffle_block}

    def step_of(self, position: Any) -> int:
        """The global step at ``position``: a dict from :meth:`position`, ``(epoch, batch)``, or a step.
        Refuses a position saved with another batch count, sample count, seed or shuffle setting."""
        if isinstance(position, abc.Mapping):
            for key, mine in (("batches_per_epoch", self.batches_per_epoch), ("samples", self.samples),
                              ("seed", self.seed), ("shuffle", self.shuffle), ("shuffle_block", self.shuffle_block)):
                if key in position and position[key] != mine:
                    raise ValueError(f"cannot resume at {dict(position)}: it was saved with {key}={position[key]!r}, "
                                     f"this stream has {key}={mine!r}")
            epoch, batch = position.get("epoch"), position.get("batch")
        elif isinstance(position, (tuple, list)) and len(position) == 2:
            epoch, batch = position
        else:
            return check_count(position, "start step")
        epoch, batch = check_count(epoch, "epoch"), check_count(batch, "batch")
        if batch >= max(self.batches_per_epoch, 1):
            raise ValueError(f"batch {batch} is out of range: an epoch has {self.batches_per_epoch} batches")
        return epoch * self.batches_per_epoch + batch
