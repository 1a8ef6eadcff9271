"""The on-disk format: the names of the files in a dataset directory, the schema, record layout,
shard headers and per-record checksums (see docs/format.md). The manifest that lists the shards,
and the dictionary files, are read and written by ``shardfeed.manifest``.

A dataset is a directory holding ``manifest.json`` and shard files. Every sample's fixed-shape
fields live together in one fixed-size record, so sample ``i`` of a shard sits at
``HEADER_BYTES + i * record_bytes`` of its ``.rec`` file. A variable-length field stores a 16-byte
descriptor in the record (absolute byte offset and row count, both uint64) and its rows in the
shard's ``.var`` heap file.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .errors import SchemaError, ShardFormatError
from .fileio import open_regular

# Version in the shard files' headers (the manifest has its own, manifest.FORMAT_VERSION): their
# layout has not changed since version 1.
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
# merge's plan in the target directory while it moves files (docs/reliability.md, "Merging").
MERGE_JOURNAL_NAME = "merge.journal"
TEMPORARY_JOURNAL_PATTERN = re.compile(re.escape(MERGE_JOURNAL_NAME) + r"\.tmp-\d+")


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


# ---- shard headers, the schema and the record layout (docs/format.md, "Record layout") ----------

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
