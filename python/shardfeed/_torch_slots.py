"""Shared-memory slots that carry a ``DataLoader`` worker's batches to the main process, reused
batch after batch instead of a new shared-memory segment per batch.

Why: torch sends a tensor from a worker through shared memory. A new segment per batch costs the
worker its creation and page faults, and the main process a descriptor passed over a socket and a
new mapping that faults again: 11-16 ms per 4 MiB batch on the 2-vCPU VM, where reading the batch
takes 1-4 ms. A slot reused, its mapping kept in both processes, costs about 1 ms per batch in
the same test (benchmarks/RESULTS.md, "fifth session").

The protocol. A worker's :class:`WorkerSlots` owns at most ``WORKER_SLOTS`` slots of at most
``WORKER_SLOT_BYTES`` together; a slot is one shared-memory storage
(torch's ``UntypedStorage._new_shared``, so torch's sharing strategy applies): a header, then
each field's rows. The header holds two flags, each written by one side only:

* ``BUSY``: the worker sets it when it takes the slot for a batch (cleared again if the read
  fails); the main process clears it when every tensor of that batch is freed (a
  ``weakref.finalize`` on the array under each tensor: all views of a tensor share its storage,
  which holds the array). The worker reads into a slot only while ``BUSY`` is clear, so a
  batch is never overwritten while the main process references any part of it. A lent batch
  that never reaches the main process (a user ``collate_fn`` that copies it, a worker stopped
  with batches queued) keeps its slot busy: the worker then uses the next slot, and with none
  free a one-off segment, as before; it never waits.
* ``MAPPED``: the main process sets it once it keeps its own mapping of the slot. Until then the
  worker sends the storage itself with the batch (torch passes its descriptor); after, only the
  slot's number. A slot is lent again only after the main process released it, hence after it
  mapped it, so the flag is reliable when read.

The main process drops its mappings of a worker's slots once the worker has exited, checked
when a batch is released and when a new worker's first batch arrives; tensors still referenced
keep their memory until freed.

Ordering: the main process clears ``BUSY`` after its last use of the batch (a finaliser, after the
last reference is gone) and the worker writes the slot only after reading ``BUSY`` clear; x86
orders these stores and loads, and elsewhere the interpreter's lock releases and acquires
between them act as barriers.

Only ``multiprocessing``'s pickler (what DataLoader's queues use) sends a :class:`LentTensor` as a
slot reference; ``pickle`` and ``torch.save`` see an ordinary tensor.
"""

from __future__ import annotations

import math
import multiprocessing.util
import os
import secrets
import threading
import weakref
from multiprocessing.reduction import ForkingPickler
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ._process import process_alive

__all__ = ["LentTensor", "WorkerSlots", "WORKER_SLOTS", "WORKER_SLOT_BYTES"]

# Slots per worker process: DataLoader's prefetch_factor (default 2) batches queued, one the
# training step holds, one being read. More outstanding batches fall back to one-off segments.
WORKER_SLOTS = 4
# And at most this much slot memory per worker, which a container's memory cap must hold besides
# the batches in flight: 4 slots of 8 KiB x 256 float32 batches (4 MiB) fit; batches over 32 MiB
# (38 MiB of 147 KiB images) get none and travel in one-off segments, as before the slots. Up to
# 4 slots, then one, of 38 MiB per worker got the benchmark's 256 MiB memory cgroup OOM-killed
# (RESULTS.md, fifth session).
WORKER_SLOT_BYTES = 32 << 20
HEADER_BYTES = 64
ALIGN = 64  # each field's rows start on a cache line
BUSY, MAPPED = 0, 1  # header bytes


