"""tf.data integration: :func:`to_tf_dataset`. Importing this module imports TensorFlow;
``import shardfeed`` does not."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import tensorflow as tf

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


def to_tf_dataset(source: Any, batch_size: int, *, epochs: Optional[int] = None, prefetch: int = tf.data.AUTOTUNE,
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

    Like any ``tf.data`` dataset it is a description, not a stream: every iteration starts again
    at ``start`` and covers epochs up to ``epochs - 1`` (``epochs=None``: forever). For Keras,
    use ``epochs=None`` with ``model.fit(ds, steps_per_epoch=batches_per_epoch, epochs=E)``;
    a finite dataset passed to ``fit`` for several epochs would repeat the same order each epoch.

    In ``tf.distribute``, ``strategy.experimental_distribute_dataset`` splits each global batch
    across replicas; with ``distribute_datasets_from_function``, give every input pipeline its
    own part with ``view.shard(ctx.input_pipeline_id, ctx.num_input_pipelines)`` and turn
    tf.data's auto-sharding off.

    ``tf.numpy_function`` wraps a 64-byte-aligned batch array without copying, and the tensor holds
    a reference to it until it is freed: a batch's memory goes to a later batch only once every
    tensor wrapping it is gone (see :mod:`shardfeed.loader`)."""
    plan = BatchPlan(source, batch_size, FeedOptions.from_kwargs("to_tf_dataset()", options))
    steps = plan.steps(epochs, start)
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

    if isinstance(steps, range):
        numbers = tf.data.Dataset.range(steps.start, steps.stop)
    else:
        numbers = tf.data.Dataset.counter(start=first)
    dataset = numbers.map(load, num_parallel_calls=num_parallel_calls, deterministic=True)
    return dataset.prefetch(prefetch)
