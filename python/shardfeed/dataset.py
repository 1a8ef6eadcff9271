"""Opening a dataset: the :class:`Dataset` handle (files, manifest, background preload, views,
pickling) and :class:`Batch`. What a read does is in ``batch_reader.py``."""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from . import _core, _preload
from .batch_reader import BATCH_MEMORY_MIN_BYTES, BatchReader, check_threads  # noqa: F401 (the constant's old home)
from ._process import usable_cpus
from .errors import ShardFormatError, ShardReadError
from .format import (
    CHECKSUM_DTYPE, FILE_KIND_CHECKSUMS, FILE_KIND_HEAP, FILE_KIND_RECORDS, HEADER_BYTES, MANIFEST_NAME,
    MERGE_JOURNAL_NAME, Field, check_header, checksum_words,
)
from .manifest import Manifest, ShardEntry, read_dictionary, read_manifest
from .fileio import file_system_path, open_regular

# Records up to this size are copied from a read-only memory map (MADV_RANDOM) instead of one
# preadv() each. Page-cached, the map is 2-8x faster up to 1 KiB and 1.3-1.7x up to 64 KiB (no
# system call, one pass over the bytes); records that are not in the page cache are read by
# preadv on either path, so cold reads are the same. Above 64 KiB the gain is small or nil
# (none for uint8 images with a fused normalisation) and not worth the map's costs: mapped pages
# count in the RSS, and a shard truncated under a reader needs the SIGBUS guard (ext/mapped.c).
# Figures: benchmarks/RESULTS.md.
MMAP_MAX_RECORD_BYTES = 64 * 1024

# threads="auto": at least this many reader threads (the queue depth for cold reads; measured in
# benchmarks/RESULTS.md, "Thread count").
AUTO_MIN_THREADS = 16
_default_threads: Optional[int] = None
_auto_threads: Optional[int] = None


def get_num_threads() -> int:
    """Native threads a batch read uses unless told otherwise (see :func:`set_num_threads`)."""
    global _auto_threads
    if _default_threads is not None:
        return _default_threads
    if _auto_threads is None:  # once: the affinity query is a system call
        _auto_threads = max(AUTO_MIN_THREADS, 2 * usable_cpus())
    return _auto_threads


def set_num_threads(threads: Union[None, str, int]) -> None:
    """Sets the default number of native reader threads; ``"auto"`` (or ``None``) restores the
    automatic choice: ``AUTO_MIN_THREADS``, or twice the CPUs if more. The threads are C threads
    that never hold the GIL. They are the reader's queue depth for records that are not in the
    page cache (cold random reads want many requests in flight: benchmarks/RESULTS.md); records
    that are in the page cache (found without waiting for the disk, on Linux) are read by at most
    one thread per CPU whatever this number, since more would only add thread switches."""
    global _default_threads
    _default_threads = check_threads(threads)


class Batch(dict):
    """A dict of field name -> batch array; ``lengths`` maps each variable-length field to the
    number of valid (unpadded) rows of every sample (the first ones, or the last ones when read
    with ``padding="pre"``); ``uncached`` is how many of the batch's
    fixed-size records were not in the page cache when it was read (each field's record reads
    counted once; all of them on systems where the reader cannot tell)."""

    def __init__(self, *args: Any, lengths: Optional[Dict[str, np.ndarray]] = None, uncached: int = 0):
        super().__init__(*args)
        self.lengths: Dict[str, np.ndarray] = lengths or {}
        self.uncached = uncached

    def __reduce__(self):
        return (Batch, (dict(self),), {"lengths": self.lengths, "uncached": self.uncached})

    def samples(self) -> List[Dict[str, Any]]:
        """The batch as one dict per sample, as ``ds[i]`` gives it: each field's row (a view of
        the batch's array, no copy), variable-length fields cut to the sample's length."""
        names = list(self)
        count = len(self[names[0]]) if names else 0
        out = []
        for row in range(count):
            sample = {}
            for name in names:
                length = self.lengths.get(name)
                values = self[name]
                sample[name] = values[row] if length is None else values[row, :length[row]]
            out.append(sample)
        return out


