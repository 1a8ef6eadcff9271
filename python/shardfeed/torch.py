"""PyTorch front end: batched reads in torch's ``DataLoader``, an epoch order with exact resume and
rank sharding, and a thread-prefetched iterator of tensors. Importing this module imports torch;
``import shardfeed`` does not.

* :class:`ShardDataset` — a map-style ``torch.utils.data.Dataset``; ``data[i]`` is one sample and
  ``data.__getitems__(positions)`` (what torch's fetcher calls for a whole batch) reads the batch
  with one native read, GIL released, returned as tensors that share the batch's memory.
* :class:`ShardSampler` — a batch sampler yielding the library's epoch order (``shardfeed.Sampler``),
  ``set_epoch``, ``state_dict`` / ``load_state_dict`` (``torchdata.stateful_dataloader``), and
  ``rank`` / ``world_size`` with the semantics of ``view.shard(rank, world_size)``.
* :class:`ShardLoader` — batches of tensors read ahead on a thread, no worker processes: the fast
  path where cores are few (the native reader already runs on its own threads).
* :func:`collate` — the pass-through ``collate_fn`` for a ``DataLoader`` over a ShardDataset.

Positions: a ShardDataset over a view is indexed by the view's positions ``[0, len(view))``, as any
map-style dataset; ShardSampler yields those positions (of the epoch order of the view, or of
rank's part of it). A tensor from ``torch.from_numpy`` holds a reference to its array, so a batch's
memory is reused by a later read only once every tensor of it is freed (see
:mod:`shardfeed.loader`).
"""

from __future__ import annotations

import numbers
import os
from collections import abc
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

try:
    import torch
    import torch.utils.data
except ImportError as exc:  # pragma: no cover - exercised by tests/test_torch.py in a subprocess
    raise ImportError(f'shardfeed.torch needs PyTorch: pip install "shardfeed[torch]" ({exc})') from exc

from ._torch_slots import WorkerSlots
from .dataset import Batch
from .loader import DEFAULT_PREFETCH, BatchPlan, FeedOptions, Prefetcher
from .order import Sampler
from .views import Subset, as_subset

__all__ = ["Positions", "ShardDataset", "ShardLoader", "ShardSampler", "collate"]

# The name of a ShardLoader's prefetch thread (tests wait for these threads).
LOADER_THREAD_NAME = "shardfeed-torch-prefetch"

# The feed options (loader.FeedOptions) that choose the samples of each batch: a ShardSampler's;
# the others say how a batch is read and arranged: a ShardDataset's. ShardLoader takes them all.
_ORDER_OPTIONS = ("shuffle", "seed", "shuffle_block", "drop_remainder")


def _feed_options(where: str, options: Dict[str, Any], order: bool) -> FeedOptions:
    """``options`` as FeedOptions (an unknown name is a TypeError naming the options there are),
    refusing those that belong to the other half (see ``_ORDER_OPTIONS``)."""
    misplaced = [name for name in options if (name in _ORDER_OPTIONS) != order and name in FeedOptions.names()]
    if misplaced:
        other = "ShardDataset (how a batch is read)" if order else "ShardSampler (which samples, in what order)"
        raise TypeError(f"{where} got {misplaced[0]}=...: that option belongs to {other}")
    return FeedOptions.from_kwargs(where, options)


def collate(batch: Any) -> Any:
    """The ``collate_fn`` for a ``DataLoader`` over a :class:`ShardDataset`: the batch
    ``__getitems__`` returned, as it is (torch's default collate would treat a batch of tensors
    as a list of samples and copy, or fail on a dict)."""
    return batch


def _tensor(value: Any, lent: Optional[Dict[int, Any]] = None) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if lent is not None and id(value) in lent:
        return lent[id(value)]
    if isinstance(value, np.ndarray):
        if not value.flags.writeable:  # torch has no read-only tensors (from_numpy warns)
            value = value.copy()
        return torch.from_numpy(value)  # shares the array's memory and keeps the array alive
    return torch.as_tensor(value)


