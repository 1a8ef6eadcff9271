"""CSV columns -> fields (:class:`CsvLayout`) and lines -> arrays per field (:class:`CsvParser`), for
:func:`shardfeed.convert.from_csv`."""

from __future__ import annotations

import csv
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .._casting import FLOAT_DTYPES
from ..errors import SchemaError, SourceError
from . import _csv_lists
from ._options import check_dtypes_cover, dtype_for
from ._sink import Sink


def parse_kind(dtype: str) -> str:
    """How a column of a field of this dtype is parsed: as float64, int64 or uint64."""
    if dtype in FLOAT_DTYPES:
        return "f8"
    return "u8" if dtype == "uint64" else "i8"


class CsvLayout:
    """Columns of the CSV files and which of them go to which field."""

    def __init__(self, columns: List[str], fields: Any, label: Any, label_field: str, dtypes: Any,
                 string_labels: bool, lists: Any = None):
        self.columns = columns
        self.label_field = label_field if label is not None else None
        label_index = self.resolve(label, label_field)[0][0] if label is not None else None
        if fields is not None and not isinstance(fields, Mapping):
            raise TypeError(f"fields must be a dict of field -> column(s), got {type(fields).__name__}")
        # list fields: name -> (column, separator), variable-length (see _csv_lists)
        self.lists = {name: (_csv_lists.list_column(self, name, fields), separator)
                      for name, separator in _csv_lists.list_separators(lists).items()}
        if fields is None:
            taken = {label_index} | {column for column, _ in self.lists.values()}
            wanted = {"x": [c for i, c in enumerate(columns) if i not in taken]}
            if not wanted["x"]:
                del wanted["x"]
                if not self.lists:
                    raise SchemaError("no feature columns: the only column is the label")
        else:
            wanted = {name: spec for name, spec in fields.items() if name not in self.lists}
        self.fields: Dict[str, Tuple[List[int], bool]] = {name: self.resolve(spec, name) for name, spec in wanted.items()}
        if label is not None:
            if label_field in self.fields or label_field in self.lists:
                raise SchemaError(f"field {label_field!r} is both a feature field and the label field")
            self.fields[label_field] = ([label_index], False)
        given = list(fields) if isinstance(fields, Mapping) else []  # the fields in the order given
        self.order = [n for n in given if n in self.fields or n in self.lists] + \
            [n for n in list(self.fields) + list(self.lists) if n not in given]
        check_dtypes_cover(dtypes, self.order)
        self.dtypes = {name: dtype_for(name, dtypes, "int64" if name == self.label_field else "float32")
                       for name in list(self.fields) + list(self.lists)}
        self.string_label = label_index if string_labels else None
        self.numeric = sorted({i for name, (indices, _) in self.fields.items() for i in indices
                               if not (string_labels and name == self.label_field)})
        kinds = {}
        for name, (indices, _) in self.fields.items():
            if string_labels and name == self.label_field:
                continue
            for i in indices:
                kind = parse_kind(self.dtypes[name])
                if kinds.setdefault(i, kind) != kind:
                    raise SchemaError(f"column {columns[i]!r} goes to fields of different kinds")
        self.kinds = [kinds[i] for i in self.numeric]
        self.position = {column: k for k, column in enumerate(self.numeric)}

    def resolve(self, spec: Any, name: str) -> Tuple[List[int], bool]:
        """A column name or index (scalar field), a list of them or a glob pattern (vector field)."""
        import fnmatch

        def one(item: Any) -> int:
            if isinstance(item, int) and not isinstance(item, bool):
                if not 0 <= item < len(self.columns):
                    raise SchemaError(f"field {name!r}: column index {item} out of range (0..{len(self.columns) - 1})")
                return item
            if item in self.columns:
                return self.columns.index(item)
            raise SchemaError(f"field {name!r}: no column {item!r}; the columns are {self.columns[:50]}")

        if isinstance(spec, str) and any(c in spec for c in "*?[") and spec not in self.columns:
            matches = [i for i, c in enumerate(self.columns) if fnmatch.fnmatchcase(c, spec)]
            if not matches:
                raise SchemaError(f"field {name!r}: no column matches {spec!r}")
            return matches, True
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise SchemaError(f"field {name!r}: no columns")
            return [one(item) for item in spec], True
        return [one(spec)], False

    def spec(self) -> Dict[str, Tuple[str, Tuple[Optional[int], ...]]]:
        spec: Dict[str, Tuple[str, Tuple[Optional[int], ...]]] = {
            name: (self.dtypes[name], (len(indices),) if vector else ()) for name, (indices, vector) in self.fields.items()}
        spec.update({name: (self.dtypes[name], (None,)) for name in self.lists})
        return {name: spec[name] for name in self.order}


