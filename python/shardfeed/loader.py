"""Batches for training: what a batch is (:class:`BatchPlan`), and the prefetching generator
(:func:`batches`) that reads the next batches on a background thread while the model trains.

An array handed to the consumer is never written again: Keras (TensorFlow backend) wraps
64-byte-aligned numpy arrays without copying and reads them later, keeps the first batches of a
generator, and queues batches between workers, so writing into an array it was given corrupts
training batches (see tests/test_keras.py, the buffer-reuse test). Every batch is a new set of
arrays from ``Dataset.read``, whose arrays of 1 MiB or more take back the memory of arrays numpy
has freed (``_core.BatchMemory``): a batch the consumer dropped lends its pages to a later one,
without the page faults of fresh memory, and memory anything still references (a view, a
TensorFlow tensor wrapping it, Keras's queue) is never handed out again.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import queue
import threading
import weakref
from collections import abc
from typing import Any, Callable, Dict, Generator, Iterable, List, Mapping, Optional, Tuple

import numpy as np

from . import kerasfit
from .order import Sampler
from .views import as_subset

DEFAULT_PREFETCH = 2
# After a batch that missed the page cache, the next batch is read ahead for this many batches.
READAHEAD_BATCHES = 8
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


@dataclasses.dataclass(frozen=True)
class FeedOptions:
    """What a training batch holds and how it is read: the options every front end takes
    (:func:`batches`, :class:`~shardfeed.keras.ShardSequence`, :func:`~shardfeed.tf.to_tf_dataset`),
    declared here once. Each front end passes its keyword arguments to :meth:`from_kwargs`, and a
    :class:`BatchPlan` holds the result as ``plan.options``.

    Which samples:
        ``shuffle`` (default True): a new uniformly random order of every sample each epoch, a
        pure function of ``(seed, epoch)``; storage order without. ``seed`` (int >= 0).
        ``shuffle_block=k`` (k > 1): shuffle blocks of ``k`` consecutive samples instead, for slow
        disks (see :class:`~shardfeed.Sampler`). ``drop_remainder``: drop each epoch's last,
        smaller batch.
    How the fields are arranged:
        ``inputs``, ``targets`` and ``sample_weights`` are each a field name, a list of names (a
        tuple of arrays, for a model with several inputs or outputs) or a dict ``{model
        input/output name: field}``; a batch is ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)``,
        or without ``inputs`` the dict of fields (a :class:`~shardfeed.Batch`).
    How they are read (``Dataset.read``'s options):
        ``fields`` (default: those named above); ``dtype`` (default ``"auto"``: float fields as
        float32, integer and bool fields in their stored dtype, fields with ``scale``/``offset``
        as float32; or float16, bfloat16, a dtype per field...: the table is in
        docs/training.md, "Output dtypes"); ``lossy`` (a conversion that cannot give back every
        stored value exactly raises unless True, or ``{field: True}``); ``scale``, ``offset``;
        for variable-length fields ``maxlen``, ``pad_value``, ``padding`` and ``truncating``
        (``"post"``, the default, or ``"pre"``, as in ``keras.utils.pad_sequences``).
    ``transform(batch) -> dict``:
        runs on each batch's dict of fields (with ``batch.indices``, ``batch.epoch`` and
        ``batch.step``: seed an augmentation's randomness from them to keep runs reproducible)
        and returns the fields to arrange.
    """

    inputs: Any = None
    targets: Any = None
    sample_weights: Any = None
    shuffle: bool = True
    seed: int = 0
    shuffle_block: int = 1
    drop_remainder: bool = False
    transform: Optional[Callable[[Any], Mapping[str, Any]]] = None
    fields: Any = None
    dtype: Any = "auto"
    lossy: Any = False
    scale: Any = None
    offset: Any = None
    maxlen: Any = None
    pad_value: Any = 0
    padding: Any = "post"
    truncating: Any = "post"

    @classmethod
    def names(cls) -> Tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_kwargs(cls, where: str, kwargs: Mapping[str, Any], base: Optional["FeedOptions"] = None) -> "FeedOptions":
        """The options in ``kwargs`` (over ``base``, default the defaults); an unknown name is a
        TypeError that names ``where`` and the options there are."""
        unknown = [name for name in kwargs if name not in cls.names()]
        if unknown:
            raise TypeError(f"{where} got an unexpected keyword argument {unknown[0]!r}; its feed options are "
                            f"{', '.join(cls.names())} (see shardfeed.loader.FeedOptions)")
        return dataclasses.replace(base if base is not None else cls(), **kwargs)

    def read_options(self) -> Dict[str, Any]:
        """The keyword arguments of ``Dataset.read`` (all but ``fields``)."""
        return {"dtype": self.dtype, "lossy": self.lossy, "scale": self.scale, "offset": self.offset,
                "maxlen": self.maxlen, "pad_value": self.pad_value, "padding": self.padding,
                "truncating": self.truncating}


class BatchPlan:
    """Everything about a batch except when it is read: which samples (a :class:`~shardfeed.Sampler`
    over a dataset or view), which fields and how they are read, an optional ``transform``, and
    how the fields are arranged into the ``(x,)``, ``(x, y)`` or ``(x, y, sample_weight)`` tuples
    that Keras expects: the :class:`FeedOptions`, given as ``options`` and/or keyword arguments.
    ``plan.load(step)`` reads global step ``step``; it is thread-safe, and the plan pickles (with
    its dataset, by path) for worker processes when ``transform`` does."""

    def __init__(self, source: Any, batch_size: int, options: Optional[FeedOptions] = None, **kwargs: Any):
        if options is not None and not isinstance(options, FeedOptions):
            raise TypeError(f"options must be a FeedOptions, got {type(options).__name__}")
        self.options = options = FeedOptions.from_kwargs("BatchPlan", kwargs, options)
        self.view = as_subset(source)
        self.dataset = self.view.dataset
        self.sampler = Sampler(self.view, batch_size, shuffle=options.shuffle, seed=options.seed,
                               drop_remainder=options.drop_remainder, shuffle_block=options.shuffle_block)
        if options.transform is not None and not callable(options.transform):
            raise TypeError(f"transform must be callable, got {options.transform!r}")
        self.transform = options.transform
        self.inputs = _structure(options.inputs, "inputs")
        self.targets = _structure(options.targets, "targets")
        self.sample_weights = _structure(options.sample_weights, "sample_weights")
        if self.inputs is None and (self.targets is not None or self.sample_weights is not None):
            raise ValueError("targets and sample_weights need inputs")
        if self.targets is None and self.sample_weights is not None:
            raise ValueError("sample_weights need targets (Keras reads (x, y, sample_weight))")
        named = list(dict.fromkeys(_names(self.inputs) + _names(self.targets) + _names(self.sample_weights)))
        available = self.dataset.fields
        fields = options.fields
        if fields is None:
            read = [name for name in named if name in available] if named else list(available)
        else:
            read = [fields] if isinstance(fields, str) else list(fields)
        missing = [name for name in read if name not in available]
        if missing:
            raise KeyError(f"no field {missing[0]!r}; the dataset has {list(available)}")
        unread = [name for name in named if name not in read]
        if unread and self.transform is None:
            raise KeyError(f"no field {unread[0]!r} to read; the dataset has {list(available)} "
                           "(a transform can add fields)")
        self.fields = read
        self.read_options: Dict[str, Any] = options.read_options()
        # A read of no samples checks the options now (dtype, scale/offset shapes, pad values)
        # and gives each field's output dtype and shape.
        self.empty = self.dataset.read(np.empty(0, np.int64), self.fields, **self.read_options)
        self._readahead_left = 0  # batches to read ahead for; see read()

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
        batch = self.dataset.read(indices, self.fields, **self.read_options)
        if batch.uncached:
            self._readahead_left = READAHEAD_BATCHES
        elif self._readahead_left > 0:
            self._readahead_left -= 1
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
    is (a transform included, if its randomness is seeded from the step)."""

    POLL_S = 0.1
    IDLE_S = 10.0

    def __init__(self, produce: Callable[[int], Any], first: int = 0, stop: Optional[int] = None,
                 depth: int = DEFAULT_PREFETCH, name: str = "shardfeed-prefetch", idle_s: Optional[float] = None):
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise ValueError(f"prefetch depth must be an int >= 1, got {depth!r}")
        self._produce = produce
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


_WORKER_PLAN: Optional[BatchPlan] = None  # the plan of a StepPool's worker process


def _set_worker_plan(plan: BatchPlan) -> None:
    global _WORKER_PLAN
    _WORKER_PLAN = plan


def _load_in_worker(step: int) -> Any:
    assert _WORKER_PLAN is not None, "a StepPool worker process without its plan"
    return _WORKER_PLAN.load(step)


class StepPool:
    """``plan.load(step)`` for the steps a consumer asks for, with the next ``depth`` steps read
    ahead on ``workers`` threads (or processes, with ``processes``: the plan is pickled to them
    once, its dataset reopened by path, and the batches come back pickled).

    Results are keyed by step: :meth:`get` returns exactly ``plan.load(step)`` whatever was asked
    before, and a read ahead that the consumer does not ask for next (it jumped, or restarted an
    epoch) is dropped, never handed out for another step. Thread-safe. :meth:`close` cancels the
    reads ahead and stops the workers; the pool also closes when it is garbage-collected and at
    interpreter exit. Processes start with the ``multiprocessing`` start method in effect."""

    def __init__(self, plan: BatchPlan, *, workers: int = 1, processes: bool = False, depth: int = DEFAULT_PREFETCH,
                 name: str = "shardfeed-steps"):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be an int >= 1, got {workers!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"the read-ahead depth must be an int >= 0, got {depth!r}")
        self.plan, self.workers, self.processes, self.depth, self.name = plan, workers, bool(processes), depth, name
        self._lock = threading.Lock()
        self._ahead: Dict[int, Any] = {}  # step -> Future
        self._executor: Any = None
        self._finalizer: Any = None

    def _start(self) -> Any:
        if self._executor is None:
            if self.processes:
                import multiprocessing
                self._executor = concurrent.futures.ProcessPoolExecutor(
                    self.workers, mp_context=multiprocessing.get_context(), initializer=_set_worker_plan,
                    initargs=(self.plan,))
            else:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
            self._finalizer = weakref.finalize(self, _shutdown, self._executor)
        return self._executor

    def _submit(self, step: int) -> Any:
        if self.processes:
            return self._start().submit(_load_in_worker, step)
        return self._start().submit(self.plan.load, step)

    def get(self, step: int) -> Any:
        with self._lock:
            future = self._ahead.pop(step, None)
            for other in [s for s in self._ahead if not step < s <= step + self.depth]:
                self._ahead.pop(other).cancel()
            if future is None and (self.depth == 0 and not self.processes):
                future = None  # read in the caller's thread below
            elif future is None:
                future = self._submit(step)
            for ahead in range(step + 1, step + self.depth + 1):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._submit(ahead)
        if future is None:
            return self.plan.load(step)
        return future.result()

    def cancel(self) -> None:
        """Drops the reads ahead (those not started are cancelled)."""
        with self._lock:
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()

    def close(self) -> None:
        self.cancel()
        with self._lock:
            finalizer, self._finalizer, self._executor = self._finalizer, None, None
        if finalizer is not None:
            finalizer()


def _shutdown(executor: Any) -> None:
    executor.shutdown(wait=True, cancel_futures=True)


def refuse_generator_as_validation(call: Optional[kerasfit.KerasCall]) -> None:
    """Refuses a ``fit`` whose ``validation_data`` is a generator of :func:`batches`: Keras 3
    replays a generator's first (peeked) batches at the start of every validation run, then
    continues it. Every shardfeed feed calls this when fit first reads it, so that the refusal
    comes before training (and the generator itself calls it when Keras first reads it)."""
    if (call is not None and call.method == "fit"
            and getattr(call.arguments.get("validation_data"), "gi_code", None) is _stream.__code__):
        raise ValueError("a shardfeed generator as validation_data: Keras replays a generator's first batches "
                         "at every validation run; pass a shardfeed.keras.ShardSequence(..., shuffle=False)")


def _refuse_inexact_keras_fit(plan: BatchPlan, epochs: Optional[int], started: bool) -> None:
    """Called on a generator's first ``next``: when that is Keras's ``fit`` peeking at it, refuses
    the uses in which the batches Keras trains could not be the sampler's epoch after epoch."""
    call = kerasfit.keras_call()
    if call is None or call.method != "fit":
        return
    arguments = call.arguments
    per_epoch = len(plan.sampler)
    refuse_generator_as_validation(call)
    if kerasfit.distributed(call.model):
        raise ValueError("model.fit(generator) under tf.distribute: Keras reads ahead from the generator to build "
                         "the model and drops what it read, so batches would be skipped; use "
                         "ds.to_tf_dataset(..., epochs=None) with steps_per_epoch, or a shardfeed.keras.ShardSequence")
    steps_per_epoch = arguments.get("steps_per_epoch")
    keras_epochs = int(arguments.get("epochs", 1)) - int(arguments.get("initial_epoch", 0))
    if steps_per_epoch is None and (epochs is None or keras_epochs > 1):
        raise ValueError(f"model.fit(generator) without steps_per_epoch: Keras ends its first epoch only when the "
                         f"generator ends, then replays the generator's first batches; pass "
                         f"steps_per_epoch={per_epoch} (the batches per epoch) with a generator of epochs=None, or "
                         "use a shardfeed.keras.ShardSequence")
    if steps_per_epoch is not None and steps_per_epoch != per_epoch:
        raise ValueError(f"model.fit(generator, steps_per_epoch={steps_per_epoch}): an epoch of this generator has "
                         f"{per_epoch} batches, so Keras's epochs would not be the data epochs; pass "
                         f"steps_per_epoch={per_epoch}, or train on a view (ds.head(n), ds.split(...)) for shorter "
                         "epochs")
    initial_epoch = int(arguments.get("initial_epoch", 0))
    if initial_epoch and not started:
        raise ValueError(f"model.fit(generator, initial_epoch={initial_epoch}) with a generator starting at epoch "
                         f"0: pass start=({initial_epoch}, 0) to batches() so that Keras epoch {initial_epoch} "
                         f"reads data epoch {initial_epoch}")


def _stream(plan: BatchPlan, first: int, stop: Optional[int], prefetch: int, epochs: Optional[int],
            started: bool) -> Generator[Any, None, None]:
    _refuse_inexact_keras_fit(plan, epochs, started)
    if prefetch == 0:
        steps: Iterable[int] = itertools.count(first) if stop is None else range(first, stop)
        for step in steps:
            yield plan.load(step)
        return
    fetcher = Prefetcher(plan.load, first, stop, prefetch)
    try:
        while True:
            yield fetcher.get()  # not held in a local: the frame keeps no batch while suspended
    except StopIteration:
        return
    finally:
        fetcher.close()


def batches(source: Any, batch_size: int, *, epochs: Optional[int] = None, prefetch: int = DEFAULT_PREFETCH,
            start: Any = None, **options: Any) -> Generator[Any, None, None]:
    """A generator of batches of a dataset or view, read ahead on a background thread.

    ``options`` are the :class:`FeedOptions` (``inputs``, ``targets``, ``sample_weights``,
    ``shuffle``, ``seed``, ``shuffle_block``, ``drop_remainder``, ``transform``, ``fields``,
    ``dtype``, ``lossy``, ``scale``, ``offset``, ``maxlen``, ``pad_value``, ``padding``,
    ``truncating``). It yields ``(x, y)`` tuples
    (``(x,)`` without ``targets``, ``(x, y, sample_weight)`` with ``sample_weights``), as
    ``model.fit`` expects, or each batch's dict of fields without ``inputs``.

    Every epoch is a new uniformly random order of all the samples (a pure function of ``seed``
    and the epoch; storage order without ``shuffle``), cut into ``batch_size`` batches.
    ``epochs=None`` never ends (for ``model.fit(gen, steps_per_epoch=...)``); otherwise the
    generator ends with epoch ``epochs - 1``. ``start`` resumes exactly: a global step
    (``epoch * batches_per_epoch + batch``), ``(epoch, batch)`` or a ``Sampler.position`` dict;
    the batches are then the very ones an uninterrupted run would have read.

    ``prefetch`` batches are read ahead (0: read in the consumer's thread); the reads run on the
    native threads with the GIL released, so they overlap the training step, and the transform
    runs on the prefetch thread. An array once yielded is never written again; a new batch takes
    back the memory of batches nothing references any more (see :mod:`shardfeed.loader`).
    ``close()`` (or leaving ``with contextlib.closing(gen):``, or dropping the generator) stops the
    thread and drops the batches read ahead; so does an idle thread. Do not use a generator
    as Keras ``validation_data`` (Keras 3 replays its first batches every validation run): use
    :class:`shardfeed.keras.ShardSequence` there."""
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        raise ValueError(f"prefetch must be an int >= 0, got {prefetch!r}")
    plan = BatchPlan(source, batch_size, FeedOptions.from_kwargs("batches()", options))
    steps = plan.steps(epochs, start)
    first = 0 if start is None else plan.sampler.step_of(start)
    return _stream(plan, first, steps.stop if isinstance(steps, range) else None, prefetch, epochs, start is not None)