def _tensors(structure: Any, lent: Optional[Dict[int, Any]] = None) -> Any:
    """A batch (arrays in a tuple, dict or :class:`~shardfeed.Batch`) with every array a tensor
    that shares its memory: ``lent[id(array)]`` where given (a worker's slot tensors). A Batch
    stays a Batch, its ``lengths`` tensors too. A tuple of arrays (what a loader's ``inputs`` give)
    is checked first: this runs on every batch, right after a read that leaves the caches cold."""
    if isinstance(structure, tuple):
        return tuple([_tensors(value, lent) for value in structure])
    if type(structure) is np.ndarray:
        return _tensor(structure, lent)
    if isinstance(structure, Batch):
        return Batch({name: _tensor(value, lent) for name, value in structure.items()},
                     lengths={name: _tensor(value) for name, value in structure.lengths.items()},
                     uncached=structure.uncached)
    if isinstance(structure, abc.Mapping):
        return {key: _tensors(value, lent) for key, value in structure.items()}
    return _tensor(structure, lent)


def _pinned(structure: Any) -> Any:
    """A batch of tensors with every tensor copied into pinned (page-locked) memory."""
    if isinstance(structure, Batch):
        return Batch({name: value.pin_memory() for name, value in structure.items()},
                     lengths={name: value.pin_memory() for name, value in structure.lengths.items()},
                     uncached=structure.uncached)
    if isinstance(structure, abc.Mapping):
        return {key: _pinned(value) for key, value in structure.items()}
    if isinstance(structure, tuple):
        return tuple(_pinned(value) for value in structure)
    return structure.pin_memory()


