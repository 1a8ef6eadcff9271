"""One overflow policy (shardfeed._casting) for the Writer and the converters: the same values are
refused by both, naming the same sample; with overflow="saturate" a converter stores what numpy
says the nearest representable value is (the largest finite float of the same sign, the nearest
end of an integer range) and counts the values so stored; values that are not integers are
refused by both whatever the policy."""

import numpy as np
import pytest

import shardfeed
from shardfeed import convert

try:
    import ml_dtypes  # the reference bfloat16 rounding
except ImportError:  # the sanitizer build installs numpy only: the bfloat16 case skips
    ml_dtypes = None

CASES = [
    ("float16", [1.0, 7e4, 2.0, -1e5]),
    ("float16", [65519.0, -65520.0]),  # 65519 rounds to 65504: fits; -65520 rounds to -inf
    pytest.param("bfloat16", [3.0, 1e39, -3.5e38],
                 marks=pytest.mark.skipif(ml_dtypes is None, reason="the bfloat16 reference is ml_dtypes")),
    ("float32", [np.inf, np.nan, -1e39, 1e39]),  # infinities and NaN are stored as they are
    ("float32", [1.0, 2.0]),
    ("uint8", [0, 255, 256, -1]),
    ("int8", [1.0, 300.0, -200.0, np.inf]),
    ("int64", [1.0, 2.0 ** 63, -(2.0 ** 64)]),
    ("uint16", [7, 70000]),
    ("int32", [1, 2 ** 31 - 1, -(2 ** 31)]),
]


def _refused(action):
    try:
        action()
    except shardfeed.ValueRangeError as error:
        return error.sample
    return None


def _saturated_reference(dtype, values):
    """numpy's nearest representable value of each source value, and how many were moved to an end."""
    if dtype in ("float16", "bfloat16", "float32"):
        target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
        largest = float(ml_dtypes.finfo(target).max) if dtype == "bfloat16" else float(np.finfo(target).max)
        with np.errstate(over="ignore", invalid="ignore"):
            rounded = values.astype(target).astype(np.float64)
        over = np.isinf(rounded) & np.isfinite(values)
        rounded[over] = np.copysign(largest, values[over])
        return rounded, int(over.sum())
    info = np.iinfo(dtype)
    top = info.max if values.dtype.kind != "f" else max(v for v in (float(info.max), np.nextafter(float(info.max), 0))
                                                        if int(v) <= info.max)
    high, low = values > top, values < info.min
    reference = np.array(values, dtype=object)
    reference[high], reference[low] = int(top), info.min
    return reference.astype(np.float64 if values.dtype.kind == "f" else object), int(high.sum() + low.sum())


@pytest.mark.parametrize("dtype, values", CASES, ids=[f"{getattr(case, 'values', case)[0]}-{i}" for i, case in enumerate(CASES)])
def test_the_writer_and_the_converters_refuse_the_same_values(new_path, dtype, values):
    values = np.array(values)

    def write():
        with shardfeed.Writer(new_path(), fields={"x": (dtype, ())}) as w:
            w.extend({"x": values})

    by_writer = _refused(write)
    by_converter = _refused(lambda: convert.from_arrays(new_path(), {"x": values}, dtypes={"x": dtype}))
    assert by_writer == by_converter
    reference, count = _saturated_reference(dtype, values)
    assert (by_writer is None) == (count == 0)
    path = new_path()
    report = convert.from_arrays(path, {"x": values}, dtypes={"x": dtype}, overflow="saturate")
    assert report.fields["x"].saturated == count
    with shardfeed.open(path) as ds:
        stored = ds.read(np.arange(len(values)))["x"]
    np.testing.assert_array_equal(stored.astype(object if reference.dtype == object else np.float64), reference)


@pytest.mark.parametrize("bad", [1.5, np.nan])
def test_a_float_that_is_not_an_integer_is_refused_whatever_the_policy(new_path, bad):
    values = np.array([1.0, 2.0, bad])
    for overflow in ("error", "saturate"):
        with pytest.raises(shardfeed.ValueRangeError, match=r"sample 2: value .* is not an integer in the range "
                                                            r"of int16$"):
            convert.from_arrays(new_path(), {"x": values}, dtypes={"x": "int16"}, overflow=overflow)
    with pytest.raises(shardfeed.ValueRangeError, match=r"sample 2: value .* is not an integer in the range of int16$"):
        with shardfeed.Writer(new_path(), fields={"x": ("int16", ())}) as w:
            w.extend({"x": values})
