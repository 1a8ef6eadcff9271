"""The on-disk format: schema, record layout, manifest and shard headers (see docs/format.md).

A dataset is a directory holding ``manifest.json`` and shard files. Every sample's fixed-shape
fields live together in one fixed-size record, so sample ``i`` of a shard sits at
``HEADER_BYTES + i * record_bytes`` of its ``.rec`` file. A variable-length field stores a 16-byte
descriptor in the record (absolute byte offset and row count, both uint64) and its rows in the
shard's ``.var`` heap file.
"""

from __future__ import annotations

import hashlib
import json
import errno
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass, field as dataclass_field
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import SchemaError, ShardFormatError, ShardReadError
from .fileio import encodable, open_regular, replace_atomically

FORMAT_NAME = "shardfeed"
# Manifest version this shardfeed writes, and those it reads. Version 2 added per-record checksums
# (a shard's "checksums" entry, optional so that shards of version-1 datasets stay valid in it).
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
# Version in the shard files' headers: their layout has not changed since version 1.
SHARD_FILE_VERSION = 1

# ---- names in a dataset directory (their one owner; docs/format.md) ---------------------------
MANIFEST_NAME = "manifest.json"
RECORDS_SUFFIX = ".rec"
HEAP_SUFFIX = ".var"
CHECKSUMS_SUFFIX = ".crc"  # a shard's per-record checksums (version 2)
# The names writers and merge give shard files (a manifest may list other plain names).
SHARD_FILE_PATTERN = re.compile(r"shard-\d{6,}\.(rec|var|crc)")
# The writer's lock: flock()ed while a writer is open; holds "<pid> <host>\n".
LOCK_NAME = "writer.lock"
# A manifest written but not yet renamed into place (by the process of that pid).
TEMPORARY_MANIFEST_PATTERN = re.compile(re.escape(MANIFEST_NAME) + r"\.tmp-\d+")
# A compressed field's trained dictionary (docs/format.md, "Compression dictionaries"): the zstd
# dictionary's bytes as zstd writes them, named after their SHA-256, so that merged parts' files
# never collide (and equal dictionaries are one file).
DICTIONARY_FILE_PATTERN = re.compile(r"dict-[0-9a-f]{16}\.zdict")
# A dictionary written but not yet renamed into place (by the process of that pid).
TEMPORARY_DICTIONARY_PATTERN = re.compile(r"dict-[0-9a-f]{16}\.zdict\.tmp-\d+")
# The largest dictionary file a reader loads (a writer trains at most MAX_DICTIONARY_BYTES).
MAX_DICTIONARY_BYTES = 16 << 20
# merge's plan in the target directory while it moves files (docs/reliability.md, "Merging").
MERGE_JOURNAL_NAME = "merge.journal"
TEMPORARY_JOURNAL_PATTERN = re.compile(re.escape(MERGE_JOURNAL_NAME) + r"\.tmp-\d+")
# Bounds what reading a manifest may cost: about 5 million shards, a petabyte of 256 MiB shards.
MAX_MANIFEST_BYTES = 1 << 30


def is_data_file_name(name: str) -> bool:
    """Whether ``name`` is one writers and merge give the files they list in a manifest: shard and
    dictionary files (a killed writer's are removed by the next one)."""
    return SHARD_FILE_PATTERN.fullmatch(name) is not None or DICTIONARY_FILE_PATTERN.fullmatch(name) is not None


def shard_stem(number: int) -> str:
    """The stem of shard file ``number``: ``shard-000042``."""
    return f"shard-{number:06d}"


def dictionary_name(data: bytes) -> str:
    """The file name of a dictionary of these bytes: ``dict-<first 16 hex digits of SHA-256>.zdict``."""
    return f"dict-{hashlib.sha256(data).hexdigest()[:16]}.zdict"


def temporary_dictionary_name(name: str, pid: int) -> str:
    return f"{name}.tmp-{pid}"


def temporary_manifest_name(pid: int) -> str:
    return f"{MANIFEST_NAME}.tmp-{pid}"


def temporary_journal_name(pid: int) -> str:
    return f"{MERGE_JOURNAL_NAME}.tmp-{pid}"