_BLANK_INNER_LINE = re.compile(r"\n[ \t\r\f\v]*\n")


class CsvParser:
    """Lines -> arrays per field: numpy's loadtxt for clean chunks, a row-by-row parse that finds
    (and raises or skips) the bad rows otherwise."""

    def __init__(self, layout: CsvLayout, delimiter: str, class_index: Optional[Dict[str, int]], on_error: str):
        self.layout, self.delimiter, self.class_index, self.on_error = layout, delimiter, class_index, on_error
        self.expected = len(layout.columns) - 1  # delimiters per line
        kinds = set(layout.kinds)
        self.dtype = (np.dtype(kinds.pop()) if len(kinds) == 1 else
                      np.dtype([(f"c{i}", kind) for i, kind in zip(layout.numeric, layout.kinds)]))
        # Every column parsed: loadtxt itself then refuses rows with another number of columns.
        self.every_column = layout.numeric == list(range(len(layout.columns)))

    def parse(self, name: str, raw: List[bytes], first_line: int, sink: Sink) -> Tuple[Optional[Dict[str, np.ndarray]], Sequence[int]]:
        """A chunk of lines -> (the fields' arrays or None, the line number of each row)."""
        try:
            joined = b"".join(raw).decode("utf-8")
        except UnicodeDecodeError:
            pieces = []
            for k, line in enumerate(raw):
                try:
                    pieces.append(line.decode("utf-8"))
                except UnicodeDecodeError as exc:
                    self._bad(sink, f"{name}, line {first_line + k}: not UTF-8 ({exc.reason})")
                    pieces.append("\n")  # skipped like a blank line
            joined = "".join(pieces)
        if first_line == 1 and joined.startswith("\ufeff"):
            joined = joined[1:]
        body = joined[:-1] if joined.endswith("\n") else joined
        text = body.split("\n")  # the lines as readlines() cut them
        numbers: Sequence[int] = range(first_line, first_line + len(text))
        if not text[0].strip() or not text[-1].strip() or _BLANK_INNER_LINE.search(body):
            keep = [k for k, line in enumerate(text) if line.strip()]
            text, numbers = [text[k] for k in keep], [numbers[k] for k in keep]
        if not text:
            return None, []
        if self.layout.lists:
            batch = self._with_lists(text)
        else:
            batch = self._fast(text) if '"' not in body else None
        if batch is None:
            batch, numbers = self._slow(name, text, numbers, sink)
        return batch, numbers

    def _assemble(self, table: np.ndarray, labels: Optional[np.ndarray]) -> Dict[str, np.ndarray]:
        batch = {}
        structured = self.dtype.names is not None
        for field, (indices, vector) in self.layout.fields.items():
            if labels is not None and field == self.layout.label_field:
                batch[field] = labels
                continue
            if structured:
                columns = [table[f"c{i}"] for i in indices]
                batch[field] = np.stack(columns, axis=1) if vector else columns[0]
            else:
                positions = [self.layout.position[i] for i in indices]
                batch[field] = table[:, positions] if vector else table[:, positions[0]]
        return batch

    def _fast(self, text: List[str]) -> Optional[Dict[str, np.ndarray]]:
        labels = None
        if self.layout.string_label is not None:
            index = self.layout.string_label
            try:
                labels = np.fromiter((self.class_index[line.split(self.delimiter)[index].strip()] for line in text),
                                     np.int64, len(text))
            except KeyError:
                return None
        if not self.every_column and not all(line.count(self.delimiter) == self.expected for line in text):
            return None
        if not self.layout.numeric:
            return self._assemble(np.empty((len(text), 0)), labels)
        try:
            table = np.loadtxt(text, delimiter=self.delimiter, usecols=None if self.every_column else self.layout.numeric,
                               dtype=self.dtype, ndmin=1 if self.dtype.names else 2, comments=None, encoding=None)
        except ValueError:
            return None
        if not self.dtype.names and table.shape[1] != len(self.layout.numeric):
            return None  # every row has another number of columns than the header
        return self._assemble(table, labels)

    def _with_lists(self, text: List[str]) -> Optional[Dict[str, Any]]:
        """A chunk with list cells, split by the csv module and parsed a column at a time by numpy;
        None when a row is bad (the row-by-row parse then names it)."""
        rows = list(csv.reader(text, delimiter=self.delimiter))
        if any(len(row) != len(self.layout.columns) for row in rows):
            return None
        labels = None
        if self.layout.string_label is not None:
            try:
                labels = np.array([self.class_index[row[self.layout.string_label].strip()] for row in rows], np.int64)
            except KeyError:
                return None
        try:
            columns = [np.array([row[i] for row in rows], dtype=str).astype(kind)
                       for i, kind in zip(self.layout.numeric, self.layout.kinds)]
        except (ValueError, OverflowError):
            return None
        if not columns:
            table = np.empty((len(rows), 0))
        elif self.dtype.names:
            table = np.empty(len(rows), self.dtype)
            for i, column in zip(self.layout.numeric, columns):
                table[f"c{i}"] = column
        else:
            table = np.stack(columns, axis=1)
        batch: Dict[str, Any] = self._assemble(table, labels)
        for name, (column, separator) in self.layout.lists.items():
            lists = _csv_lists.parse_column([row[column] for row in rows], separator,
                                            parse_kind(self.layout.dtypes[name]))
            if lists is None:
                return None
            batch[name] = lists
        return batch

    def _slow(self, name: str, text: List[str], numbers: Sequence[int], sink: Sink) -> Tuple[Optional[Dict[str, np.ndarray]], List[int]]:
        parsers = {"f8": float, "i8": int, "u8": int}
        columns = self.layout.columns
        rows, labels, kept = [], [], []
        lists: Dict[str, List[np.ndarray]] = {name: [] for name in self.layout.lists}
        for line_number, row in zip(numbers, csv.reader(text, delimiter=self.delimiter)):
            problem = None
            if len(row) != len(columns):
                problem = f"{len(row)} columns, the header has {len(columns)}"
            else:
                values = []
                for i, kind in zip(self.layout.numeric, self.layout.kinds):
                    cell = row[i]
                    try:
                        value = parsers[kind](cell)
                        if kind != "f8" and not (-(1 << 63) <= value < (1 << 64 if kind == "u8" else 1 << 63)) \
                                or (kind == "u8" and value < 0):
                            raise ValueError
                    except ValueError:
                        what = {"f8": "a number", "i8": "an integer", "u8": "an unsigned integer"}[kind]
                        problem = f"column {columns[i]!r}: {cell!r} is not {what}"
                        break
                    values.append(value)
                row_lists = {}
                for list_name, (column, separator) in self.layout.lists.items():
                    if problem is not None:
                        break
                    items, why = _csv_lists.parse_cell(row[column], separator,
                                                       parse_kind(self.layout.dtypes[list_name]))
                    if items is None:
                        problem = f"column {columns[column]!r}: {why}"
                    row_lists[list_name] = items
                if problem is None and self.layout.string_label is not None:
                    cell = row[self.layout.string_label].strip()
                    if cell not in self.class_index:
                        problem = (f"column {columns[self.layout.string_label]!r}: label {cell!r} is not one of "
                                   f"the classes {list(self.class_index)[:20]}")
                    else:
                        labels.append(self.class_index[cell])
            if problem is not None:
                self._bad(sink, f"{name}, line {line_number}: {problem}")
                continue
            rows.append(tuple(values))
            kept.append(line_number)
            for list_name, items in row_lists.items():
                lists[list_name].append(items)
        if not rows:
            return None, []
        if not self.layout.numeric:
            table = np.empty((len(rows), 0))
        elif self.dtype.names:
            table = np.array(rows, dtype=self.dtype)
        else:
            table = np.array(rows, dtype=self.dtype).reshape(len(rows), len(self.layout.numeric))
        batch = self._assemble(table, np.array(labels, np.int64) if self.layout.string_label is not None else None)
        batch.update(lists)
        return batch, kept

    def _bad(self, sink: Sink, problem: str) -> None:
        if self.on_error == "raise":
            raise SourceError(problem + " (on_error='skip' skips such rows)")
        sink.skip(problem)