def _uint8_view(storage: Any) -> np.ndarray:
    """The whole storage as a writable numpy uint8 array (its base holds the storage)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),)).numpy()


def _layout(capacity: int, fields: List[Tuple[str, np.dtype, Tuple[int, ...]]]) -> Tuple[Dict[str, int], int]:
    """Each field's offset in a slot of ``capacity`` samples, and the slot's size."""
    offsets = {}
    end = HEADER_BYTES
    for name, dtype, sample_shape in fields:
        offsets[name] = end
        end += -(-capacity * math.prod(sample_shape) * dtype.itemsize // ALIGN) * ALIGN
    return offsets, end


class _Slot:
    """One slot in the worker: its storage, sized for ``capacity`` samples of each field; ``index``
    its number in the worker's slots, None for a one-off slot."""

    def __init__(self, index: Optional[int], capacity: int, fields: List[Tuple[str, np.dtype, Tuple[int, ...]]]):
        self.index, self.capacity = index, capacity
        self.offsets, self.nbytes = _layout(capacity, fields)
        self.storage = torch.UntypedStorage._new_shared(self.nbytes)
        self.memory = _uint8_view(self.storage)
        self.memory[:HEADER_BYTES] = 0
        self.header = self.memory[:HEADER_BYTES]

    def free(self) -> bool:
        return not self.header[BUSY]


