"""The per-field options of :meth:`shardfeed.Dataset.read` and what they make of a field: the
output dtype (the one policy, tabled in docs/training.md, "Output dtypes"), the native conversion
that makes it, the lossless-cast rule, the scale/offset layout the kernels take, and the padding
and truncating sides of variable-length fields.

A read converts natively (ext/cast.h) to float32, float16 and bfloat16, fused with scale/offset;
any other output dtype a field is asked for (an integer of another width, float64, bool) is made
by numpy from the stored values after a native copy. Either way a conversion that does not give
back every stored value exactly (int64 16777217 as float32, int16 2049 as float16, a negative
int as uint8, 1.5 as an int) raises :class:`ValueRangeError` naming the field and the first such
sample, unless the read's ``lossy`` option allows it for that field. Narrowing a float (float64
to float32 or float16, float32 to bfloat16) is a choice of precision and is never refused: values
round to nearest even, those beyond the output's range become infinities, as numpy's astype.
"""

from __future__ import annotations

import math
from collections import abc
from typing import Any, Dict, Optional

import numpy as np

from . import _core
from .errors import OptionalDependencyError, ValueRangeError
from .format import Field

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
INTEGER_DTYPES = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64")
_FLOAT32 = np.dtype(np.float32)

# dtype="auto": floats as float32, which is what training computes in (float64 too: narrowing it
# is a precision choice); integers and bool as stored, so ids and tokens are never rounded.
AUTO_DTYPES: Dict[str, np.dtype] = {
    name: _FLOAT32 if name in FLOAT_DTYPES else np.dtype(name)
    for name in ("bool",) + INTEGER_DTYPES + FLOAT_DTYPES
}

# The native kernel per stored dtype, and the id that copies the bytes: the core's (ext/cast.h).
CAST_COPY = _core.CAST_COPY
STORED_KINDS = _core.STORED_KINDS
# Output dtypes the kernels make, and the only ones scale/offset can be read into.
NATIVE_OUTPUTS = ("float32", "float16", "bfloat16")
_NUMPY_OUTPUTS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                  "float16", "float32", "float64")


def bfloat16_dtype() -> np.dtype:
    """numpy's bfloat16 dtype, from ml_dtypes (installed with jax and tensorflow); the core itself
    needs only numpy."""
    try:
        import ml_dtypes
    except ImportError:
        raise OptionalDependencyError("bfloat16 output arrays need the ml_dtypes package: "
                                      "pip install ml_dtypes") from None
    return np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype: np.dtype) -> str:
    """The name of an output dtype ("bfloat16" for ml_dtypes' dtype)."""
    return "bfloat16" if dtype.kind == "V" and dtype.name == "bfloat16" else dtype.name


def _requested(field: Field, dtype: Any) -> np.dtype:
    if isinstance(dtype, str) and dtype == "bfloat16":
        return bfloat16_dtype()
    try:
        wanted = np.dtype(dtype)
    except TypeError:
        raise ValueError(f"field {field.name!r}: dtype must be None, 'auto' or a numpy dtype, got {dtype!r}") from None
    if dtype_name(wanted) == "bfloat16" or (wanted.name in _NUMPY_OUTPUTS and wanted.isnative):
        return wanted
    raise ValueError(f"field {field.name!r}: cannot read as {wanted}; output dtypes are "
                     f"{', '.join(_NUMPY_OUTPUTS + ('bfloat16',))}")


def output_dtype(field: Field, dtype: Any, affine: bool = False) -> np.dtype:
    """The dtype :meth:`shardfeed.Dataset.read` returns for ``field`` given its ``dtype`` option
    (one field's value: None, ``"auto"`` or a dtype) and whether it is read with scale/offset
    (``affine``). ``None``: the stored dtype (bfloat16 as float32); ``"auto"``: :data:`AUTO_DTYPES`;
    either is float32 with scale/offset. A dtype asked for is returned as it is; scale/offset need
    float32, float16 or bfloat16 (the transform is computed in float32)."""
    if dtype is None:
        return _FLOAT32 if affine else field.natural_dtype
    if isinstance(dtype, str) and dtype == "auto":
        return _FLOAT32 if affine else AUTO_DTYPES[field.dtype]
    wanted = _requested(field, dtype)
    if affine and dtype_name(wanted) not in NATIVE_OUTPUTS:
        raise ValueError(f"field {field.name!r} ({field.dtype}): scale/offset need a float32, float16 or "
                         f"bfloat16 output, not {wanted}")
    return wanted


def conversion(field: Field, out_dtype: np.dtype, affine: bool) -> Optional[int]:
    """The native conversion id that reads ``field`` as ``out_dtype`` (the stored kind | the output
    kind << CAST_OUT_SHIFT, ext/cast.h), CAST_COPY when the stored bytes are the output, or None
    when numpy converts a copy of the stored values (:func:`cast_values`)."""
    name = dtype_name(out_dtype)
    if not affine and (name == field.dtype or (out_dtype == field.natural_dtype and field.dtype != "bfloat16")):
        return CAST_COPY
    if name in NATIVE_OUTPUTS:
        return STORED_KINDS[field.dtype] | _core.OUTPUT_KINDS[name] << _core.CAST_OUT_SHIFT
    return None


