"""The lists that say which per-sample files a dataset holds and their labels, read for
:func:`shardfeed.convert.from_files`.

* A **file list** (``files=``, ``splits=``): one name per line, relative to the root directory;
  blank lines and ``#`` comments are skipped; a name is the whole line (spaces included).
* A **label list** (``labels=``) pairs each file with its label, in any of the forms people keep:
  ``file label`` lines separated by spaces or tabs (names with spaces quoted as in a shell:
  ``"my file.npy" 3`` or ``my\\ file.npy 3``), CSV rows (``file,label``; a ``.csv`` file, or any
  list whose first line splits into two at a comma), tab-separated rows (``.tsv``, or a first line with a tab),
  or JSON (``{"file": label}``, ``[[file, label], ...]`` or ``[{"file": ..., "label": ...}]``).
  A first row naming the columns (``file label``, ``filename,label``, ...) is skipped.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
from typing import Any, Dict, Iterator, List, Mapping, Tuple

from ..errors import SourceError

_HEADER_NAMES = ("file", "filename", "file_name", "path", "name", "image", "sample")


def read_listing(listing: Any, what: str) -> List[str]:
    """A list of names, or a text file of them: one per line, blank lines and '#' comments skipped."""
    if isinstance(listing, (str, os.PathLike)):
        with open(listing, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    names = [os.fspath(n) for n in listing]
    if not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be file names")
    return names


def read_labels(labels: Any) -> Dict[str, Any]:
    """file -> label from a mapping or a label list in one of the forms the module describes."""
    if isinstance(labels, Mapping):
        return {os.fspath(k): v for k, v in labels.items()}
    name = os.fspath(labels)
    if name.lower().endswith(".json"):
        return _json_labels(name)
    out: Dict[str, Any] = {}
    for number, row in _rows(name):
        if len(row) != 2:
            raise SourceError(f"{name}, line {number}: expected 2 columns (file, label), got {len(row)}: {row[:4]} "
                              "(quote a name that has spaces: \"my file.npy\" 3)")
        if not out and row[0].strip().lower() in _HEADER_NAMES:
            continue
        out[row[0].strip()] = row[1].strip()
    return out


def _rows(name: str) -> Iterator[Tuple[int, List[str]]]:
    """(line number, cells) of the non-blank, non-comment lines, split as the file's form says."""
    with open(name, newline="", encoding="utf-8-sig") as f:
        lines = [(number, line.rstrip("\r\n")) for number, line in enumerate(f, 1)]
    data = [(number, line) for number, line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not data:
        return
    lower, first = name.lower(), data[0][1]
    if lower.endswith(".tsv") or (not lower.endswith(".csv") and "\t" in first):
        delimiter = "\t"
    elif lower.endswith(".csv") or ("," in first and len(next(csv.reader([first]))) == 2):
        delimiter = ","
    else:
        delimiter = None
    for number, line in data:
        if delimiter is None:
            cells = _split_words(line)
            if cells is None:
                raise SourceError(f"{name}, line {number}: unbalanced quotes in {line!r}")
        else:
            cells = next(csv.reader([line], delimiter=delimiter))
        yield number, cells


def _split_words(line: str) -> Any:
    """Whitespace-separated words with shell quoting ('#' starts a comment), or None when the quotes
    do not balance."""
    try:
        return shlex.split(line, comments=True)
    except ValueError:
        return None


def _json_labels(name: str) -> Dict[str, Any]:
    with open(name, encoding="utf-8") as f:
        doc = json.load(f)
    if isinstance(doc, dict):
        return dict(doc)
    if isinstance(doc, list):
        out = {}
        for item in doc:
            if isinstance(item, dict) and "file" in item and "label" in item:
                out[item["file"]] = item["label"]
            elif isinstance(item, (list, tuple)) and len(item) == 2:
                out[item[0]] = item[1]
            else:
                raise SourceError(f"{name}: expected [file, label] pairs or {{'file', 'label'}} objects, got {item!r}")
        return out
    raise SourceError(f"{name}: expected a JSON object or list, got {type(doc).__name__}")
