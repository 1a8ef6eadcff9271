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

Small batches (under ``GROUP_BYTES / 2``) are read several at a time: one ``Dataset.read`` for a
group of consecutive steps, each batch a view of that read's new arrays (never written again
either), handed to the consumer together; while it waits, the consumer reads the group after
(``Prefetcher``'s ``help_while_waiting``). A read's fixed cost and a thread hand-off are then paid
once per group instead of once per batch (benchmarks/RESULTS.md, "fourth session: the loader as
fast as a read").
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections import abc
from typing import Any, Callable, Dict, Generator, Iterable, Iterator, List, Mapping, Optional, Tuple

import numpy as np

from . import kerasfit
from ._prefetch import DEFAULT_PREFETCH, Prefetcher, StepPool  # noqa: F401 - StepPool: where front ends find it
from .dataset import Batch
from .order import Sampler
from .views import as_subset

# After a read that missed the page cache, the next read is read ahead for this many reads.
READAHEAD_BATCHES = 8
# Batches under GROUP_BYTES / 2 are read several at a time: one Dataset.read of up to GROUP_BYTES
# of output for up to MAX_GROUP consecutive steps, cut into the steps' batches (views of one new
# array). A read costs ~15 us of Python and thread-pool start beside its copy, and a hand-off from
# the prefetch thread to the consumer 20-50 us on 2 loaded cores: at 128 B records (64 KiB
# batches) the loader delivered 0.36-0.5x of one ds.read per batch; reading 8 batches per read
# (512 KiB) costs 20 us per batch against 35 (16: 20, 32: 24) (benchmarks/RESULTS.md, "fourth
# session: the loader as fast as a read").
GROUP_BYTES = 512 << 10
MAX_GROUP = 16
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
        self._readahead_left = 0  # reads to read ahead for; see read_group()
        self.group = self._group_size(batch_size)
        # Whether a prefetching consumer that waits may read a group itself (Prefetcher's
        # help_while_waiting): for small batches, whose reads are mostly Python overhead that a
        # second thread runs beside the first (128 B records: 1.9x the loader without it); not for
        # large ones, whose copies on the native threads a second read only competes with (8 KiB
        # records, 4 MiB batches: 0.35x without it), nor with a transform (it runs on the
        # prefetch thread, as documented).
        self.helped = self.group > 1 and self.transform is None
        # Whether a prefetching consumer that waits for every batch and does little between them
        # reads its batches itself while the reads find their records in the page cache
        # (Prefetcher's inline_when, with reads_cached): for batches too large to be helped, whose
        # copies a prefetch thread only slows (4 MiB batches of 8 KiB records: 0.7x of ds.read
        # with the thread, ~0.95x without); not with a transform (it runs on the prefetch thread).
        self.inlined = self.group == 1 and self.transform is None

    def _group_size(self, batch_size: int) -> int:
        """Steps read together (see ``GROUP_BYTES``): 1 where a batch is ``GROUP_BYTES / 2`` or
        more, or has variable-length fields (each batch is padded to its own longest sample)."""
        if self.empty.lengths:
            return 1
        sample_bytes = sum(math.prod(array.shape[1:]) * array.itemsize for array in self.empty.values())
        return max(1, min(MAX_GROUP, GROUP_BYTES // max(1, sample_bytes * batch_size)))

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.sampler)

    def reads_cached(self) -> bool:
        """Whether none of the last ``READAHEAD_BATCHES`` reads waited for the disk (direct reads
        always do): reads that cost CPU time, not waiting, which a second thread cannot overlap."""
        return self._readahead_left == 0

    def read(self, step: int):
        """Global step ``step`` as a :class:`~shardfeed.Batch` of fields (transformed, if the plan
        has a transform). It carries ``indices`` (dataset indices), ``epoch`` and ``step``."""
        indices = self.sampler.indices(step)
        if self._readahead_left > 0:
            self.dataset.readahead(self.sampler.indices(step + 1))
        batch = self.dataset.read(indices, self.fields, **self.read_options)
        self._counted(batch.uncached)
        return self._labelled(batch, indices, step)

    def _counted(self, uncached: int) -> None:
        """Counts down the reads to read ahead for (see :meth:`read_group`) after a read that
        found all but ``uncached`` of its records in the page cache."""
        if uncached:
            self._readahead_left = READAHEAD_BATCHES
        elif self._readahead_left > 0:
            self._readahead_left -= 1

    def _labelled(self, batch: Batch, indices: np.ndarray, step: int) -> Any:
        """The batch of ``step`` labelled with its ``indices``, epoch and step, then transformed."""
        batch.indices = indices
        batch.epoch = step // len(self.sampler)
        batch.step = step
        if self.transform is None:
            return batch
        result = self.transform(batch)
        if not isinstance(result, abc.Mapping):
            raise TypeError(f"transform must return a mapping of field name -> array, got {type(result).__name__}")
        return result

    def read_group(self, first: int, count: int) -> Iterator[Any]:
        """The batches of steps ``first`` to ``first + count - 1``, in order, read with one
        ``Dataset.read`` (each batch's arrays are views of that read's arrays, which nothing
        writes again) and transformed one by one; each is exactly what :meth:`read` gives for its
        step, but ``uncached`` (the read's count is on its first batch). Should the read fail, the
        steps are read one by one, so that the batches before the failing one come first and
        the error is the one a read of that step raises.

        While reads miss the page cache (and for ``READAHEAD_BATCHES`` reads after the last one
        that did), the records of the next ``count`` steps are read ahead
        (``Dataset.readahead``) before these are read, so the disk has the next read's requests
        queued while this one's last reads complete, instead of running dry at the end of every
        read. Page-cached data costs no readahead calls."""
        if count == 1:
            yield self.read(first)
            return
        steps = range(first, first + count)
        indices = [self.sampler.indices(step) for step in steps]
        if self._readahead_left > 0:
            self.dataset.readahead(np.concatenate([self.sampler.indices(step)
                                                   for step in range(first + count, first + 2 * count)]))
        try:
            whole = self.dataset.read(np.concatenate(indices), self.fields, **self.read_options)
        except Exception:  # noqa: BLE001 - read again step by step, to raise at the right one
            for step in steps:
                yield self.read(step)
            return
        self._counted(whole.uncached)
        at = 0
        for step, step_indices in zip(steps, indices):
            end = at + len(step_indices)
            batch = Batch({name: array[at:end] for name, array in whole.items()},
                          uncached=whole.uncached if step == first else 0)
            at = end
            yield self._labelled(batch, step_indices, step)
            del batch

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

    def load_group(self, first: int, count: int) -> Iterator[Any]:
        """:meth:`load` of the steps ``first`` to ``first + count - 1``, read together
        (:meth:`read_group`)."""
        for batch in self.read_group(first, count):
            yield self.arrange(batch)
            del batch

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
        step = first
        while stop is None or step < stop:
            count = plan.group if stop is None else min(plan.group, stop - step)
            yield from plan.load_group(step, count)
            step += count
        return
    fetcher = Prefetcher(plan.load, first, stop, prefetch, group=plan.group, produce_group=plan.load_group,
                         help_while_waiting=plan.helped, inline_when=plan.reads_cached if plan.inlined else None)
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
    runs on the prefetch thread. Without a transform, batches of 256 KiB or more are read on the
    consumer's thread instead while their reads are page-cached and the consumer comes back for
    every batch at once (``Prefetcher``'s ``inline_when``): a thread cannot overlap anything then.
    Batches under 256 KiB are read ``plan.group`` at a time (one read of up to 512 KiB, see
    :class:`BatchPlan`), and ``prefetch`` then counts such groups. An array once yielded is never
    written again; a new batch takes back the memory of batches nothing references any more (see
    :mod:`shardfeed.loader`).
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