def _accelerator_available() -> bool:
    """Whether torch has an accelerator to pin memory for (pinned memory needs one: on a CPU-only
    torch, ``Tensor.pin_memory()`` raises)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None:
        return bool(accelerator.is_available())
    return bool(torch.cuda.is_available())


def _unsharded(source: Any, what: str) -> Subset:
    view = as_subset(source.view if isinstance(source, ShardDataset) else source)
    if view.sharded:
        raise ValueError(f"{what} of a shard ({view!r}): pass the whole view, and rank/world_size to "
                         "ShardSampler or ShardLoader, which give each rank its part of every epoch")
    return view


def _distributed(rank: Optional[int], world_size: Optional[int]) -> Tuple[int, int]:
    """``(rank, world_size)``: as given, else from ``torch.distributed`` when it is initialised,
    else ``(0, 1)``."""
    if rank is None and world_size is None:
        distributed = torch.distributed
        if distributed.is_available() and distributed.is_initialized():
            return distributed.get_rank(), distributed.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"give both rank and world_size, or neither (got rank={rank!r}, world_size={world_size!r})")
    return rank, world_size


class _Run:
    """One iteration over the steps ``[next, stop)``; ``next`` is the first step not yet handed out."""

    __slots__ = ("next", "stop")

    def __init__(self, first: int, stop: int):
        self.next, self.stop = first, stop


class _Epochs:
    """Where iterations of a :class:`~shardfeed.Sampler` start and stand: each new iteration is one
    epoch, from the position ``set_epoch`` / ``load_state_dict`` set, else the epoch after the
    previous iteration's; the position is counted in batches handed out. Shared by ShardSampler and
    ShardLoader, so both save and resume the same way."""

    def __init__(self, sampler: Sampler, rank: int, world_size: int):
        if len(sampler) == 0:
            raise ValueError(f"no batches: {sampler.samples} samples with batch_size {sampler.batch_size} and "
                             f"drop_remainder={sampler.drop_remainder}")
        self.sampler = sampler
        self.rank, self.world_size = rank, world_size
        self._next_step = 0  # where the next iteration starts
        self._live: Optional[_Run] = None  # the latest iteration, until it ends

    def begin(self) -> _Run:
        """A new iteration: to the end of the epoch of its first step."""
        first = self._next_step
        stop = (first // len(self.sampler) + 1) * len(self.sampler)
        self._next_step = stop
        run = self._live = _Run(first, stop)
        return run

    def end(self, run: _Run) -> None:
        if self._live is run and run.next >= run.stop:
            self._live = None

    @property
    def step(self) -> int:
        """The global step the stream stands at: the next batch the latest iteration hands out, or
        where the next iteration starts."""
        return self._live.next if self._live is not None else self._next_step

    def set_epoch(self, epoch: int) -> None:
        if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self._next_step = int(epoch) * len(self.sampler)
        self._live = None

    def state_dict(self) -> Dict[str, Any]:
        state = self.sampler.position(self.step)
        state.update(rank=self.rank, world_size=self.world_size)
        return state

    def load_state_dict(self, state: Any) -> None:
        if not isinstance(state, abc.Mapping):
            raise TypeError(f"state must be a dict from state_dict(), got {type(state).__name__}")
        for key, mine in (("world_size", self.world_size), ("rank", self.rank)):
            if key in state and state[key] != mine:
                raise ValueError(f"cannot resume at {dict(state)}: it was saved with {key}={state[key]!r}, "
                                 f"this stream has {key}={mine!r}")
        self._next_step = self.sampler.step_of({k: v for k, v in state.items() if k not in ("rank", "world_size")})
        self._live = None


class ShardDataset(torch.utils.data.Dataset):
    """A dataset or view as a map-style ``torch.utils.data.Dataset`` of tensors.

    ``data[i]`` is sample ``i`` of the view; ``data.__getitems__(positions)``, which torch's
    ``DataLoader`` calls with each batch of positions, reads the batch with one native read (GIL
    released) and returns it as tensors sharing the batch's memory: arranged as ``(x,)``,
    ``(x, y)`` or ``(x, y, sample_weight)`` with ``inputs`` / ``targets`` / ``sample_weights``
    (each a field name, list or dict, as for ``ds.batches``), else a :class:`~shardfeed.Batch` of
    every field read (its ``lengths`` as tensors). The options are the read half of the
    :class:`~shardfeed.loader.FeedOptions` (``fields``, ``dtype``, ``scale``, ``offset``,
    ``maxlen``, ``pad_value``, ``transform``, ``sample_weights``; the order options go to
    :class:`ShardSampler`); a transform sees ``batch.indices`` and, when the
    positions came from a :class:`ShardSampler`, ``batch.epoch`` and ``batch.step``.

    Use it with ``collate_fn=shardfeed.torch.collate``::

        DataLoader(data, batch_sampler=ShardSampler(data, 256, seed=0), collate_fn=collate,
                   num_workers=2)

    or torch's own samplers (``batch_size=256, shuffle=True``). Every batch a worker process reads
    is a whole batch: the DataLoader hands each worker the positions of one batch, and the worker
    reads it into one of its few shared-memory slots, which reaches the main process without a
    copy and is read into again only once every tensor of that batch is freed there
    (:mod:`shardfeed._torch_slots`). It pickles (the dataset by path) for spawned workers."""

    def __init__(self, source: Any, inputs: Any = None, targets: Any = None, **options: Any):
        self.view = _unsharded(source, "ShardDataset")
        options = _feed_options("ShardDataset()", dict(options, inputs=inputs, targets=targets), order=False)
        self.plan = BatchPlan(self.view, 1, options)
        self._shareable: Optional[bool] = None  # whether torch has every field's dtype, once known
        self._slots: Optional[WorkerSlots] = None  # in a DataLoader worker: its slots

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, _slots=None)  # a worker makes its own

    def __len__(self) -> int:
        return len(self.view)

    def __repr__(self) -> str:
        return f"<shardfeed.torch.ShardDataset of {self.view!r}>"

    def __getitem__(self, index: Any) -> Any:
        """Sample ``index`` (tensors without the batch dimension); a list or array of positions
        reads them as one batch (the ``DataLoader(..., sampler=ShardSampler(...), batch_size=None)`` form)."""
        if isinstance(index, (numbers.Integral, np.integer)) and not isinstance(index, bool):
            return _first(self._read([int(index)], lend=False))
        return self.__getitems__(index)

    def __getitems__(self, positions: Any) -> Any:
        """The samples at ``positions`` (view positions, any order, duplicates allowed) as one
        batch of tensors: one native read. In a ``DataLoader`` worker, read into one of the
        worker's shared-memory slots (see :meth:`_read`)."""
        return self._read(positions, lend=True)

    def _read(self, positions: Any, lend: bool) -> Any:
        """The batch at ``positions`` as tensors. In a ``DataLoader`` worker, with ``lend``, the
        batch is read into one of the worker's shared-memory slots, which reach the main process
        without a copy and are reused once it has freed every tensor of the batch
        (:mod:`shardfeed._torch_slots`; torch would copy any other tensor into a new
        shared-memory segment, 11-16 ms a 4 MiB batch on 2 vCPUs where a slot costs ~1 ms).
        Not with a transform (it may return any arrays), variable-length fields (their shape is
        known after the read) or a dtype torch does not have (bfloat16 from ml_dtypes): those
        batches travel as torch sends any tensor."""
        indices = self.view.indices(np.asarray(positions, dtype=np.int64) if not isinstance(positions, np.ndarray)
                                    else positions)
        slots = self._worker_slots() if lend else None
        if slots is None:
            return _tensors(self._arranged(positions, indices, None))
        slot = slots.take(len(indices))
        try:
            out = slots.outputs(slot, len(indices))
            arranged = self._arranged(positions, indices, out)
        except BaseException:
            slots.give_back(slot)
            raise
        return _tensors(arranged, slots.lend(slot, out))

    def _arranged(self, positions: Any, indices: np.ndarray, out: Optional[Dict[str, np.ndarray]]) -> Any:
        """The batch of dataset ``indices`` read (into ``out``), transformed and arranged."""
        plan = self.plan
        batch = plan.dataset.read(indices, plan.fields, out=out, **plan.read_options)
        batch.indices = indices
        batch.epoch = getattr(positions, "epoch", None)
        batch.step = getattr(positions, "step", None)
        if plan.transform is not None:
            batch = plan.transform(batch)
            if not isinstance(batch, abc.Mapping):
                raise TypeError(f"transform must return a mapping of field name -> array, got {type(batch).__name__}")
        return plan.arrange(batch)

    def _worker_slots(self) -> Optional[WorkerSlots]:
        """This worker process's slots; None in the main process, with a transform, with
        variable-length fields or a dtype torch does not have (see :meth:`_read`)."""
        plan = self.plan
        if (self._shareable is False or plan.transform is not None or plan.empty.lengths
                or torch.utils.data.get_worker_info() is None):
            return None
        if self._shareable is None:
            try:
                for array in plan.empty.values():
                    torch.from_numpy(array)
            except TypeError:  # a numpy dtype torch has no counterpart for
                self._shareable = False
                return None
            self._shareable = True
        if self._slots is None or self._slots.pid != os.getpid():
            self._slots = WorkerSlots([(name, array.dtype, array.shape[1:]) for name, array in plan.empty.items()])
        return self._slots


