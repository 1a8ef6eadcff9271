"""Native conversion to float32 is bit-identical to numpy's astype: every float16 and bfloat16 bit
pattern (signalling NaNs, subnormals, infinities), through the kernel directly and through reads on
both record paths and the variable-length heap path."""

import json
import os

import numpy as np
import pytest

import shardfeed
from shardfeed import _core
from shardfeed.format import HEADER_BYTES, MANIFEST_NAME, file_checksum

ALL_HALF = np.arange(1 << 16, dtype=np.uint16)
# conversion kernel (the core's ids, _core.STORED_KINDS) -> the stored numpy dtype it reads
CASTS = {_core.STORED_KINDS[name]: spec for name, spec in [
    ("float16", "<f2"), ("bfloat16", "bfloat16"), ("float32", "<f4"), ("float64", "<f8"), ("uint8", "u1"),
    ("int8", "i1"), ("uint16", "<u2"), ("int16", "<i2"), ("uint32", "<u4"), ("int32", "<i4"), ("uint64", "<u8"),
    ("int64", "<i8")]}


def f16_expected():
    return ALL_HALF.view(np.float16).astype(np.float32).view(np.uint32)


def bf16_expected():
    return ALL_HALF.astype(np.uint32) << 16


def test_numpy_keeps_signalling_nans_so_the_comparison_has_teeth():
    # 0x7c01 is a signalling NaN: the hardware instruction would set the quiet bit (0x7fc02000).
    assert f16_expected()[0x7C01] == 0x7F802000
    assert f16_expected()[0xFE00] == 0xFFC00000
    assert f16_expected()[0x0001] == 0x33800000  # smallest subnormal
    assert f16_expected()[0x7C00] == 0x7F800000


def test_f16c_switch_changes_the_path_in_use():
    if not _core.BUILD_INFO["f16c"]:
        pytest.skip("this CPU has no F16C")
    try:
        assert _core.allow_f16c(False) is False
        assert _core.allow_f16c(True) is True
    finally:
        _core.allow_f16c(True)


@pytest.mark.parametrize("start", [0, 1, 3, 7, 8, 255, 257])
def test_kernel_float16_all_bit_patterns(start, f16_path):
    src = ALL_HALF[start:]
    dst = np.full(src.size, np.nan, np.float32)
    _core.convert(1, src.view(np.uint8), dst)
    np.testing.assert_array_equal(dst.view(np.uint32), f16_expected()[start:])


def test_kernel_bfloat16_all_bit_patterns():
    dst = np.empty(ALL_HALF.size, np.float32)
    _core.convert(2, ALL_HALF.view(np.uint8), dst)
    np.testing.assert_array_equal(dst.view(np.uint32), bf16_expected())


def test_kernel_reads_unaligned_sources():
    raw = np.zeros(2 * 1000 + 1, np.uint8)
    raw[1:] = np.arange(1000, dtype=np.uint16).view(np.uint8) + 0  # copy of the bytes at an odd address
    src = raw[1:]
    assert src.ctypes.data % 2 == 1
    dst = np.empty(1000, np.float32)
    _core.convert(1, src, dst)
    np.testing.assert_array_equal(dst, np.arange(1000, dtype=np.uint16).view(np.float16).astype(np.float32))