class WorkerSlots:
    """A worker process's slots for the batches of one dataset (see the module docstring).
    ``fields``: each field's name, dtype and sample shape, as the batches have them."""

    def __init__(self, fields: List[Tuple[str, np.dtype, Tuple[int, ...]]]):
        self.pid = os.getpid()
        self.key = (self.pid, secrets.token_hex(8))
        self.fields = fields
        self.torch_dtypes = {name: torch.from_numpy(np.empty(0, dtype)).dtype for name, dtype, _ in fields}
        self.slots: List[_Slot] = []
        self.lock = threading.Lock()
        # A worker process ends in os._exit, which frees no storage: with torch's file_system
        # sharing strategy a segment whose count is never decremented stays in /dev/shm. So the
        # slots are dropped as the process exits (multiprocessing runs these finalisers then).
        multiprocessing.util.Finalize(self, self.slots.clear, exitpriority=0)

    def take(self, samples: int) -> _Slot:
        """A free slot for ``samples`` samples, marked ``BUSY`` (taken under a lock: a worker may
        read on several threads): a new one while there are fewer than ``WORKER_SLOTS`` and
        their bytes stay within ``WORKER_SLOT_BYTES``, a free one too small replaced by a larger
        one (within the bytes); when every slot is lent, a one-off slot (index
        None) that the main process maps for this batch only. Hand it back with :meth:`lend`,
        or :meth:`give_back` when the batch is not sent."""
        with self.lock:
            slot = self._free_slot(samples)
            slot.header[BUSY] = 1
            return slot

    def _free_slot(self, samples: int) -> _Slot:
        free = [slot for slot in self.slots if slot.free()]
        for slot in free:
            if slot.capacity >= samples:
                return slot
        size = _layout(samples, self.fields)[1]
        held = sum(slot.nbytes for slot in self.slots)
        if len(self.slots) < WORKER_SLOTS and held + size <= WORKER_SLOT_BYTES:
            slot = _Slot(len(self.slots), samples, self.fields)
            self.slots.append(slot)
            return slot
        if free and held - free[0].nbytes + size <= WORKER_SLOT_BYTES:
            # the main process sees the new storage with the slot's next batch
            slot = self.slots[free[0].index] = _Slot(free[0].index, samples, self.fields)
            return slot
        return _Slot(None, samples, self.fields)

    def give_back(self, slot: _Slot) -> None:
        """``slot``, taken for a batch that failed before it was lent, is free again."""
        slot.header[BUSY] = 0

    def outputs(self, slot: _Slot, samples: int) -> Dict[str, np.ndarray]:
        """The arrays of a batch of ``samples`` in ``slot``, for the read to fill."""
        arrays = {}
        for name, dtype, sample_shape in self.fields:
            start = slot.offsets[name]
            size = samples * math.prod(sample_shape) * dtype.itemsize
            arrays[name] = slot.memory[start:start + size].view(dtype).reshape((samples,) + sample_shape)
        return arrays

    def lend(self, slot: _Slot, arrays: Dict[str, np.ndarray]) -> Dict[int, "LentTensor"]:
        """By ``id`` of each array of ``arrays`` (the batch read into ``slot``), a
        :class:`LentTensor` over it that multiprocessing sends as a reference to the slot. The
        slot stays ``BUSY`` until the main process has freed them all."""
        handle = _SlotHandle(self.key, slot)
        lent = {}
        for name, array in arrays.items():
            dtype = self.torch_dtypes[name]
            tensor = torch.empty(0, dtype=dtype).set_(slot.storage, slot.offsets[name] // array.itemsize, array.shape)
            tensor = tensor.as_subclass(LentTensor)  # over the shared storage: is_shared(), as torch's own
            tensor._shardfeed_slot = (handle, array.dtype.str, array.shape, slot.offsets[name])
            lent[id(array)] = tensor
        return lent


class _SlotHandle:
    """What a batch's tensors in one slot share in a message (pickled once, by the memo): the
    worker's key, the slot's number, and the storage while the main process has not mapped it."""

    def __init__(self, key: Tuple[int, str], slot: _Slot):
        self.key, self.slot = key, slot

    def __reduce__(self):
        slot = self.slot
        storage = None if slot.index is not None and slot.header[MAPPED] else slot.storage
        return (_received, (self.key, slot.index, storage))


class LentTensor(torch.Tensor):
    """A tensor over a worker's slot (in the worker only). Any operation on it gives an ordinary
    tensor; multiprocessing's pickler sends it as a reference to the slot, which the main process
    turns into an ordinary tensor over its own mapping of the slot."""

    __torch_function__ = torch._C._disabled_torch_function_impl

    def __reduce_ex__(self, protocol: Any):
        return self.as_subclass(torch.Tensor).__reduce_ex__(protocol)  # pickle, torch.save: by value


def _reduce_lent(tensor: LentTensor):
    handle, dtype, shape, offset = tensor._shardfeed_slot
    return (_lent_tensor, (handle, dtype, shape, offset))


ForkingPickler.register(LentTensor, _reduce_lent)


# ---- the main process ------------------------------------------------------------------------


class _Mapped:
    """The main process's mapping of one slot (kept while its worker lives)."""

    __slots__ = ("memory", "header")

    def __init__(self, storage: Any):
        self.memory = _uint8_view(storage)
        self.header = self.memory[:HEADER_BYTES]


class _Received:
    """One batch received in one slot: how many of its arrays are alive."""

    __slots__ = ("mapped", "live", "__weakref__")

    def __init__(self, mapped: _Mapped):
        self.mapped, self.live = mapped, 0

    def release_one(self) -> None:
        with _lock:
            self.live -= 1
            if self.live == 0:
                self.mapped.header[BUSY] = 0
                _forget_exited_workers()


_lock = threading.RLock()  # reentrant: a finaliser may run inside (a garbage collection)
_workers: Dict[Tuple[int, str], Dict[int, _Mapped]] = {}  # worker key -> slot number -> mapping



def _forget_exited_workers() -> None:
    """Drops the mappings of workers that exited (under ``_lock``)."""
    for key in [key for key in _workers if not process_alive(key[0])]:
        del _workers[key]


def _received(key: Tuple[int, str], index: Optional[int], storage: Any) -> _Received:
    if index is None:  # a one-off slot: mapped for this batch only
        return _Received(_Mapped(storage))
    with _lock:
        slots = _workers.get(key)
        if slots is None:
            _forget_exited_workers()
            slots = _workers[key] = {}
        if storage is not None:
            mapped = slots[index] = _Mapped(storage)
            mapped.header[MAPPED] = 1
        else:
            mapped = slots.get(index)
            if mapped is None:
                raise RuntimeError(f"shardfeed: a batch from worker process {key[0]} refers to its slot {index}, "
                                   "which this process never received: a worker's batches must be unpickled by "
                                   "the process that started the worker")
    return _Received(mapped)


def _lent_tensor(received: _Received, dtype: str, shape: Tuple[int, ...], offset: int) -> torch.Tensor:
    """In the main process: the tensor of one field of a received batch, over the slot's mapping.
    The array under it is the batch's own (its base is the slot's mapping, not another array),
    so its finaliser runs once every view of the tensor is freed."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    array = received.mapped.memory[offset:offset + size].view(dtype).reshape(shape)
    with _lock:
        received.live += 1
    finaliser = weakref.finalize(array, received.release_one)
    finaliser.atexit = False
    return torch.from_numpy(array)


def _forget_in_child() -> None:
    """A forked child starts with no mappings of its own to keep and a lock nobody holds."""
    global _lock
    _lock = threading.RLock()
    _workers.clear()


os.register_at_fork(after_in_child=_forget_in_child)
