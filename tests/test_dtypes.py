"""Output dtypes of Dataset.read: dtype="auto" (floats as float32, integers and bool as stored),
checked against numpy's astype of the written values and against the slow reference reader."""

import re

import numpy as np
import pytest

import shardfeed
import shardfeed.read_options
from shardfeed._reference import reference_read

FLOATS = ("float16", "bfloat16", "float32", "float64")
DTYPES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64") + FLOATS
N = 40


@pytest.fixture(scope="module")
def every_dtype(tmp_path_factory):
    """One fixed (2, 3) field per stored dtype, int64 ids above 2^24, variable int64 and float64
    rows; over several shards."""
    rng = np.random.default_rng(5)
    columns, fields = {}, {}
    for dtype in DTYPES:
        if dtype == "bool":
            values = rng.random((N, 2, 3)) < 0.5
        elif dtype == "bfloat16":
            values = (rng.standard_normal((N, 2, 3)).astype(np.float32).view(np.uint32) & 0xFFFF0000).view(np.float32)
        elif dtype in FLOATS:
            values = (rng.standard_normal((N, 2, 3)) * 1000).astype(dtype)
        else:
            info = np.iinfo(dtype)
            values = rng.integers(info.min, info.max, (N, 2, 3), dtype=dtype, endpoint=True)
        columns[dtype], fields[dtype] = values, (dtype, (2, 3))
    columns["id"] = (np.arange(N, dtype=np.int64) * 123456789 + 16777217)
    fields["id"] = ("int64", ())
    columns["tokens"] = [rng.integers(2 ** 40, 2 ** 41, k, dtype=np.int64) for k in rng.integers(0, 6, N)]
    fields["tokens"] = ("int64", (None,))
    columns["points"] = [rng.standard_normal((k, 2)) for k in rng.integers(0, 6, N)]
    fields["points"] = ("float64", (None, 2))
    path = str(tmp_path_factory.mktemp("dtypes") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=4096) as w:
        w.extend(columns)
    assert shardfeed.open(path).num_shards > 2
    return path, columns, fields


def auto_dtype(stored):
    """The documented table, written out independently of shardfeed.read_options.AUTO_DTYPES."""
    return np.dtype(np.float32) if stored in FLOATS else np.dtype(stored)


INDICES = np.array([7, 0, 39, 3, 3, 21, -1, 12])


def expected_rows(columns, name, stored, indices, dtype):
    values = columns[name]
    if isinstance(values, list):
        rows = [np.asarray(values[i]).astype(dtype) for i in indices]
        longest = max(len(r) for r in rows)
        out = np.zeros((len(rows), longest) + rows[0].shape[1:], dtype)
        for k, r in enumerate(rows):
            out[k, :len(r)] = r
        return out
    return np.asarray(values)[indices].astype(dtype)


def test_auto_reads_floats_as_float32_and_keeps_integers(tools, every_dtype, mmap_mode):
    path, columns, fields = every_dtype
    batch = shardfeed.open(path, mmap=mmap_mode).read(INDICES, dtype="auto")
    reference, _ = reference_read(path, INDICES, dtype="auto")
    assert list(batch) == list(fields)
    for name, (stored, _) in fields.items():
        want = auto_dtype(stored)
        tools.assert_identical(batch[name], expected_rows(columns, name, stored, INDICES, want), name)
        tools.assert_identical(batch[name], reference[name], name)
    assert batch["id"].tolist() == [int(i % N) * 123456789 + 16777217 for i in INDICES]


def test_auto_table_in_one_place(every_dtype):
    path, _, fields = every_dtype
    ds = shardfeed.open(path)
    for name, (stored, _) in fields.items():
        assert shardfeed.read_options.AUTO_DTYPES[stored] == auto_dtype(stored)
        assert shardfeed.read_options.output_dtype(ds.fields[name], "auto") == auto_dtype(stored)
        assert shardfeed.read_options.output_dtype(ds.fields[name], "auto", affine=True) == np.float32
        assert ds.read([], fields=name, dtype="auto")[name].dtype == auto_dtype(stored)


