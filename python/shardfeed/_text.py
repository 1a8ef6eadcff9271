"""Text for people, shared by the reports and the command line: byte counts, strings from a
dataset made safe for a terminal, docstrings without reStructuredText markup."""

from __future__ import annotations

import re
import unicodedata


def human_bytes(n: float) -> str:
    """A byte count for people: '512 B', '3.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


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