def _open_file(path: str, size: int, kind: int, manifest: Manifest) -> int:
    """Opens a shard or heap file (a regular file, never through a link) and checks its size and header."""
    fd = open_regular(path, " shard")
    try:
        actual = os.fstat(fd).st_size
        if actual != size:
            raise ShardFormatError(f"{path}: file is {actual} bytes, the manifest says {size} "
                                   f"({'truncated' if actual < size else 'extra data'})")
        check_header(path, os.pread(fd, HEADER_BYTES, 0), kind, manifest.schema)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _stored_checksums(path: str, shard: ShardEntry, manifest: Manifest) -> np.ndarray:
    """The stored checksum words of each sample of a shard (its ``.crc`` file, header and size
    checked), one row per sample: the record's CRC32C, then its variable-length rows' where the
    schema has variable fields; for ``open(..., verify=True)``."""
    if shard.checksums_file is None:
        raise ShardFormatError(f"{os.path.join(path, shard.file)}: this shard has no per-record checksums "
                               "(written by a shardfeed before format version 2), so verify=True cannot check "
                               "its reads; `shardfeed verify` checks its whole-file checksum")
    file = os.path.join(path, shard.checksums_file)
    fd = _open_file(file, shard.checksums_size, FILE_KIND_CHECKSUMS, manifest)
    try:
        data = bytearray(shard.checksums_size - HEADER_BYTES)
        view, at = memoryview(data), HEADER_BYTES
        while view:
            got = os.preadv(fd, [view], at)
            if got == 0:
                raise ShardReadError(errno.EIO, "file ended before its manifest size (truncated?)", file)
            view, at = view[got:], at + got
    except OSError as exc:
        if isinstance(exc, ShardReadError):
            raise
        raise ShardReadError(exc.errno, f"cannot read the record checksums: {exc.strerror}", file) from None
    finally:
        os.close(fd)
    return np.frombuffer(data, dtype=CHECKSUM_DTYPE).reshape(shard.num_samples, checksum_words(manifest.schema))


def field_dictionaries(path: str, manifest: Manifest) -> Dict[str, Any]:
    """Each compressed field with trained dictionaries: a ``_core.FieldDictionaries`` (each shard's
    dictionary, every file loaded once and checked against its size and checksum), or where the
    codec library cannot use dictionaries, why not (a read of the field raises it)."""
    loaded: Dict[str, Any] = {}
    fields: Dict[str, Any] = {}
    for name, codec in manifest.schema.codecs.items():
        files = [shard.dictionary(name) for shard in manifest.shards]
        if not any(files):
            continue
        why = _core.dictionaries_unavailable(codec)
        if why is not None:
            fields[name] = why
            continue
        for file in files:
            if file is not None and file not in loaded:
                try:
                    loaded[file] = _core.Dictionary(codec, read_dictionary(path, manifest.dictionaries[file]))
                except ValueError as exc:
                    if isinstance(exc, ShardFormatError):
                        raise
                    raise ShardFormatError(f"{os.path.join(path, file)}: {exc} (the dictionary of field {name!r})") \
                        from None
        fields[name] = _core.FieldDictionaries([None if file is None else loaded[file] for file in files])
    return fields


