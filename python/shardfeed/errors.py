"""Exceptions raised by shardfeed.

Each library exception is also the builtin that fits, so ``except ValueError`` / ``except OSError``
keep working alongside ``except shardfeed.ShardfeedError``.
"""


class ShardfeedError(Exception):
    """Base class of every exception raised by shardfeed itself."""


class SchemaError(ShardfeedError, ValueError):
    """A field specification (name, dtype, shape) is invalid, or data does not match it."""


class ValueRangeError(ShardfeedError, ValueError):
    """A value does not fit in the dtype its field stores (overflow, out-of-range integer), or in
    the dtype a read was asked for (a cast that would not give back the stored value exactly).

    ``field`` and ``sample`` name the field and the sample index, where known."""

    field = None
    sample = None


class OutputSizeError(ShardfeedError, ValueError):
    """A read's output array would be larger than an array may hold (a ``maxlen`` too large for the
    batch). ``field`` names the field, ``nbytes`` the bytes it would take and ``limit`` the most an
    output array may take."""

    def __init__(self, message, *, field=None, nbytes=None, limit=None):
        super().__init__(message)
        self.field = field
        self.nbytes = nbytes
        self.limit = limit


class OptionalDependencyError(ShardfeedError, ImportError):
    """A feature needs a package that is not installed; the message names the ``pip install``."""


class CodecUnavailableError(OptionalDependencyError):
    """A compressed field's codec library (e.g. libzstd.so.1) cannot be loaded in this process:
    the message names the field and the library. Every other field reads and writes as usual."""


class SourceError(ShardfeedError, ValueError):
    """Source data cannot be converted or merged: a value that does not parse, a row with the wrong
    number of columns, a file that cannot be read or decoded, inputs that do not match each other.
    The message names the file and, where there is one, the line or row."""


class ShardFormatError(ShardfeedError, ValueError):
    """A manifest or shard file is malformed, of another version, or inconsistent with the manifest."""


class RecordChecksumError(ShardFormatError):
    """A record read with ``shardfeed.open(path, verify=True)`` does not match the CRC32C stored for
    it when it was written: its bytes changed on disk or in transfer. ``path`` is the shard file and
    ``sample`` the sample's index in the dataset."""

    def __init__(self, message, *, path=None, sample=None):
        super().__init__(message)
        self.path = path
        self.sample = sample


class ShardReadError(ShardfeedError, OSError):
    """Reading a shard failed; ``filename`` is the shard path and ``errno`` the system error."""


class ShardWriteError(ShardfeedError, OSError):
    """Writing a shard or the manifest failed (disk full, file-size limit, I/O error); ``filename``
    is the file being written. The dataset keeps the shards committed before the failure."""


class WriterLockedError(ShardfeedError, OSError):
    """Another writer holds the dataset's lock file; ``pid`` is its process id (None if unknown)."""

    def __init__(self, *args, pid=None):
        super().__init__(*args)
        self.pid = pid


class ShardfeedWarning(UserWarning):
    """Something worth knowing that is not an error, e.g. leftovers of a writer that was killed."""


class KerasVersionError(ShardfeedError, RuntimeError):
    """This Keras's trainer does not hold what shardfeed reads to know which Keras epoch is being
    trained (the loop variable of ``fit``, Keras 3.15): the feeds raise this rather than guess an
    epoch. The message names the Keras version and the feeds that do not need it."""
