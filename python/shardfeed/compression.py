"""The ``compression`` option of :class:`shardfeed.Writer`, the converters, :func:`shardfeed.merge`
and ``--compress`` on the command line: its one parser (docs/format.md, "Compressed fields").

``compression={"image": "zstd"}`` compresses field ``image`` with zstd at its default level;
``{"image": ("zstd", 9)}`` chooses the level; ``{"image": None}`` stores it uncompressed (merge: to
say that a field must not be compressed); ``"zstd"`` alone compresses every fixed-shape field.
``{"tokens": {"codec": "zstd", "level": 3, "dictionary": True}}`` also trains a dictionary on the
field's first samples (True: zstd's default size, 110 KiB; an int: its size in bytes) and writes
every frame with it: worth it for small records (docs/format.md, "Compression dictionaries").
Variable-length fields cannot be compressed. The level and the dictionary size are choices of the
writer: the manifest keeps the codec and the dictionary files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from .errors import SchemaError
from .format import CODECS, Schema

DEFAULT_LEVELS = {"zstd": 3}
LEVEL_RANGES = {"zstd": (-7, 22)}  # (zstd's negative levels trade ratio for compression speed)
# ``"dictionary": True``: zstd's default dictionary size (ZDICT_DICTSIZE of its command line).
DEFAULT_DICTIONARY_BYTES = 112640
# An int size must lie here: zstd trains nothing useful below 1 KiB, and the writer holds about 100
# times the size of samples to train on (the bound keeps that below about 100 MiB).
DICTIONARY_BYTES_RANGE = (1024, 1 << 20)
_SPEC_KEYS = {"codec", "level", "dictionary"}


@dataclass(frozen=True)
class Codec:
    """How one field is compressed: ``codec`` (a name in ``format.CODECS``) at ``level``, and
    ``dictionary``: the size in bytes of the dictionary to train for it, 0 for none, None where the
    option does not say (a new dataset: none; appending: the dataset's dictionary, if it has one)."""

    codec: str
    level: int
    dictionary: Optional[int] = None


def _codec(name: str, value: Any) -> Optional[Codec]:
    if value is None:
        return None
    dictionary = None
    if isinstance(value, str):
        codec, level = value, None
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        codec, level = value
    elif isinstance(value, dict):
        unknown = set(value) - _SPEC_KEYS
        if unknown or "codec" not in value:
            raise SchemaError(f"field {name!r}: a compression dict has the keys 'codec' (required), 'level' and "
                              f"'dictionary', got {sorted(map(str, value))}")
        codec, level = value["codec"], value.get("level")
        dictionary = _dictionary_bytes(name, value.get("dictionary", False))
    else:
        raise SchemaError(f"field {name!r}: compression must be a codec name or (codec, level), or a dict "
                          f"{{'codec': ..., 'level': ..., 'dictionary': ...}}, got {value!r}")
    if not isinstance(codec, str) or codec not in CODECS:
        raise SchemaError(f"field {name!r}: unknown codec {codec!r} in compression; known codecs: {', '.join(CODECS)}")
    if level is None:
        return Codec(codec, DEFAULT_LEVELS[codec], dictionary)
    low, high = LEVEL_RANGES[codec]
    if isinstance(level, bool) or not isinstance(level, int) or not low <= level <= high:
        raise SchemaError(f"field {name!r}: {codec} level must be an int in [{low}, {high}], got {level!r}")
    return Codec(codec, level, dictionary)


def _dictionary_bytes(name: str, value: Any) -> int:
    """The ``dictionary`` of a compression dict: True (the default size), False (none) or a size."""
    if value is True:
        return DEFAULT_DICTIONARY_BYTES
    if value is False:
        return 0
    low, high = DICTIONARY_BYTES_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise SchemaError(f"field {name!r}: dictionary must be True, False or a size in bytes in [{low}, {high}], "
                          f"got {value!r}")
    return value


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
    """The command line's ``--compress FIELD=CODEC[:LEVEL][:dict[=BYTES]]`` items as a
    ``compression`` option (``tokens=zstd:3:dict``, ``tokens=zstd:dict=16384``); ValueError saying
    what is wrong with an item (the values are checked by parse_compression)."""
    option: Dict[str, Any] = {}
    for item in items:
        name, sep, spec = item.partition("=")
        if not sep or not name or not spec:
            raise ValueError(f"--compress {item!r}: expected FIELD=CODEC[:LEVEL][:dict[=BYTES]], e.g. image=zstd or "
                             "tokens=zstd:3:dict")
        codec, *rest = spec.split(":")
        level: Optional[int] = None
        dictionary: Any = None
        for part in rest:
            word, equals, size = part.partition("=")
            if word == "dict" and dictionary is None:
                try:
                    dictionary = int(size) if equals else True
                except ValueError:
                    raise ValueError(f"--compress {item!r}: the dictionary size {size!r} is not an integer") from None
            elif level is None and dictionary is None and not equals:
                try:
                    level = int(part)
                except ValueError:
                    raise ValueError(f"--compress {item!r}: the level {part!r} is not an integer") from None
            else:
                raise ValueError(f"--compress {item!r}: expected FIELD=CODEC[:LEVEL][:dict[=BYTES]], {part!r} is not "
                                 "a level or dict[=BYTES] in its place")
        if dictionary is not None:
            option[name] = {"codec": codec, "level": level, "dictionary": dictionary}
        elif level is not None:
            option[name] = (codec, level)
        else:
            option[name] = None if codec == "none" else codec
    return option
