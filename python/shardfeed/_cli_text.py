"""What the command line's modules share: dataset-provided strings made safe for a terminal, help
text without reStructuredText markup, library messages reworded in command-line terms, byte
counts for people, and the small argparse helpers (a formatter, a positive-integer type).

The library's messages name Python arguments (``mode='a'``, ``metadata=``); the command line's
name its options (``--append``, ``--metadata``). The library stays in Python terms and the
command line translates here, in one table, so a message that changes wording in the library is
caught by the command-line tests that look for the option's name.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from typing import Any, List, Tuple


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the descriptions' line breaks."""


def human(n: float) -> str:
    """A byte count for people: '512 B', '3.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def say(args: argparse.Namespace, *text: Any) -> None:
    """print() unless --quiet."""
    if not args.quiet:
        print(*text)

# Unicode categories a terminal may act on instead of showing: C0/C1 controls (ESC starts the
# escape sequences), format characters (bidirectional overrides, zero-width joiners) and the line
# and paragraph separators.
_UNPRINTABLE = {"Cc", "Cf", "Zl", "Zp"}


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` with every control or format character escaped as Python writes it (``\\x1b``,
    ``\\u202e``): what a dataset's names and metadata hold cannot move the cursor, recolour or
    clear the terminal, or disguise itself. ``keep_newlines`` keeps ``\\n`` (for multi-line text
    this program composed around dataset-provided parts)."""
    text = str(text)
    if text.isprintable():  # fast path: no controls (str.isprintable also refuses spaces other than ' ')
        return text
    out = []
    for char in text:
        if (char == "\n" and keep_newlines) or unicodedata.category(char) not in _UNPRINTABLE:
            out.append(char)
        else:
            out.append(repr(char)[1:-1] if char not in "'\"" else char)
    return "".join(out)


_ROLE = re.compile(r":(?:func|meth|class|mod|attr|data|exc|obj|ref):`~?([^`]+)`")


def plain(doc: str) -> str:
    """reStructuredText markup of a docstring removed for ``--help``: ``:func:`x``` -> ``x``,
    double backticks -> nothing."""
    return _ROLE.sub(r"\1", doc or "").replace("``", "")


# Python arguments -> command-line options, in the library's messages. Longest first where one
# pattern contains another.
_OPTION_TERMS: List[Tuple[str, str]] = [
    (r"use mode='a' to append", "use --append to add to it"),
    (r"create the dataset with mode='w'", "create the dataset first (without --append)"),
    (r"the next Writer\(path, mode='a'\)", "the next conversion with --append"),
    (r"with Writer\(path, mode='a'\)", "with --append"),
    (r"mode='a'", "--append"),
    (r"pass metadata=", "pass --metadata"),
    (r"pass size=\(width, height\)", "pass --size WxH"),
    (r"size=\(width, height\)", "--size WxH"),
    (r"overflow='saturate'", "--overflow saturate"),
    (r"on_error='skip'", "--on-error skip"),
    (r"name them with datasets=", "name them with --field NAME=/DATASET"),
    (r"sample_per_file=True", "--sample-per-file"),
    (r"image_mode='(\w+)'", r"--image-mode \1"),
    (r"dtypes=\{'(\w+)': '(\w+)'\}", r"--dtype \1=\2"),
    (r"chunk_bytes", "--chunk-size"),
]
_COMPILED = [(re.compile(pattern), replacement) for pattern, replacement in _OPTION_TERMS]


def in_option_terms(message: str) -> str:
    """A library message with its Python arguments replaced by the command line's options."""
    for pattern, replacement in _COMPILED:
        message = pattern.sub(replacement, message)
    return message