def test_auto_per_field_and_with_scale(tools, every_dtype):
    path, columns, _ = every_dtype
    ds = shardfeed.open(path)
    batch = ds.read(INDICES, fields=["float64", "int32", "uint8"], dtype={"float64": "auto", "int32": "auto"},
                    scale={"uint8": 0.5})
    tools.assert_identical(batch["float64"], columns["float64"][INDICES].astype(np.float32))
    tools.assert_identical(batch["int32"], columns["int32"][INDICES])
    tools.assert_identical(batch["uint8"], columns["uint8"][INDICES].astype(np.float32) * np.float32(0.5))
    scaled = ds.read(INDICES, fields="int16", dtype="auto", scale=2.0, offset=1.0)["int16"]
    tools.assert_identical(scaled, columns["int16"][INDICES].astype(np.float32) * np.float32(2) + np.float32(1))


def test_bad_dtype_option_names_the_field(every_dtype):
    path, _, _ = every_dtype
    ds = shardfeed.open(path)
    with pytest.raises(ValueError, match=r"field 'int8': dtype must be None, 'auto' or a numpy dtype, got 'automatic'"):
        ds.read([0], fields="int8", dtype="automatic")


# ---- the lossless-cast rule --------------------------------------------------------------------


def exact_by_python(values, converted):
    """Independent oracle: each value and its conversion compared as Python numbers (ints exactly,
    floats as the exact value they hold)."""
    from fractions import Fraction
    out = []
    for v, c in zip(np.asarray(values).reshape(-1).tolist(), np.asarray(converted).reshape(-1).tolist()):
        if any(isinstance(x, float) and not np.isfinite(x) for x in (v, c)):
            out.append(False)
        else:
            out.append(Fraction(v) == Fraction(c))
    return np.array(out).reshape(np.shape(values))


def as_out(values, dtype):
    with np.errstate(all="ignore"):
        if dtype == "bfloat16":
            return values.astype(ml_dtypes.bfloat16).astype(np.float64)
        return values.astype(dtype)


BOUNDARIES = {
    "int64": [0, 2 ** 24, -2 ** 24, 2 ** 24 + 1, 123456789, 2 ** 30, 2 ** 53 + 1, 2 ** 63 - 1, -2 ** 63, 2048, 2049, -2049,
              256, 257, 65504, 65519, 65520, 70000, 127, 128, -129, 255],
    "uint64": [0, 1, 2 ** 24 + 1, 2 ** 64 - 1, 2 ** 63, 2 ** 40, 2049, 257, 65535, 255, 256],
    "int32": [0, -1, 2 ** 24 + 1, 2 ** 31 - 1, -2 ** 31, 2 ** 24 + 2, 2049, 2048, 257, 256, -256, 65520, 70000, -128, 127],
    "uint32": [0, 2 ** 32 - 1, 2 ** 24 + 1, 2 ** 24, 4096, 4097, 300, 255],
    "int16": [0, -1, 2048, 2049, -2049, 32767, -32768, 256, 257, 4098, 127, -128],
    "uint16": [0, 2048, 2049, 65535, 256, 257, 255, 512],
    "int8": [0, -128, 127, -1, 1],
    "uint8": [0, 255, 128, 1],
    "float64": [0.0, 1.5, -0.5, 2.0 ** 40, 1e300, -3.0, 255.0, 256.0, np.nan, np.inf, 127.0, -128.0],
    "float32": [0.0, 1.5, -1.0, 3e9, 255.0, 2.0 ** 31],
}
# (stored, output) pairs: native float outputs and numpy ones (other integer widths, sign changes)
try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None
NEEDS_ML_DTYPES = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 outputs are ml_dtypes arrays: not installed")
PAIRS = [(s, o) if o != "bfloat16" else pytest.param(s, o, marks=NEEDS_ML_DTYPES)
         for s in BOUNDARIES if s.startswith(("int", "uint")) for o in ("float32", "float16", "bfloat16")]
PAIRS += [("int64", "float64"), ("uint64", "int64"), ("int64", "uint64"), ("int32", "int8"), ("int16", "uint8"),
          ("uint32", "int32"), ("int64", "bool"), ("uint16", "int16"), ("float64", "int32"), ("float32", "uint8"),
          ("float64", "bool"), ("float32", "int64")]


