"""Values -> a field's stored dtype: the one overflow policy of the writer and the converters.

What does not fit the stored dtype, for every caller:

* **float fields** (float16, bfloat16, float32, float64): a finite value that rounds to infinity
  overflows (65519 rounds to float16's 65504 and does not); infinities and NaN are stored as they
  are;
* **integer fields**: a value outside ``[min, max]`` of the dtype overflows; a float that is not
  an integer (1.5, NaN) is refused whatever the policy;
* **bool fields**: values other than 0 and 1 are refused (numpy bools holding another byte are
  stored as True).

``overflow="error"`` (the :class:`shardfeed.Writer`, and the converters by default) raises
:class:`ValueRangeError` naming the field and the sample of the first value that does not fit;
``overflow="saturate"`` (the converters' option) stores the largest finite value of the same sign
(floats) or the nearest end of the range (integers) and counts the values so stored. The converters
pass ``suggest=True``, which adds to the error how to saturate instead.

Float casts run a block of rows at a time, so the temporaries stay small whatever the batch; the
caller may watch each block's source and stored values (the converters' precision report).
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

from .errors import SchemaError, ValueRangeError
from .format import Field

OVERFLOW_POLICIES = ("error", "saturate")
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
_BLOCK_VALUES = 1 << 18  # values per block of a float cast: 2 MiB of float64 temporaries

# (block of source values, the same values as stored, decoded to a numpy float)
BlockWatcher = Callable[[np.ndarray, np.ndarray], None]


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bfloat16 is the upper half of a float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Rounds to the nearest bfloat16 (ties to even), NaN kept NaN, as ml_dtypes does.

    float64 (and integer) inputs go through float32 with round-to-odd so there is one rounding."""
    values = np.asarray(values)
    with np.errstate(over="ignore", invalid="ignore"):
        if values.dtype in (np.float16, np.float32):
            bits = values.astype(np.float32).view(np.uint32)
        else:
            wide = values.astype(np.float64)
            narrow = wide.astype(np.float32)
            bits = narrow.view(np.uint32).copy()
            back = narrow.astype(np.float64)
            finite = np.isfinite(wide)
            bits[finite & (np.abs(back) > np.abs(wide))] -= 1  # truncate toward zero ...
            bits |= (finite & (back != wide)).astype(np.uint32)  # ... and make the result odd if inexact
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(nan, quiet_nan, rounded)


BFLOAT16_MAX = float(bfloat16_bits_to_float32(np.array([0x7F7F], np.uint16))[0])


def largest_finite(dtype: str) -> float:
    """The largest finite value of a float field's dtype."""
    return BFLOAT16_MAX if dtype == "bfloat16" else float(np.finfo(np.dtype(dtype)).max)


