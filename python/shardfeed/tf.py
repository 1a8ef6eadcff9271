"""tf.data integration: :func:`to_tf_dataset`. Importing this module imports TensorFlow;
``import shardfeed`` does not."""

from __future__ import annotations

import threading
from typing import Any, Callable, Mapping, Optional

import numpy as np

try:
    import tensorflow as tf
except ImportError as exc:  # as shardfeed.keras: say which extra brings it
    raise ImportError(f"shardfeed.tf (Dataset.to_tf_dataset) needs TensorFlow ({exc}): "
                      "pip install 'shardfeed[tensorflow]'") from exc

from . import kerasfit
from .loader import BatchPlan, FeedOptions, refuse_generator_as_validation

__all__ = ["to_tf_dataset"]


def _signature(plan: BatchPlan, batch_dim: Optional[int]) -> Any:
    """The element spec from the fields' output dtypes and shapes (a read of no samples)."""
    maxlen = plan.options.maxlen
    specs = {}
    for name, array in plan.empty.items():
        shape = [batch_dim] + list(array.shape[1:])
        if name in plan.empty.lengths:  # variable length: padded to the batch's longest row unless maxlen
            limit = maxlen.get(name) if isinstance(maxlen, Mapping) else maxlen
            shape[1] = None if limit is None else int(limit)
        specs[name] = tf.TensorSpec(shape, tf.as_dtype(array.dtype), name=name)
    return plan.arrange(specs)


def _signature_from_sample(plan: BatchPlan, step: int, batch_dim: Optional[int]) -> Any:
    """The element spec from one batch (when a transform decides what a batch holds)."""
    sample = plan.load(step)
    return tf.nest.map_structure(
        lambda a: tf.TensorSpec([batch_dim] + list(np.shape(a)[1:]), tf.as_dtype(np.asarray(a).dtype)), sample)


def _element_spec(plan: BatchPlan, output_signature: Any, first: int, batch_dim: Optional[int]) -> Any:
    """The dataset's element spec: ``output_signature`` when given, else the fields' (no
    transform), else the first batch's (``first``: the step the dataset starts at)."""
    if output_signature is not None:
        return output_signature
    if plan.transform is None:
        return _signature(plan, batch_dim)
    if len(plan):
        return _signature_from_sample(plan, first, batch_dim)
    raise ValueError("cannot infer the output signature of an empty dataset with a transform: "
                     "pass output_signature")


def _step_loader(plan: BatchPlan, output_signature: Any) -> Callable[[Any], Any]:
    """The map function of the dataset: a step number (a scalar tensor) -> that step's batch, read
    by the plan in a ``tf.numpy_function`` call and checked against ``output_signature``."""
    flat_specs = tf.nest.flatten(output_signature)
    out_dtypes = [spec.dtype for spec in flat_specs]

    def read(step: np.ndarray) -> list:
        if step < 0:  # the end-of-pass marker (_Iterations): an empty stand-in, dropped before the output
            return [np.zeros([0 if d is None else d for d in spec.shape] if spec.shape.rank is not None else [],
                             spec.dtype.as_numpy_dtype) for spec in flat_specs]
        flat = tf.nest.flatten(plan.load(int(step)))
        arrays = []
        for array, spec in zip(flat, flat_specs):
            array = np.asarray(array)
            if array.dtype != spec.dtype.as_numpy_dtype:
                raise TypeError(f"batch {int(step)}: an array is {array.dtype}, the output signature says "
                                f"{spec.dtype.name} ({spec})")
            arrays.append(array)
        return arrays

    def load(step: tf.Tensor) -> Any:
        tensors = tf.numpy_function(read, [step], out_dtypes, name="shardfeed_read")
        return tf.nest.pack_sequence_as(output_signature, [
            tf.ensure_shape(t, spec.shape) for t, spec in zip(tensors, flat_specs)])

    return load


