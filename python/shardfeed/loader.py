"""Batches for training: what a batch is (:class:`BatchPlan`), and the prefetching generator
(:func:`batches`) that reads the next batches on a background thread while the model trains.

An array handed to the consumer is never written while anything else references it: Keras
(TensorFlow backend) wraps 64-byte-aligned numpy arrays without copying and reads them later,
keeps the first batches of a generator, and queues batches between workers, so writing into an
array it was given corrupts training batches (see tests/test_keras.py, the buffer-reuse test).

But a fresh array per batch is not free: above glibc's mmap threshold (it adapts up to 32 MiB) each new
array is mapped, page-faulted and zeroed by the kernel, which for a 38 MiB batch of images costs
more than reading it. So a plan keeps the output arrays it allocated and handed out (a few sets,
the least recently handed out dropped first) and reads a later batch into a set again once
nothing but the pool references any of its arrays: ``sys.getrefcount`` at the count of an array
only the pool holds, no weak references, and the shape, dtype and flags it was handed out with.
Anything that can still read an array holds a reference to it: a view holds its base (the array
handed out, or for an array that does not own its memory, the owner, whose count the pool checks
too), a TensorFlow tensor wrapping it holds it (``tf.numpy_function`` and
``Dataset.from_generator`` outputs included, until the tensor is freed), a ``memoryview`` or
buffer export holds it. The check and the claim (the reader's own reference) happen under the
pool's lock, so two threads never take the same set. Only batches of at least
``RECYCLE_MIN_BYTES`` (4 MiB) are recycled: smaller blocks come back from glibc's heap without
page faults, and the checks would cost more than they save. Only arrays the loader allocated are
recycled, never arrays a ``transform`` returns (the arrays read before a transform are, once the
transform and whatever it returned drop them). A variable-length field is recycled only with a
fixed ``maxlen`` (else its padded length changes with the batch). ``recycle=False`` turns this off
(a fresh array per batch, as before); so does a Python without exact reference counts (not
CPython, or a free-threaded build).
"""

from __future__ import annotations

import itertools
import os
import queue
import sys
import sysconfig
import threading
import weakref
from collections import abc
from typing import Any, Callable, Dict, Generator, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from .order import Sampler, as_subset

DEFAULT_PREFETCH = 2
DEFAULT_POOL_SIZE = 4  # sets of output arrays a plan keeps for reuse, unless its caller says otherwise
# Batches whose output arrays total less than this are read into new arrays even with ``recycle``:
# glibc's heap hands a freed block of that size back without page faults, so a new array costs
# nothing, while the pool's checks cost ~30 us a batch (benchmarks/RESULTS.md, "Recycling").
RECYCLE_MIN_BYTES = 4 << 20
# After a batch that missed the page cache, the next batch is read ahead for this many batches.
READAHEAD_BATCHES = 8
# A generator's pool: the prefetch queue, the batch being read, the consumer's batch, and Keras's
# (the two batches it peeks at and keeps, and what tf.data holds; see benchmarks/RESULTS.md).
GENERATOR_POOL_EXTRA = 4

# A normalised structure: ("one", name), ("seq", (names...)) or ("map", ((key, name), ...)).
_Structure = Tuple[str, Any]


def _structure(value: Any, what: str) -> Optional[_Structure]:
    if value is None:
        return None
    if isinstance(value, str):
        return ("one", value)
    if isinstance(value, abc.Mapping):
        items = tuple(value.items())
        if not items or not all(isinstance(k, str) and isinstance(v, str) for k, v in items):
            raise TypeError(f"{what} as a dict must map names (str) to field names (str), got {value!r}")
        return ("map", items)
    if isinstance(value, (list, tuple)):
        names = tuple(value)
        if not names or not all(isinstance(v, str) for v in names):
            raise TypeError(f"{what} as a list must hold field names (str), got {value!r}")
        return ("seq", names)
    raise TypeError(f"{what} must be a field name, a list of names or a dict {{name: field}}, got {value!r}")


def _names(structure: Optional[_Structure]) -> List[str]:
    if structure is None:
        return []
    kind, value = structure
    if kind == "one":
        return [value]
    if kind == "seq":
        return list(value)
    return [name for _, name in value]


