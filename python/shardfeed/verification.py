"""Checking a dataset on disk: every shard's checksum and structure. The package exports
:func:`verify` and :class:`VerifyReport` as ``shardfeed.verify`` and ``shardfeed.VerifyReport``; the
module is named for what it does, not after the function, so that ``shardfeed.verify`` is the
function however the module is imported (``import shardfeed.verify as m`` would bind the function,
and ``mock.patch("shardfeed.verify.x")`` would look in it, if both had one name).

Checksums are CRC-32s of whole files (docs/format.md), so a checksum mismatch marks all samples of
that shard as suspect. Problems the structure shows are pinned to samples: records missing from a
truncated file, variable-length rows that point outside their heap file (or past the end of a
truncated one), bool values other than 0 and 1. Problems are kept as sample ranges, never as
per-sample arrays, so memory stays bounded by the shards and the problems found, whatever counts a
manifest claims.
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from . import _core
from ._process import process_alive
from .errors import ShardFormatError
from .format import (
    CHECKSUM_DTYPE, FILE_KIND_CHECKSUMS, FILE_KIND_HEAP, FILE_KIND_RECORDS, HEADER_BYTES, LOCK_NAME, MANIFEST_NAME,
    MERGE_JOURNAL_NAME, SHARD_FILE_PATTERN, TEMPORARY_MANIFEST_PATTERN, check_header, checksum_words, format_checksum,
    is_data_file_name,
)
from .manifest import Manifest, ShardEntry, read_dictionary, read_manifest
from .fileio import file_system_path, open_regular
from ._text import human_bytes, printable
from .lock import lock_holder

_CHUNK_BYTES = 4 << 20


@dataclass
class Problem:
    """One thing wrong with a dataset: ``file`` at fault, ``shard`` its number in the manifest
    (None for the manifest itself) and the global sample ranges ``[start, stop)`` it affects."""

    file: str
    message: str
    shard: Optional[int] = None
    samples: List[Tuple[int, int]] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return sum(stop - start for start, stop in self.samples)

    def __str__(self) -> str:
        return f"{self.file}: {self.message}"


@dataclass
class VerifyReport:
    """What :func:`verify` found. ``ok`` is true when nothing is wrong; ``notes`` tell about things
    that are not errors (a writer at work, or leftovers of one that was killed)."""

    path: str
    num_samples: int = 0
    num_shards: int = 0
    problems: List[Problem] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    # Each compressed field's CompressedSize (its stored and raw bytes in the records read).
    compression: Dict[str, "CompressedSize"] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def bad_shards(self) -> List[int]:
        """Numbers of the shards with a problem."""
        return sorted({p.shard for p in self.problems if p.shard is not None})

    @property
    def bad_ranges(self) -> List[Tuple[int, int]]:
        """Sorted, merged ``[start, stop)`` ranges of the samples that are bad or suspect."""
        merged: List[List[int]] = []
        for start, stop in sorted(r for p in self.problems for r in p.samples):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], stop)
            else:
                merged.append([start, stop])
        return [(start, stop) for start, stop in merged]

    @property
    def num_bad_samples(self) -> int:
        return sum(stop - start for start, stop in self.bad_ranges)

    def good_indices(self) -> np.ndarray:
        """Indices of the samples outside :attr:`bad_ranges`, e.g. for ``ds.subset(...)`` to train
        on the rest of a damaged dataset."""
        keep = np.ones(self.num_samples, dtype=bool)
        for start, stop in self.bad_ranges:
            keep[start:stop] = False
        return np.flatnonzero(keep).astype(np.int64)

    def to_json(self) -> Dict[str, Any]:
        return {
            "path": self.path, "ok": self.ok, "num_samples": self.num_samples, "num_shards": self.num_shards,
            "bad_shards": self.bad_shards, "bad_ranges": [list(r) for r in self.bad_ranges],
            "num_bad_samples": self.num_bad_samples,
            "problems": [{"file": p.file, "shard": p.shard, "message": p.message,
                          "samples": [list(r) for r in p.samples]} for p in self.problems],
            "notes": list(self.notes),
            "compression": {name: size.to_json() for name, size in self.compression.items()},
        }

    def __str__(self) -> str:
        if self.ok:
            lines = [f"{self.path}: ok, {self.num_samples} samples in {self.num_shards} shard(s)"]
        else:
            where = f" in shard(s) {self.bad_shards}" if self.bad_shards else ""
            unread = any(p.shard is None for p in self.problems)  # no manifest: no samples known
            counts = "" if unread else f"; {self.num_bad_samples} of {self.num_samples} samples bad or suspect"
            lines = [f"{self.path}: {len(self.problems)} problem(s){where}{counts}"]
            lines += [f"  {p}" for p in self.problems]
        lines += [f"  {size}" for size in self.compression.values()]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


@dataclass
class CompressedSize:
    """The bytes of compressed field ``name`` in the heap files (``stored``) and as values
    (``raw``, what the same samples take uncompressed), over ``samples`` samples."""

    name: str
    codec: str
    samples: int = 0
    stored: int = 0
    raw: int = 0
    # Trained dictionaries: how many files the field's shards use, their bytes, and how many of
    # the field's shards use none (stored, the frames' bytes, leaves the dictionaries out).
    dictionaries: int = 0
    dictionary_bytes: int = 0
    shards_without_dictionary: int = 0

    @property
    def ratio(self) -> float:
        """raw / stored: how many times smaller the field is compressed (1.0 without samples)."""
        return self.raw / self.stored if self.stored else 1.0

    def add(self, descriptors: np.ndarray, raw_bytes: int) -> None:
        """Counts the samples whose (offset, bytes) descriptors these are."""
        self.samples += len(descriptors)
        self.stored += int(descriptors[:, 1].sum(dtype=np.uint64))
        self.raw += len(descriptors) * raw_bytes

    def to_json(self) -> Dict[str, Any]:
        return {"codec": self.codec, "samples": self.samples, "stored_bytes": self.stored, "raw_bytes": self.raw,
                "ratio": round(self.ratio, 4), "dictionaries": self.dictionaries,
                "dictionary_bytes": self.dictionary_bytes, "shards_without_dictionary": self.shards_without_dictionary}

    def count_dictionaries(self, manifest: Manifest) -> None:
        """Counts the field's dictionaries and the shards without one, from the manifest."""
        files = [shard.dictionary(self.name) for shard in manifest.shards]
        used = {file for file in files if file is not None}
        self.dictionaries = len(used)
        self.dictionary_bytes = sum(manifest.dictionaries[file].size for file in used)
        self.shards_without_dictionary = files.count(None) if used else 0

    def __str__(self) -> str:
        text = (f"field {printable(self.name)!r} ({self.codec}): {human_bytes(self.stored)} stored for "
                f"{human_bytes(self.raw)} of values, {self.ratio:.2f}x smaller")
        if self.dictionaries:
            text += (f", with {self.dictionaries} trained dictionar{'y' if self.dictionaries == 1 else 'ies'} of "
                     f"{human_bytes(self.dictionary_bytes)}")
            if self.shards_without_dictionary:
                text += f" ({self.shards_without_dictionary} shard(s) without one)"
        return text


