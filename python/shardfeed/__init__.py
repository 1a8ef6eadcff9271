"""shardfeed: train on datasets larger than RAM.

Write samples once into compact binary shards with :class:`Writer`, then read any samples by index
with :func:`open` and :meth:`Dataset.read`: a pool of native threads reads the records straight
into float32 batch buffers, converting in place, with the GIL released.

Training: views without copies (``ds.split``, ``subset``, ``head``, ``shard``: :class:`Subset`),
a new uniformly random order every epoch (:class:`Sampler`, :class:`Permutation`), the prefetching
generator ``ds.batches(...)`` and, imported on demand, ``shardfeed.keras.ShardSequence`` and
``ds.to_tf_dataset(...)`` (``shardfeed.tf``). ``import shardfeed`` never imports TensorFlow or Keras.
"""

from .dataset import Batch, Dataset, get_num_threads, open, set_num_threads
from .errors import (
    SchemaError, ShardfeedError, ShardfeedWarning, ShardFormatError, ShardReadError, ShardWriteError, ValueRangeError,
    WriterLockedError,
)
from .format import Field
from .order import Permutation, Sampler, Subset
from ._verify import VerifyReport, verify
from .writer import Writer

__version__ = "0.1.0"

__all__ = [
    "Batch", "Dataset", "Field", "Permutation", "Sampler", "SchemaError", "ShardFormatError", "ShardReadError",
    "ShardWriteError", "ShardfeedError", "ShardfeedWarning", "Subset", "ValueRangeError", "VerifyReport", "Writer",
    "WriterLockedError", "get_num_threads", "open", "set_num_threads", "verify",
]
