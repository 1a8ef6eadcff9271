"""The ``compression`` option of :class:`shardfeed.Writer`, the converters, :func:`shardfeed.merge`
and ``--compress`` on the command line: its one parser (docs/format.md, "Compressed fields").

``compression={"image": "zstd"}`` compresses field ``image`` with zstd at its default level;
``{"image": ("zstd", 9)}`` chooses the level; ``{"image": None}`` stores it uncompressed (merge: to
say that a field must not be compressed); ``"zstd"`` alone compresses every fixed-shape field.
Variable-length fields cannot be compressed. The level is a choice of the writer: the manifest
keeps only the codec.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .errors import SchemaError
from .format import CODECS, Schema

DEFAULT_LEVELS = {"zstd": 3}
LEVEL_RANGES = {"zstd": (-7, 22)}  # (zstd's negative levels trade ratio for compression speed)


@dataclass(frozen=True)
class Codec:
    """How one field is compressed: ``codec`` (a name in ``format.CODECS``) at ``level``."""

    codec: str
    level: int


def _codec(name: str, value: Any) -> Optional[Codec]:
    if value is None:
        return None
    if isinstance(value, str):
        codec, level = value, None
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        codec, level = value
    else:
        raise SchemaError(f"field {name!r}: compression must be a codec name or (codec, level), got {value!r}")
    if not isinstance(codec, str) or codec not in CODECS:
        raise SchemaError(f"field {name!r}: unknown codec {codec!r} in compression; known codecs: {', '.join(CODECS)}")
    if level is None:
        return Codec(codec, DEFAULT_LEVELS[codec])
    low, high = LEVEL_RANGES[codec]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise SchemaError(f"field {name!r}: {codec} level must be an int in [{low}, {high}], got {level!r}")
    return Codec(codec, level)


def parse_compression(option: Any, schema: Schema) -> Dict[str, Optional[Codec]]:
    """The ``compression`` option for a dataset of ``schema``: field name -> Codec, or None for a
    field the option stores uncompressed. Refuses (SchemaError naming the field) unknown fields,
    codecs and levels, and variable-length fields."""
    if option is None:
        return {}
    if isinstance(option, (str, tuple, list)):  # one codec for every fixed-shape field that has values
        return {f.name: _codec(f.name, option) for f in schema.fields.values() if not f.variable and f.raw_bytes}
    if not isinstance(option, dict):
        raise SchemaError(f"compression must be a dict of field name -> codec (e.g. {{'image': 'zstd'}}) or a "
                          f"codec name, got {type(option).__name__}")
    parsed: Dict[str, Optional[Codec]] = {}
    for name, value in option.items():
        if name not in schema.fields:
            raise SchemaError(f"compression names field {name!r}, which the dataset does not have; its fields are "
                              f"{list(schema.fields)}")
        codec = _codec(name, value)
        if codec is not None and schema.fields[name].variable:
            raise SchemaError(f"field {name!r}: a variable-length field cannot be compressed (only fixed-shape "
                              "fields can)")
        if codec is not None and not schema.fields[name].raw_bytes:
            raise SchemaError(f"field {name!r}: shape {list(schema.fields[name].shape)} holds no values to compress")
        parsed[name] = codec
    return parsed


def compressed_schema(schema: Schema, compression: Dict[str, Optional[Codec]]) -> Schema:
    """``schema`` with the codecs of a parsed ``compression`` option."""
    return schema.with_codecs({name: None if codec is None else codec.codec for name, codec in compression.items()})


def parse_compress_arguments(items: List[str]) -> Dict[str, Any]:
    """The command line's ``--compress FIELD=CODEC[:LEVEL]`` items as a ``compression`` option;
    ValueError saying what is wrong with an item."""
    option: Dict[str, Any] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--compress {item!r}: expected FIELD=CODEC or FIELD=CODEC:LEVEL, e.g. image=zstd")
        codec, colon, level = spec.partition(":")
        if colon:
            try:
                option[name] = (codec, int(level))
            except ValueError:
                raise ValueError(f"--compress {item!r}: the level {level!r} is not an integer") from None
        else:
            option[name] = None if codec == "none" else codec
    return option
