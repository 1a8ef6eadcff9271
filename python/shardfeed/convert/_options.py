"""What the converters share: their common options, checked once, and the lists of source files."""

from __future__ import annotations

import glob as _glob
import os
import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .._casting import FLOAT_DTYPES
from ..errors import SchemaError, SourceError
from ..format import STORED_DTYPES
from ..writer import DEFAULT_SHARD_SIZE

DEFAULT_CHUNK_BYTES = 8 << 20

PathLike = Union[str, "os.PathLike[str]"]
Progress = Union[bool, Callable[[int], None]]


def choice(name: str, value: Any, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def part_range(total: int, part: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The contiguous slice [start, stop) of ``total`` items that part (k, n) converts."""
    if part is None:
        return 0, total
    k, n = check_part(part)
    return total * k // n, total * (k + 1) // n


def check_part(part: Any) -> Tuple[int, int]:
    try:
        k, n = part
    except (TypeError, ValueError):
        raise ValueError(f"part must be a pair (k, n) with 0 <= k < n, got {part!r}") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (k, n)) or not 0 <= k < n:
        raise ValueError(f"part must be a pair (k, n) with 0 <= k < n, got {part!r}")
    return k, n


def natural_key(text: str) -> List[Any]:
    return [(0, int(token), "") if token.isdigit() else (1, 0, token) for token in re.split(r"(\d+)", text)]


def expand(sources: Any, suffixes: Tuple[str, ...], what: str) -> List[str]:
    """Paths, directories (their files with these suffixes) and glob patterns -> a list of files.
    Directory contents and glob matches are sorted naturally (2.csv before 10.csv); the order of
    explicitly listed paths is kept."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files: List[str] = []
    for source in sources:
        source = os.fspath(source)
        if os.path.isdir(source):
            matches = [os.path.join(source, name) for name in os.listdir(source)
                       if name.lower().endswith(suffixes) and os.path.isfile(os.path.join(source, name))]
        elif any(c in source for c in "*?["):
            matches = [m for m in _glob.glob(source) if os.path.isfile(m)]
        else:
            files.append(source)
            continue
        if not matches:
            raise SourceError(f"no {what} files in {source!r}")
        files += sorted(matches, key=natural_key)
    if not files:
        raise SourceError(f"no {what} files given")
    return files


def dtype_for(name: str, dtypes: Any, default: str) -> str:
    """The stored dtype of a field: ``dtypes`` is None, one dtype for every float field, or a dict."""
    if isinstance(dtypes, Mapping):
        wanted = dtypes.get(name)
    elif dtypes is not None and default in FLOAT_DTYPES:
        wanted = dtypes
    else:
        wanted = None
    if wanted is None:
        return default
    return wanted if isinstance(wanted, str) and wanted in STORED_DTYPES else np.dtype(wanted).name


def check_dtypes_cover(dtypes: Any, names: Iterable[str]) -> None:
    """Refuses a ``dtypes`` entry for a field the source does not have. The error carries
    ``argument="dtypes"``, ``unknown`` and ``fields`` (the source's, in order), so that a front end
    can word it in its own terms (the command line's ``--dtype``)."""
    if isinstance(dtypes, Mapping):
        fields = list(names)
        unknown = sorted(set(dtypes) - set(fields))
        if unknown:
            error = SchemaError(f"dtypes given for unknown fields {unknown}; the fields are {fields}")
            error.argument, error.unknown, error.fields = "dtypes", unknown, fields  # type: ignore[attr-defined]
            raise error


def source_dtype_name(dtype: np.dtype) -> str:
    dtype = np.dtype(dtype)
    if dtype.kind not in "biuf" or dtype.itemsize > 8:
        raise SchemaError(f"cannot store {dtype} data: shardfeed stores bool, integers and floats")
    return dtype.newbyteorder("=").name if dtype.byteorder not in "=|" else dtype.name


def common_options(shard_size: int = DEFAULT_SHARD_SIZE, metadata: Optional[Mapping[str, Any]] = None,
                   mode: str = "w", overflow: str = "error", progress: Progress = False,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> Dict[str, Any]:
    """The options every converter takes, ``chunk_bytes`` checked (the Writer and the sink check the
    rest; ``compression`` is the Writer's option, shardfeed.compression)."""
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int, got {chunk_bytes!r}")
    return dict(shard_size=shard_size, metadata=metadata, mode=mode, overflow=overflow, progress=progress,
                chunk_bytes=chunk_bytes, compression=compression)
