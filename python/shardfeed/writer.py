"""Streaming writer: samples in, shards and an atomically replaced manifest out."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _core
from ._casting import cast_to_stored
from ._process import usable_cpus
from .compression import DEFAULT_LEVELS, compressed_schema, parse_compression
from .errors import (
    CodecUnavailableError, SchemaError, ShardfeedError, ShardfeedWarning, ShardFormatError, ShardWriteError,
    SourceError,
)
from .fileio import file_system_path
from .format import (
    CHECKSUM_DTYPE, HEADER_BYTES, LOCK_NAME, MANIFEST_NAME, MERGE_JOURNAL_NAME, TEMPORARY_DICTIONARY_PATTERN,
    TEMPORARY_MANIFEST_PATTERN, Field, Schema, checksum_words, is_data_file_name,
)
from .manifest import DictionaryEntry, Manifest, read_dictionary, read_manifest, write_dictionary, write_manifest
from .lock import WriterLock
from .shardfile import ShardFile

DEFAULT_SHARD_SIZE = 256 << 20
_BUFFER_BYTES = 4 << 20  # records are written to the shard file in pieces of about this size
_WRITE_HINTS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "the file is larger than the file-size limit (ulimit -f) or the file system allows; "
                 "a smaller shard_size may help",
}


@contextlib.contextmanager
def _opening(path: str, what: str):
    """Names the file in an OSError of opening a dataset for writing (ShardWriteError); shardfeed's
    own errors, and the FileExistsError / FileNotFoundError of the mode checks, pass unchanged."""
    try:
        yield
    except ShardfeedError:
        raise
    except OSError as exc:
        raise ShardWriteError(exc.errno, f"cannot open the dataset for writing: {what}: {exc.strerror or exc}",
                              exc.filename or path) from exc


def _is_stored(values: np.ndarray, field: Field) -> bool:
    """Values already in the field's stored dtype need no cast and no range check; except bfloat16
    (its stored uint16 is not a value dtype) and bool (numpy bools may hold any byte, e.g.
    ``uint8_array.view(bool)``: cast_to_stored stores them as 0 and 1)."""
    return values.dtype == field.stored_dtype and field.dtype not in ("bfloat16", "bool")


def _cast(values: np.ndarray, field: Field, first_sample: int) -> np.ndarray:
    return values if _is_stored(values, field) else cast_to_stored(values, field, first_sample)[0]


# Training a dictionary: the writer holds the first samples of the dataset until the dictionary
# fields' samples reach about 100 times the dictionary's size (zstd's advice for its trainer), and
# at least TRAINING_SAMPLES_MIN of them where that is more, within TRAINING_BYTES_MAX of a field's
# values. With fewer than TRAINING_SAMPLES_FLOOR samples in all (a small dataset) no dictionary is
# trained: zstd cannot train on so few.
TRAINING_SIZE_FACTOR = 100
TRAINING_SAMPLES_MIN = 1000
TRAINING_BYTES_MAX = 128 << 20
TRAINING_SAMPLES_FLOOR = 16


def _training_samples(dictionary_bytes: int, raw_bytes: int) -> int:
    """How many samples of a field of ``raw_bytes`` the writer holds to train a dictionary."""
    wanted = max(-(-TRAINING_SIZE_FACTOR * dictionary_bytes // raw_bytes), TRAINING_SAMPLES_MIN)
    return max(1, min(wanted, TRAINING_BYTES_MAX // raw_bytes))


def _slice_columns(columns: Dict[str, Any], start: int, stop: int) -> Dict[str, Any]:
    return {name: column[start:stop] for name, column in columns.items()}


def _compress_threads() -> int:
    """Native threads that compress a batch: the CPUs this process may run on."""
    return max(1, min(usable_cpus(), _core.BUILD_INFO["max_threads"]))


class Writer:
    """Writes a dataset directory of shards.

    ``Writer(path, fields={"x": ("float16", (64, 64)), "y": ("int64", ())})`` creates a dataset
    (``mode="w"``, refusing to overwrite one); ``mode="a"`` continues an existing one. Use it as a
    context manager, or call :meth:`close`. Each completed shard is committed to the manifest at once,
    so an interrupted run keeps every completed shard; :meth:`close` commits the rest.

    One writer per dataset: another one raises :class:`WriterLockedError` naming its pid. A failed
    write (disk full, file-size limit) raises :class:`ShardWriteError` and ends the writer; so does
    an interrupt (``KeyboardInterrupt``) in :meth:`extend` or :meth:`close`. Either way the dataset
    keeps what was committed, and ``mode="a"`` continues it.

    ``compression={"image": "zstd"}`` (or ``("zstd", level)``; ``shardfeed.compression``) stores
    each sample of those fixed-shape fields as one compressed frame in the shard's heap file,
    compressed on native threads; reads decode it on theirs. Appending keeps the dataset's codecs
    (``compression`` may then only choose the levels).

    ``{"tokens": {"codec": "zstd", "dictionary": True}}`` trains a dictionary on the field's first
    samples (the writer holds them until it has about 100 times the dictionary's size of them, at
    most 128 MiB of the field's values), writes it into the dataset and compresses every frame with
    it. Where there are too few samples, or zstd cannot train on them, the frames are written
    without a dictionary, with a :class:`ShardfeedWarning` saying so (``ds.compression()`` shows
    it). Appending uses the dataset's latest dictionary of the field, if it has one.

    Memory stays bounded by one write buffer of about 4 MiB (plus the batch passed to ``extend``,
    and the samples held to train a dictionary).
    """

    def __init__(self, path: "os.PathLike[str] | str", fields: Optional[Mapping[str, Any]] = None, *,
                 shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None,
                 mode: str = "w", compression: Any = None):
        self.path = file_system_path(path, ShardWriteError)
        if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size <= HEADER_BYTES:
            raise ValueError(f"shard_size must be an int of more than {HEADER_BYTES} bytes, got {shard_size!r}")
        manifest_path = os.path.join(self.path, MANIFEST_NAME)
        if mode not in ("w", "a"):
            raise ValueError(f"mode must be 'w' (create) or 'a' (append), got {mode!r}")
        if mode == "w":
            if os.path.lexists(manifest_path):
                raise FileExistsError(errno.EEXIST, "a dataset already exists here (use mode='a' to append)",
                                      self.path)
            if fields is None:
                raise SchemaError("fields are required to create a dataset")
            schema = Schema.from_spec(fields)
            schema = compressed_schema(schema, parse_compression(compression, schema))
            with _opening(self.path, "creating its directory"):
                os.makedirs(self.path, exist_ok=True)
        elif not os.path.lexists(manifest_path):
            raise FileNotFoundError(errno.ENOENT, f"no dataset to append to (no {MANIFEST_NAME}; a writer killed "
                                    "before its first commit leaves none: create the dataset with mode='w')",
                                    manifest_path)
        with _opening(self.path, "taking its lock"):
            self._lock: Optional[WriterLock] = WriterLock(self.path)
        try:
            if mode == "w":
                if os.path.lexists(manifest_path):  # created while we were taking the lock
                    raise FileExistsError(errno.EEXIST, "a dataset already exists here (use mode='a' to append)",
                                          self.path)
                self._manifest = Manifest(schema, [], {})
            else:
                with _opening(manifest_path, "reading its manifest"):
                    self._manifest = read_manifest(self.path)
                self._check_append(manifest_path, fields, compression)
            if os.path.lexists(os.path.join(self.path, MERGE_JOURNAL_NAME)):
                raise SourceError(f"{os.path.join(self.path, MERGE_JOURNAL_NAME)}: a merge into this directory did not "
                                  "finish; run the same shardfeed.merge again to complete it before writing here")
            self.schema = self._manifest.schema
            self._levels = self._compression_levels(compression)
            # Each field's dictionary in use (entry and loaded form), and the size of those to train.
            self._dictionaries: Dict[str, Tuple[DictionaryEntry, Any]] = {}
            self._to_train = self._dictionary_plan(compression)
            self.metadata: Dict[str, Any] = dict(self._manifest.metadata)
            if metadata is not None:
                self.metadata.update(metadata)
            self._check_metadata()
            with _opening(self.path, "removing what an unfinished writer left"):
                self._remove_leftovers()
        except BaseException:
            self._lock.release()
            raise

        record_bytes = self.schema.record_bytes
        self._records_per_shard = max(1, (shard_size - HEADER_BYTES) // record_bytes)
        self._heap_limit = shard_size
        # At most _BUFFER_BYTES of records and as much of their checksums, which outweigh records
        # smaller than a sample's checksum words: a larger block, once freed, would raise glibc's
        # mmap threshold for the whole process (fileio.read_bounded says what that costs).
        sample_bytes = max(record_bytes, checksum_words(self.schema) * CHECKSUM_DTYPE.itemsize)
        self._buffer = np.zeros(max(1, min(self._records_per_shard, _BUFFER_BYTES // sample_bytes)),
                                dtype=self.schema.record_dtype)
        self._buffered = 0
        # The per-record checksums of the buffered records (format.checksum_words per sample).
        self._buffer_checksums = np.zeros((len(self._buffer), checksum_words(self.schema)), dtype=CHECKSUM_DTYPE)
        # One fixed field filling the whole record (no padding): large batches skip the write buffer
        # and go from the caller's array (or its cast) straight to the shard file.
        only = next(iter(self.schema.fields.values()))
        self._direct = (only if len(self.schema.fields) == 1 and not only.in_heap
                        and only.record_bytes == record_bytes else None)
        self._shard: Optional[ShardFile] = None
        self._next_shard = len(self._manifest.shards)  # the number the next shard's name tries first
        # The batches held (copies, checked) until the dictionaries are trained, and their samples.
        self._held: List[Tuple[Dict[str, Any], int]] = []
        self._held_count = 0
        self._hold_target = max((_training_samples(size, self.schema.fields[name].raw_bytes)
                                 for name, size in self._to_train.items()), default=0)
        self._closed = False
        if mode == "w":
            self._guarded(self._commit)  # an empty dataset is a valid dataset

    # ---- public API ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Samples written so far (committed or not)."""
        pending = self._shard.num_samples if self._shard else 0
        return self._manifest.num_samples + pending + self._buffered + self._held_count

    def append(self, sample: Mapping[str, Any]) -> None:
        """Adds one sample: a dict with one value (array or scalar) per field."""
        self._check_keys(sample)
        self.extend({name: [value] if field.variable else np.asarray(sample[name])[None]
                     for name, field in self.schema.fields.items() for value in (sample[name],)})

    def extend(self, batch: Mapping[str, Any]) -> None:
        """Adds many samples: a dict of arrays with a leading batch dimension (for a variable field, a
        sequence of arrays). A value that does not fit its dtype raises ValueRangeError naming the
        field and sample; nothing of the batch is written then, unless the batch is larger than the
        write buffer, in which case the pieces before the offending one are kept."""
        self._check_open()
        columns, count = self._check_batch(batch)
        self._guarded(self._extend, columns, count)

    def _extend(self, columns: Dict[str, Any], count: int) -> None:
        if self._to_train and count:  # the first samples wait for the dictionaries to be trained
            take = min(count, self._hold_target - self._held_count)
            self._hold(_slice_columns(columns, 0, take), take)
            if self._held_count < self._hold_target:
                return
            self._train()
            columns, count = _slice_columns(columns, take, count), count - take
        self._write_samples(columns, count)

    def _write_samples(self, columns: Dict[str, Any], count: int) -> None:
        position = 0
        while position < count:
            if self._shard is None:
                self._shard = ShardFile(self.path, self._next_shard, self.schema, self._listed_names())
                self._next_shard = self._shard.number + 1
            if self._direct is not None and not self._buffered and count - position >= len(self._buffer):
                position += self._write_direct(columns[self._direct.name], position, count)
                if self._shard_full():
                    self._finish_shard()
                continue
            room = min(len(self._buffer) - self._buffered,
                       self._records_per_shard - self._shard.num_samples - self._buffered)
            take = self._heap_take(columns, position, min(count - position, room))
            self._store(columns, position, take)
            position += take
            if self._buffered == len(self._buffer) or self._shard_full():
                self._flush()
            if self._shard_full():
                self._finish_shard()

    def close(self) -> None:
        """Writes what is buffered and commits the manifest. Safe to call twice. A lock file that
        cannot be removed once everything is committed is reported with a ShardfeedWarning (the
        data is saved; the lock is released and the file emptied), not an exception."""
        if self._closed:
            return
        self._guarded(self._close)
        self._closed = True
        failure = self._release_lock()
        if failure is not None:
            warnings.warn(f"{self.path}: all {self._manifest.num_samples} samples are committed, but the lock file "
                          f"{failure.filename or LOCK_NAME} could not be removed ({failure.strerror or failure}); "
                          "the lock is released and the file emptied: the next writer takes it over",
                          ShardfeedWarning, stacklevel=2)

    def _close(self) -> None:
        if self._to_train:
            self._train()
        if self._shard is not None:
            self._flush()
            if self._shard.num_samples:
                self._finish_shard()
            else:
                self._shard.discard()
                self._shard = None
        self._commit()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # ---- internals ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError(f"writer for {self.path} is closed")

    def _release_lock(self) -> Optional[OSError]:
        """Drops the lock; returns the error of a lock file that could not be removed."""
        lock, self._lock = self._lock, None
        return None if lock is None else lock.release()

    def _listed_names(self) -> "set[str]":
        return ({name for s in self._manifest.shards for name in (s.file, s.heap_file, s.checksums_file) if name}
                | set(self._manifest.dictionaries))

    def _guarded(self, work, *args: Any) -> None:
        """Runs ``work``; an OSError (disk full, file-size limit, I/O error) ends the writer: the
        shard being written is discarded, the lock released, and ShardWriteError raised. What the
        manifest lists stays as it was, so the dataset keeps every committed sample."""
        try:
            work(*args)
        except OSError as exc:
            written = len(self)
            committed = self._abandon()
            kept = ("no manifest was committed" if committed is None else
                    f"the dataset keeps its {committed} committed samples")
            lost = written - (committed or 0)
            hint = _WRITE_HINTS.get(exc.errno, "")
            raise ShardWriteError(
                exc.errno, f"writing the dataset failed: {exc.strerror or exc}{' (' + hint + ')' if hint else ''}; "
                f"{kept}, the {lost} samples written since are lost; after fixing the cause, continue "
                "with Writer(path, mode='a')", exc.filename or self.path) from exc
        except Exception:  # a value or schema error: checked before anything is written, go on
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: the shard may be half written
            self._abandon()
            raise

    def _abandon(self) -> Optional[int]:
        """Ends the writer without committing more: removes the files of the shard being written
        unless the manifest on disk lists them (a failure after the rename), drops the lock.
        Returns the number of committed samples, None if there is no readable manifest."""
        self._closed = True
        shard, self._shard, self._buffered = self._shard, None, 0
        self._held, self._held_count, self._to_train = [], 0, {}
        try:
            committed: Optional[Manifest] = read_manifest(self.path)
        except (OSError, ValueError):
            committed = None
        if shard is not None:
            name = os.path.basename(shard.records.path)
            if committed is not None and any(s.file == name for s in committed.shards):
                shard.close()
            else:
                shard.discard()
        for entry, _ in self._dictionaries.values():  # a dictionary no committed shard names
            if committed is not None and entry.file not in committed.dictionaries:
                try:
                    os.unlink(os.path.join(self.path, entry.file))
                except OSError:
                    pass
        self._release_lock()
        return None if committed is None else committed.num_samples

    def _remove_leftovers(self) -> None:
        """With the lock held: removes what a killed writer left (uncommitted shard files, temporary
        manifests) and warns naming it."""
        listed = self._listed_names()
        leftovers = sorted(name for name in os.listdir(self.path)
                           if (is_data_file_name(name) and name not in listed)
                           or TEMPORARY_MANIFEST_PATTERN.fullmatch(name) or TEMPORARY_DICTIONARY_PATTERN.fullmatch(name))
        stale = self._lock.stale if self._lock is not None else None
        if not leftovers and stale is None:
            return
        for name in leftovers:
            try:
                os.unlink(os.path.join(self.path, name))
            except FileNotFoundError:
                pass
        committed = self._manifest.num_samples
        if stale:
            message = (f"a writer (pid {stale[0]} on host {stale[1]}) did not finish; continuing after the "
                       f"{committed} committed samples, removed its uncommitted files {leftovers}")
        else:  # no lock file names a writer: say only what is known
            message = (f"removed files the manifest does not list (uncommitted shards, temporary manifests) "
                       f"{leftovers}; continuing after the {committed} committed samples")
        warnings.warn(f"{self.path}: {message}", ShardfeedWarning, stacklevel=3)

    def _check_append(self, manifest_path: str, fields: Optional[Mapping[str, Any]], compression: Any) -> None:
        """Appending: ``fields`` (with the dataset's codecs unless ``compression`` names others) must
        be the dataset's, and ``compression`` must not change a field's codec."""
        dataset = self._manifest.schema
        if fields is not None:
            given = Schema.from_spec(fields)
            codecs = {name: codec for name, codec in dataset.codecs.items() if name in given.fields}
            given = given.with_codecs(codecs)
            if compression is not None:
                given = compressed_schema(given, parse_compression(compression, given))
            if given != dataset:
                raise SchemaError(f"{manifest_path}: fields {given!r} differ from the dataset's {dataset!r}")
        for name, codec in parse_compression(compression, dataset).items():
            stored = dataset.fields[name].codec
            if (codec.codec if codec else None) != stored:
                raise SchemaError(f"{manifest_path}: field {name!r} is stored "
                                  f"{'with ' + stored if stored else 'uncompressed'} in the dataset; appending "
                                  f"cannot change that (compression asks for {codec.codec if codec else None!r})")

    def _compression_levels(self, compression: Any) -> Dict[str, int]:
        """The level of each compressed field (the option's, else its codec's default), after
        checking that each codec's library can be loaded here."""
        option = parse_compression(compression, self.schema)
        levels = {}
        for name, codec in self.schema.codecs.items():
            why = _core.codec_unavailable(codec)
            if why is not None:
                raise CodecUnavailableError(f"{self.path}: field {name!r} is compressed with {codec}, but {why}")
            chosen = option.get(name)
            levels[name] = chosen.level if chosen is not None else DEFAULT_LEVELS[codec]
        return levels

    def _dictionary_plan(self, compression: Any) -> Dict[str, int]:
        """Loads the dictionary each compressed field continues with (appending: the one of the
        field's last shard that has one, unless the option says ``dictionary: False``) and returns
        the size of the dictionary to train for each field that asks for one and has none."""
        option = parse_compression(compression, self.schema)
        to_train: Dict[str, int] = {}
        for name, codec in self.schema.codecs.items():
            asked = option.get(name)
            wanted = asked.dictionary if asked is not None else None
            if wanted == 0:
                continue
            latest = next((s.dictionary(name) for s in reversed(self._manifest.shards) if s.dictionary(name)), None)
            if latest is None and not wanted:
                continue
            why = _core.dictionaries_unavailable(codec)
            if why is not None:
                raise CodecUnavailableError(f"{self.path}: field {name!r} is compressed with a {codec} dictionary, but "
                                            f"{why}")
            if latest is None:
                to_train[name] = wanted
                continue
            entry = self._manifest.dictionaries[latest]
            try:
                loaded = _core.Dictionary(codec, read_dictionary(self.path, entry))
            except ValueError as exc:
                raise ShardFormatError(f"{os.path.join(self.path, latest)}: {exc}") from None
            self._dictionaries[name] = (entry, loaded)
        return to_train

    def _hold(self, columns: Dict[str, Any], count: int) -> None:
        """Checks and copies a batch's samples into the held ones; nothing is held where a value
        fails its check."""
        first = len(self)
        copies: Dict[str, Any] = {}
        for name, field in self.schema.fields.items():
            column = columns[name]
            if field.variable:
                for i in range(count):
                    self._cast_rows(field, column[i], first + i)
                copies[name] = [np.array(value, copy=True) for value in column]
            else:
                _cast(column, field, first)
                copies[name] = np.array(column, copy=True)
        self._held.append((copies, count))
        self._held_count += count

    def _train(self) -> None:
        """Trains the dictionaries on the held samples, writes them into the dataset (atomically,
        before any frame that uses them), then writes the held samples."""
        to_train, self._to_train = self._to_train, {}
        held, self._held, self._held_count = self._held, [], 0
        count = sum(n for _, n in held)
        for name, size in to_train.items():
            field = self.schema.fields[name]
            if count < TRAINING_SAMPLES_FLOOR:
                why = f"{count} samples are too few to train on (at least {TRAINING_SAMPLES_FLOOR} are needed)"
            else:
                samples = np.empty(count * field.raw_bytes, np.uint8)  # the field's values as stored, in a row
                at = 0
                for columns, _ in held:
                    values = np.ascontiguousarray(_cast(columns[name], field, 0)).reshape(-1).view(np.uint8)
                    samples[at:at + values.size] = values
                    at += values.size
                try:
                    data = _core.train_dictionary(field.codec, samples, np.full(count, field.raw_bytes, np.uint64),
                                                  size)
                    loaded = _core.Dictionary(field.codec, data)
                except ValueError as exc:
                    del samples
                    why = f"zstd could not train one on its {count} samples ({exc})"
                else:
                    del samples
                    self._dictionaries[name] = (write_dictionary(self.path, data), loaded)
                    continue
            warnings.warn(f"{self.path}: field {name!r} is written without a dictionary: {why}", ShardfeedWarning,
                          stacklevel=5)  # (extend or close's caller)
        for columns, n in held:
            self._write_samples(columns, n)

    def _check_metadata(self) -> None:
        try:
            json.dumps(self.metadata, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metadata must be JSON-serialisable (no NaN, no objects): {exc}") from None

    def _check_keys(self, batch: Mapping[str, Any]) -> None:
        if not isinstance(batch, Mapping):
            raise TypeError(f"expected a dict of field name -> values, got {type(batch).__name__}")
        missing = [n for n in self.schema.fields if n not in batch]
        unknown = [n for n in batch if n not in self.schema.fields]
        if missing or unknown:
            raise SchemaError(f"{self.path}: sample fields do not match the schema: missing {missing}, "
                              f"unknown {unknown}; schema fields {list(self.schema.fields)}")

    def _check_batch(self, batch: Mapping[str, Any]):
        self._check_keys(batch)
        columns: Dict[str, Any] = {}
        count = None
        for name, field in self.schema.fields.items():
            if field.variable:
                values = batch[name]
                if isinstance(values, np.ndarray) or not isinstance(values, Sequence):
                    values = list(np.asarray(values)) if np.ndim(values) else None
                if values is None:
                    raise SchemaError(f"field {name!r}: expected a sequence of arrays of shape {field.shape}")
                column: Any = values
                length = len(values)
            else:
                column = np.asarray(batch[name])
                if column.shape[1:] != field.shape or column.ndim != len(field.shape) + 1:
                    raise SchemaError(f"field {name!r}: expected a batch of shape (n, {', '.join(map(str, field.shape))})"
                                      f" for shape {field.shape}, got {column.shape}")
                length = column.shape[0]
            if count is not None and length != count:
                raise SchemaError(f"field {name!r} has {length} samples, other fields have {count}")
            count = length
            columns[name] = column
        return columns, count or 0

    def _write_direct(self, column: np.ndarray, position: int, count: int) -> int:
        """Writes the next piece of a large single-field batch without the write buffer: values
        already in the stored dtype and contiguous go to the file as they are (no copy, no check:
        they cannot be out of range), others are cast or copied a buffer's worth at a time. Returns
        the number of samples written."""
        field = self._direct
        take = min(count - position, self._records_per_shard - self._shard.num_samples)
        if not (_is_stored(column, field) and column.flags.c_contiguous):
            take = min(take, len(self._buffer))  # a cast or a copy: bounded like the buffer
        values = np.ascontiguousarray(_cast(column[position:position + take], field, len(self)))
        self._shard.records.write(values)
        self._shard.checksums.write(_core.record_checksums(values, self.schema.record_bytes))
        self._shard.num_samples += take
        return take

    def _store(self, columns: Dict[str, Any], position: int, take: int) -> None:
        """Casts samples [position, position + take) and places them in the write buffer; checks
        every field before anything is stored."""
        first = len(self)
        fixed = {}
        variable: Dict[str, List[np.ndarray]] = {}
        for name, field in self.schema.fields.items():
            if field.variable:
                variable[name] = [self._cast_rows(field, columns[name][i], first + i - position)
                                  for i in range(position, position + take)]
            else:
                fixed[name] = _cast(columns[name][position:position + take], field, first)
        rows = self._buffer[self._buffered:self._buffered + take]
        in_heap: Dict[str, List[np.ndarray]] = {}  # each sample's bytes in the heap, per field
        for name, values in fixed.items():
            if name in self._levels:
                in_heap[name] = self._write_compressed(self.schema.fields[name], values, rows[name])
            else:
                rows[name] = values
        for name, samples in variable.items():
            descriptors = rows[name]
            for i, data in enumerate(samples):
                descriptors[i, 0] = self._shard.heap.write(data) if data.size else self._shard.heap.size
                descriptors[i, 1] = data.shape[0]
            in_heap[name] = samples
        self._checksum_records(rows, [in_heap[f.name] for f in self.schema.heap_fields], self._buffered)
        self._buffered += take

    def _write_compressed(self, field: Field, values: np.ndarray, descriptors: np.ndarray) -> List[np.ndarray]:
        """Compresses each sample of ``values`` (stored dtype) into one frame on native threads,
        appends the frames to the heap file and sets the samples' descriptors (offset, bytes).
        Returns each sample's frame."""
        codec = self.schema.fields[field.name].codec
        dictionary = self._dictionaries.get(field.name)
        frames, lengths = _core.compress_samples(codec, self._levels[field.name],
                                                 np.ascontiguousarray(values).reshape(-1).view(np.uint8),
                                                 field.raw_bytes, _compress_threads(),
                                                 dictionary[1] if dictionary is not None else None)
        start = self._shard.heap.write(frames)
        ends = np.cumsum(lengths)
        descriptors[:, 0] = start + ends - lengths
        descriptors[:, 1] = lengths
        begins = (ends - lengths).tolist()
        return [frames[a:b] for a, b in zip(begins, ends.tolist())]

    def _checksum_records(self, rows: np.ndarray, variable: List[List[np.ndarray]], at: int) -> None:
        """The per-record checksums of the records ``rows`` (complete: descriptors set) into the
        checksum buffer from row ``at``: each record's CRC32C, and with variable fields the CRC32C
        of each sample's rows of all of them, in field order (docs/format.md)."""
        sums = self._buffer_checksums[at:at + len(rows)]
        sums[:, 0] = _core.record_checksums(rows.reshape(-1).view(np.uint8), self.schema.record_bytes)
        if variable:
            for i in range(len(rows)):
                crc = 0
                for samples in variable:
                    crc = _core.crc32c(samples[i], crc)
                sums[i, 1] = crc

    def _heap_take(self, columns: Dict[str, Any], position: int, take: int) -> int:
        """How many of the next ``take`` samples go into the current shard: a heap that reaches the
        shard size ends the shard, within a batch too (at least one sample goes in)."""
        heap = self._shard.heap
        if heap is None:
            return take
        used = heap.size
        for k in range(take):
            if used >= self._heap_limit:
                return k
            used += sum(np.size(columns[f.name][position + k]) * f.stored_dtype.itemsize
                        for f in self.schema.heap_fields)  # (a compressed field: its size before compression)
        return take

    def _cast_rows(self, field: Field, value: Any, sample: int) -> np.ndarray:
        data = np.asarray(value)
        if data.ndim != len(field.shape) or data.shape[1:] != field.row_shape:
            raise SchemaError(f"field {field.name!r}, sample {sample}: expected shape (rows, "
                              f"{', '.join(map(str, field.row_shape))}) for {field.shape}, got {data.shape}")
        return np.ascontiguousarray(cast_to_stored(data[None], field, sample)[0][0])

    def _shard_full(self) -> bool:
        shard = self._shard
        if shard is None:
            return False
        heap_full = shard.heap is not None and shard.heap.size >= self._heap_limit
        return shard.num_samples + self._buffered >= self._records_per_shard or heap_full

    def _flush(self) -> None:
        if self._buffered:
            self._shard.records.write(self._buffer[:self._buffered])
            self._shard.checksums.write(self._buffer_checksums[:self._buffered])
            self._shard.num_samples += self._buffered
            self._buffered = 0

    def _finish_shard(self) -> None:
        entry = self._shard.finish()
        if self._dictionaries:  # (its frames were all written with the dictionaries in use now)
            entry = dataclasses.replace(entry, dictionaries=tuple((name, d.file) for name, (d, _)
                                                                  in sorted(self._dictionaries.items())))
            for dictionary, _ in self._dictionaries.values():
                self._manifest.dictionaries.setdefault(dictionary.file, dictionary)
        self._manifest.shards.append(entry)
        try:
            self._commit()
        except BaseException:
            self._manifest.shards.pop()  # not committed: _abandon removes the shard's files
            raise
        self._shard = None

    def _commit(self) -> None:
        self._check_metadata()
        self._manifest.metadata = dict(self.metadata)
        write_manifest(self.path, self._manifest)