class Dataset:
    """A dataset opened for reading: ``len(ds)``, ``ds.fields``, ``ds.metadata``, ``ds[i]`` and
    :meth:`read` for batches. Thread-safe; pickles by path (the copy reopens the files)."""

    def __init__(self, path: "os.PathLike[str] | str", *, threads: Union[None, str, int] = "auto",
                 mmap: Union[str, bool] = "auto", verify: bool = False, preload: Union[str, bool] = "auto",
                 direct_io: Union[str, bool] = "auto"):
        self.path = file_system_path(path, ShardReadError)
        self._preload_option = _preload.check_option(preload)
        self._direct_option = _preload.check_option(direct_io, "direct_io")
        self.preloading: Optional[_preload.BackgroundPreload] = None  # the background pass, if one started
        if not isinstance(verify, bool):
            raise TypeError(f"verify must be True or False, got {verify!r}")
        self.verify_reads = verify
        self._threads = check_threads(threads)
        if mmap not in ("auto", True, False):
            raise ValueError(f"mmap must be 'auto', True or False, got {mmap!r}")
        self._mmap_option = mmap
        if not os.path.isdir(self.path):
            raise ShardReadError(errno.ENOENT if not os.path.exists(self.path) else errno.ENOTDIR,
                                 "not a dataset directory", self.path)
        try:
            manifest = read_manifest(self.path)
        except FileNotFoundError:
            why = ("a merge into this directory did not finish: run the same shardfeed.merge again"
                   if os.path.lexists(os.path.join(self.path, MERGE_JOURNAL_NAME)) else
                   "not a shardfeed dataset, or its writer never committed")
            raise ShardReadError(errno.ENOENT, f"no {MANIFEST_NAME}: {why}",
                                 os.path.join(self.path, MANIFEST_NAME)) from None
        self._manifest = manifest
        self.schema = manifest.schema
        self.fields: Dict[str, Field] = dict(manifest.schema.fields)
        self.metadata: Dict[str, Any] = manifest.metadata
        self._record_bytes = manifest.schema.record_bytes
        counts = [s.num_samples for s in manifest.shards]
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        heap_paths = [os.path.join(self.path, s.heap_file) for s in manifest.shards if s.heap_file]
        paths = [os.path.join(self.path, s.file) for s in manifest.shards]
        use_map = self._record_bytes <= MMAP_MAX_RECORD_BYTES if mmap == "auto" else bool(mmap)
        has_heap = bool(manifest.schema.heap_fields)
        words = [_stored_checksums(self.path, shard, manifest) for shard in manifest.shards] if verify else None
        checksums = [np.ascontiguousarray(w[:, 0], dtype=np.uint32) for w in words] if words is not None else None
        # verify=True with heap fields: the CRC32C of each sample's heap bytes (all variable and compressed fields), in
        # dataset order, checked by read() before it reads any rows.
        row_checksums: Optional[np.ndarray] = None
        if words is not None and has_heap:
            row_checksums = np.concatenate([np.asarray(w[:, 1], dtype=np.uint32) for w in words] or
                                                 [np.zeros(0, np.uint32)])
        fds: List[int] = []
        heap_fds: List[int] = []
        try:
            for shard, shard_path in zip(manifest.shards, paths):
                fds.append(_open_file(shard_path, shard.size, FILE_KIND_RECORDS, manifest))
                if has_heap:
                    heap_path = os.path.join(self.path, shard.heap_file)
                    heap_fds.append(_open_file(heap_path, shard.heap_size, FILE_KIND_HEAP, manifest))
        except BaseException:
            for fd in fds + heap_fds:
                os.close(fd)
            raise
        # The ShardSet owns the descriptors from here on, even if it fails.
        self._shards = _core.ShardSet(fds, heap_fds if has_heap else None, counts, paths,
                                      heap_paths if has_heap else None, HEADER_BYTES,
                                      self._record_bytes, use_map, checksums)
        self._use_map = use_map
        heap_sizes = np.array([s.heap_size for s in manifest.shards], dtype=np.int64)
        try:
            dictionaries = field_dictionaries(self.path, manifest)
        except BaseException:
            self._shards.close()
            raise
        self._reader = BatchReader(self._shards, manifest.schema, self._starts, heap_sizes, heap_paths, use_map,
                                   row_checksums, dictionaries)
        files = self._data_files()
        data_bytes = sum(size for _, size in files)
        available = _preload.memory_available() if "auto" in (self._preload_option, self._direct_option) else None
        if _preload.direct_wanted(self._direct_option, data_bytes, self._record_bytes, available):
            self._shards.use_direct_reads(True)
        if files and _preload.background_wanted(self._preload_option, data_bytes, available):
            self.preloading = _preload.start_background(self, files)

    # ---- basics -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_shards(self) -> int:
        return len(self._manifest.shards)

    @property
    def direct_reads(self) -> bool:
        """Whether fixed-size records are read with O_DIRECT, past the page cache (``open``'s
        ``direct_io``; False where the file system does not take it)."""
        return self._shards.direct_shards > 0

    @property
    def threads(self) -> int:
        return self._threads if self._threads is not None else get_num_threads()

    def __repr__(self) -> str:
        return f"<shardfeed.Dataset {self.path!r}: {len(self)} samples, {self.schema!r}>"

    def close(self) -> None:
        """Closes the shard files (reads running in other threads finish first) and stops the
        background preload."""
        if self.preloading is not None:
            self.preloading.stop()
        self._shards.close()

    def __enter__(self) -> "Dataset":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __reduce__(self):
        return (_reopen, (self.path, self._threads, self._mmap_option, self.verify_reads, self._preload_option,
                          self._direct_option))

    def preload(self) -> bool:
        """Reads every file of the dataset once, front to back, so that the operating system's
        page cache holds all of it and random reads are then served from memory: one sequential
        pass at the disk's bandwidth instead of a first epoch of random reads at its request rate
        (1 GiB of 128-byte records: 0.8-2 s instead of 75-90 s on the VM of benchmarks/RESULTS.md).
        Where the kernel caches file data in large folios (Linux 6.16+ on ext4, XFS), pages read in
        order are cached in 2 MiB units that the reader's memory maps use as huge pages, and
        page-cached random reads of small records run 1.3-1.5x faster than after random or
        write-order caching.

        Returns False without reading anything when the files are larger than the memory the
        process could give the page cache (``MemAvailable``, and its memory cgroup's limit): they
        would only evict one another, and random reads are the way to read them. The pages stay
        cached as long as the kernel keeps them, shared with every process that reads the files.
        Parts already cached are not read again (and keep the size they were cached in).

        ``open`` does this by default in the background for a dataset that fits (its ``preload``
        option, :attr:`preloading`); call this to wait for all of it before reading."""
        if self._shards.closed:
            raise ValueError("I/O operation on a closed dataset")
        files = self._data_files()
        available = _preload.memory_available()
        if available is not None and sum(size for _, size in files) > available:
            return False
        _preload.preload_files(files)
        return True

    def _data_files(self) -> List[Tuple[str, int]]:
        """(path, size) of every record and heap file, in shard order: what a preload reads."""
        files = [(os.path.join(self.path, s.file), s.size) for s in self._manifest.shards]
        return files + [(os.path.join(self.path, s.heap_file), s.heap_size) for s in self._manifest.shards
                        if s.heap_file]

    def verify(self) -> Any:
        """Checks every shard this dataset lists (checksums, sizes, headers, records) and returns a
        :class:`shardfeed.VerifyReport` naming the bad shards and, where the structure shows them,
        the bad samples. See :func:`shardfeed.verify`."""
        from .verification import verify_manifest
        return verify_manifest(self.path, self._manifest)

    def compression(self) -> Dict[str, Any]:
        """Each compressed field's sizes: field name -> a ``CompressedSize`` with ``stored`` (bytes
        in the heap files), ``raw`` (the same values uncompressed), ``ratio`` (raw / stored),
        ``codec``, and the trained dictionaries its shards use: ``dictionaries`` (how many files),
        ``dictionary_bytes`` (their size, not counted in ``stored``) and
        ``shards_without_dictionary``; an empty dict without compressed fields. Reads the record
        files' descriptors."""
        from .verification import compressed_sizes
        return compressed_sizes(self.path, self._manifest)

    def __getitem__(self, index: Any) -> Any:
        """``ds[i]``: one sample as a dict of arrays (variable fields unpadded); ``ds[a:b]``: a Batch."""
        if isinstance(index, slice):
            return self.read(np.arange(len(self), dtype=np.int64)[index])
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"dataset indices must be integers or slices, not {type(index).__name__}")
        if not -len(self) <= int(index) < len(self):  # (before numpy, which cannot hold 2**63)
            raise IndexError(f"index {int(index)} is out of range for a dataset of {len(self)} samples")
        return self.read(np.array([index], dtype=np.int64)).samples()[0]

    def _getitems(self, indices: Sequence[int]) -> List[Dict[str, Any]]:
        """grain's optional batched read (``RandomAccessDataSource._getitems``, used by
        ``grain.MapDataset.source(ds)``): the samples ``indices`` as ``ds[i]`` gives them, read
        with one :meth:`read`. A Dataset is a grain data source as it is: ``len``, a thread-safe,
        deterministic ``ds[i]``, a repr naming its path, and pickling by path."""
        return self.read(indices).samples()

    # ---- views and training (python/shardfeed/views.py, loader.py, keras.py, tf.py) -----------

    def split(self, parts: Any, *, seed: int = 0, shuffle: bool = True) -> Any:
        """Disjoint views, e.g. ``split({"train": 0.8, "val": 0.1, "test": 0.1}, seed=0)``: see
        :meth:`shardfeed.Subset.split`. No data is copied."""
        from .views import Subset
        return Subset(self).split(parts, seed=seed, shuffle=shuffle)

    def subset(self, indices: Any) -> Any:
        """A view of the samples at ``indices``, in that order (:class:`shardfeed.Subset`)."""
        from .views import Subset
        return Subset(self).subset(indices)

    def head(self, n: int) -> Any:
        """A view of the first ``n`` samples, for smoke tests (:class:`shardfeed.Subset`)."""
        from .views import Subset
        return Subset(self).head(n)

    def shard(self, rank: int, world_size: int) -> Any:
        """Worker ``rank``'s disjoint, equal-length part of every epoch (:meth:`shardfeed.Subset.shard`)."""
        from .views import Subset
        return Subset(self).shard(rank, world_size)

    def batches(self, batch_size: int, **options: Any) -> Any:
        """A prefetching generator of ``(x, y)`` batches for Keras or a training loop, a new
        uniformly random order every epoch: see :func:`shardfeed.loader.batches`."""
        from .loader import batches
        return batches(self, batch_size, **options)

    def to_tf_dataset(self, batch_size: int, **options: Any) -> Any:
        """A ``tf.data.Dataset`` of whole batches: see :func:`shardfeed.tf.to_tf_dataset`."""
        from .tf import to_tf_dataset
        return to_tf_dataset(self, batch_size, **options)

    # ---- batch reads --------------------------------------------------------------------------

    def read(self, indices: Any, fields: Union[None, str, Sequence[str]] = None, *, dtype: Any = None,
             out: Optional[Mapping[str, np.ndarray]] = None, scale: Any = None, offset: Any = None,
             maxlen: Union[None, int, Mapping[str, int]] = None, pad_value: Any = 0,
             padding: Union[str, Mapping[str, str]] = "post", truncating: Union[str, Mapping[str, str]] = "post",
             lossy: Union[bool, Mapping[str, bool]] = False, threads: Union[None, str, int] = None) -> Batch:
        """Reads the samples ``indices`` (any order, duplicates allowed, negative counts from the end)
        and returns a :class:`Batch` of arrays with a leading batch dimension.

        ``fields``: a name or list of names (default: all). ``dtype``: ``None`` (each field's stored
        dtype; bfloat16 reads as float32), ``"auto"`` (float fields as float32, integer and bool
        fields as stored: ``shardfeed.read_options.AUTO_DTYPES``), or a dtype: float32, float16 and bfloat16 (the
        ``ml_dtypes`` dtype; ``"bfloat16"`` names it) are converted natively, in place, rounding to
        nearest even; others (another integer width, float64, bool) by numpy from the stored values.
        A dict gives a value per field. The table of what each choice gives is in
        docs/training.md, "Output dtypes".

        ``lossy``: a conversion that cannot give back a stored value exactly (int64 16777217 as
        float32, int16 2049 as float16, -1 as uint8, 1.5 as int32) raises
        :class:`shardfeed.ValueRangeError` naming the field and sample, unless ``lossy`` is True
        (or a dict ``{field: True}``). Narrowing floats (float64 to float32, float32 to float16) is
        a choice of precision, never refused: out-of-range values become infinities.

        ``scale``/``offset``: ``out = float32(stored) * scale + offset`` computed in float32 (no
        fused multiply-add), each a scalar or an array broadcastable to the field's shape (per
        channel), or a dict per field; the output is float32, or float16/bfloat16 when asked for
        (that float32 result rounded to nearest even). ``out``: dict of preallocated arrays to fill.

        Variable-length fields are padded with ``pad_value`` to the longest sample, or to
        ``maxlen`` (longer samples are truncated). ``padding="post"`` (the default) puts the pad
        rows after a sample's rows, ``"pre"`` before them; ``truncating="post"`` (the default)
        keeps a long sample's first ``maxlen`` rows, ``"pre"`` its last ones, as in
        ``keras.utils.pad_sequences`` (whose defaults are ``"pre"``). Each may be a dict per field.
        ``batch.lengths`` holds each sample's rows in the output: its stored length, at most
        ``maxlen``."""
        results, lengths, uncached = self._reader.read(
            indices, fields, dtype, out, scale, offset, maxlen, pad_value, padding, truncating, lossy, threads,
            self._threads if self._threads is not None else get_num_threads())  # self.threads, one call less
        return Batch(results, lengths=lengths, uncached=uncached)

    def readahead(self, indices: Any) -> None:
        """Asks the kernel to start reading the records of ``indices`` from disk into the page
        cache, and returns without waiting: a later ``read`` of them finds them there or under way.
        The loader calls it for the next batch while it reads this one, once reads miss the page
        cache, so that the disk always has requests queued. Advice only: a system without
        ``posix_fadvise(POSIX_FADV_WILLNEED)``, or one that refuses it, reads nothing ahead, and
        neither does a dataset that reads directly (:attr:`direct_reads`: its reads would not look
        in the page cache). Variable-length rows (heap files) are not read ahead; bad indices raise
        as in ``read``."""
        self._shards.advise(self._reader.indices(indices))


