"""Casting values to a field's stored dtype, refusing values that do not fit; bfloat16 bit helpers."""

from __future__ import annotations

import numpy as np

from .errors import SchemaError, ValueRangeError
from .format import Field


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


def _first_bad(bad: np.ndarray, field: Field, first_sample: int, values: np.ndarray, dtype: str, why: str):
    flat = int(np.flatnonzero(bad.reshape(-1))[0])
    per_sample = max(1, bad.size // max(1, bad.shape[0])) if bad.ndim else 1
    value = (values.reshape(-1)[flat] if values.ndim else values).item()
    sample = first_sample + (flat // per_sample if bad.ndim else 0)
    error = ValueRangeError(f"field {field.name!r}, sample {sample}: value {value!r} {why} {dtype}")
    error.field, error.sample = field.name, sample
    return error


def cast_to_stored(values: np.ndarray, field: Field, first_sample: int) -> np.ndarray:
    """Returns ``values`` as the stored dtype of ``field``; raises ValueRangeError naming the field
    and the sample (``first_sample`` + position along axis 0) of the first value that does not fit."""
    kind = values.dtype.kind
    if kind not in "biuf":
        raise SchemaError(f"field {field.name!r}: cannot store {values.dtype} values as {field.dtype}")
    target = field.dtype
    stored = field.stored_dtype
    if target == "bool":
        if kind == "b":  # any nonzero byte is True (numpy's bools can hold any, e.g. uint8.view(bool))
            return values.view(np.uint8) != 0
        bad = (values != 0) & (values != 1)
        if bad.any():
            raise _first_bad(bad, field, first_sample, values, target, "is not 0 or 1, cannot be stored as")
        return values.astype(np.bool_)
    if target == "bfloat16":
        bits = float_to_bfloat16_bits(values)
        bad = (bits & 0x7FFF) == 0x7F80
        if kind == "f":
            bad &= np.isfinite(values)
        if bad.any():
            raise _first_bad(bad, field, first_sample, values, target, "overflows")
        return bits.astype(stored)
    if stored.kind == "f":
        with np.errstate(over="ignore", invalid="ignore"):
            out = values.astype(stored)
        bad = ~np.isfinite(out)
        if kind == "f":
            bad &= np.isfinite(values)
        if bad.any():
            raise _first_bad(bad, field, first_sample, values, target, "overflows")
        return out
    info = np.iinfo(stored)
    if kind == "f":
        with np.errstate(invalid="ignore"):
            lo, hi = float(info.min), float(info.max) + 1.0  # exact powers of two
            bad = ~np.isfinite(values) | (values != np.trunc(values)) | (values < lo) | (values >= hi)
        if bad.any():
            raise _first_bad(bad, field, first_sample, values, target, "is not an integer in the range of")
        return values.astype(stored)
    if values.size and (int(values.min()) < info.min or int(values.max()) > info.max):
        as_objects = values.astype(object)
        bad = (as_objects < info.min) | (as_objects > info.max)
        raise _first_bad(bad.astype(bool), field, first_sample, values, target,
                         f"is out of the range [{info.min}, {info.max}] of")
    return values.astype(stored)