def exact(values: np.ndarray, out_dtype: np.dtype) -> np.ndarray:
    """Boolean mask: where ``values`` (as a read with dtype=None returns them) convert to
    ``out_dtype`` exactly. Always true from bool and between floats (a choice of precision)."""
    source = values.dtype
    out_float = out_dtype.kind == "f" or dtype_name(out_dtype) == "bfloat16"
    if source.kind == "b" or (source.kind == "f" and out_float):
        return np.ones(values.shape, bool)
    with np.errstate(all="ignore"):
        if out_dtype.kind == "b":
            return (values == 0) | (values == 1)
        if out_dtype.kind in "iu":
            info = np.iinfo(out_dtype)
            if source.kind == "f":
                wide = values.astype(np.float64)
                return (np.isfinite(wide) & (wide == np.trunc(wide)) & (wide >= float(info.min))
                        & (wide < float(info.max) + 1.0))  # exact powers of two
            return (values >= info.min) & (values <= info.max)
        # integer -> float: exact when the float is in the integer's range and converts back to it
        info = np.iinfo(source)
        back = values.astype(out_dtype).astype(np.float64)
        in_range = (back >= float(info.min)) & (back < float(info.max) + 1.0)
        return in_range & (np.where(in_range, back, 0).astype(source) == values)


def inexact_error(field: Field, values: np.ndarray, bad: np.ndarray, indices: np.ndarray, out_dtype: np.dtype,
                  check: Optional[np.dtype] = None) -> ValueRangeError:
    """The error for the first ``bad`` element of ``values`` (batch-major, one row per index)."""
    flat = np.flatnonzero(bad.reshape(-1))
    position = int(flat[0]) // max(1, values.size // max(1, len(indices)))
    value = values.reshape(-1)[int(flat[0])].item()
    via = "" if check is None or check == out_dtype else f" (scale/offset compute in {dtype_name(check)})"
    error = ValueRangeError(
        f"field {field.name!r}: sample {int(indices[position])} holds {value!r}, which "
        f"{dtype_name(check if check is not None else out_dtype)} cannot represent exactly (reading {field.dtype} as "
        f"{dtype_name(out_dtype)}{via}); pass lossy=True, or lossy={{{field.name!r}: True}}, to read it rounded")
    error.field, error.sample = field.name, int(indices[position])
    return error


def cast_values(field: Field, values: np.ndarray, out_dtype: np.dtype, indices: np.ndarray,
                lossy: bool) -> np.ndarray:
    """``values`` (a read's natural values, one row per index) as ``out_dtype`` by numpy, refusing
    inexact values unless ``lossy``."""
    if not lossy:
        bad = ~exact(values, out_dtype)
        if bad.any():
            raise inexact_error(field, values, bad, indices, out_dtype)
    with np.errstate(all="ignore"):
        return values.astype(out_dtype)


def per_field(option: Any, name: str, several: bool, what: str) -> Any:
    """One field's value of scale/offset: a dict per field, or one value when one field is read."""
    if option is None:
        return None
    if isinstance(option, abc.Mapping):
        return option.get(name)
    if option is not None and several:
        raise ValueError(f"{what} applies to one field; pass a dict {{field: value}} when reading several")
    return option


def affine_layout(field: Field, scale: Any, offset: Any) -> "_core.Affine":
    """Turns scale/offset broadcastable to the field's (row) shape into the kernels' description
    (:class:`_core.Affine`): parameter p = (element // inner) % period."""
    shape = field.row_shape
    s = np.asarray(1.0 if scale is None else scale, dtype=np.float32)
    o = np.asarray(0.0 if offset is None else offset, dtype=np.float32)
    try:
        params = np.broadcast_shapes(s.shape, o.shape)
        fits = np.broadcast_shapes(params, shape) == shape and len(params) <= len(shape)
    except ValueError:
        fits = False
    if not fits:
        raise ValueError(f"field {field.name!r}: scale {s.shape} / offset {o.shape} do not broadcast to "
                         f"the field's shape {shape}")
    if math.prod(shape) == 0:  # nothing to transform (and no layout with a zero period or inner)
        return _core.Affine(np.ones(1, np.float32), np.zeros(1, np.float32))
    params = (1,) * (len(shape) - len(params)) + params
    s, o = (np.broadcast_to(a.reshape((1,) * (len(params) - a.ndim) + a.shape), params) for a in (s, o))
    varying = [axis for axis, n in enumerate(params) if n != 1]
    if not varying:
        return _core.Affine(s.reshape(-1)[:1], o.reshape(-1)[:1])
    first = varying[0]
    if len(varying) == 1:  # per channel along one axis: one parameter per channel
        period, inner = shape[first], math.prod(shape[first + 1:])
        s, o = s.reshape(-1), o.reshape(-1)
    else:  # varies along several axes: one parameter per element from the first varying axis on
        period, inner = math.prod(shape[first:]), 1
        tail = (1,) * first + tuple(shape[first:])
        s, o = (np.broadcast_to(a, tail).reshape(-1) for a in (s, o))
    return _core.Affine(s, o, inner, period)


def option_for(option: Any, name: str) -> Any:
    """One field's value of a read option given as a value or a dict per field."""
    return option.get(name) if isinstance(option, abc.Mapping) else option


def side(option: Any, name: str, what: str) -> str:
    """One field's padding or truncating side: "post" (the default) or "pre"."""
    value = option.get(name, "post") if isinstance(option, abc.Mapping) else option
    if not (isinstance(value, str) and value in ("post", "pre")):
        raise ValueError(f"{what} for field {name!r} must be 'post' or 'pre', got {value!r}")
    return value
