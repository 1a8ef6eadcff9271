"""float16 and bfloat16 outputs from every stored dtype, with and without scale/offset: the native
kernels against numpy's astype (float16) and ml_dtypes' (bfloat16), rounding to nearest even,
bit for bit: every 16-bit pattern, float32 patterns around every rounding tie, float64 and
integer extremes; on the F16C path and the portable one; in place; through reads."""

import sys
from fractions import Fraction

import numpy as np
import pytest

import shardfeed
from shardfeed import _core

try:
    import ml_dtypes
except ImportError:  # the float16 tests still run (the sanitizer build installs numpy only)
    ml_dtypes = None
NEEDS_ML_DTYPES = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 outputs are ml_dtypes arrays: not installed")
BF16 = np.dtype(ml_dtypes.bfloat16) if ml_dtypes else None
F16 = np.dtype(np.float16)
ALL_16 = np.arange(1 << 16, dtype=np.uint16)
# enum sf_cast (ext/cast.h): stored kind -> stored numpy dtype ("bfloat16": uint16 bit patterns)
STORED = {1: "<f2", 2: "bfloat16", 3: "<f4", 4: "<f8", 5: "u1", 6: "i1", 7: "<u2", 8: "<i2", 9: "<u4",
          10: "<i4", 11: "<u8", 12: "<i8"}
OUT = {"float16": (F16, _core.OUTPUT_KINDS["float16"]), "bfloat16": (BF16, _core.OUTPUT_KINDS["bfloat16"])}
OUTS = ["float16", pytest.param("bfloat16", marks=NEEDS_ML_DTYPES)]


def cast_id(stored_kind, out):
    return stored_kind | OUT[out][1] << _core.CAST_OUT_SHIFT


def natural(stored, bits):
    """The values a float32 read would start from: bfloat16 bit patterns as float32."""
    if stored == "bfloat16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits


def expected(stored, bits, out, scale=None, offset=None):
    x = natural(stored, bits)
    with np.errstate(all="ignore"):
        if scale is not None:
            x = (x.astype(np.float32) * np.float32(scale) + np.float32(offset)).astype(np.float32)
        return x.astype(OUT[out][0])


def run_kernel(cast, stored_bits, n, scale=None, offset=None):
    dst = np.empty(n, np.uint16)
    affine = None if scale is None else _core.Affine(np.full(1, scale, np.float32), np.full(1, offset, np.float32))
    inexact = _core.convert(cast, np.ascontiguousarray(stored_bits).view(np.uint8).reshape(-1), dst, affine)
    return dst, inexact


def assert_bits(actual_u16, expected_array):
    np.testing.assert_array_equal(actual_u16, expected_array.view(np.uint16))


def float32_patterns():
    """Every sign/exponent/top-7-mantissa prefix (all 65536 upper halves) with low halves at and
    around the rounding points of bfloat16 (bit 15) and float16 (bit 12 of a normal; subnormal
    outputs round at higher bits, covered by the random low halves)."""
    lows = np.array([0, 1, 0x0FFF, 0x1000, 0x1001, 0x1FFF, 0x2000, 0x3000, 0x7FFF, 0x8000, 0x8001, 0xFFFF],
                    np.uint32)
    rng = np.random.default_rng(3)
    upper = ALL_16.astype(np.uint32) << 16
    grid = (upper[:, None] | lows[None, :]).reshape(-1)
    return np.concatenate([grid, upper | rng.integers(0, 1 << 16, upper.size, dtype=np.uint32)]).view(np.float32)


SNAN = np.array([0x7F800001, 0x7FA00000, 0xFFA00000], np.uint32).view(np.float32)


def test_numpy_keeps_nan_payloads_so_the_comparison_has_teeth():
    with np.errstate(invalid="ignore"):
        assert SNAN.astype(F16).view(np.uint16).tolist() == [0x7C01, 0x7D00, 0xFD00]  # not quieted to 0x7E00


@NEEDS_ML_DTYPES
def test_ml_dtypes_makes_nans_the_quiet_nan_of_their_sign():
    with np.errstate(invalid="ignore"):
        assert SNAN.astype(BF16).view(np.uint16).tolist() == [0x7FC0, 0x7FC0, 0xFFC0]