def is_reserved_name(name: str) -> bool:
    """Names the library writes itself besides shards: never a shard a manifest may list."""
    return (name in (MANIFEST_NAME, LOCK_NAME, MERGE_JOURNAL_NAME)
            or TEMPORARY_MANIFEST_PATTERN.fullmatch(name) is not None
            or TEMPORARY_JOURNAL_PATTERN.fullmatch(name) is not None
            or DICTIONARY_FILE_PATTERN.fullmatch(name) is not None
            or TEMPORARY_DICTIONARY_PATTERN.fullmatch(name) is not None)


def format_lock(pid: int, host: str) -> bytes:
    return f"{pid} {host}\n".encode()


def parse_lock(data: bytes) -> Optional[Tuple[int, str]]:
    """(pid, host) from a lock file's bytes, or None when they are not "<pid> <host>"."""
    parts = data.decode("utf-8", "replace").split()
    if len(parts) == 2 and parts[0].isdigit() and len(parts[0]) < 20:
        return int(parts[0]), parts[1]
    return None


MAGIC = b"SHRDFEED"
HEADER_BYTES = 64
FILE_KIND_RECORDS = 0
FILE_KIND_HEAP = 1
FILE_KIND_CHECKSUMS = 2
CHECKSUM_DTYPE = np.dtype("<u4")
# magic, version, file kind, header bytes, record bytes, schema fingerprint (16 bytes), reserved
_HEADER = struct.Struct("<8sIIIQ16s20x")
assert _HEADER.size == HEADER_BYTES

# dtype name -> numpy dtype of the stored little-endian bytes. bfloat16 has no numpy dtype: it is
# stored as its 16-bit pattern and read back as float32.
STORED_DTYPES: Dict[str, str] = {
    "bool": "|b1",
    "int8": "|i1", "int16": "<i2", "int32": "<i4", "int64": "<i8",
    "uint8": "|u1", "uint16": "<u2", "uint32": "<u4", "uint64": "<u8",
    "float16": "<f2", "bfloat16": "<u2", "float32": "<f4", "float64": "<f8",
}
DESCRIPTOR_DTYPE = np.dtype("<u8")  # (offset, rows) of a variable-length field, (offset, bytes) of a compressed one
# The codecs a fixed-shape field may be compressed with (docs/format.md, "Compressed fields"): the
# names in a manifest's field entries. A reader refuses a dataset with a codec it does not know.
CODECS = ("zstd",)
_FIELD_KEYS = {"name", "dtype", "shape", "codec"}  # a manifest's field entry; codec only where compressed
# numpy represents at most 64 dimensions and dimensions below 2**31 in a structured dtype; a read
# adds one (the batch) or two (batch and rows) dimensions to a field's.
MAX_DIMENSIONS = 30
_MAX_DIMENSION = (1 << 31) - 1
_MAX_RECORD_BYTES = 1 << 31


@dataclass(frozen=True)
class Field:
    """One named field of a schema.

    ``shape`` is the per-sample shape; a variable first dimension is ``None``. ``offset`` is the
    byte offset of the field (or of its descriptor) in the record. ``codec``: the codec of a
    compressed fixed-shape field (one of ``CODECS``), whose record holds a descriptor of its frame
    in the heap file, like a variable-length field's.
    """

    name: str
    dtype: str
    shape: Tuple[Optional[int], ...]
    offset: int = 0
    codec: Optional[str] = None

    @property
    def variable(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] is None

    @property
    def compressed(self) -> bool:
        return self.codec is not None

    @property
    def in_heap(self) -> bool:
        """Whether the record holds a descriptor (offset, count) into the heap file rather than the
        values: variable-length and compressed fields."""
        return self.variable or self.codec is not None

    @property
    def heap_unit_bytes(self) -> int:
        """Bytes of the heap file per unit of a descriptor's count: a row of a variable field, a
        byte of a compressed one's frame."""
        return 1 if self.codec is not None else self.count * self.stored_dtype.itemsize

    @property
    def raw_bytes(self) -> int:
        """Bytes of one sample's values as stored uncompressed (a row of a variable field's)."""
        return self.count * self.stored_dtype.itemsize

    @property
    def stored_dtype(self) -> np.dtype:
        return np.dtype(STORED_DTYPES[self.dtype])

    @property
    def row_shape(self) -> Tuple[int, ...]:
        """Shape of one row of a variable field, or the whole shape of a fixed one."""
        return tuple(self.shape[1:]) if self.variable else tuple(self.shape)  # type: ignore[arg-type]

    @property
    def count(self) -> int:
        """Elements per sample (per row for a variable field)."""
        return math.prod(self.row_shape)

    @property
    def record_bytes(self) -> int:
        """Bytes this field takes in the record."""
        return 2 * DESCRIPTOR_DTYPE.itemsize if self.in_heap else self.count * self.stored_dtype.itemsize

    @property
    def alignment(self) -> int:
        return DESCRIPTOR_DTYPE.itemsize if self.in_heap else self.stored_dtype.itemsize

    @property
    def natural_dtype(self) -> np.dtype:
        """The dtype a read returns when no dtype is asked for."""
        return np.dtype(np.float32) if self.dtype == "bfloat16" else np.dtype(self.dtype)

    def spec(self) -> Dict[str, Any]:
        spec: Dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.codec is not None:  # (absent otherwise: the fingerprints of other fields stay as they were)
            spec["codec"] = self.codec
        return spec


