"""The manifest (``manifest.json``) and the dictionary files it lists: their entries, parsing and
validating a manifest, and reading and writing both kinds of file (docs/format.md, "manifest.json"
and "Compression dictionaries"). The files' names and the schema are the format module's.
"""

from __future__ import annotations

import errno
import json
import os
import zlib
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from .errors import SchemaError, ShardFormatError, ShardReadError
from .fileio import encodable, open_regular, read_bounded, replace_atomically
from .format import (
    DICTIONARY_FILE_PATTERN, HEADER_BYTES, MANIFEST_NAME, Schema, checksum_file_size, dictionary_name, format_checksum,
    is_reserved_name, temporary_dictionary_name, temporary_manifest_name,
)

FORMAT_NAME = "shardfeed"
# Manifest version this shardfeed writes, and those it reads. Version 2 added per-record checksums
# (a shard's "checksums" entry, optional so that shards of version-1 datasets stay valid in it).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
# The largest dictionary file a reader loads (a writer trains at most MAX_DICTIONARY_BYTES).
MAX_DICTIONARY_BYTES = 16 << 20
# Bounds what reading a manifest may cost: about 5 million shards, a petabyte of 256 MiB shards.
MAX_MANIFEST_BYTES = 1 << 30

# ---- the manifest's keys and entries -------------------------------------------------------

_MANIFEST_KEYS = {"format", "version", "fields", "record_bytes", "num_samples", "shards", "metadata"}
_SHARD_KEYS = {"file", "num_samples", "size", "checksum"}
_HEAP_KEYS = {"file", "size", "checksum"}
_CHECKSUMS_KEY = "checksums"  # optional in version 2: {"file", "size", "checksum"} of the .crc file
# Optional (only where a field has a trained dictionary): the manifest's list of dictionary files,
# each {"file", "size", "checksum"}, and a shard's {field name: dictionary file} of its frames.
_DICTIONARIES_KEY = "dictionaries"


@dataclass(frozen=True)
class DictionaryEntry:
    """A dictionary file of the dataset: its name, size and CRC-32 checksum."""

    file: str
    size: int
    checksum: str

    def to_json(self) -> Dict[str, Any]:
        return {"file": self.file, "size": self.size, "checksum": self.checksum}


@dataclass(frozen=True)
class ShardEntry:
    file: str
    num_samples: int
    size: int
    checksum: str
    heap_file: Optional[str] = None
    heap_size: int = 0
    heap_checksum: Optional[str] = None
    checksums_file: Optional[str] = None  # the per-record checksums (None: a shard written before them)
    checksums_size: int = 0
    checksums_checksum: Optional[str] = None
    # (field name, dictionary file) of each compressed field whose frames in this shard were
    # written with a trained dictionary; a compressed field not named here uses none.
    dictionaries: Tuple[Tuple[str, str], ...] = ()

    def dictionary(self, field: str) -> Optional[str]:
        """The dictionary file of ``field``'s frames in this shard, or None."""
        return dict(self.dictionaries).get(field)

    def to_json(self) -> Dict[str, Any]:
        entry: Dict[str, Any] = {
            "file": self.file, "num_samples": self.num_samples, "size": self.size, "checksum": self.checksum,
        }
        if self.heap_file is not None:
            entry["heap"] = {"file": self.heap_file, "size": self.heap_size, "checksum": self.heap_checksum}
        if self.checksums_file is not None:
            entry[_CHECKSUMS_KEY] = {"file": self.checksums_file, "size": self.checksums_size,
                                     "checksum": self.checksums_checksum}
        if self.dictionaries:
            entry[_DICTIONARIES_KEY] = dict(self.dictionaries)
        return entry


@dataclass
class Manifest:
    schema: Schema
    shards: List[ShardEntry]
    metadata: Dict[str, Any]
    # The dictionary files the shards name, by file name (in the order first named).
    dictionaries: Dict[str, DictionaryEntry] = dataclass_field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def to_json(self) -> Dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "fields": self.schema.spec(),
            "record_bytes": self.schema.record_bytes,
            "num_samples": self.num_samples,
            "shards": [s.to_json() for s in self.shards],
            "metadata": self.metadata,
            **({_DICTIONARIES_KEY: [d.to_json() for d in self.dictionaries.values()]} if self.dictionaries else {}),
        }