@pytest.mark.parametrize("out", OUTS)
def test_kernel_float32_patterns_round_to_nearest_even(out, f16_path):
    values = float32_patterns()
    dst, inexact = run_kernel(cast_id(3, out), values, values.size)
    assert_bits(dst, expected("<f4", values, out))
    assert inexact is False  # floats are never "inexact": narrowing is a choice of precision


@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("stored_kind", [1, 2])
def test_kernel_every_16_bit_pattern(stored_kind, out, f16_path):
    stored = STORED[stored_kind]
    bits = ALL_16.view(np.float16) if stored == "<f2" else ALL_16
    dst, _ = run_kernel(cast_id(stored_kind, out), bits, bits.size)
    assert_bits(dst, expected(stored, bits, out))


def float64_values(rng):
    """Random bit patterns, and values at, just above and just below the rounding ties of float16
    and bfloat16 (normal and subnormal), as float64: one rounding must decide them."""
    random = rng.integers(0, 1 << 64, 4000, dtype=np.uint64, endpoint=False).view(np.float64)
    halves = ALL_16.view(np.float16)
    finite = halves[np.isfinite(halves)].astype(np.float64)
    with np.errstate(over="ignore"):
        ups = np.nextafter(finite.astype(np.float16), np.float16(np.inf)).astype(np.float64)
    ok = np.isfinite(ups)
    ties = (finite[ok] + ups[ok]) / 2
    bf = (ALL_16.astype(np.uint32) << 16).view(np.float32)
    bf = bf[np.isfinite(bf)].astype(np.float64)
    bf_ties = bf + np.abs(bf) * 2.0 ** -9
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65519.99, 65520.0, 2.0 ** -25,
                         2.0 ** -25 * (1 + 2 ** -40), 2.0 ** -26, 1e300, -1e-300, 3.3895313892515355e38,
                         3.3961775292304516e38, 3.4e38, 3.5e38])
    around = np.concatenate([ties, bf_ties])
    with np.errstate(over="ignore"):
        return np.concatenate([random, specials, around, np.nextafter(around, np.inf), np.nextafter(around, -np.inf)])


@pytest.mark.parametrize("out", OUTS)
def test_kernel_float64_rounds_once(rng, out):
    values = float64_values(rng)
    dst, inexact = run_kernel(cast_id(4, out), values, values.size)
    assert_bits(dst, expected("<f8", values, out))
    assert inexact is False


def integer_values(rng, dtype):
    info = np.iinfo(dtype)
    values = rng.integers(info.min, info.max, 3000, dtype=dtype, endpoint=True)
    small = rng.integers(max(info.min, -70000), min(info.max, 70000), 3000, endpoint=True).astype(dtype)
    edges = [info.min, info.max, 0, 1, 2048, 2049, 256, 257, 65504, 65519, 65520, 2 ** 24 + 1, 2 ** 25 + 2 ** 17 + 1,
             2 ** 53 + 1, 2 ** 62 + 2 ** 54 + 1]
    edges = np.array([e for e in edges if info.min <= e <= info.max], dtype=dtype)
    return np.concatenate([values, small, edges, -edges[edges > 0] if info.min < 0 else edges])


def exact_by_fraction(values, converted):
    return all(np.isfinite(c) and Fraction(int(v)) == Fraction(float(c))
               for v, c in zip(values.tolist(), converted.astype(np.float64).tolist()))


@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("stored_kind", [5, 6, 7, 8, 9, 10, 11, 12])
def test_kernel_integers_round_once_and_flag_inexact(rng, stored_kind, out, f16_path):
    stored = STORED[stored_kind]
    values = integer_values(rng, stored)
    dst, inexact = run_kernel(cast_id(stored_kind, out), values, values.size)
    assert_bits(dst, expected(stored, values, out))
    assert inexact == (not exact_by_fraction(values, expected(stored, values, out)))
    exact_part = values[(values >= -256) & (values <= 256)]
    assert run_kernel(cast_id(stored_kind, out), exact_part, exact_part.size)[1] is False