def to_tf_dataset(source: Any, batch_size: int, *, epochs: Optional[int] = 1, prefetch: int = tf.data.AUTOTUNE,
                  start: Any = None, num_parallel_calls: int = 1, output_signature: Any = None,
                  **options: Any) -> tf.data.Dataset:
    """A ``tf.data.Dataset`` whose elements are whole batches, the same batches, in the same order,
    as :func:`shardfeed.loader.batches` with the same options yields: ``(x, y)`` tuples (or
    ``(x,)``, ``(x, y, sample_weight)``, or a dict of fields without ``inputs``). ``options`` are
    the :class:`~shardfeed.loader.FeedOptions`.

    The dataset maps a range of global step numbers through ``tf.numpy_function`` calls that read
    each batch with the native reader (GIL released), ``num_parallel_calls`` at a time (default 1:
    a read already runs on all the native threads, and more calls at once only compete for the
    CPUs; raise it for a slow transform), in order, then prefetches ``prefetch`` batches. ``element_spec`` is exact: dtypes and shapes of the
    fields as read (the batch dimension is ``batch_size`` with ``drop_remainder``, else None; a
    variable-length dimension is ``maxlen`` or None). With a ``transform``, the spec is taken
    from the first batch (all but the batch dimension fixed) unless ``output_signature`` is given.

    Epochs: each iteration of the dataset reads ``epochs`` epochs (default 1), and each new
    iteration (a new ``iter()``, the next epoch of ``model.fit(ds, epochs=N)``, the next pass of
    ``ds.repeat()``, a pass over a dataset derived from this one with ``map``, ``batch``,
    ``prefetch``..., or over ``strategy.experimental_distribute_dataset(ds)``) reads the next
    ones, as tf.data's ``shuffle`` reshuffles every iteration: iteration ``r`` reads data epochs
    ``r * epochs`` to ``(r + 1) * epochs - 1``; the first iteration is the one that holds
    ``start`` (default step 0), from ``start`` on. The iteration is decided at its first read, in
    the tf.data graph, so every way of iterating counts once per pass. In ``model.fit(ds,
    epochs=N)`` (without ``steps_per_epoch``; with it, fit is refused), directly or derived, on
    any backend and under ``tf.distribute``, Keras epoch ``e`` trains data epoch ``e`` (counted
    from ``initial_epoch``): the pass is taken from fit's own epoch (:mod:`shardfeed.kerasfit`),
    and the pass Keras makes to build the model (then drops) is not counted. ``epochs=None``:
    one endless stream from ``start`` that every iteration starts again; for ``model.fit(ds,
    steps_per_epoch=len(sampler), epochs=N)``, which keeps one iteration for the whole fit.

    Resuming: the iterator checkpoints with ``tf.train.Checkpoint(iterator=it)`` (the dataset
    sets tf.data's external-state policy to ignore the batch-reading function, whose only state
    is the step it is given); an iterator restored from it, also in a fresh process, continues
    with the very next batch of the pass it was in, and the dataset's next iteration reads the
    epoch after that pass. A restarted ``model.fit`` resumes with ``start=`` (a step,
    ``(epoch, batch)`` or a ``Sampler.position``) and ``epochs=None``, e.g. ``start=backup.step``
    with :class:`shardfeed.keras.BackupAndRestore`.

    In ``tf.distribute``, ``strategy.experimental_distribute_dataset`` splits each global batch
    across replicas; with ``distribute_datasets_from_function``, give every input pipeline its
    own part with ``view.shard(ctx.input_pipeline_id, ctx.num_input_pipelines)`` and turn
    tf.data's auto-sharding off.

    ``tf.numpy_function`` wraps a 64-byte-aligned batch array without copying, and the tensor holds
    a reference to it until it is freed: a batch's memory goes to a later batch only once every
    tensor wrapping it is gone (see :mod:`shardfeed.loader`)."""
    plan = BatchPlan(source, batch_size, FeedOptions.from_kwargs("to_tf_dataset()", options))
    plan.steps(epochs, start)  # checks epochs and start
    first = 0 if start is None else plan.sampler.step_of(start)
    batch_dim = plan.sampler.batch_size if plan.options.drop_remainder else None
    output_signature = _element_spec(plan, output_signature, first, batch_dim)
    load = _step_loader(plan, output_signature)
    if epochs is None:
        dataset = tf.data.Dataset.counter(start=first).map(
            load, num_parallel_calls=num_parallel_calls, deterministic=True).prefetch(prefetch)
    else:
        # The cardinality stays unknown: told it, Keras's TensorFlow trainer would also make an
        # iteration at the end of each epoch, which it drops.
        iterations = _Iterations(first, int(epochs) * len(plan.sampler))
        dataset = iterations.passes(load, num_parallel_calls, prefetch)
    options = tf.data.Options()
    # The only state of the map function is its argument, the step: an iterator checkpoint that
    # records the steps' position resumes exactly.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    dataset = dataset.with_options(options)
    return dataset if epochs is None else iterations.mark(dataset)


