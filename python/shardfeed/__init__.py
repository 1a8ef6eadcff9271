"""shardfeed: train on datasets larger than RAM.

Write samples once into compact binary shards with :class:`Writer`, then read any samples by index
with :func:`open` and :meth:`Dataset.read`: a pool of native threads reads the records straight
into batch buffers, converting in place, with the GIL released. ``Dataset.read`` returns each
field in its stored dtype unless ``dtype=`` asks for float32; the training loaders (``batches``,
``ShardSequence``, ``to_tf_dataset``) default to ``dtype="auto"``: float fields as float32,
integer and bool fields as stored, fields with ``scale``/``offset`` as float32.

Training: views without copies (``ds.split``, ``subset``, ``head``, ``shard``: :class:`Subset`),
a new uniformly random order every epoch (:class:`Sampler`, :class:`Permutation`), the prefetching
generator ``ds.batches(...)`` and, imported on demand, ``shardfeed.keras.ShardSequence`` and
``ds.to_tf_dataset(...)`` (``shardfeed.tf``). ``import shardfeed`` never imports TensorFlow or Keras.

Getting data in: ``shardfeed.convert`` (numpy arrays, .npy/.npz, per-sample files and images, CSV,
HDF5, any iterable; imported on first use) and :func:`merge`, which joins datasets written in parts
by parallel processes without copying shard data.
"""

from .dataset import Batch, Dataset, free_batch_memory, get_num_threads, open, set_num_threads
from .errors import (
    CodecUnavailableError, KerasVersionError, OptionalDependencyError, OutputSizeError, RecordChecksumError, SchemaError, ShardfeedError,
    ShardfeedWarning, ShardFormatError, ShardReadError, ShardWriteError, SourceError, ValueRangeError, WriterLockedError,
)
from .format import Field
from .merge import MergeResult, merge
from .order import Permutation, Sampler
from .views import Subset
from .verification import VerifyReport, verify
from .writer import Writer

__version__ = "0.1.0"

__all__ = [
    "Batch", "CodecUnavailableError", "Dataset", "Field", "KerasVersionError", "MergeResult", "OptionalDependencyError", "OutputSizeError",
    "Permutation", "RecordChecksumError", "Sampler", "SchemaError", "ShardFormatError",
    "ShardReadError", "ShardWriteError", "ShardfeedError", "ShardfeedWarning", "SourceError", "Subset",
    "ValueRangeError", "VerifyReport", "Writer", "WriterLockedError", "convert", "free_batch_memory",
    "get_num_threads", "merge", "open", "set_num_threads", "verify",
]


def __getattr__(name: str):
    if name == "convert":  # converters import more of the standard library: only when used
        import importlib
        return importlib.import_module(".convert", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
