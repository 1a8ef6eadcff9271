"""Progress of a conversion: a tqdm bar on a terminal, a caller's callback, or nothing."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

from ._options import Progress


class NoBar:
    def update(self, n: int) -> None:
        pass

    def set_total(self, total: Optional[int]) -> None:
        pass

    def close(self) -> None:
        pass


class _CallbackBar(NoBar):
    def __init__(self, callback: Callable[[int], None]):
        self.callback = callback

    def update(self, n: int) -> None:
        self.callback(n)


class _TqdmBar(NoBar):
    """A tqdm bar on stderr, shown only when stderr is a terminal (tqdm's ``disable=None``)."""

    def __init__(self, bar: Any):
        self.bar = bar

    def update(self, n: int) -> None:
        self.bar.update(n)

    def set_total(self, total: Optional[int]) -> None:
        self.bar.total = total
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def progress_bar(progress: Progress, total: Optional[int], desc: str, unit: str = "B") -> NoBar:
    if callable(progress):
        return _CallbackBar(progress)
    if not progress:
        return NoBar()
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but a trimmed install converts without a bar
        return NoBar()
    scaled = dict(unit_scale=True, unit_divisor=1024) if unit == "B" else {}
    return _TqdmBar(tqdm(total=total, desc=desc, unit=unit, disable=None, file=sys.stderr, dynamic_ncols=True,
                         leave=False, **scaled))


