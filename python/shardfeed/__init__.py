"""shardfeed: train on datasets larger than RAM.

Write samples once into compact binary shards with :class:`Writer`, then read any samples by index
with :func:`open` and :meth:`Dataset.read`: a pool of native threads reads the records straight
into float32 batch buffers, converting in place, with the GIL released.
"""

from .dataset import Batch, Dataset, get_num_threads, open, set_num_threads
from .errors import SchemaError, ShardfeedError, ShardFormatError, ShardReadError, ValueRangeError
from .format import Field
from .writer import Writer

__version__ = "0.1.0"

__all__ = [
    "Batch", "Dataset", "Field", "SchemaError", "ShardFormatError", "ShardReadError", "ShardfeedError",
    "ValueRangeError", "Writer", "get_num_threads", "open", "set_num_threads",
]