@pytest.mark.parametrize("out", OUTS)
def test_kernel_bool_to_16_bits(out):
    values = np.array([True, False, True] * 100)
    dst, inexact = run_kernel(cast_id(5, out), values, values.size)
    assert_bits(dst, values.astype(OUT[out][0]))
    assert inexact is False


@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("stored_kind", sorted(STORED))
def test_kernel_affine_is_the_float32_result_rounded(rng, stored_kind, out, f16_path):
    """(x.astype(float32) * scale + offset) in float32, then rounded to nearest even."""
    stored = STORED[stored_kind]
    if stored == "bfloat16":
        bits = rng.integers(0, 1 << 16, 2000, dtype=np.uint16)
    elif np.dtype(stored).kind == "f":
        bits = rng.standard_normal(2000).astype(stored) * np.array(1000, stored)
    else:
        info = np.iinfo(stored)
        bits = rng.integers(max(info.min, -1 << 20), min(info.max, 1 << 20), 2000, endpoint=True).astype(stored)
    for scale, offset in [(1 / 255, -0.5), (3.0, 0.0), (1e-3, 7.25), (-2.5e4, 1.0)]:
        dst, _ = run_kernel(cast_id(stored_kind, out), bits, bits.size, scale, offset)
        assert_bits(dst, expected(stored, bits, out, scale, offset))


@pytest.mark.parametrize("out", OUTS)
@pytest.mark.parametrize("stored_kind", [1, 2, 5, 6, 7, 8])
def test_kernel_in_place_from_the_tail(rng, stored_kind, out, f16_path):
    """Stored elements no wider than the output convert in place when they end where it ends."""
    stored = STORED[stored_kind]
    n = 1000
    bits = rng.integers(0, 1 << 16, n, dtype=np.uint16) if stored in ("bfloat16", "<f2") else \
        rng.integers(np.iinfo(stored).min, np.iinfo(stored).max, n, endpoint=True).astype(stored)
    if stored == "<f2":
        bits = bits.view(np.float16)
    raw = np.ascontiguousarray(bits).view(np.uint8).reshape(-1)
    buffer = np.zeros(2 * n, np.uint8)
    buffer[buffer.size - raw.size:] = raw
    _core.convert(cast_id(stored_kind, out), buffer[buffer.size - raw.size:], buffer)
    assert_bits(buffer.view(np.uint16), expected(stored, bits, out))


def test_kernel_rejects_bad_conversions():
    dst = np.empty(4, np.uint16)
    for cast in (3 << _core.CAST_OUT_SHIFT, 1 | 3 << _core.CAST_OUT_SHIFT, 13 | 1 << _core.CAST_OUT_SHIFT):
        with pytest.raises(ValueError, match="bad cast or sizes"):
            _core.convert(cast, np.zeros(8, np.uint8), dst)
    with pytest.raises(ValueError, match="bad cast or sizes"):  # 4 float16 outputs need 8 stored float16 bytes
        _core.convert(cast_id(1, "float16"), np.zeros(6, np.uint8), dst)