def _arrange(structure: _Structure, arrays: Mapping[str, Any]) -> Any:
    kind, value = structure
    try:
        if kind == "one":
            return arrays[value]
        if kind == "seq":
            return tuple(arrays[name] for name in value)
        return {key: arrays[name] for key, name in value}
    except KeyError as exc:
        raise KeyError(f"the batch has no field {exc.args[0]!r} (it has {sorted(arrays)}); a transform must "
                       "return every field named in inputs, targets and sample_weights") from None


# Exact reference counts: CPython with the GIL (a count read under the pool's lock stays true until
# the lock is released, since only the pool could hand out a new reference). Not free-threaded builds.
RECYCLING_SUPPORTED = sys.implementation.name == "cpython" and not sysconfig.get_config_var("Py_GIL_DISABLED")

_Layout = Tuple[Tuple[Tuple[int, ...], np.dtype], ...]


def _refcounts(objects: Tuple[Any, ...]) -> List[int]:
    return [sys.getrefcount(obj) for obj in objects]


def _calibrate() -> List[int]:
    """What :func:`_refcounts` says of an array that only a pool's tuple references, and of the
    array whose memory it views (its base), referenced by that tuple and by the view's ``base``:
    measured, since the count includes the interpreter's own temporary references."""
    owner = np.empty(2)
    objects = (owner[:1], owner)
    del owner
    return _refcounts(objects)


_ALONE, _ALONE_BASE = _calibrate() if RECYCLING_SUPPORTED else (-1, -1)


def _owners(array: np.ndarray) -> List[Any]:
    """The objects whose memory ``array`` views: its base, the base's base... (numpy points a view
    of a view at the first owner of the data, past the array handed out, so a view of an array
    that does not own its data holds a reference to its owner, not to the array)."""
    owners = []
    base = array.base
    while base is not None:
        owners.append(base)
        base = base.base if isinstance(base, np.ndarray) else None
    return owners


def _as_handed_out(objects: Tuple[Any, ...], layout: _Layout) -> bool:
    """No weak references (a holder of one could still get the array), and the arrays' shapes,
    dtypes and the flags an ``out=`` array needs (a holder can reshape it in place, or make it
    read-only)."""
    if any(weakref.getweakrefcount(obj) for obj in objects):
        return False
    for array, (shape, dtype) in zip(objects, layout):
        flags = array.flags
        if array.shape != shape or array.dtype != dtype or not (flags.c_contiguous and flags.writeable
                                                                and flags.aligned):
            return False
    return True


class ArrayPool:
    """Sets of output arrays a :class:`BatchPlan` allocated and handed out (``fields``, in that
    order), at most ``capacity`` of them, the least recently handed out dropped first. :meth:`take`
    returns a set that nothing but the pool references (nor anything viewing the same memory), or
    None; :meth:`add` keeps a new one. ``allocated`` and ``reused`` count the sets added and taken.
    Thread-safe; a pickled or forked copy starts empty."""

    def __init__(self, fields: List[str], capacity: int):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"pool size must be an int >= 1, got {capacity!r}")
        self.fields = list(fields)
        self.capacity = capacity
        self.allocated = 0
        self.reused = 0
        self._lock = threading.Lock()
        # (batch length, (arrays..., their owners...), the counts that mean "only the pool", the
        # arrays' shapes and dtypes), least recently handed out first
        self._sets: List[Tuple[int, Tuple[Any, ...], List[int], _Layout]] = []
        _POOLS.add(self)

    def __reduce__(self) -> Any:
        return (ArrayPool, (self.fields, self.capacity))

    def __len__(self) -> int:
        return len(self._sets)

    def take(self, length: int) -> Optional[Dict[str, np.ndarray]]:
        """A dict ``field -> array`` (a batch of ``length`` samples) to read into, or None."""
        with self._lock:
            i = 0
            while i < len(self._sets):
                entry = self._sets[i]
                if entry[0] == length and _refcounts(entry[1]) == entry[2]:
                    del self._sets[i]
                    if _as_handed_out(entry[1], entry[3]):
                        self._sets.append(entry)  # now the most recently handed out
                        self.reused += 1
                        # The dict references every array before the lock is released: no other
                        # thread finds this set unreferenced until the caller drops it.
                        return dict(zip(self.fields, entry[1]))
                    continue  # reshaped, made read-only or weakly referenced by its last holder: dropped
                i += 1
        return None

    def add(self, length: int, arrays: List[np.ndarray]) -> None:
        """Keeps ``arrays`` (this pool's fields of a batch of ``length`` just allocated)."""
        owners = [owner for array in arrays for owner in _owners(array)]
        entry = (length, tuple(arrays) + tuple(owners), [_ALONE] * len(arrays) + [_ALONE_BASE] * len(owners),
                 tuple((array.shape, array.dtype) for array in arrays))
        del owners
        with self._lock:
            self._sets.append(entry)
            self.allocated += 1
            dropped = self._sets[:-self.capacity]
            del self._sets[:-self.capacity]
        del dropped  # freed (if unreferenced) outside the lock

    def clear(self) -> None:
        """Drops every set (arrays still in use elsewhere stay alive there)."""
        with self._lock:
            dropped, self._sets = self._sets, []
        del dropped

    def _after_fork(self) -> None:
        self._lock = threading.Lock()  # the parent's may have been held by a thread the child lacks
        self._sets = []


