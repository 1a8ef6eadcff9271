"""What storing floats in a narrower dtype did to them, counted: the converters' precision report.

A maximum alone misleads: ``max rel error 1`` can come from 340 of 16 M values that float16 could
only round to 0 while every other value kept 11 significant bits. So the values are sorted into
the ranges of the stored dtype and each is counted:

* **normal range** (``|v| >= tiny``, the smallest normal number): rounding to nearest keeps the
  relative error within half a unit in the last place (2^-11 for float16, 2^-8 for bfloat16,
  2^-24 for float32); its largest measured value is ``normal_rel_error``;
* **became subnormal**: stored as a nonzero number below ``tiny``, with fewer significant bits
  (up to 100% relative error at the bottom of the range);
* **became zero**: a nonzero value stored as 0;
* **overflowed**: finite values beyond the largest finite number (refused, or saturated with
  ``overflow="saturate"``: the sink counts those as ``saturated``).
"""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

# The smallest normal number of each stored float dtype (bfloat16 has float32's exponent range).
_TINY = {"float16": float(np.finfo(np.float16).tiny), "bfloat16": float(np.finfo(np.float32).tiny),
         "float32": float(np.finfo(np.float32).tiny), "float64": float(np.finfo(np.float64).tiny)}
_LARGEST = {"float16": float(np.finfo(np.float16).max), "bfloat16": 3.3895313892515355e38,
            "float32": float(np.finfo(np.float32).max), "float64": float(np.finfo(np.float64).max)}
# A wider dtype that keeps the values a narrower one loses, suggested in the report.
_WIDER_RANGE = {"float16": "bfloat16 (float32's range, 8 significant bits) or float32", "bfloat16": "float32",
                "float32": "float64"}


def measure(source: np.ndarray, stored: np.ndarray, target: str, stats: Any, block: int = 1 << 16) -> None:
    """Adds to ``stats`` (a FieldReport) what rounding ``source`` to ``stored`` (the target's
    values, decoded to a numpy float) did: counts per range and the largest absolute, relative
    and normal-range relative errors over the values finite on both sides. Works in blocks so
    that the float64 temporaries stay small."""
    tiny, largest = _TINY[target], _LARGEST[target]
    source_all, stored_all = source.reshape(-1), stored.reshape(-1)
    for start in range(0, source_all.size, block):
        x = source_all[start:start + block].astype(np.float64)
        s = stored_all[start:start + block].astype(np.float64)
        finite = np.isfinite(x) & np.isfinite(s)
        if not finite.all():
            x, s = x[finite], s[finite]
        stats.values += int(x.size)
        magnitude, stored_magnitude = np.abs(x), np.abs(s)
        nonzero = magnitude > 0
        stats.zeroed += int(np.count_nonzero(nonzero & (stored_magnitude == 0)))
        stats.subnormal += int(np.count_nonzero((stored_magnitude > 0) & (stored_magnitude < tiny)))
        diff = np.abs(s - x)
        if not diff.size or not diff.max() > 0:
            continue
        stats.max_abs_error = max(stats.max_abs_error, float(diff.max()))
        if nonzero.any():
            relative = diff[nonzero] / magnitude[nonzero]
            stats.max_rel_error = max(stats.max_rel_error, float(relative.max()))
            normal = (magnitude[nonzero] >= tiny) & (magnitude[nonzero] <= largest)  # overflows: counted apart
            if normal.any():
                stats.normal_rel_error = max(stats.normal_rel_error, float(relative[normal].max()))


def _count(n: int, total: int) -> str:
    if not total:
        return f"{n:,}"
    share = 100 * n / total
    return f"{n:,} ({share:.2g}%)" if share >= 0.01 or not n else f"{n:,} (<0.01%)"


def describe(stats: Any) -> Tuple[str, str]:
    """The report's words for one measured field: what happened, and what to do about it (empty
    when nothing was lost beyond rounding in the normal range)."""
    target = stats.dtype
    tiny = _TINY.get(target, 0.0)
    parts = [f"{stats.values:,} values, rel error <= {stats.normal_rel_error:.3g} in {target}'s normal range "
             f"(|v| >= {tiny:.2g})"]
    lost = []
    if stats.subnormal:
        lost.append(f"{_count(stats.subnormal, stats.values)} became subnormal (fewer significant bits)")
    if stats.zeroed:
        lost.append(f"{_count(stats.zeroed, stats.values)} became 0")
    if stats.saturated:
        lost.append(f"{_count(stats.saturated, stats.values)} overflowed (saturated)")
    if not lost:
        return "; ".join(parts + ["none overflowed, became subnormal or 0"]), ""
    parts += lost
    parts.append(f"max rel error {stats.max_rel_error:.3g}")
    wider = _WIDER_RANGE.get(target)
    advice = ""
    if wider:
        suggestion = wider.split(" ")[0]
        advice = (f"to keep {'the small values' if stats.subnormal or stats.zeroed else 'the large values'}, "
                  f"store {stats.name!r} as {wider} (dtypes={{'{stats.name}': '{suggestion}'}})")
        if (stats.subnormal or stats.zeroed) and not stats.saturated:
            advice += " or scale the values up before converting"
    return "; ".join(parts), advice