def _first_bad(bad: np.ndarray, field: Field, first_sample: int, values: np.ndarray, why: str) -> ValueRangeError:
    """The error for the first true entry of ``bad`` (same shape as ``values``, axis 0 = samples)."""
    flat = int(np.flatnonzero(bad.reshape(-1))[0])
    per_sample = max(1, bad.size // max(1, bad.shape[0])) if bad.ndim else 1
    value = (values.reshape(-1)[flat] if values.ndim else values).item()
    sample = first_sample + (flat // per_sample if bad.ndim else 0)
    error = ValueRangeError(f"field {field.name!r}, sample {sample}: value {value!r} {why}")
    error.field, error.sample = field.name, sample
    return error


def cast_to_stored(values: np.ndarray, field: Field, first_sample: int, *, overflow: str = "error",
                   suggest: bool = False, watch: Optional[BlockWatcher] = None) -> Tuple[np.ndarray, int]:
    """``values`` (axis 0: samples, the first being ``first_sample``) as the stored dtype of
    ``field``, under the policy of the module documentation. Returns the stored values and how
    many were saturated. ``watch``: called with each block of a float field's values and the same
    values as stored (bfloat16 decoded to float32)."""
    if overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"overflow must be one of {', '.join(map(repr, OVERFLOW_POLICIES))}, got {overflow!r}")
    kind = values.dtype.kind
    if kind not in "biuf":
        raise SchemaError(f"field {field.name!r}: cannot store {values.dtype} values as {field.dtype}")
    if field.dtype == "bool":
        return _to_bool(values, field, first_sample), 0
    if field.dtype in FLOAT_DTYPES:
        return _to_float(values, field, first_sample, overflow, suggest, watch)
    return _to_integer(values, field, first_sample, overflow, suggest)


def _to_bool(values: np.ndarray, field: Field, first_sample: int) -> np.ndarray:
    if values.dtype.kind == "b":  # any nonzero byte is True (numpy's bools can hold any, e.g. uint8.view(bool))
        return values.view(np.uint8) != 0
    bad = (values != 0) & (values != 1)
    if bad.any():
        raise _first_bad(bad, field, first_sample, values, "is not 0 or 1, cannot be stored as bool")
    return values.astype(np.bool_)


def _to_float(values: np.ndarray, field: Field, first_sample: int, overflow: str, suggest: bool,
              watch: Optional[BlockWatcher]) -> Tuple[np.ndarray, int]:
    """Rounds a block of rows at a time: values that round to infinity refused or saturated."""
    target, stored = field.dtype, field.stored_dtype
    bfloat16 = target == "bfloat16"
    largest = largest_finite(target)
    out = np.empty(values.shape, stored)
    rows = values.reshape(1, *values.shape) if values.ndim == 0 else values
    out_rows = out.reshape(rows.shape)
    per_row = max(1, int(np.prod(rows.shape[1:], dtype=np.int64)))
    step = max(1, _BLOCK_VALUES // per_row)
    saturated = 0
    for a in range(0, len(rows), step):
        block, stored_block = rows[a:a + step], out_rows[a:a + step]
        with np.errstate(over="ignore", invalid="ignore"):
            if bfloat16:
                stored_block[...] = float_to_bfloat16_bits(block)
                over = (stored_block & 0x7FFF) == 0x7F80
            else:
                np.copyto(stored_block, block, casting="unsafe")
                over = np.isinf(stored_block)
            if block.dtype.kind == "f":
                over &= np.isfinite(block)
        if over.any():
            if overflow == "error":
                hint = (f" (largest finite value {largest:.6g}); pass overflow='saturate' to store ±{largest:.6g} "
                        "instead") if suggest else ""
                raise _first_bad(over, field, first_sample + a, block, f"overflows {target}{hint}")
            saturated += int(over.sum())
            negative = np.signbit(block[over])
            if bfloat16:
                stored_block[over] = np.where(negative, 0xFF7F, 0x7F7F).astype(np.uint16)
            else:
                stored_block[over] = np.where(negative, -largest, largest)
        if watch is not None:
            watch(block, bfloat16_bits_to_float32(stored_block) if bfloat16 else stored_block)
    return out, saturated


def _to_integer(values: np.ndarray, field: Field, first_sample: int, overflow: str,
                suggest: bool) -> Tuple[np.ndarray, int]:
    stored = field.stored_dtype
    info = np.iinfo(stored)
    hint = "; pass overflow='saturate' to clip it to the range" if suggest else ""
    if values.dtype.kind != "f":  # integers (and bools): compared exactly, uint64 and int64 alike
        if not values.size or (info.min <= int(values.min()) and int(values.max()) <= info.max):
            return values.astype(stored), 0
        as_objects = values.astype(object)
        high, low = (as_objects > info.max).astype(bool), (as_objects < info.min).astype(bool)
        if overflow == "error":
            raise _first_bad(high | low, field, first_sample, values,
                             f"is out of the range [{info.min}, {info.max}] of {field.dtype}{hint}")
        out = values.astype(stored)
        out[high], out[low] = info.max, info.min
        return out, int(high.sum() + low.sum())
    # floats: beyond [min, top] (infinities too), top the largest float <= max (max itself up to int32)
    lo = float(info.min)
    top = float(info.max) if int(float(info.max)) <= info.max else float(np.nextafter(float(info.max), 0))
    with np.errstate(invalid="ignore"):
        high, low = values > top, values < lo
        inexact = np.isnan(values) | (np.isfinite(values) & (values != np.trunc(values)))
    saturated = 0
    if overflow == "saturate" and (high.any() or low.any()):
        values = values.copy()
        values[high], values[low] = top, lo
        saturated = int(high.sum() + low.sum())
        inexact &= ~(high | low)  # 300.5 clipped to 255 is an integer now
        high[...] = low[...] = False
    bad = high | low | inexact
    if bad.any():
        flat = int(np.flatnonzero(bad.reshape(-1))[0])
        range_hint = hint + f" [{info.min}, {info.max}]" if hint and not inexact.reshape(-1)[flat] else ""
        raise _first_bad(bad, field, first_sample, values, f"is not an integer in the range of {field.dtype}{range_hint}")
    return values.astype(stored), saturated