_POOLS: "weakref.WeakSet[ArrayPool]" = weakref.WeakSet()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: [pool._after_fork() for pool in list(_POOLS)])


class BatchPlan:
    """Everything about a batch except when it is read: which samples (a :class:`~shardfeed.Sampler`
    over a dataset or view), which fields and how they are read (``dtype``, ``scale``, ``offset``,
    ``maxlen``, ``pad_value`` as in ``Dataset.read``), an optional ``transform``, and how the
    fields are arranged into the ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` tuples that
    Keras expects. ``plan.load(step)`` reads global step ``step``; it is thread-safe, and the plan
    pickles (with its dataset, by path) for worker processes when ``transform`` does.

    With ``recycle`` (the default) the plan keeps up to ``pool_size`` sets of the output arrays it
    handed out in ``plan.pool`` (an :class:`ArrayPool`; None when off) and reads into a set again
    once nothing else references it (see the module docstring); :meth:`release` drops them."""

    def __init__(self, source: Any, batch_size: int, *, inputs: Any = None, targets: Any = None,
                 sample_weights: Any = None, shuffle: bool = True, seed: int = 0, drop_remainder: bool = False,
                 transform: Optional[Callable[[Any], Mapping[str, Any]]] = None, dtype: Any = "float32",
                 fields: Any = None, scale: Any = None, offset: Any = None, maxlen: Any = None, pad_value: Any = 0,
                 shuffle_block: int = 1, recycle: bool = True, pool_size: int = DEFAULT_POOL_SIZE):
        self.view = as_subset(source)
        self.dataset = self.view.dataset
        self.sampler = Sampler(self.view, batch_size, shuffle=shuffle, seed=seed, drop_remainder=drop_remainder,
                               shuffle_block=shuffle_block)
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be callable, got {transform!r}")
        self.transform = transform
        self.inputs = _structure(inputs, "inputs")
        self.targets = _structure(targets, "targets")
        self.sample_weights = _structure(sample_weights, "sample_weights")
        if self.inputs is None and (self.targets is not None or self.sample_weights is not None):
            raise ValueError("targets and sample_weights need inputs")
        if self.targets is None and self.sample_weights is not None:
            raise ValueError("sample_weights need targets (Keras reads (x, y, sample_weight))")
        named = list(dict.fromkeys(_names(self.inputs) + _names(self.targets) + _names(self.sample_weights)))
        available = self.dataset.fields
        if fields is None:
            read = [name for name in named if name in available] if named else list(available)
        else:
            read = [fields] if isinstance(fields, str) else list(fields)
        missing = [name for name in read if name not in available]
        if missing:
            raise KeyError(f"no field {missing[0]!r}; the dataset has {list(available)}")
        unread = [name for name in named if name not in read]
        if unread and transform is None:
            raise KeyError(f"no field {unread[0]!r} to read; the dataset has {list(available)} "
                           "(a transform can add fields)")
        self.fields = read
        self.read_options: Dict[str, Any] = {"dtype": dtype, "scale": scale, "offset": offset, "maxlen": maxlen,
                                             "pad_value": pad_value}
        # A read of no samples checks the options now (dtype, scale/offset shapes, pad values)
        # and gives each field's output dtype and shape.
        self.empty = self.dataset.read(np.empty(0, np.int64), self.fields, **self.read_options)
        if not isinstance(recycle, bool):
            raise TypeError(f"recycle must be True or False, got {recycle!r}")
        # A variable-length field has a fixed shape only with a maxlen (else the batch's longest row).
        limits = maxlen if isinstance(maxlen, abc.Mapping) else dict.fromkeys(self.fields, maxlen)
        fixed = [name for name in self.fields if name not in self.empty.lengths or limits.get(name) is not None]
        self._readahead_left = 0  # batches to read ahead for; see read()
        self.pool: Optional[ArrayPool] = None
        if recycle and fixed and RECYCLING_SUPPORTED and self._batch_bytes(fixed, limits) >= RECYCLE_MIN_BYTES:
            self.pool = ArrayPool(fixed, pool_size)

    def _batch_bytes(self, fixed: List[str], limits: Mapping[str, Any]) -> int:
        """Bytes of a full batch's output arrays of the fields ``fixed``."""
        total = 0
        for name in fixed:
            empty = self.empty[name]
            shape = list(empty.shape[1:])
            if name in self.empty.lengths:
                shape[0] = int(limits[name])
            total += int(np.prod(shape, dtype=np.int64)) * empty.dtype.itemsize
        return total * self.sampler.batch_size

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def read(self, step: int):
        """Global step ``step`` as a :class:`~shardfeed.Batch` of fields (transformed, if the plan
        has a transform). It carries ``indices`` (dataset indices), ``epoch`` and ``step``.

        While the batches read miss the page cache (and for ``READAHEAD_BATCHES`` batches after
        the last one that did), the records of step ``step + 1`` are read ahead
        (``Dataset.readahead``) before this step is read, so the disk has the next batch's requests
        queued while this one's last reads complete, instead of running dry at the end of every
        batch. Page-cached data costs no readahead calls."""
        indices = self.sampler.indices(step)
        if self._readahead_left > 0:
            self.dataset.readahead(self.sampler.indices(step + 1))
        pool = self.pool
        out = None if pool is None else pool.take(len(indices))
        batch = self.dataset.read(indices, self.fields, out=out, **self.read_options)
        if batch.uncached:
            self._readahead_left = READAHEAD_BATCHES
        elif self._readahead_left > 0:
            self._readahead_left -= 1
        if pool is not None and out is None:
            pool.add(len(indices), [batch[name] for name in pool.fields])
        del out
        batch.indices = indices
        batch.epoch = step // len(self.sampler)
        batch.step = step
        if self.transform is not None:
            result = self.transform(batch)
            if not isinstance(result, abc.Mapping):
                raise TypeError(f"transform must return a mapping of field name -> array, got {type(result).__name__}")
            return result
        return batch

    def arrange(self, batch: Mapping[str, Any]) -> Any:
        """Fields -> ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``; the batch itself without inputs."""
        if self.inputs is None:
            return batch
        x = _arrange(self.inputs, batch)
        if self.targets is None:
            return (x,)
        y = _arrange(self.targets, batch)
        if self.sample_weights is None:
            return (x, y)
        return (x, y, _arrange(self.sample_weights, batch))

    def load(self, step: int) -> Any:
        """Reads and arranges global step ``step``: what the generator yields and a Sequence returns."""
        return self.arrange(self.read(step))

    def release(self) -> None:
        """Drops the pooled output arrays (those still referenced elsewhere live on there)."""
        if self.pool is not None:
            self.pool.clear()

    def steps(self, epochs: Optional[int], start: Any = None) -> Iterable[int]:
        """Global steps from ``start`` (a step, ``(epoch, batch)`` or a saved position) to the end of
        epoch ``epochs - 1``, or forever when ``epochs`` is None."""
        first = 0 if start is None else self.sampler.step_of(start)
        if epochs is None:
            if len(self.sampler) == 0:
                raise ValueError(f"no batches to repeat: {self.sampler.samples} samples with batch_size "
                                 f"{self.sampler.batch_size} and drop_remainder={self.sampler.drop_remainder}")
            return itertools.count(first)
        epochs = int(epochs)
        if epochs < 0:
            raise ValueError(f"epochs must be None (forever) or an int >= 0, got {epochs}")
        stop = epochs * len(self.sampler)
        if first > stop:
            raise ValueError(f"start step {first} is past the end of epoch {epochs - 1} (step {stop})")
        return range(first, stop)