def compressed_sizes(path: str, manifest: Manifest) -> Dict[str, CompressedSize]:
    """Each compressed field's stored and raw bytes over the whole dataset, from the descriptors in
    its record files (read in pieces of a few MiB; nothing is decoded or checked: verify does that)."""
    schema = manifest.schema
    sizes = {name: CompressedSize(name, codec) for name, codec in schema.codecs.items()}
    if not sizes:
        return sizes
    for size in sizes.values():
        size.count_dictionaries(manifest)
    per_chunk = max(1, _CHUNK_BYTES // schema.record_bytes)
    for shard in manifest.shards:
        with _open_shard_file(os.path.join(path, shard.file)) as f:
            f.seek(HEADER_BYTES)
            left = shard.num_samples
            while left > 0 and (chunk := f.read(min(left, per_chunk) * schema.record_bytes)):
                records = np.frombuffer(chunk, dtype=schema.record_dtype, count=len(chunk) // schema.record_bytes)
                _count_compressed(records, schema, sizes)
                left -= len(records)
    return sizes


def _count_compressed(records: np.ndarray, schema, sizes: Dict[str, CompressedSize]) -> None:
    for name, size in sizes.items():
        size.add(records[name], schema.fields[name].raw_bytes)


def verify(path: "os.PathLike[str] | str") -> VerifyReport:
    """Checks the dataset at ``path``: the manifest, and every shard file's size, header, CRC-32
    checksum and records. Reads every byte once, in pieces of a few MiB. Problems are reported, not
    raised (an unreadable manifest is a problem too)."""
    try:
        path = file_system_path(path, OSError)
    except OSError as exc:
        report = VerifyReport(exc.filename)
        report.problems.append(Problem(exc.filename, exc.strerror))
        return report
    report = VerifyReport(path)
    manifest_path = os.path.join(path, MANIFEST_NAME)
    if not os.path.isdir(path):
        what = "not a directory" if os.path.lexists(path) else "no such directory"
        report.problems.append(Problem(path, f"{what}: not a dataset"))
        return report
    try:
        manifest = read_manifest(path)
    except (OSError, ShardFormatError) as exc:
        message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        if message.startswith(manifest_path + ": "):
            message = message[len(manifest_path) + 2:]
        report.problems.append(Problem(manifest_path, f"cannot read the manifest: {message}"))
        _note_writer(path, None, report)
        return report
    return verify_manifest(path, manifest, report)


def verify_manifest(path: str, manifest: Manifest, report: Optional[VerifyReport] = None) -> VerifyReport:
    """:func:`verify` for an already parsed manifest (what :meth:`Dataset.verify` checks)."""
    report = report or VerifyReport(path)
    report.num_samples = manifest.num_samples
    report.num_shards = len(manifest.shards)
    report.compression = {name: CompressedSize(name, codec) for name, codec in manifest.schema.codecs.items()}
    for size in report.compression.values():
        size.count_dictionaries(manifest)
    dictionary_ids = _verify_dictionaries(path, manifest, report)
    first = 0
    for number, shard in enumerate(manifest.shards):
        _verify_shard(path, manifest, number, shard, first, report, dictionary_ids)
        first += shard.num_samples
    _note_writer(path, manifest, report)
    return report


def _verify_dictionaries(path: str, manifest: Manifest, report: VerifyReport) -> Optional[Dict[str, Optional[int]]]:
    """Each dictionary file: its size and checksum, and that zstd loads it (where the library can);
    a bad one makes the samples of every shard that uses it suspect. Returns each file's dictionary
    id (None: bad or not loaded), or None for a dataset without dictionaries."""
    if not manifest.dictionaries:
        return None
    ids: Dict[str, Optional[int]] = {}
    starts = np.concatenate([[0], np.cumsum([s.num_samples for s in manifest.shards], dtype=np.int64)])
    for entry in manifest.dictionaries.values():
        users = [(number, shard) for number, shard in enumerate(manifest.shards)
                 if entry.file in (file for _, file in shard.dictionaries)]
        codec = next((manifest.schema.fields[name].codec for _, shard in users[:1]
                      for name, file in shard.dictionaries if file == entry.file), None)
        file = os.path.join(path, entry.file)
        ids[entry.file] = None
        try:
            data = read_dictionary(path, entry)
            if codec is not None and _core.dictionaries_unavailable(codec) is None:
                ids[entry.file] = _core.Dictionary(codec, data).id
        except (OSError, ValueError) as exc:
            message = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if message.startswith(file + ": "):
                message = message[len(file) + 2:]
            samples = [(int(starts[n]), int(starts[n + 1])) for n, _ in users if starts[n + 1] > starts[n]]
            merged: List[Tuple[int, int]] = []
            _extend_ranges(merged, samples)
            report.problems.append(Problem(file, f"dictionary: {message}; the samples of the shards that use it "
                                           f"({[n for n, _ in users]}) cannot be decoded",
                                           users[0][0] if users else None, merged))
    return ids


_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def _frame_dictionary_id(header: bytes) -> Optional[int]:
    """The dictionary id a zstd frame header names (0: none), or None where ``header`` does not
    start a zstd frame (RFC 8878, 3.1.1.1: the descriptor byte's Dictionary_ID_flag, the window
    descriptor that precedes the id unless Single_Segment_flag is set)."""
    if len(header) < 5 or header[:4] != _ZSTD_MAGIC:
        return None
    descriptor = header[4]
    at = 5 if descriptor & 0x20 else 6
    size = (0, 1, 2, 4)[descriptor & 3]
    if len(header) < at + size:
        return None
    return int.from_bytes(header[at:at + size], "little")


def _ranges(samples: np.ndarray) -> List[Tuple[int, int]]:
    """Sorted unique indices -> [start, stop) ranges."""
    if samples.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(samples) != 1)
    starts = np.concatenate([[samples[0]], samples[breaks + 1]])
    stops = np.concatenate([samples[breaks], [samples[-1]]]) + 1
    return [(int(a), int(b)) for a, b in zip(starts, stops)]


def _extend_ranges(ranges: List[Tuple[int, int]], more: List[Tuple[int, int]]) -> None:
    """Appends sorted ranges that start at or after the last one, joining touching ones."""
    for start, stop in more:
        if ranges and start <= ranges[-1][1]:
            ranges[-1] = (ranges[-1][0], max(ranges[-1][1], stop))
        else:
            ranges.append((start, stop))


def describe_samples(ranges: List[Tuple[int, int]], *, with_count: bool = False) -> str:
    """Sorted [start, stop) ranges as text: ``samples 3, 7-9, 12`` (the first 10 ranges, then
    `` ... (N samples)``); ``with_count`` adds `` (N samples)`` whenever there are several."""
    shown = ", ".join(str(a) if b - a == 1 else f"{a}-{b - 1}" for a, b in ranges[:10])
    count = sum(b - a for a, b in ranges)
    more = len(ranges) > 10
    return (f"sample{'s' if count > 1 else ''} {shown}{' ...' if more else ''}"
            + (f" ({count} samples)" if count > 1 and (with_count or more) else ""))


def _open_shard_file(file: str):
    """A shard or heap file opened for reading: a regular file, never through a link (or raises)."""
    return os.fdopen(open_regular(file), "rb")


def _open_checked(file: str, expected_size: int, kind: int, manifest: Manifest, number: int,
                  whole: Tuple[int, int], report: VerifyReport):
    """Opens a shard file and checks its header. Returns (file object, actual size), or None after
    reporting why the whole shard is bad."""
    try:
        f = _open_shard_file(file)
    except (OSError, ShardFormatError) as exc:
        message = (f"cannot open: {exc.strerror}" if isinstance(exc, OSError) and exc.strerror else
                   str(exc)[len(file) + 2:] if str(exc).startswith(file + ": ") else str(exc))
        report.problems.append(Problem(file, message, number, [whole]))
        return None
    try:
        size = os.fstat(f.fileno()).st_size
        check_header(file, f.read(HEADER_BYTES), kind, manifest.schema)
    except (OSError, ShardFormatError) as exc:
        f.close()
        message = str(exc)[len(file) + 2:] if str(exc).startswith(file + ": ") else str(exc)
        report.problems.append(Problem(file, message, number, [whole]))
        return None
    if size != expected_size:
        word = "truncated" if size < expected_size else "extra data"
        report.problems.append(Problem(file, f"file is {size} bytes, the manifest says {expected_size} ({word})",
                                       number, [whole] if size > expected_size else []))
    return f, size


def _load_record_checksums(path: str, manifest: Manifest, number: int, shard: ShardEntry,
                           report: VerifyReport) -> Optional[np.ndarray]:
    """The shard's per-record checksums, (samples, checksum_words) uint32, or None when it has none
    (written before format version 2) or they are damaged (reported: the shard is then checked by
    its whole-file checksums only, as before)."""
    if shard.checksums_file is None:
        return None
    file = os.path.join(path, shard.checksums_file)
    known = len(report.problems)
    opened = _open_checked(file, shard.checksums_size, FILE_KIND_CHECKSUMS, manifest, number, (0, 0), report)
    for problem in report.problems[known:]:
        problem.samples = []  # not the samples' fault: they are checked by the whole-file checksums
        problem.message += ": the shard's samples are checked by its whole-file checksums only"
    if opened is None:
        return None
    f, size = opened
    with f:
        f.seek(0)
        data = f.read()
    if size != shard.checksums_size or format_checksum(zlib.crc32(data)) != shard.checksums_checksum:
        if size == shard.checksums_size:
            report.problems.append(Problem(file, f"checksum {format_checksum(zlib.crc32(data))} does not match "
                                           f"the manifest's {shard.checksums_checksum}: the per-record checksums "
                                           "are damaged, the shard's samples are checked by its whole-file "
                                           "checksums only", number))
        return None
    return np.frombuffer(data, CHECKSUM_DTYPE, offset=HEADER_BYTES).reshape(-1, checksum_words(manifest.schema))


def _heap_row_checksums(heap_file, records: np.ndarray, schema) -> np.ndarray:
    """CRC32C of each record's heap bytes of all variable and compressed fields, in field order (the
    second checksum word); reads them with one pread per sample and field."""
    sums = np.zeros(len(records), np.uint32)
    fields = [(f.name, f.heap_unit_bytes) for f in schema.heap_fields]
    for i in range(len(records)):
        crc = 0
        for name, row_bytes in fields:
            offset, rows = (int(v) for v in records[name][i])
            if rows:
                crc = _core.crc32c(os.pread(heap_file.fileno(), rows * row_bytes, offset), crc)
        sums[i] = crc
    return sums


def _verify_shard(path: str, manifest: Manifest, number: int, shard: ShardEntry, first: int,
                  report: VerifyReport, dictionary_ids: Optional[Dict[str, Optional[int]]] = None) -> None:
    whole = (first, first + shard.num_samples)
    heap_path = os.path.join(path, shard.heap_file) if shard.heap_file else None
    heap_size = None
    stored = _load_record_checksums(path, manifest, number, shard, report)
    heap_damaged = None  # the heap file's checksum problem, reported unless its samples are named
    if heap_path is not None:  # its size tells which rows a truncated heap still holds
        opened = _open_checked(heap_path, shard.heap_size, FILE_KIND_HEAP, manifest, number, whole, report)
        if opened is not None:
            f, heap_size = opened
            crc = 0
            try:
                with f:
                    f.seek(0)
                    while chunk := f.read(_CHUNK_BYTES):
                        crc = zlib.crc32(chunk, crc)
            except OSError as exc:
                report.problems.append(Problem(heap_path, f"cannot read: {exc.strerror}", number, [whole]))
            else:
                if format_checksum(crc) != shard.heap_checksum:
                    heap_damaged = Problem(heap_path, f"checksum {format_checksum(crc)} does not match the "
                                           f"manifest's {shard.heap_checksum}: all samples of the shard are "
                                           "suspect", number, [whole])

    heap_rows = None  # the heap file, open for the second checksum word
    if stored is not None and stored.shape[1] > 1 and heap_size == shard.heap_size:
        heap_rows = _open_shard_file(heap_path)
    try:
        _verify_records(path, manifest, number, shard, first, report, stored, heap_rows, heap_damaged,
                        heap_path, heap_size, dictionary_ids)
    finally:
        if heap_rows is not None:
            heap_rows.close()


def _verify_records(path: str, manifest: Manifest, number: int, shard: ShardEntry, first: int,
                    report: VerifyReport, stored: Optional[np.ndarray], heap_rows, heap_damaged: Optional[Problem],
                    heap_path: Optional[str], heap_size: Optional[int],
                    dictionary_ids: Optional[Dict[str, Optional[int]]] = None) -> None:
    """The record file of a shard: size, header, whole-file checksum, the records' structure, and
    with per-record checksums (``stored``) each record's and each sample's heap rows'; in a dataset
    with dictionaries, that each frame names its shard's dictionary (``dictionary_ids``)."""
    schema = manifest.schema
    whole = (first, first + shard.num_samples)
    rec_path = os.path.join(path, shard.file)
    named: Dict[str, List[Tuple[int, int]]] = {}  # samples whose record (or heap rows) fail their checksum
    opened = _open_checked(rec_path, shard.size, FILE_KIND_RECORDS, manifest, number, whole, report)
    if opened is None:
        if heap_damaged is not None:
            report.problems.append(heap_damaged)
        return
    f, size = opened
    record_bytes = schema.record_bytes
    per_chunk = max(1, _CHUNK_BYTES // record_bytes)
    bad: Dict[Tuple[str, str], List[Tuple[int, int]]] = {}
    crc = 0
    done = 0
    try:
        with f:
            f.seek(0)
            crc = zlib.crc32(f.read(HEADER_BYTES), crc)
            while chunk := f.read(per_chunk * record_bytes):
                crc = zlib.crc32(chunk, crc)
                complete = min(len(chunk) // record_bytes, shard.num_samples - done)
                if complete > 0:
                    records = np.frombuffer(chunk, dtype=schema.record_dtype, count=complete)
                    _count_compressed(records, schema, report.compression)
                    for file, what, rows in _bad_records(records, schema, shard, rec_path, heap_path, heap_size,
                                                         dictionary_ids):
                        _extend_ranges(bad.setdefault((file, what), []), _ranges(rows + first + done))
                    if stored is not None:
                        expected = stored[done:done + complete]
                        actual = _core.record_checksums(chunk[:complete * record_bytes], record_bytes)
                        _extend_ranges(named.setdefault(rec_path, []),
                                       _ranges(np.flatnonzero(actual != expected[:, 0]) + first + done))
                        if heap_rows is not None:  # rows of intact records only: a damaged one's descriptors
                            intact = np.flatnonzero(actual == expected[:, 0])  # may point anywhere
                            rows_actual = _heap_row_checksums(heap_rows, records[intact], schema)
                            _extend_ranges(named.setdefault(heap_path, []),
                                           _ranges(intact[rows_actual != expected[intact, 1]] + first + done))
                    done += complete
    except OSError as exc:  # an I/O error: what was read is reported, the rest of the shard is suspect
        report.problems.append(Problem(rec_path, f"cannot read past sample {first + done}: {exc.strerror}",
                                       number, [whole]))
    else:
        if format_checksum(crc) != shard.checksum and not (named.get(rec_path) and done == shard.num_samples):
            report.problems.append(Problem(rec_path, f"checksum {format_checksum(crc)} does not match the "
                                           f"manifest's {shard.checksum}: all samples of the shard are suspect",
                                           number, [whole]))
    for file, ranges in named.items():
        if ranges:
            what = ("record" if file == rec_path else "variable-length rows" if not schema.codecs
                    else "heap bytes (compressed values or variable-length rows)")
            report.problems.append(Problem(file, f"{describe_samples(ranges, with_count=True)}: {what} failed the per-record CRC32C "
                                           "check (the bytes changed after they were written)", number, ranges))
    heap_named = heap_path is not None and bool(named.get(heap_path))
    if heap_damaged is not None and not heap_named:
        report.problems.append(heap_damaged)
    if done < shard.num_samples and size < shard.size:
        missing = [(first + done, whole[1])]
        report.problems.append(Problem(rec_path, f"the records of {describe_samples(missing)} are missing (file of "
                                       f"{size} bytes)", number, missing))
    for (file, what), ranges in bad.items():
        report.problems.append(Problem(file, f"{describe_samples(ranges)}: {what}", number, ranges))


def _outside(offsets: np.ndarray, counts: np.ndarray, row_bytes: np.uint64, end: int) -> np.ndarray:
    """Descriptors whose rows are not all inside bytes [HEADER_BYTES, end) of the heap file."""
    end = np.uint64(end)
    with np.errstate(over="ignore"):  # (end - offsets) wraps where offsets > end, which is caught first
        return (offsets < HEADER_BYTES) | (offsets > end) | (counts > (end - offsets) // row_bytes)


def _bad_records(records: np.ndarray, schema, shard: ShardEntry, rec_path: str, heap_path: Optional[str],
                 heap_size: Optional[int], dictionary_ids: Optional[Dict[str, Optional[int]]] = None):
    """Yields (file at fault, what is wrong, record numbers in the chunk) for records whose contents
    no writer produces, whose rows a truncated heap file lost, or (in a dataset with dictionaries)
    whose frame names another dictionary than its shard's."""
    for f in schema.fields.values():
        if f.dtype == "bool" and f.count and not f.in_heap:  # (a heap field's record holds its descriptor)
            values = records[f.name].reshape(len(records), -1).view(np.uint8)
            rows = np.flatnonzero((values > 1).any(axis=1))
            if rows.size:
                yield rec_path, f"bool field {f.name!r} holds values other than 0 and 1", rows
        if not f.in_heap:
            continue
        offsets, counts = records[f.name][:, 0], records[f.name][:, 1]
        row_bytes = np.uint64(max(f.heap_unit_bytes, 1))
        kind = "compressed" if f.compressed else "variable"
        outside = _outside(offsets, counts, row_bytes, shard.heap_size)
        if f.compressed:  # a frame is never empty
            outside |= counts == 0
        if outside.any():
            yield rec_path, f"{kind} field {f.name!r} points outside its heap file", np.flatnonzero(outside)
        if heap_size is not None and heap_size < shard.heap_size:
            cut = _outside(offsets, counts, row_bytes, heap_size) & ~outside & (counts > 0)
            if cut.any():
                yield heap_path, f"the {'frames' if f.compressed else 'rows'} of {kind} field {f.name!r} are past " \
                    "the end of the truncated file", np.flatnonzero(cut)
        if f.compressed and dictionary_ids is not None and heap_size == shard.heap_size:
            file = shard.dictionary(f.name)
            wanted = 0 if file is None else dictionary_ids.get(file)
            if wanted is not None:  # (a bad dictionary is reported on its own)
                wrong = _frames_naming_another_dictionary(heap_path, offsets, counts, ~outside, wanted)
                if wrong.size:
                    yield heap_path, (f"the frames of compressed field {f.name!r} name another dictionary than the "
                                      f"manifest gives the shard ({file or 'none'})"), wrong


def _frames_naming_another_dictionary(heap_path: str, offsets: np.ndarray, lengths: np.ndarray, inside: np.ndarray,
                                      wanted: int) -> np.ndarray:
    """The records (of those ``inside`` the heap file) whose frame header names a dictionary id
    other than ``wanted``; a frame that is not one (damaged) is left to the checksums."""
    wrong = []
    with _open_shard_file(heap_path) as f:
        for r in np.flatnonzero(inside & (lengths > 0)).tolist():
            named = _frame_dictionary_id(os.pread(f.fileno(), min(int(lengths[r]), 18), int(offsets[r])))
            if named is not None and named != wanted:
                wrong.append(r)
    return np.array(wrong, dtype=np.int64)


def _note_writer(path: str, manifest: Optional[Manifest], report: VerifyReport) -> None:
    """Notes about writers (one at work now, or one that did not finish), an unfinished merge, and
    files no manifest lists; each says what is known and what the next writer really does."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    temporary = sorted(n for n in names if TEMPORARY_MANIFEST_PATTERN.fullmatch(n))
    unlisted: List[str] = []
    if manifest is not None:
        listed = {n for s in manifest.shards for n in (s.file, s.heap_file, s.checksums_file) if n}
        listed |= set(manifest.dictionaries)
        unlisted = sorted(n for n in names if is_data_file_name(n) and n not in listed)
    if LOCK_NAME in names:
        holder = lock_holder(os.path.join(path, LOCK_NAME))
        committed = "" if manifest is None else f": the dataset holds the {report.num_samples} samples it committed"
        if holder is None:
            state = "a writer did not finish (its lock file names no process)" if unlisted or temporary else None
        elif holder[1] != os.uname().nodename:
            state = f"a writer (pid {holder[0]} on host {holder[1]}) is at work or did not finish"
        elif process_alive(holder[0]):
            state = f"a writer (pid {holder[0]}) is at work" + (
                "" if manifest is None else f": samples after the {report.num_samples} committed are not listed yet")
        else:
            state = f"the writer pid {holder[0]} did not finish (killed?){committed}"
        if state:
            report.notes.append(state)
    if MERGE_JOURNAL_NAME in names:
        report.notes.append(f"a merge into this directory did not finish ({MERGE_JOURNAL_NAME} holds its plan): "
                            "running the same shardfeed.merge again completes it")
    if manifest is None:
        if any(SHARD_FILE_PATTERN.fullmatch(n) for n in names):
            report.notes.append("the manifest cannot be read, so which shard files are committed is unknown; "
                                "nothing is removed, and Writer(path, mode='a') refuses the dataset until "
                                f"{MANIFEST_NAME} is repaired or restored")
        if temporary:
            report.notes.append(f"temporary manifests {temporary}: a writer did not rename them into place")
    elif unlisted or temporary:
        report.notes.append(f"uncommitted files {unlisted + temporary}: ignored by readers, removed by the next "
                            "Writer(path, mode='a')")