def _parse_shape(name: str, shape: Any) -> Tuple[Optional[int], ...]:
    if isinstance(shape, (int, np.integer)) and not isinstance(shape, bool):
        shape = (shape,)
    if not isinstance(shape, (tuple, list)):
        raise SchemaError(f"field {name!r}: shape must be a tuple of ints, got {shape!r}")
    if len(shape) > MAX_DIMENSIONS:
        raise SchemaError(f"field {name!r}: shape has {len(shape)} dimensions, at most {MAX_DIMENSIONS} are "
                          "supported")
    dims: List[Optional[int]] = []
    for axis, dim in enumerate(shape):
        if dim is None and axis == 0:
            dims.append(None)
            continue
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or not 0 <= dim <= _MAX_DIMENSION:
            where = ("only the first dimension may be None" if dim is None
                     else f"dimensions must be ints in [0, {_MAX_DIMENSION}]")
            raise SchemaError(f"field {name!r}: bad shape {tuple(shape)!r} ({where})")
        dims.append(int(dim))
    return tuple(dims)


def make_field(name: Any, dtype: Any, shape: Any = (), codec: Optional[str] = None) -> Field:
    """Validates one field specification."""
    if not isinstance(name, str) or not name or name != name.strip() or any(c in name for c in "\0/\\"):
        raise SchemaError(f"bad field name {name!r}: use a non-empty string without '/', '\\' or NUL")
    if isinstance(dtype, str) and dtype in STORED_DTYPES:
        dtype_name = dtype
    else:
        try:
            parsed: Optional[np.dtype] = np.dtype(dtype)
        except (TypeError, ValueError):  # not a dtype at all, e.g. a dict numpy cannot read as one
            parsed = None
        if parsed is None or parsed.name not in STORED_DTYPES or parsed.byteorder == ">":
            raise SchemaError(
                f"field {name!r}: unsupported dtype {dtype!r}; supported: {', '.join(STORED_DTYPES)}"
            )
        dtype_name = parsed.name
    field = Field(name, dtype_name, _parse_shape(name, shape), codec=codec)
    if codec is not None:
        if not isinstance(codec, str) or codec not in CODECS:
            raise SchemaError(f"field {name!r}: codec {codec!r} is not one this shardfeed knows ({', '.join(CODECS)}); "
                              "a newer shardfeed may have written it")
        if field.variable:
            raise SchemaError(f"field {name!r}: a variable-length field cannot be compressed (only fixed-shape "
                              "fields can)")
    return field