def _safe_file_name(manifest_path: str, name: Any, what: str) -> str:
    """Shard names are plain file names inside the dataset directory: no separators, no '..', none
    of the names the library writes itself (the manifest, the lock, temporary files)."""
    if (
        not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name
        or "\0" in name or os.path.isabs(name) or not encodable(name)
    ):
        raise ShardFormatError(f"{manifest_path}: {what} file name {name!r} is not a plain file name "
                               "inside the dataset directory")
    if is_reserved_name(name):
        raise ShardFormatError(f"{manifest_path}: {what} file name {name!r} is the name of a file shardfeed "
                               "writes itself, not a shard")
    return name


def _count(manifest_path: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise ShardFormatError(f"{manifest_path}: {what} must be an integer in [0, 2**62), got {value!r}")
    return value


def _checksum(manifest_path: str, value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.startswith("crc32:") or len(value) != 14:
        raise ShardFormatError(f"{manifest_path}: {what} checksum {value!r} is not 'crc32:<8 hex digits>'")
    try:
        int(value[6:], 16)
    except ValueError:
        raise ShardFormatError(f"{manifest_path}: {what} checksum {value!r} is not 'crc32:<8 hex digits>'") from None
    return value


def parse_manifest(manifest_path: str, text: bytes) -> Manifest:
    """Validates a manifest completely; every problem raises ShardFormatError naming the file."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise ShardFormatError(f"{manifest_path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ShardFormatError(f"{manifest_path}: expected a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT_NAME:
        raise ShardFormatError(f"{manifest_path}: not a shardfeed manifest (format {doc.get('format')!r})")
    version = doc.get("version")
    if isinstance(version, bool) or version not in READ_VERSIONS:
        raise ShardFormatError(f"{manifest_path}: format version {version!r}, "
                               f"this shardfeed reads versions {', '.join(map(str, READ_VERSIONS))}")
    unknown, missing = set(doc) - _MANIFEST_KEYS - {_DICTIONARIES_KEY}, _MANIFEST_KEYS - set(doc)
    if unknown or missing:
        raise ShardFormatError(f"{manifest_path}: unknown keys {sorted(unknown)} / missing keys {sorted(missing)}")
    if not isinstance(doc["fields"], list):  # (a dict would be read as the Writer's {name: spec} form)
        raise ShardFormatError(f"{manifest_path}: fields must be a list")
    try:
        schema = Schema.from_spec(doc["fields"])
    except SchemaError as exc:
        raise ShardFormatError(f"{manifest_path}: {exc}") from None
    if doc["record_bytes"] != schema.record_bytes:
        raise ShardFormatError(f"{manifest_path}: record_bytes {doc['record_bytes']!r} does not match the "
                               f"schema's {schema.record_bytes}")
    if not isinstance(doc["metadata"], dict):
        raise ShardFormatError(f"{manifest_path}: metadata must be a JSON object")
    if not isinstance(doc["shards"], list):
        raise ShardFormatError(f"{manifest_path}: shards must be a list")
    has_heap = bool(schema.heap_fields)
    dictionaries = _parse_dictionaries(manifest_path, doc.get(_DICTIONARIES_KEY, []))
    shards: List[ShardEntry] = []
    seen = set(dictionaries)
    for number, raw in enumerate(doc["shards"]):
        what = f"shard {number}"
        expected_keys = _SHARD_KEYS | ({"heap"} if has_heap else set())
        optional = ({_CHECKSUMS_KEY} if version >= 2 else set()) | ({_DICTIONARIES_KEY} if dictionaries else set())
        if not isinstance(raw, dict) or not expected_keys <= set(raw) <= expected_keys | optional:
            raise ShardFormatError(f"{manifest_path}: {what} must have exactly the keys {sorted(expected_keys)}"
                                   + (f", and may have {sorted(optional)}" if optional else ""))
        name = _safe_file_name(manifest_path, raw["file"], what)
        count = _count(manifest_path, raw["num_samples"], f"{what} num_samples")
        size = _count(manifest_path, raw["size"], f"{what} size")
        if size != HEADER_BYTES + count * schema.record_bytes:
            raise ShardFormatError(f"{manifest_path}: {what} ({name}) has size {size}, but {count} records of "
                                   f"{schema.record_bytes} bytes need {HEADER_BYTES + count * schema.record_bytes}")
        entry = dict(file=name, num_samples=count, size=size, checksum=_checksum(manifest_path, raw["checksum"], what))
        if has_heap:
            heap = raw["heap"]
            if not isinstance(heap, dict) or set(heap) != _HEAP_KEYS:
                raise ShardFormatError(f"{manifest_path}: {what} heap must have exactly the keys {sorted(_HEAP_KEYS)}")
            entry.update(
                heap_file=_safe_file_name(manifest_path, heap["file"], f"{what} heap"),
                heap_size=_count(manifest_path, heap["size"], f"{what} heap size"),
                heap_checksum=_checksum(manifest_path, heap["checksum"], f"{what} heap"),
            )
            if entry["heap_size"] < HEADER_BYTES:
                raise ShardFormatError(f"{manifest_path}: {what} heap size {entry['heap_size']} is below the header size")
        if _CHECKSUMS_KEY in raw:
            entry.update(_parse_checksums_entry(manifest_path, raw[_CHECKSUMS_KEY], what, schema, count))
        if _DICTIONARIES_KEY in raw:
            entry["dictionaries"] = _parse_shard_dictionaries(manifest_path, raw[_DICTIONARIES_KEY], what, schema,
                                                              dictionaries)
        for file_name in (entry["file"], entry.get("heap_file"), entry.get("checksums_file")):
            if file_name is not None:
                if file_name in seen:
                    raise ShardFormatError(f"{manifest_path}: file {file_name!r} is listed twice")
                seen.add(file_name)
        shards.append(ShardEntry(**entry))
    manifest = Manifest(schema, shards, doc["metadata"], dictionaries)
    if doc["num_samples"] != manifest.num_samples:
        raise ShardFormatError(f"{manifest_path}: num_samples {doc['num_samples']!r} is not the sum of the "
                               f"shards' counts ({manifest.num_samples})")
    return manifest


def _parse_dictionaries(manifest_path: str, raw: Any) -> Dict[str, DictionaryEntry]:
    if not isinstance(raw, list):
        raise ShardFormatError(f"{manifest_path}: dictionaries must be a list")
    parsed: Dict[str, DictionaryEntry] = {}
    for number, item in enumerate(raw):
        what = f"dictionary {number}"
        if not isinstance(item, dict) or set(item) != _HEAP_KEYS:
            raise ShardFormatError(f"{manifest_path}: {what} must have exactly the keys {sorted(_HEAP_KEYS)}")
        name = item["file"]
        if not isinstance(name, str) or not DICTIONARY_FILE_PATTERN.fullmatch(name):
            raise ShardFormatError(f"{manifest_path}: {what} file name {name!r} is not a dictionary name shardfeed "
                                   "writes (dict-<16 hex digits>.zdict)")
        if name in parsed:
            raise ShardFormatError(f"{manifest_path}: file {name!r} is listed twice")
        size = _count(manifest_path, item["size"], f"{what} size")
        if not 0 < size <= MAX_DICTIONARY_BYTES:
            raise ShardFormatError(f"{manifest_path}: {what} ({name}) has size {size}, not in [1, "
                                   f"{MAX_DICTIONARY_BYTES}]")
        parsed[name] = DictionaryEntry(name, size, _checksum(manifest_path, item["checksum"], what))
    return parsed


def _parse_shard_dictionaries(manifest_path: str, raw: Any, what: str, schema: Schema,
                              dictionaries: Mapping[str, DictionaryEntry]) -> Tuple[Tuple[str, str], ...]:
    if not isinstance(raw, dict) or not raw:
        raise ShardFormatError(f"{manifest_path}: {what} dictionaries must be an object of field name -> "
                               "dictionary file")
    for name, file in raw.items():
        if name not in schema.fields or schema.fields[name].codec is None:
            raise ShardFormatError(f"{manifest_path}: {what} names a dictionary for {name!r}, which is not a "
                                   "compressed field")
        if not isinstance(file, str) or file not in dictionaries:
            raise ShardFormatError(f"{manifest_path}: {what} field {name!r}: dictionary {file!r} is not in the "
                                   "manifest's dictionaries")
    return tuple(raw.items())


def read_dictionary(path: str, entry: DictionaryEntry) -> bytes:
    """The bytes of dictionary ``entry`` of the dataset at ``path``, checked against the size and
    checksum the manifest gives: ShardFormatError (damaged, truncated, not a regular file) or
    ShardReadError (missing, unreadable) naming the file."""
    file = os.path.join(path, entry.file)
    fd = open_regular(file, " dictionary")
    try:
        try:
            size = os.fstat(fd).st_size
            data = read_bounded(fd, size, MAX_DICTIONARY_BYTES) if size == entry.size else None
        except OSError as exc:
            raise ShardReadError(exc.errno, f"cannot read the dictionary: {exc.strerror}", file) from None
    finally:
        os.close(fd)
    if data is None or len(data) != entry.size:
        raise ShardFormatError(f"{file}: the dictionary file has {size} bytes, the manifest says {entry.size} "
                               "(truncated or replaced)")
    if format_checksum(zlib.crc32(data)) != entry.checksum:
        raise ShardFormatError(f"{file}: the dictionary file does not match its checksum {entry.checksum} in the "
                               "manifest (damaged after it was written)")
    return data


def write_dictionary(path: str, data: bytes) -> DictionaryEntry:
    """Writes dictionary ``data`` into the dataset at ``path`` atomically (temporary file, fsync,
    rename, fsync of the directory) and returns its manifest entry."""
    name = dictionary_name(data)
    replace_atomically(path, name, temporary_dictionary_name(name, os.getpid()), data)
    return DictionaryEntry(name, len(data), format_checksum(zlib.crc32(data)))


def _parse_checksums_entry(manifest_path: str, raw: Any, what: str, schema: Schema, count: int) -> Dict[str, Any]:
    if not isinstance(raw, dict) or set(raw) != _HEAP_KEYS:
        raise ShardFormatError(f"{manifest_path}: {what} checksums must have exactly the keys {sorted(_HEAP_KEYS)}")
    size = _count(manifest_path, raw["size"], f"{what} checksums size")
    if size != checksum_file_size(schema, count):
        raise ShardFormatError(f"{manifest_path}: {what} checksums file has size {size}, but {count} samples "
                               f"need {checksum_file_size(schema, count)}")
    return dict(checksums_file=_safe_file_name(manifest_path, raw["file"], f"{what} checksums"),
                checksums_size=size, checksums_checksum=_checksum(manifest_path, raw["checksum"], f"{what} checksums"))


def read_manifest(path: str) -> Manifest:
    """Reads and validates ``path``/manifest.json: a regular file (no link, FIFO or device) of at
    most MAX_MANIFEST_BYTES. A missing manifest raises FileNotFoundError; other failures
    ShardFormatError or ShardReadError naming it."""
    manifest_path = os.path.join(path, MANIFEST_NAME)
    try:
        fd = open_regular(manifest_path)
    except ShardReadError as exc:
        if exc.errno == errno.ENOENT:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), manifest_path) from None
        raise
    try:
        size = os.fstat(fd).st_size
        if size > MAX_MANIFEST_BYTES:
            raise ShardFormatError(f"{manifest_path}: {size} bytes, larger than a manifest may be "
                                   f"({MAX_MANIFEST_BYTES} bytes)")
        data = read_bounded(fd, size, MAX_MANIFEST_BYTES)
        if data is None:
            raise ShardFormatError(f"{manifest_path}: larger than a manifest may be ({MAX_MANIFEST_BYTES} bytes)")
    except OSError as exc:
        raise ShardReadError(exc.errno, f"cannot read: {exc.strerror}", manifest_path) from None
    finally:
        os.close(fd)
    return parse_manifest(manifest_path, data)


def write_manifest(path: str, manifest: Manifest) -> None:
    """Replaces the manifest atomically: temporary file, fsync, rename, fsync of the directory."""
    data = json.dumps(manifest.to_json(), indent=1, allow_nan=False).encode() + b"\n"
    replace_atomically(path, MANIFEST_NAME, temporary_manifest_name(os.getpid()), data)
