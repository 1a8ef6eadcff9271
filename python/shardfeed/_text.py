"""Numbers written for people, shared by the reports and the command line."""

from __future__ import annotations


def human_bytes(n: float) -> str:
    """A byte count for people: '512 B', '3.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