class _Iterations:
    """Which iteration (pass) of a finite dataset begins, decided at the first read of each pass
    and counted, one per pass, like the seed generator that makes tf.data's ``shuffle`` reshuffle
    each iteration, except where Keras says otherwise: the pass ``fit`` makes to build the model
    (then drops) is not counted, and a pass made in fit's epoch ``e`` is pass ``e``.

    The decision runs in the tf.data graph (a ``numpy_function`` at the start of every pass), so
    every way of iterating takes it exactly once per pass: ``iter()``, ``.repeat()``, a dataset
    derived with ``map``/``batch``/``prefetch``..., and ``tf.distribute``'s distributed iterators,
    which never call the dataset's ``__iter__``. It runs on a tf.data thread, so the Keras call is
    looked up on every thread (:func:`shardfeed.kerasfit.keras_calls_reading`): the one whose data
    ``x`` is this dataset or is built on it. Keras's thread is then waiting for that first read,
    inside the epoch the pass is for.

    A pass ends with a marker element (dropped before the output) that carries its number: an
    iterator restored from a checkpoint (``tf.train.Checkpoint(iterator=it)``), also in a fresh
    process, continues the very pass it was in (its bounds are part of the iterator's state), and
    when it reaches the end of that pass the count moves past it, so that the dataset's next
    iteration is the following one (a restored iterator left before its end leaves the count
    where this process has it).

    ``fit`` with ``steps_per_epoch`` is refused: Keras then keeps one iteration across epochs and
    runs out of data after the first."""

    def __init__(self, first: int, per_iteration: int) -> None:
        self._lock = threading.Lock()
        self._first = first
        self._per_iteration = per_iteration
        self._next = first // per_iteration if per_iteration else 0

    def mark(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """``dataset``, recognisable (with what is built on it) as this object's dataset, with an
        ``__iter__`` that refuses a ``fit`` with ``steps_per_epoch`` before reading anything."""
        base, iterations = type(dataset), self

        def __iter__(self):  # noqa: N807
            _refuse_inexact_fit(kerasfit.keras_call())
            return base.__iter__(self)

        dataset.__class__ = type("ShardfeedDataset", (base,), {
            "__iter__": __iter__, "__module__": __name__, "_shardfeed_iterations": iterations})
        return dataset

    def _reads(self, data: Any) -> bool:
        """Whether ``data`` (a Keras call's ``x``) is this dataset or built on it: a derived
        ``tf.data.Dataset`` (through its inputs) or a ``tf.distribute`` distributed dataset."""
        pending, seen = [data], set()
        while pending:
            item = pending.pop()
            if item is None or id(item) in seen:
                continue
            seen.add(id(item))
            if getattr(item, "_shardfeed_iterations", None) is self:
                return True
            if isinstance(item, tf.data.Dataset):
                try:
                    pending.extend(item._inputs())  # noqa: SLF001 (tf.data's graph of datasets)
                except NotImplementedError:
                    pass
            else:
                pending.append(getattr(item, "_original_dataset", None))  # a tf.distribute DistributedDataset
        return False

    def begin(self) -> np.ndarray:
        """The first read of a pass: ``[first step, end step, pass number or -1 if not counted]``."""
        calls = kerasfit.keras_calls_reading(self._reads)
        if len(calls) > 1:
            raise ValueError(f"the same to_tf_dataset(...) is read by {len(calls)} Keras calls at once (on "
                             "different threads): which epoch each pass is for cannot be known; give each its "
                             "own dataset")
        call = calls[0] if calls else None
        _refuse_inexact_fit(call)
        with self._lock:
            if call is None or call.method != "fit":
                r, counted = self._next, True
            elif call.building:
                r, counted = self._next, False
            else:
                r, counted = call.epoch, True
            if counted:
                self._next = r + 1
        hi = (r + 1) * self._per_iteration
        return np.array([min(max(self._first, r * self._per_iteration), hi), hi, r if counted else -1], np.int64)

    def ended(self, number: np.ndarray) -> np.ndarray:
        """The end of pass ``number`` (-1: a pass not counted) was read: the next pass counted is
        the one after it (a no-op, but after restoring a checkpointed iterator)."""
        if number >= 0:
            with self._lock:
                self._next = max(self._next, int(number) + 1)
        return np.array(False)

    def passes(self, load: Callable[[tf.Tensor], Any], num_parallel_calls: int, prefetch: int) -> tf.data.Dataset:
        """The batches of pass ``r``: data epochs ``r * epochs`` to ``(r + 1) * epochs - 1`` (from
        ``first`` in the pass that holds it, which is the first one counted), read by ``load``
        from their step numbers, then the pass's end marker, dropped once past the prefetch."""

        def bounds(_: tf.Tensor) -> tf.Tensor:
            lo_hi_number = tf.numpy_function(self.begin, [], tf.int64, stateful=True, name="shardfeed_iteration")
            return tf.ensure_shape(lo_hi_number, [3])

        def steps(lo_hi_number: tf.Tensor) -> tf.data.Dataset:
            batches = tf.data.Dataset.range(lo_hi_number[0], lo_hi_number[1]).map(lambda step: (step, tf.constant(_BATCH, tf.int64)))
            end = tf.data.Dataset.from_tensors((tf.constant(-1, tf.int64), lo_hi_number[2]))
            return batches.concatenate(end)

        def keep(batch: Any, number: tf.Tensor) -> tf.Tensor:
            return tf.cond(tf.equal(number, _BATCH), lambda: tf.constant(True), lambda: tf.reshape(
                tf.numpy_function(self.ended, [number], tf.bool, stateful=True, name="shardfeed_pass_end"), []))

        return (tf.data.Dataset.range(1).map(bounds).flat_map(steps)
                .map(lambda step, number: (load(step), number), num_parallel_calls=num_parallel_calls,
                     deterministic=True)
                .prefetch(prefetch).filter(keep).map(lambda batch, number: batch))


_BATCH = -2  # the pass number of an element that is a batch (not an end marker)


def _refuse_inexact_fit(call: Optional[kerasfit.KerasCall]) -> None:
    refuse_generator_as_validation(call)
    if call is not None and call.method == "fit" and call.arguments.get("steps_per_epoch") is not None:
        raise ValueError(f"model.fit(to_tf_dataset(...), steps_per_epoch={call.arguments['steps_per_epoch']}) "
                         "with a finite dataset (one epoch per iteration, the default): Keras keeps one "
                         "iteration for the whole fit and runs out of data after it; leave steps_per_epoch "
                         "out, or pass epochs=None to to_tf_dataset for an endless stream")