def random_stored(rng, stored, n):
    if stored == "bfloat16":
        return rng.integers(0, 1 << 16, n, dtype=np.uint16), None
    dtype = np.dtype(stored)
    bits = rng.integers(0, 256, n * dtype.itemsize, dtype=np.uint8).view(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        bits[:4] = [info.min, info.max, 0, info.max - 1]
    if dtype == np.float64:
        bits[:6] = [np.inf, -np.inf, 3.4028235677973366e38, 3.4028235e38 * 1.0000001, 1e-46, -0.0]
    return bits, dtype


@pytest.mark.parametrize("cast", sorted(CASTS))
def test_kernel_every_cast_matches_numpy(rng, cast):
    bits, dtype = random_stored(rng, CASTS[cast], 1031)
    dst = np.empty(bits.size, np.float32)
    _core.convert(cast, bits.view(np.uint8), dst)
    if dtype is None:
        expected = (bits.astype(np.uint32) << 16).view(np.float32)
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            expected = bits.astype(np.float32)
    np.testing.assert_array_equal(dst.view(np.uint32), expected.view(np.uint32))


@pytest.mark.parametrize("n", [1, 5, 15, 16, 17, 255, 256, 257, 1000, 4099])
def test_streamed_kernel_at_every_offset_in_a_cache_line(rng, n):
    """The non-temporal variant (reads of batches of 16 MiB or more) writes exactly what the plain
    one and numpy do into float32 outputs starting anywhere in a 64-byte line (its blocks start at
    line boundaries; the partial lines at either end take plain stores), touching nothing before or
    after: uint8 with a per-channel scale/offset of period 3, and float16."""
    stored_u8 = rng.integers(0, 256, n, dtype=np.uint8)
    scale, offset = np.array([0.5, 2.0, -1.25], np.float32), np.array([1.0, -3.0, 0.125], np.float32)
    channel = np.arange(n) % 3
    expected_u8 = stored_u8.astype(np.float32) * scale[channel] + offset[channel]
    stored_f16 = rng.standard_normal(n).astype(np.float16)
    cases = [(_core.STORED_KINDS["uint8"], stored_u8.view(np.uint8), _core.Affine(scale, offset, 1, 3), expected_u8),
             (_core.STORED_KINDS["float16"], stored_f16.view(np.uint8), None, stored_f16.astype(np.float32))]
    space = np.full(n + 64, np.nan, np.float32)  # 64 floats of room to start the output at any offset
    lead = (-space.ctypes.data % 64) // 4  # the first float of `space` at a line boundary
    for cast, src, affine, expected in cases:
        for shift in range(16):  # 4-byte steps through a line
            space[:] = np.nan
            dst = space[lead + shift:lead + shift + n]
            assert dst.ctypes.data % 64 == 4 * shift
            _core.convert(cast, src, dst, affine, stream=True)
            np.testing.assert_array_equal(dst, expected, err_msg=f"shift {shift}")
            assert np.isnan(space[:lead + shift]).all() and np.isnan(space[lead + shift + n:]).all(), shift


def test_reads_stream_batches_of_16_mib_of_output_or_more():
    """output_streamed, the reads' choice of the non-temporal variant (and the benchmarks' copy
    ceiling's): a batch's converted output of 16 MiB or more, whatever the split into records."""
    mib = 1 << 20
    assert _core.output_streamed(16 * mib // 64, 64) and not _core.output_streamed(16 * mib // 64 - 1, 64)
    assert _core.output_streamed(3 * 224 * 224 * 4, 64)  # bench_read's 147 KiB images, batch 64: 37 MiB
    assert not _core.output_streamed(64 * 64 * 4, 256) and _core.output_streamed(64 * 64 * 4, 1024)  # 4, 16 MiB
    assert _core.output_streamed(16 * mib, 1) and not _core.output_streamed(1, 16 * mib - 1)
    with pytest.raises(ValueError, match="0 records"):
        _core.output_streamed(1, 0)


def test_kernel_rejects_bad_arguments():
    dst = np.empty(4, np.float32)
    with pytest.raises(ValueError, match="bad cast or sizes"):
        _core.convert(0, np.zeros(16, np.uint8), dst)  # COPY is not a conversion
    with pytest.raises(ValueError, match="bad cast or sizes"):
        _core.convert(13, np.zeros(16, np.uint8), dst)
    with pytest.raises(ValueError, match="bad cast or sizes"):
        _core.convert(1, np.zeros(7, np.uint8), dst)


# ---- through reads --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def half_datasets(tmp_path_factory):
    """Every float16 pattern as 256 samples of 256 (float16[256], 512-byte records), as one sample
    of 65536, and as variable-length samples of awkward lengths."""
    root = tmp_path_factory.mktemp("half")
    halves = ALL_HALF.view(np.float16)
    paths = {}
    paths["rows"] = os.fspath(root / "rows")
    with shardfeed.Writer(paths["rows"], fields={"h": ("float16", (256,))}, shard_size=HEADER_BYTES + 40 * 512) as w:
        w.extend({"h": halves.reshape(256, 256)})
    paths["one"] = os.fspath(root / "one")
    with shardfeed.Writer(paths["one"], fields={"h": ("float16", (1 << 16,))}) as w:
        w.append({"h": halves})
    cuts = np.cumsum([0, 1, 7, 9, 1000, 3, 0, 255, 257, 20000])
    paths["var"] = os.fspath(root / "var")
    with shardfeed.Writer(paths["var"], fields={"h": ("float16", (None,))}, shard_size=30000) as w:
        w.extend({"h": list(np.split(halves, cuts[1:]))})
    return paths, np.diff(np.append(cuts, 1 << 16))


def test_writer_stores_every_half_pattern_unchanged(half_datasets):
    paths, _ = half_datasets
    stored = shardfeed.open(paths["rows"]).read(np.arange(256))["h"]
    np.testing.assert_array_equal(stored.view(np.uint16).reshape(-1), ALL_HALF)


@pytest.mark.parametrize("layout", ["rows", "one"])
def test_read_float16_all_bit_patterns(half_datasets, rng, mmap_mode, layout, f16_path):
    paths, _ = half_datasets
    ds = shardfeed.open(paths[layout], mmap=mmap_mode, threads=4)
    order = rng.permutation(len(ds))
    got = ds.read(order, dtype="float32")["h"]
    expected = f16_expected().reshape(len(ds), -1)[order]
    np.testing.assert_array_equal(got.view(np.uint32), expected)


def test_read_float16_all_bit_patterns_variable_length(half_datasets):
    paths, lengths = half_datasets
    ds = shardfeed.open(paths["var"])
    assert ds.num_shards > 1
    batch = ds.read(np.arange(len(ds)), dtype="float32", pad_value=-1.5)
    np.testing.assert_array_equal(batch.lengths["h"], lengths)
    got = np.concatenate([row[:n] for row, n in zip(batch["h"], lengths)])
    np.testing.assert_array_equal(got.view(np.uint32), f16_expected())
    for row, n in zip(batch["h"], lengths):
        assert (row[n:] == np.float32(-1.5)).all()


@pytest.fixture(scope="module")
def bf16_dataset(tmp_path_factory):
    """Every bfloat16 pattern on disk (NaNs included, which the writer would quiet): written as
    zeros, then the record bytes are replaced and the manifest checksum updated."""
    path = os.fspath(tmp_path_factory.mktemp("bf16") / "ds")
    with shardfeed.Writer(path, fields={"b": ("bfloat16", (256,))}) as w:
        w.extend({"b": np.zeros((256, 256), np.float32)})
    shard = os.path.join(path, "shard-000000.rec")
    with open(shard, "r+b") as f:
        f.seek(HEADER_BYTES)
        f.write(ALL_HALF.astype("<u2").tobytes())
    manifest_path = os.path.join(path, MANIFEST_NAME)
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["shards"][0]["checksum"] = file_checksum(shard)
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    return path


def test_read_bfloat16_all_bit_patterns(bf16_dataset, rng, mmap_mode):
    ds = shardfeed.open(bf16_dataset, mmap=mmap_mode)
    order = rng.permutation(256)
    expected = bf16_expected().reshape(256, 256)[order]
    for dtype in (None, "float32"):  # bfloat16 always reads as float32
        got = ds.read(order, dtype=dtype)["b"]
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got.view(np.uint32), expected)


@pytest.mark.parametrize("dtype", ["uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                                   "float64", "bool"])
def test_read_integer_and_double_extremes_as_float32(tools, new_path, mmap_mode, dtype):
    if dtype == "bool":
        values = np.array([True, False, True, True])
    elif dtype == "float64":
        values = np.array([np.inf, -np.inf, np.nan, -0.0, 5e-324, 3.4028235677973366e38, 3.4028235677973367e38,
                           1e39, -1e39, 1.0000000596046448, 1.0000001788139343, 2.0 ** -149, 2.0 ** -150])
    else:
        info = np.iinfo(dtype)
        values = np.array([info.min, info.max, 0, 1, info.max - 1, info.min + 1, info.max // 3], dtype=dtype)
        if info.bits == 64:  # round-to-nearest-even boundaries of float32
            values = np.append(values, np.array([2 ** 24 + 1, 2 ** 25 + 3, 2 ** 40 + 2 ** 16, 2 ** 40 + 2 ** 16 + 1,
                                                 2 ** 53 + 1, 2 ** 62 + 2 ** 38, 2 ** 62 + 2 ** 38 + 1], dtype=dtype))
    values = values.astype(dtype)
    ds = shardfeed.open(tools.write_dataset(new_path(), {"x": (dtype, ()), "row": (dtype, (3,))},
                                            {"x": values, "row": np.stack([values] * 3, axis=1)}), mmap=mmap_mode)
    batch = ds.read(np.arange(len(values))[::-1], dtype="float32", lossy=True)
    with np.errstate(over="ignore"):
        expected = values[::-1].astype(np.float32)
    np.testing.assert_array_equal(batch["x"].view(np.uint32), expected.view(np.uint32))
    np.testing.assert_array_equal(batch["row"].view(np.uint32), np.stack([expected] * 3, axis=1).view(np.uint32))
