"""CSV cells that hold a list of numbers (``"607 2214 9"``), stored as variable-length fields by
:func:`shardfeed.convert.from_csv` (``lists=``).

A list field takes one column. Its cells are split at a separator (default: any run of
whitespace; e.g. ``";"`` or ``","`` -- a CSV cell holding commas is quoted), every item is parsed
as the field's kind (float, signed or unsigned integer), and an empty cell is an empty list. The
field's dtype is ``dtypes[name]`` (default float32, like the other features); values that do not
fit it are refused by the writer, naming the row, as for any field.
"""

from __future__ import annotations

import itertools
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from ..errors import SchemaError

_WHAT = {"f8": "a number", "i8": "an integer", "u8": "an unsigned integer"}


def list_separators(lists: Any) -> Dict[str, Optional[str]]:
    """``lists`` (None, field names, or ``{field: separator or None}``) -> field -> separator."""
    if lists is None:
        return {}
    if isinstance(lists, str):
        lists = [lists]
    if isinstance(lists, Mapping):
        out = dict(lists)
    else:
        out = {name: None for name in lists}
    for name, separator in out.items():
        if separator is not None and (not isinstance(separator, str) or not separator or separator in "\r\n"):
            raise ValueError(f"lists[{name!r}]: the separator must be a non-empty string (None: whitespace), "
                             f"got {separator!r}")
    return out


def list_column(layout: Any, name: str, fields: Any) -> int:
    """The one column of list field ``name``: ``fields[name]`` when given, else the column of that name."""
    spec = fields.get(name, name) if isinstance(fields, Mapping) else name
    indices, vector = layout.resolve(spec, name)
    if vector:
        raise SchemaError(f"list field {name!r}: takes one column whose cells hold the lists, got {spec!r}")
    return indices[0]


def parse_column(cells: List[str], separator: Optional[str], kind: str) -> Optional[List[np.ndarray]]:
    """A chunk's cells of one list column -> one array per cell, parsed in one numpy call (None when
    some item does not parse: the caller then finds the row with :func:`parse_cell`)."""
    if separator is None:
        split = [cell.split() for cell in cells]
    else:
        split = [[item.strip() for item in cell.split(separator)] if cell.strip() else [] for cell in cells]
    lengths = np.fromiter(map(len, split), np.int64, len(split))
    try:
        flat = np.array(list(itertools.chain.from_iterable(split)), dtype=str).astype(kind)
    except (ValueError, OverflowError):
        return None
    return np.split(flat, np.cumsum(lengths)[:-1])


def parse_cell(cell: str, separator: Optional[str], kind: str) -> Tuple[Optional[np.ndarray], str]:
    """The cell's items as a float64/int64/uint64 array, or (None, why not)."""
    items = cell.split(separator) if separator is not None else cell.split()
    if separator is not None:
        items = [item.strip() for item in items]
        if items == [""]:
            items = []
    try:
        return np.array(items, dtype=str).astype(kind), ""
    except (ValueError, OverflowError):
        bad = next(item for item in items if not _parses(item, kind))
        return None, f"item {bad!r} is not {_WHAT[kind]}"


def _parses(item: str, kind: str) -> bool:
    try:
        np.array([item], dtype=str).astype(kind)
    except (ValueError, OverflowError):
        return False
    return True
