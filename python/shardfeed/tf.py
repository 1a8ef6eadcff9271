"""tf.data integration: :func:`to_tf_dataset`. Importing this module imports TensorFlow;
``import shardfeed`` does not."""

from __future__ import annotations

import threading
from typing import Any, Mapping, Optional, Tuple

import numpy as np

try:
    import tensorflow as tf
except ImportError as exc:  # as shardfeed.keras: say which extra brings it
    raise ImportError(f"shardfeed.tf (Dataset.to_tf_dataset) needs TensorFlow ({exc}): "
                      "pip install 'shardfeed[tensorflow]'") from exc

from . import kerasfit
from .loader import BatchPlan, FeedOptions

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
    ``ds.repeat()``) reads the next ones, as tf.data's ``shuffle`` reshuffles every iteration:
    iteration ``r`` reads data epochs ``r * epochs`` to ``(r + 1) * epochs - 1``; the first
    iteration is the one that holds ``start`` (default step 0), from ``start`` on. So ``model.fit(ds, epochs=N)`` trains
    Keras epoch ``e`` on data epoch ``e``, without ``steps_per_epoch``. ``epochs=None``: one
    endless stream from ``start`` that every iteration starts again; for ``model.fit(ds,
    steps_per_epoch=len(sampler), epochs=N)``, which keeps one iteration for the whole fit, and
    the route to use under ``tf.distribute``, where Keras also iterates the dataset once to
    build the model, which would count as an epoch of the finite form.

    Resuming: the iterator checkpoints with ``tf.train.Checkpoint(iterator=it)`` (the dataset
    sets tf.data's external-state policy to ignore the batch-reading function, whose only state
    is the step it is given), and a restored iterator continues with the very next batch. A
    restarted ``model.fit`` resumes with ``start=`` (a step, ``(epoch, batch)`` or a
    ``Sampler.position``) and ``epochs=None``, e.g. ``start=backup.step`` with
    :class:`shardfeed.keras.BackupAndRestore`.

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
    if output_signature is None:
        if plan.transform is None:
            output_signature = _signature(plan, batch_dim)
        elif len(plan):
            output_signature = _signature_from_sample(plan, first, batch_dim)
        else:
            raise ValueError("cannot infer the output signature of an empty dataset with a transform: "
                             "pass output_signature")
    flat_specs = tf.nest.flatten(output_signature)
    out_dtypes = [spec.dtype for spec in flat_specs]

    def read(step: np.ndarray) -> list:
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

    per_iteration = (epochs or 0) * len(plan.sampler)
    iterations = _Iterations(first // per_iteration if per_iteration else 0)
    if epochs is None:
        numbers = tf.data.Dataset.counter(start=first)
    else:
        # The cardinality stays unknown: told it, Keras's TensorFlow trainer would also make an
        # iteration at the end of each epoch, which it drops.
        numbers = _epochs_per_iteration(plan, first, int(epochs), iterations)
    dataset = numbers.map(load, num_parallel_calls=num_parallel_calls, deterministic=True).prefetch(prefetch)
    options = tf.data.Options()
    # The only state of the map function is its argument, the step: an iterator checkpoint that
    # records the steps' position resumes exactly.
    options.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    dataset = dataset.with_options(options)
    return dataset if epochs is None else _hook_iterations(dataset, iterations)


class _Iterations:
    """Which iteration of a finite dataset begins: counted, one per iteration, like the seed
    generator that makes tf.data's ``shuffle`` reshuffle each iteration, except where Keras says
    otherwise. The dataset's ``__iter__`` looks at the Keras call on the stack
    (:mod:`shardfeed.kerasfit`) and leaves a note for the iteration's first read, which runs on
    a tf.data thread (Keras reads from each iteration it makes before it makes the next one): the
    iteration ``fit`` makes to build the model (then drops) is not counted, one it makes in its
    epoch ``e`` is iteration ``e``. ``fit`` with ``steps_per_epoch`` is refused: Keras then keeps
    one iteration across epochs and runs out of data after the first."""

    def __init__(self, first: int) -> None:
        self._lock = threading.Lock()
        self._next = first
        self._note: Optional[Tuple[str, int]] = None

    def iteration_begins(self) -> None:
        call = kerasfit.keras_call()
        if call is not None and call.method == "fit" and call.arguments.get("steps_per_epoch") is not None:
            raise ValueError(f"model.fit(to_tf_dataset(...), steps_per_epoch={call.arguments['steps_per_epoch']}) "
                             "with a finite dataset (one epoch per iteration, the default): Keras keeps one "
                             "iteration for the whole fit and runs out of data after it; leave steps_per_epoch "
                             "out, or pass epochs=None to to_tf_dataset for an endless stream")
        with self._lock:
            if call is None or call.method != "fit":
                self._note = None
            elif call.building:
                self._note = ("uncounted", 0)
            else:
                self._note = ("keras", call.epoch)

    def take(self) -> int:
        with self._lock:
            note, self._note = self._note, None
            if note is not None and note[0] == "uncounted":
                return self._next
            r = note[1] if note is not None else self._next
            self._next = r + 1
            return r


def _hook_iterations(dataset: tf.data.Dataset, iterations: _Iterations) -> tf.data.Dataset:
    """``dataset`` with an ``__iter__`` that tells ``iterations`` an iteration begins (a subclass of
    its own class: transformations of it are plain datasets, whose passes are counted)."""
    base = type(dataset)

    def __iter__(self):  # noqa: N807
        iterations.iteration_begins()
        return base.__iter__(self)

    dataset.__class__ = type("ShardfeedDataset", (base,), {"__iter__": __iter__, "__module__": __name__})
    return dataset


def _epochs_per_iteration(plan: BatchPlan, first: int, epochs: int, iterations: _Iterations) -> tf.data.Dataset:
    """The steps of iteration ``r``: data epochs ``r * epochs`` to ``(r + 1) * epochs - 1`` (from
    ``first`` in the iteration that holds it, which is the first one counted)."""
    per_iteration = epochs * len(plan.sampler)

    def bounds() -> np.ndarray:
        r = iterations.take()
        hi = (r + 1) * per_iteration
        return np.array([min(max(first, r * per_iteration), hi), hi], np.int64)

    def steps(_: tf.Tensor) -> tf.data.Dataset:
        lo_hi = tf.numpy_function(bounds, [], tf.int64, stateful=True, name="shardfeed_iteration")
        return tf.data.Dataset.range(lo_hi[0], lo_hi[1])

    return tf.data.Dataset.range(1).flat_map(steps)