def _first(batch: Any) -> Any:
    """Sample 0 of a batch of tensors (variable-length fields cut to their length)."""
    if isinstance(batch, Batch):
        return {name: value[0] if name not in batch.lengths else value[0, :int(batch.lengths[name][0])]
                for name, value in batch.items()}
    if isinstance(batch, abc.Mapping):
        return {key: _first(value) for key, value in batch.items()}
    if isinstance(batch, tuple):
        return tuple(_first(value) for value in batch)
    return batch[0]


class Positions(list):
    """The positions of one batch (a list, as torch's samplers yield), with the ``epoch`` and
    global ``step`` of the batch: ShardDataset hands them to a transform."""

    def __init__(self, positions: Any, epoch: int, step: int):
        super().__init__(positions)
        self.epoch, self.step = epoch, step

    def __reduce__(self):
        return (Positions, (list(self), self.epoch, self.step))


class ShardSampler(torch.utils.data.Sampler):
    """A batch sampler over the positions of a dataset, view or :class:`ShardDataset`: each epoch
    the library's order (``shardfeed.Sampler``), cut into batches of ``batch_size``. Its options
    are the order half of the :class:`~shardfeed.loader.FeedOptions`: ``shuffle`` (default True:
    uniformly random, a pure function of ``(seed, epoch)``; storage order without), ``seed``,
    ``shuffle_block`` and ``drop_remainder`` (else the last batch is smaller).

    Each iteration is one epoch: the one ``set_epoch(e)`` set (as with ``DistributedSampler``),
    else the epoch after the previous iteration's. ``state_dict()`` is the position after the
    batches handed out so far (a small dict); ``load_state_dict(state)`` makes the next iteration
    continue there, with the very batches an uninterrupted run would have had. With a plain
    ``DataLoader`` the position is exact at ``num_workers=0``; with workers, which the DataLoader
    keeps fed ahead, save through ``torchdata.stateful_dataloader.StatefulDataLoader``, which
    stores this sampler's state where its batches were consumed.

    ``rank`` / ``world_size`` (default: from ``torch.distributed`` when it is initialised) give
    rank ``rank`` its part of every epoch, as ``view.shard(rank, world_size)`` does: disjoint
    parts of ``len(view) // world_size`` samples each, so every rank has as many batches. Every
    rank must use the same seed."""

    def __init__(self, source: Any, batch_size: int, *, rank: Optional[int] = None, world_size: Optional[int] = None,
                 **options: Any):
        options = _feed_options("ShardSampler()", options, order=True)
        self.view = _unsharded(source, "ShardSampler")
        rank, world_size = _distributed(rank, world_size)
        # Subset(view) is the identity map over the view's positions: its epoch orders are the
        # view's, as positions of the view instead of dataset indices (what a map-style dataset takes).
        positions = Subset(self.view)
        if world_size != 1 or rank != 0:
            positions = positions.shard(rank, world_size)
        self.rank, self.world_size = rank, world_size
        self.sampler = Sampler(positions, batch_size, shuffle=options.shuffle, seed=options.seed,
                               drop_remainder=options.drop_remainder, shuffle_block=options.shuffle_block)
        self._epochs = _Epochs(self.sampler, rank, world_size)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def __repr__(self) -> str:
        shard = f", rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return (f"<shardfeed.torch.ShardSampler {len(self)} batches of {self.sampler.batch_size} per epoch of "
                f"{self.view!r}{shard}>")

    def __iter__(self) -> Iterator[List[int]]:
        return self._batches()

    def _batches(self) -> Iterator[List[int]]:
        # A generator: the iteration begins at its first next(), not at iter(), which torch's
        # DataLoader iterators call more than once before taking a batch.
        run = self._epochs.begin()
        per_epoch = len(self.sampler)
        try:
            while run.next < run.stop:
                step = run.next
                run.next += 1
                positions = self.sampler.indices(step)
                yield Positions(positions.tolist(), step // per_epoch, step)
        finally:
            self._epochs.end(run)

    @property
    def epoch(self) -> int:
        """The epoch the stream stands in (see :meth:`state_dict`)."""
        return self._epochs.step // len(self.sampler)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch ``epoch``, from its first batch."""
        self._epochs.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """``{"epoch", "batch", ...}``: the next batch to hand out (JSON-able; it also records the
        seed, sizes, ``rank`` and ``world_size``, which :meth:`load_state_dict` checks)."""
        return self._epochs.state_dict()

    def load_state_dict(self, state: Any) -> None:
        """The next iteration continues at ``state`` (from :meth:`state_dict`)."""
        self._epochs.load_state_dict(state)


class ShardLoader:
    """Batches of tensors, read ahead on a background thread: the work of a ``DataLoader`` over a
    :class:`ShardDataset` without worker processes. A batch read already runs on the native
    threads with the GIL released, so one thread keeps the reader busy while the model trains;
    worker processes add a copy of every batch into shared memory and a process start per worker.

    Batches, options (all the :class:`~shardfeed.loader.FeedOptions`) and order are those of
    ``ds.batches``, as tensors
    sharing the batch memory; ``rank`` / ``world_size`` and the epoch protocol (``set_epoch``,
    each iteration one epoch, ``state_dict`` / ``load_state_dict``, exact) are
    :class:`ShardSampler`'s. ``prefetch`` batches are read ahead (0: in the consumer's thread).
    The thread stops when an iteration ends or is dropped (``close()`` on the iterator). Large
    batches are read on the consumer's thread instead while their reads are page-cached and the
    consumer waits for every one (docs/training.md, "Batches and buffer ownership").

    ``pin_memory=True`` copies each batch into pinned memory where it is read, for
    ``x.to(device, non_blocking=True)``, when torch has an accelerator
    (``torch.accelerator.is_available()``); without one there is no pinned memory to copy to
    and the batches are the unpinned tensors (``DataLoader`` warns in that case; this loader
    does not: ``loader.pin_memory`` says which it does)."""

    def __init__(self, source: Any, batch_size: int, inputs: Any = None, targets: Any = None, *,
                 rank: Optional[int] = None, world_size: Optional[int] = None, prefetch: int = DEFAULT_PREFETCH,
                 pin_memory: bool = False, **options: Any):
        if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
            raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
        self.view = _unsharded(source, "ShardLoader")
        rank, world_size = _distributed(rank, world_size)
        part = self.view.shard(rank, world_size) if world_size != 1 or rank != 0 else self.view
        self.rank, self.world_size, self.prefetch = rank, world_size, prefetch
        self.pin_memory = bool(pin_memory) and _accelerator_available()  # what it does, not what was asked
        options = FeedOptions.from_kwargs("ShardLoader()", dict(options, inputs=inputs, targets=targets))
        self.plan = BatchPlan(part, batch_size, options)
        self._epochs = _Epochs(self.plan.sampler, rank, world_size)

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.plan)

    def __repr__(self) -> str:
        shard = f", rank {self.rank} of {self.world_size}" if self.world_size > 1 else ""
        return (f"<shardfeed.torch.ShardLoader {len(self)} batches of {self.plan.sampler.batch_size} per epoch of "
                f"{self.view!r}{shard}>")

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _load(self, step: int) -> Any:
        batch = self.plan.load(step)
        return _pinned(_tensors(batch)) if self.pin_memory else _tensors(batch)

    def _load_group(self, first: int, count: int) -> Iterator[Any]:
        for batch in self.plan.load_group(first, count):
            yield _pinned(_tensors(batch)) if self.pin_memory else _tensors(batch)
            del batch

    def _batches(self) -> Iterator[Any]:
        run = self._epochs.begin()
        group = self.plan.group
        try:
            if self.prefetch == 0:
                while run.next < run.stop:
                    for tensors in self._load_group(run.next, min(group, run.stop - run.next)):
                        run.next += 1  # counted once handed out
                        yield tensors
                return
            fetcher = Prefetcher(self._load, run.next, run.stop, self.prefetch, name=LOADER_THREAD_NAME,
                                 group=group, produce_group=self._load_group,
                                 help_while_waiting=self.plan.helped,
                                 inline_when=self.plan.reads_cached if self.plan.inlined else None)
            try:
                while run.next < run.stop:
                    yield self._take(run, fetcher.get)  # not held in a local while suspended
            finally:
                fetcher.close()
        finally:
            self._epochs.end(run)

    def _take(self, run: _Run, get: Any) -> Any:
        value = get()
        run.next += 1  # counted once handed out, not when read ahead
        return value

    @property
    def epoch(self) -> int:
        return self._epochs.step // len(self.plan)

    def set_epoch(self, epoch: int) -> None:
        """The next iteration is epoch ``epoch``, from its first batch."""
        self._epochs.set_epoch(epoch)

    def state_dict(self) -> Dict[str, Any]:
        """The position after the batches handed out (see :meth:`ShardSampler.state_dict`)."""
        return self._epochs.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self._epochs.load_state_dict(state)