@pytest.mark.parametrize("stored, wanted", PAIRS)
def test_inexact_casts_raise_naming_field_and_sample(tmp_path, mmap_mode, stored, wanted):
    values = np.array(BOUNDARIES[stored], dtype=stored)
    n = len(values)
    path = str(tmp_path / "ds")
    with shardfeed.Writer(path, fields={"x": (stored, ()), "row": (stored, (3,)), "var": (stored, (None,))},
                          shard_size=300) as w:
        w.extend({"x": values, "row": np.stack([values, values[::-1], values], 1),
                  "var": [values[:k % 4] for k in range(n)]})
    ds = shardfeed.open(path, mmap=mmap_mode)
    order = np.arange(n)[::-1]
    read_values = values[order]
    ok = exact_by_python(read_values, as_out(read_values, wanted))
    if ok.all():
        batch = ds.read(order, fields="x", dtype=wanted)
        assert np.array_equal(batch["x"].astype(np.float64), as_out(read_values, wanted).astype(np.float64))
    else:
        first = int(np.flatnonzero(~ok)[0])
        value = read_values[first].item()
        with pytest.raises(shardfeed.ValueRangeError, match=rf"field 'x': sample {order[first]} holds {re.escape(repr(value))}, "
                                                            rf"which {wanted} cannot represent exactly") as info:
            ds.read(order, fields="x", dtype=wanted)
        assert (info.value.field, info.value.sample) == ("x", order[first])
    # lossy=True (or per field) reads what numpy's astype gives
    for lossy in (True, {"x": True}):
        got = ds.read(order, fields="x", dtype=wanted, lossy=lossy)["x"]
        assert np.array_equal(got.astype(np.float64), as_out(read_values, wanted).astype(np.float64), equal_nan=True)
    # several elements per sample, and variable-length rows: the same rule, per sample
    rows = np.stack([values, values[::-1], values], 1)[order]
    row_ok = exact_by_python(rows, as_out(rows, wanted)).all(axis=1)
    if row_ok.all():
        ds.read(order, fields="row", dtype=wanted)
    else:
        with pytest.raises(shardfeed.ValueRangeError, match=rf"field 'row': sample {order[np.flatnonzero(~row_ok)[0]]} "):
            ds.read(order, fields="row", dtype=wanted)
    var_ok = np.array([exact_by_python(values[:k % 4], as_out(values[:k % 4], wanted)).all() for k in order])
    if var_ok.all():
        ds.read(order, fields="var", dtype=wanted, pad_value=0)
    else:
        with pytest.raises(shardfeed.ValueRangeError, match=rf"field 'var': sample {order[np.flatnonzero(~var_ok)[0]]} "):
            ds.read(order, fields="var", dtype=wanted)


def test_inexact_cast_through_scale_offset(tmp_path):
    """With scale/offset the integer -> float32 step is checked; the transform's own rounding is not."""
    values = np.array([3, 16777216, 16777217, 5], np.int64)
    path = str(tmp_path / "ds")
    with shardfeed.Writer(path, fields={"id": ("int64", ())}) as w:
        w.extend({"id": values})
    ds = shardfeed.open(path)
    with pytest.raises(shardfeed.ValueRangeError, match=r"field 'id': sample 2 holds 16777217, which float32 cannot "
                                                        r"represent exactly \(reading int64 as float16 \(scale/offset"):
        ds.read(np.arange(4), dtype="float16", scale=0.5)
    got = ds.read(np.arange(4), scale=0.5, offset=1.0, lossy=True)["id"]
    np.testing.assert_array_equal(got, values.astype(np.float32) * np.float32(0.5) + np.float32(1))
    fine = ds.read([0, 1, 3], scale=1 / 3)["id"]  # 1/3 is not exact, but that is the transform's rounding
    np.testing.assert_array_equal(fine, values[[0, 1, 3]].astype(np.float32) * np.float32(1 / 3))


def test_float_narrowing_is_not_refused(tmp_path):
    values = np.array([1e300, -1e300, 0.1, 70000.0, np.nan, 1e-300])
    path = str(tmp_path / "ds")
    with shardfeed.Writer(path, fields={"x": ("float64", ())}) as w:
        w.extend({"x": values})
    ds = shardfeed.open(path)
    with np.errstate(over="ignore"):
        for dtype in ("float32", "float16"):
            np.testing.assert_array_equal(ds.read(np.arange(6), dtype=dtype)["x"].view(f"u{np.dtype(dtype).itemsize}"),
                                          values.astype(dtype).view(f"u{np.dtype(dtype).itemsize}"))