class Schema:
    """Ordered fields and the record layout derived from them (natural alignment, in order)."""

    def __init__(self, fields: Sequence[Field]):
        if not fields:
            raise SchemaError("a schema needs at least one field")
        laid_out: List[Field] = []
        offset = 0
        for field in fields:
            offset = -(-offset // field.alignment) * field.alignment
            laid_out.append(Field(field.name, field.dtype, field.shape, offset, field.codec))
            offset += field.record_bytes
        names = [f.name for f in laid_out]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise SchemaError(f"duplicate field names: {duplicates}")
        align = max(f.alignment for f in laid_out)
        self.record_bytes = -(-offset // align) * align
        if self.record_bytes == 0:
            raise SchemaError(f"every field of {names} has zero size: a record needs at least one byte")
        if self.record_bytes > _MAX_RECORD_BYTES:
            raise SchemaError(f"record of {self.record_bytes} bytes is too large (max {_MAX_RECORD_BYTES})")
        self.fields: Dict[str, Field] = {f.name: f for f in laid_out}
        formats = []
        for f in laid_out:
            try:  # (the shape checks keep numpy's limits; this names the field if one is missed)
                formats.append(np.dtype((DESCRIPTOR_DTYPE, (2,)) if f.in_heap else (f.stored_dtype, f.row_shape)))
            except (ValueError, TypeError, OverflowError) as exc:
                raise SchemaError(f"field {f.name!r}: shape {list(f.shape)} cannot be stored ({exc})") from None
        self.record_dtype = np.dtype(
            {"names": names, "formats": formats, "offsets": [f.offset for f in laid_out],
             "itemsize": self.record_bytes}
        )

    @classmethod
    def from_spec(cls, fields: Any) -> "Schema":
        """From ``{"x": ("float16", (64, 64)), "y": "int64"}`` or a list of manifest field dicts."""
        if isinstance(fields, Mapping):
            parsed = []
            for name, spec in fields.items():
                if isinstance(spec, (tuple, list)):
                    if len(spec) not in (1, 2):
                        raise SchemaError(f"field {name!r}: expected (dtype, shape), got {spec!r}")
                    parsed.append(make_field(name, *spec))
                else:
                    parsed.append(make_field(name, spec, ()))
            return cls(parsed)
        if isinstance(fields, list):
            parsed = []
            for item in fields:
                if not isinstance(item, dict) or not {"name", "dtype", "shape"} <= set(item) <= _FIELD_KEYS:
                    raise SchemaError(f"bad field entry {item!r}: expected keys name, dtype, shape (and codec)")
                if not isinstance(item["dtype"], str) or item["dtype"] not in STORED_DTYPES:
                    raise SchemaError(f"field {item.get('name')!r}: unknown dtype {item['dtype']!r}")
                if "codec" in item and item["codec"] is None:
                    raise SchemaError(f"field {item.get('name')!r}: codec null (leave the key out)")
                parsed.append(make_field(item["name"], item["dtype"], item["shape"], item.get("codec")))
            return cls(parsed)
        raise SchemaError(f"fields must be a dict of name -> (dtype, shape), got {type(fields).__name__}")

    def spec(self) -> List[Dict[str, Any]]:
        return [f.spec() for f in self.fields.values()]

    @property
    def variable_fields(self) -> List[Field]:
        return [f for f in self.fields.values() if f.variable]

    @property
    def heap_fields(self) -> List[Field]:
        """The fields whose values live in the heap file (variable-length and compressed), in order."""
        return [f for f in self.fields.values() if f.in_heap]

    @property
    def codecs(self) -> Dict[str, str]:
        """Compressed field name -> codec."""
        return {f.name: f.codec for f in self.fields.values() if f.codec is not None}

    def with_codecs(self, codecs: Mapping[str, Optional[str]]) -> "Schema":
        """The same fields with these codecs (field name -> codec, None: stored as it is)."""
        unknown = [name for name in codecs if name not in self.fields]
        if unknown:
            raise SchemaError(f"compression names fields {unknown} that the schema does not have; its fields are "
                              f"{list(self.fields)}")
        return Schema([make_field(f.name, f.dtype, f.shape, codecs[f.name] if f.name in codecs else f.codec)
                       for f in self.fields.values()])

    @property
    def fingerprint(self) -> bytes:
        """16 bytes identifying the schema; written into every shard header."""
        canonical = json.dumps(self.spec(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(canonical).digest()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Schema) and self.spec() == other.spec()

    def __repr__(self) -> str:
        return "Schema(" + ", ".join(f"{f.name}: {f.dtype}{list(f.shape)}" + (f" {f.codec}" if f.codec else "")
                                     for f in self.fields.values()) + ")"


# ---- per-record checksums (docs/format.md, "Record checksums") ---------------------------------


def checksum_words(schema: Schema) -> int:
    """uint32 checksums per sample in a ``.crc`` file: the record's CRC32C, then (when the schema
    has variable-length or compressed fields) the CRC32C of the sample's bytes of those fields in
    the heap file, in field order."""
    return 2 if schema.heap_fields else 1


def checksum_file_size(schema: Schema, num_samples: int) -> int:
    return HEADER_BYTES + num_samples * checksum_words(schema) * CHECKSUM_DTYPE.itemsize


def _header_record_bytes(kind: int, schema: Schema) -> int:
    """The header's record-size field: bytes per record (records), per sample (checksums), 0 (heap)."""
    if kind == FILE_KIND_RECORDS:
        return schema.record_bytes
    if kind == FILE_KIND_CHECKSUMS:
        return checksum_words(schema) * CHECKSUM_DTYPE.itemsize
    return 0


def pack_header(kind: int, schema: Schema) -> bytes:
    return _HEADER.pack(MAGIC, SHARD_FILE_VERSION, kind, HEADER_BYTES, _header_record_bytes(kind, schema),
                        schema.fingerprint)


def check_header(path: str, data: bytes, kind: int, schema: Schema) -> None:
    """Raises ShardFormatError naming ``path`` unless ``data`` is the header this schema writes."""
    if len(data) < HEADER_BYTES:
        raise ShardFormatError(f"{path}: file is {len(data)} bytes, shorter than the {HEADER_BYTES}-byte header")
    magic, version, file_kind, header_bytes, record_bytes, fingerprint = _HEADER.unpack(data[:HEADER_BYTES])
    if magic != MAGIC:
        raise ShardFormatError(f"{path}: not a shardfeed shard (magic {magic!r}, expected {MAGIC!r})")
    if version != SHARD_FILE_VERSION:
        raise ShardFormatError(f"{path}: shard format version {version}, this shardfeed reads {SHARD_FILE_VERSION}")
    if file_kind != kind or header_bytes != HEADER_BYTES:
        raise ShardFormatError(f"{path}: header says file kind {file_kind} / header {header_bytes} bytes, "
                               f"expected kind {kind} / {HEADER_BYTES} bytes")
    expected_record = _header_record_bytes(kind, schema)
    if record_bytes != expected_record:
        raise ShardFormatError(f"{path}: record size {record_bytes} bytes does not match the schema's "
                               f"{expected_record} bytes")
    if fingerprint != schema.fingerprint:
        raise ShardFormatError(f"{path}: shard was written with a different schema than the manifest's")


def format_checksum(crc: int) -> str:
    return f"crc32:{crc & 0xFFFFFFFF:08x}"


def file_checksum(path: str, block: int = 1 << 22) -> str:
    crc = 0
    with os.fdopen(open_regular(path), "rb") as f:
        while chunk := f.read(block):
            crc = zlib.crc32(chunk, crc)
    return format_checksum(crc)


# ---- manifest -------------------------------------------------------------------------------

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


# What read_bounded asks for once it has the bytes fstat promised: enough to see the end (or that
# the file grew), and below glibc's initial mmap threshold (128 KiB).
_READ_PIECE_BYTES = 1 << 16


def read_bounded(fd: int, size: int, limit: int) -> Optional[bytes]:
    """The bytes of the open file ``fd`` from its offset to its end (``size``: its size as fstat
    gave it), or None when it holds more than ``limit`` bytes (a file that grows while it is
    read is bounded too).

    It never asks for much more than the file holds: ``os.read(fd, n)`` allocates ``n`` bytes
    before reading, and frees the whole block when it reads nothing (at the end of the file).
    Freeing a block of up to 32 MiB that glibc had mapped raises its mmap threshold to that size
    (and its trim threshold to twice that) for the rest of the process: every later buffer below
    it comes from the heap, and up to twice that size of freed heap stays resident. A 16 MiB read
    at every manifest read did that, making RssAnon grow by megabytes over open/close cycles
    (tests/test_leaks.py)."""
    chunks = []
    got = 0
    while got <= limit:
        chunk = os.read(fd, min(limit + 1 - got, max(size + 1 - got, _READ_PIECE_BYTES)))
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)
        got += len(chunk)
    return None


def write_manifest(path: str, manifest: Manifest) -> None:
    """Replaces the manifest atomically: temporary file, fsync, rename, fsync of the directory."""
    data = json.dumps(manifest.to_json(), indent=1, allow_nan=False).encode() + b"\n"
    replace_atomically(path, MANIFEST_NAME, temporary_manifest_name(os.getpid()), data)