# ---- through reads ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """Every float16 and every (non-NaN: the writer quiets NaNs) bfloat16 pattern, fixed and
    variable-length, plus uint8 images and int64 ids, over several shards."""
    root = tmp_path_factory.mktemp("narrow")
    halves = ALL_16.view(np.float16).reshape(256, 256)
    bf_bits = ALL_16.copy()
    bf_bits[(bf_bits & 0x7FFF) > 0x7F80] = 0  # NaN patterns: the writer would quiet them
    bf_values = (bf_bits.astype(np.uint32) << 16).view(np.float32).reshape(256, 256)
    rng = np.random.default_rng(9)
    images = rng.integers(0, 256, (256, 4, 5, 3), dtype=np.uint8)
    cuts = [3, 0, 255, 1, 200, 17] * 40 + [1]
    var = np.split(ALL_16.view(np.float16)[:sum(cuts)], np.cumsum(cuts)[:-1])
    path = str(root / "ds")
    fields = {"h": ("float16", (256,)), "b": ("bfloat16", (256,)), "img": ("uint8", (4, 5, 3)),
              "id": ("int64", ()), "hv": ("float16", (None,))}
    with shardfeed.Writer(path, fields=fields, shard_size=1 << 17) as w:
        w.extend({"h": halves, "b": bf_values, "img": images, "id": np.arange(256) * 1000,
                  "hv": var[:256] if len(var) >= 256 else var + [var[0]] * (256 - len(var))})
    assert shardfeed.open(path).num_shards > 2
    columns = {"h": halves, "b": bf_bits.reshape(256, 256), "img": images, "id": np.arange(256) * 1000,
               "hv": (var + [var[0]] * 256)[:256]}
    return path, columns


INDICES = np.random.default_rng(4).permutation(256)


@pytest.mark.parametrize("out", OUTS)
def test_read_every_pattern_as_16_bits(patterns, mmap_mode, out, f16_path):
    path, columns = patterns
    ds = shardfeed.open(path, mmap=mmap_mode)
    batch = ds.read(INDICES, fields=["h", "b"], dtype=out)
    for name, stored in (("h", "<f2"), ("b", "bfloat16")):
        assert batch[name].dtype == OUT[out][0]
        assert_bits(batch[name].view(np.uint16), expected(stored, columns[name][INDICES], out))


@pytest.mark.parametrize("out", OUTS)
def test_read_variable_rows_as_16_bits(patterns, f16_path, out):
    path, columns = patterns
    ds = shardfeed.open(path)
    batch = ds.read(INDICES, fields="hv", dtype=out, maxlen=100, pad_value=-1.5)
    rows = [columns["hv"][i][:100] for i in INDICES]
    want = np.full((256, 100), -1.5, OUT[out][0])
    for k, r in enumerate(rows):
        want[k, :len(r)] = r.astype(OUT[out][0])
    assert_bits(batch["hv"].view(np.uint16), want)


@pytest.mark.parametrize("out", OUTS)
def test_read_images_normalised_to_16_bits(patterns, mmap_mode, out):
    path, columns = patterns
    mean, std = np.array([0.485, 0.456, 0.406]) * 255, np.array([0.229, 0.224, 0.225]) * 255
    ds = shardfeed.open(path, mmap=mmap_mode)
    got = ds.read(INDICES, fields="img", dtype=out, scale=1 / std, offset=-mean / std)["img"]
    x = columns["img"][INDICES].astype(np.float32)
    want = (x * (1 / std).astype(np.float32) + (-mean / std).astype(np.float32)).astype(np.float32).astype(OUT[out][0])
    assert got.dtype == OUT[out][0]
    assert_bits(got.view(np.uint16), want)


@NEEDS_ML_DTYPES
def test_bfloat16_output_dtype_spellings_and_out(patterns):
    path, columns = patterns
    ds = shardfeed.open(path)
    for spelling in ("bfloat16", ml_dtypes.bfloat16, BF16):
        assert ds.read([0, 1], fields="h", dtype=spelling)["h"].dtype == BF16
    out = {"id": np.empty(256, np.float16), "b": np.empty((256, 256), BF16)}
    batch = ds.read(INDICES, fields=["id", "b"], dtype={"id": "float16", "b": "bfloat16"}, out=out, lossy=True)
    assert batch["id"] is out["id"] and batch["b"] is out["b"]
    np.testing.assert_array_equal(batch["b"].view(np.uint16), columns["b"][INDICES])  # stored bits, copied
    with np.errstate(over="ignore"):
        assert_bits(batch["id"].view(np.uint16), (INDICES * 1000).astype(np.float16))


def test_bfloat16_without_ml_dtypes_names_the_package(patterns, monkeypatch):
    path, _ = patterns
    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now raises ImportError
    ds = shardfeed.open(path)
    with pytest.raises(shardfeed.OptionalDependencyError, match="pip install ml_dtypes") as info:
        ds.read([0], fields="h", dtype="bfloat16")
    assert isinstance(info.value, ImportError)
    assert ds.read([0], fields="h", dtype="float16")["h"].dtype == F16  # float16 needs nothing