_VALUE, _END, _ERROR = range(3)


class Prefetcher:
    """Computes ``produce(step)`` for the steps ``first, first + 1, ...`` (up to ``stop``, or
    forever when ``stop`` is None), in order, on a named daemon thread, up to ``depth`` results
    ahead of the consumer (a bounded queue). :meth:`get` returns the next result, raises
    StopIteration after the last one and re-raises an exception of ``produce``. :meth:`close`
    stops the thread promptly (after the call to ``produce`` in progress, if any), drops the
    results not consumed and joins the thread; it is idempotent.

    When the consumer takes nothing for ``idle_s`` seconds, the thread drops its results and
    exits; the next :meth:`get` starts a new one at the first step not consumed. (TensorFlow
    never frees a generator that ``model.fit`` consumed, so a generator that is not closed
    would otherwise keep its thread and ``depth`` batches for the life of the process.) The
    steps are recomputed, so ``produce`` must be a pure function of the step, as ``BatchPlan.load``
    is (a transform included, if its randomness is seeded from the step). ``release()``, if
    given, is called after the results are dropped (idle or closed): ``BatchPlan.release``."""

    POLL_S = 0.1
    IDLE_S = 10.0

    def __init__(self, produce: Callable[[int], Any], first: int = 0, stop: Optional[int] = None,
                 depth: int = DEFAULT_PREFETCH, name: str = "shardfeed-prefetch", idle_s: Optional[float] = None,
                 release: Optional[Callable[[], None]] = None):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth must be an int >= 1, got {depth!r}")
        self._produce = produce
        self._release = release
        self._stop_step = stop
        self._name = name
        self._idle_s = self.IDLE_S if idle_s is None else idle_s
        self._queue: "queue.Queue[Tuple[int, int, Any]]" = queue.Queue(maxsize=depth)
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._finished = False
        self._next = first  # the step the consumer receives next
        self._thread: Optional[threading.Thread] = None
        self._parked = threading.Event()  # set by a thread that stops for idleness
        self._start(first)

    def _start(self, first: int) -> None:
        self._parked = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(first, self._parked), name=self._name, daemon=True)
        self._thread.start()

    def _run(self, first: int, parked: threading.Event) -> None:
        steps: Iterable[int] = itertools.count(first) if self._stop_step is None else range(first, self._stop_step)
        try:
            for step in steps:
                if self._closed.is_set():
                    return
                value = self._produce(step)
                if not self._put((step, _VALUE, value), parked):
                    return
                del value
            self._put((-1, _END, None), parked)
        except BaseException as exc:  # noqa: B902 - handed to the consumer, whatever it is
            self._put((-1, _ERROR, exc), parked)

    def _put(self, message: Tuple[int, int, Any], parked: threading.Event) -> bool:
        waited = 0.0
        while not self._closed.is_set():
            try:
                self._queue.put(message, timeout=self.POLL_S)
                return True
            except queue.Full:
                waited += self.POLL_S
                if waited >= self._idle_s:
                    with self._lock:  # the consumer is away: free the batches and stop
                        parked.set()
                        self._drain()
                        if self._release is not None:
                            self._release()
                    return False
        return False

    def get(self) -> Any:
        if self._finished:
            raise StopIteration
        while True:
            try:
                step, kind, value = self._queue.get(timeout=self.POLL_S)
            except queue.Empty:
                with self._lock:
                    if self._parked.is_set():  # restart where the consumer is
                        self._drain()
                        self._start(self._next)
                    elif self._thread is not None and not self._thread.is_alive() and self._queue.empty():
                        self._finished = True
                        raise RuntimeError("the prefetch thread stopped without a result (was it closed?)") from None
                continue
            with self._lock:
                if self._parked.is_set() or (kind == _VALUE and step != self._next):
                    continue  # from a thread that parked: dropped, it will be recomputed
                if kind == _VALUE:
                    self._next = step + 1
                    return value
            self._finished = True
            if kind == _END:
                raise StopIteration
            raise value

    def close(self) -> None:
        self._closed.set()
        self._finished = True
        thread = self._thread
        if thread is not None and threading.current_thread() is not thread:
            while thread.is_alive():
                self._drain()  # unblocks a producer waiting on a full queue at once
                thread.join(timeout=0.01)
        self._drain()
        if self._release is not None:
            self._release()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    @property
    def thread(self) -> Optional[threading.Thread]:
        return self._thread

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _stream(plan: BatchPlan, first: int, stop: Optional[int], prefetch: int) -> Generator[Any, None, None]:
    if prefetch == 0:
        steps: Iterable[int] = itertools.count(first) if stop is None else range(first, stop)
        for step in steps:
            yield plan.load(step)
        return
    fetcher = Prefetcher(plan.load, first, stop, prefetch, release=plan.release)
    try:
        while True:
            yield fetcher.get()  # not held in a local: the frame keeps no batch while suspended
    except StopIteration:
        return
    finally:
        fetcher.close()