def free_batch_memory() -> int:
    """Returns to the system the memory that :meth:`Dataset.read` keeps for reuse: output arrays of
    at least 1 MiB that numpy has freed (at most 8 of them, 256 MiB), which later reads of the same
    size would take back instead of new pages, and the aligned bounce buffers that direct reads
    through io_uring keep with each idle ring for its next batch (at most 16 MiB a ring, 16 rings;
    a ring some thread is reading with keeps its own). Returns the bytes released. For a process
    that is done reading batches and needs the memory for something else, or one that is about
    to fork workers under a memory limit; reading again refills the caches."""
    return _core.free_batch_memory()


def _reopen(path: str, threads: Optional[int], mmap: Union[str, bool], verify: bool = False,
            preload: Union[str, bool] = "auto", direct_io: Union[str, bool] = "auto") -> Dataset:
    return Dataset(path, threads=threads, mmap=mmap, verify=verify, preload=preload, direct_io=direct_io)


def open(path: "os.PathLike[str] | str", *, threads: Union[None, str, int] = "auto",
         mmap: Union[str, bool] = "auto", verify: bool = False, preload: Union[str, bool] = "auto",
         direct_io: Union[str, bool] = "auto") -> Dataset:
    """Opens a dataset directory for reading. ``threads``: native reader threads per batch, or
    ``"auto"`` (the default: :func:`get_num_threads`, see :func:`set_num_threads`). ``mmap``: copy records that are in the
    page cache from a read-only memory map instead of ``preadv`` — ``"auto"`` does for records of
    at most 64 KiB.

    ``verify=True``: every read compares each record it reads (whole, whichever fields are asked
    for) with the CRC32C stored when it was written, and raises :class:`RecordChecksumError` naming
    the shard and sample on a mismatch, before returning anything of the batch; for those who would
    rather stop than train on damaged data. A read of a variable-length field also checks each
    sample's rows, of all its variable-length fields (one checksum covers them together), before
    reading them. Costs: the checksums are read into memory at open (4 bytes per sample, 8 with
    variable-length fields), records are read one at a time and whole, each is checksummed as it is
    copied, and rows are read once more for their check (benchmarks/RESULTS.md, "Per-record
    checksums"). A dataset with shards written before per-record checksums (format version 1)
    cannot be opened with ``verify=True``.

    ``preload``: ``"auto"`` (the default) starts reading the dataset's files front to back into
    the page cache, on a background thread, when they fit in the memory the page cache may use
    (at most 80% of ``MemAvailable``, or of the process's memory cgroup limit where that is lower),
    so that a first epoch from disk runs at the disk's bandwidth instead of its request rate while
    reads are served as usual meanwhile; a dataset that does not fit is read by random reads only,
    as with ``False``. ``True`` starts the pass whatever the dataset's size. Parts already cached
    cost no reads. The pass is :attr:`Dataset.preloading` (``wait()``, ``done``, ``bytes_read``,
    ``error``); it stops when the dataset is closed or garbage collected (docs/training.md,
    "Datasets that fit in RAM").

    ``direct_io``: ``"auto"`` (the default) reads fixed-size records with ``O_DIRECT``, past the
    page cache (Linux; where the file system takes it, through io_uring where it can be used),
    when the dataset's files are at least twice the memory the page cache may use and its
    records 4 KiB or more: a random epoch's reads then rarely hit the cache (2-13% of them at
    twice its size, measured), and a read past it costs the kernel no eviction and no copy (about
    0.4x the CPU time per 8 KiB sample, 0.55x per 147 KiB sample, at the same rate). ``True`` reads directly whatever the sizes (even what is cached), ``False`` never
    (docs/training.md, "Datasets larger than RAM").
    :attr:`Dataset.direct_reads` says whether this dataset does."""
    return Dataset(path, threads=threads, mmap=mmap, verify=verify, preload=preload, direct_io=direct_io)