def batches(source: Any, batch_size: int, *, inputs: Any = None, targets: Any = None, sample_weights: Any = None,
            shuffle: bool = True, seed: int = 0, epochs: Optional[int] = None, prefetch: int = DEFAULT_PREFETCH,
            drop_remainder: bool = False, transform: Optional[Callable[[Any], Mapping[str, Any]]] = None,
            dtype: Any = "float32", start: Any = None, fields: Any = None, scale: Any = None, offset: Any = None,
            maxlen: Any = None, pad_value: Any = 0, shuffle_block: int = 1,
            recycle: bool = True) -> Generator[Any, None, None]:
    """A generator of batches of a dataset or view, read ahead on a background thread.

    Yields ``(x, y)`` tuples (``(x,)`` without ``targets``, ``(x, y, sample_weight)`` with
    ``sample_weights``), as ``model.fit`` expects; ``inputs``, ``targets`` and ``sample_weights``
    are each a field name, a list of names (a tuple of arrays, for a model with several inputs or
    outputs) or a dict ``{model input/output name: field}`` (named inputs/outputs). Without
    ``inputs`` it yields each batch's dict of fields (a :class:`~shardfeed.Batch`).

    Every epoch is a new uniformly random order of all the samples (a pure function of ``seed``
    and the epoch; storage order without ``shuffle``), cut into ``batch_size`` batches; the last
    one is smaller unless ``drop_remainder``. ``shuffle_block=k`` shuffles blocks of ``k``
    consecutive samples instead (see :class:`~shardfeed.Sampler`): for slow disks, where reading
    runs of adjacent records is much faster. ``epochs=None`` never ends (for
    ``model.fit(gen, steps_per_epoch=...)``); otherwise the generator ends with epoch
    ``epochs - 1``. ``start`` resumes exactly: a global step (``epoch * batches_per_epoch +
    batch``), ``(epoch, batch)`` or a ``Sampler.position`` dict; the batches are then the very
    ones an uninterrupted run would have read.

    ``fields`` (default: those named above), ``dtype`` (default float32 for every field),
    ``scale``, ``offset``, ``maxlen`` and ``pad_value`` are passed to ``Dataset.read``.
    ``transform(batch) -> dict`` (augmentation) runs on the prefetch thread on each batch's dict
    of fields, which also carries ``batch.indices``, ``batch.epoch`` and ``batch.step`` (seed an
    augmentation's randomness from them to keep runs reproducible).

    ``prefetch`` batches are read ahead (0: read in the consumer's thread); the reads run on the
    native threads with the GIL released, so they overlap the training step. An array once yielded
    is never written again while anything references it (a view of it included); with
    ``recycle`` (the default, needs ``prefetch > 0``) a batch is read into the arrays of an earlier
    batch that nothing references any more, instead of new ones (see :mod:`shardfeed.loader`).
    ``close()`` (or leaving ``with contextlib.closing(gen):``, or dropping the generator) stops
    the thread and drops the kept arrays; so does an idle thread. Do not use a generator
    as Keras ``validation_data`` (Keras 3 replays its first batches every validation run): use
    :class:`shardfeed.keras.ShardSequence` there."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    plan = BatchPlan(source, batch_size, inputs=inputs, targets=targets, sample_weights=sample_weights,
                     shuffle=shuffle, seed=seed, drop_remainder=drop_remainder, transform=transform, dtype=dtype,
                     fields=fields, scale=scale, offset=offset, maxlen=maxlen, pad_value=pad_value,
                     shuffle_block=shuffle_block, recycle=recycle, pool_size=prefetch + GENERATOR_POOL_EXTRA)
    if prefetch == 0:
        plan.pool = None  # no prefetch thread to drop the kept arrays of a generator TensorFlow keeps
    steps = plan.steps(epochs, start)
    first = 0 if start is None else plan.sampler.step_of(start)
    return _stream(plan, first, steps.stop if isinstance(steps, range) else None, prefetch)
