"""Converters from numpy arrays, .npy and .npz files: exact round trips, several files, empty
inputs, bad files, precision reduction within the reported error, overflow refused or saturated,
parts, rollback of a failed conversion, and bounded memory on a source larger than the budget."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import shardfeed
from shardfeed import convert
from shardfeed._casting import bfloat16_bits_to_float32, float_to_bfloat16_bits


def read_all(path):
    ds = shardfeed.open(path)
    try:
        return ds.read(np.arange(len(ds)))
    finally:
        ds.close()


def bf16(values):
    return bfloat16_bits_to_float32(float_to_bfloat16_bits(values))


def test_arrays_round_trip_exactly_in_their_own_dtypes(tmp_path, rng, tools):
    x = rng.standard_normal((1000, 3, 5)).astype(np.float32)
    y = rng.integers(-5, 5, 1000).astype(np.int16)
    report = convert.from_arrays(tmp_path / "d", {"x": x, "y": y}, chunk_bytes=4096, shard_size=20_000)
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], x)
    tools.assert_identical(batch["y"], y)
    assert report.num_samples == 1000 and report.num_shards > 1
    assert report.source_bytes == x.nbytes + y.nbytes
    assert not any(f.measured for f in report.fields.values())
    assert report.fields["x"].source_dtype == "float32" and report.fields["y"].dtype == "int16"


def test_arrays_tuple_and_single_array(tmp_path, rng, tools):
    x, y = rng.standard_normal((10, 2)), np.arange(10)
    convert.from_arrays(tmp_path / "t", (x, y))
    assert list(shardfeed.open(tmp_path / "t").fields) == ["x", "y"]
    convert.from_arrays(tmp_path / "s", x)
    tools.assert_identical(read_all(tmp_path / "s")["x"], x)


@pytest.mark.parametrize("target", ["float32", "float16", "bfloat16"])
def test_precision_reduction_stays_within_the_reported_error(tmp_path, rng, target):
    # magnitudes in [2**-10, 2**10): normal numbers in every target, so the relative error is bounded
    x = rng.choice([-1.0, 1.0], (500, 16)) * rng.uniform(1, 2, (500, 16)) * 2.0 ** rng.integers(-10, 9, (500, 1))
    x[0, 0] = 0.0
    report = convert.from_arrays(tmp_path / "p", {"x": x}, dtypes={"x": target}, chunk_bytes=8192)
    stored = read_all(tmp_path / "p")["x"].astype(np.float64)
    expected = bf16(x) if target == "bfloat16" else x.astype(target)
    np.testing.assert_array_equal(stored, expected.astype(np.float64))
    field = report.fields["x"]
    abs_error = np.abs(stored - x)
    assert field.measured and field.source_dtype == "float64" and field.dtype == target
    assert field.max_abs_error == abs_error.max()
    nonzero = x != 0
    assert field.max_rel_error == (abs_error[nonzero] / np.abs(x[nonzero])).max()
    bound = {"float32": 2.0 ** -24, "float16": 2.0 ** -11, "bfloat16": 2.0 ** -8}[target]
    assert 0 < field.max_rel_error <= bound
    # every value is in the normal range: the normal-range error is the error, nothing else lost
    assert field.normal_rel_error == field.max_rel_error and field.values == x.size
    assert field.subnormal == field.zeroed == field.saturated == 0
    assert f"x: float64 -> {target}[16]: 8,000 values, rel error <= {field.max_rel_error:.3g} in {target}'s " \
           "normal range" in str(report) and "none overflowed, became subnormal or 0" in str(report)


def test_one_dtype_for_every_float_field(tmp_path, rng):
    report = convert.from_arrays(tmp_path / "d", {"x": rng.standard_normal((4, 2)), "y": np.arange(4)},
                                 dtypes="float16")
    assert (report.fields["x"].dtype, report.fields["y"].dtype) == ("float16", "int64")


def test_overflow_is_refused_naming_field_sample_and_source_row(tmp_path):
    x = np.zeros((100, 4))
    x[63, 2] = 1e6
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(shardfeed.ValueRangeError, match=r"x\.npy, row 63: field 'x', sample 63: value 1000000\.0 "
                       r"overflows float16.*overflow='saturate'") as info:
        convert.from_npy(tmp_path / "d", tmp_path / "x.npy", dtypes="float16", chunk_bytes=512)
    assert (info.value.field, info.value.sample) == ("x", 63)
    assert not os.path.exists(tmp_path / "d"), "a failed conversion leaves no dataset"


def test_overflow_saturates_when_told(tmp_path):
    x = np.array([[1.0, 1e6, -1e6, np.inf, -np.inf, np.nan, 70000.0, 65519.0]])
    report = convert.from_arrays(tmp_path / "d", {"x": x, "b": x}, dtypes={"x": "float16", "b": "bfloat16"},
                                 overflow="saturate")
    batch = read_all(tmp_path / "d")
    np.testing.assert_array_equal(batch["x"][0], np.array([1, 65504, -65504, np.inf, -np.inf, np.nan, 65504, 65504],
                                                          np.float16))
    assert report.fields["x"].saturated == 3  # 65519 rounds to 65504 and does not overflow
    assert report.fields["b"].saturated == 0
    huge = np.array([[3.5e38, -1e39]])
    report = convert.from_arrays(tmp_path / "b", {"b": huge}, dtypes="bfloat16", overflow="saturate")
    assert report.fields["b"].saturated == 2
    largest = float(bfloat16_bits_to_float32(np.array([0x7F7F], np.uint16))[0])
    np.testing.assert_array_equal(read_all(tmp_path / "b")["b"][0], [largest, -largest])


def test_integer_overflow_refused_or_clipped(tmp_path):
    values = np.array([0, 255, 256, -1, 1 << 40])
    with pytest.raises(shardfeed.ValueRangeError, match=r"row 2: field 'v', sample 2: value 256 is out of the "
                       r"range \[0, 255\] of uint8"):
        convert.from_arrays(tmp_path / "e", {"v": values}, dtypes={"v": "uint8"})
    report = convert.from_arrays(tmp_path / "c", {"v": values}, dtypes={"v": "uint8"}, overflow="saturate")
    np.testing.assert_array_equal(read_all(tmp_path / "c")["v"], [0, 255, 255, 0, 255])
    assert report.fields["v"].saturated == 3
    floats = np.array([1.0, 300.0, -3.0, 2.0 ** 70])
    convert.from_arrays(tmp_path / "f", {"v": floats}, dtypes={"v": "int64"}, overflow="saturate")
    np.testing.assert_array_equal(read_all(tmp_path / "f")["v"], [1, 300, -3, 2 ** 63 - 1024])
    with pytest.raises(shardfeed.ValueRangeError, match="not an integer"):
        convert.from_arrays(tmp_path / "g", {"v": np.array([1.5])}, dtypes={"v": "int8"}, overflow="saturate")


def test_npy_files_are_concatenated_and_named(tmp_path, rng, tools):
    parts = [rng.standard_normal((n, 8)).astype(np.float32) for n in (5, 0, 700, 33)]
    labels = [np.arange(n) for n in (5, 0, 700, 33)]
    for i, (x, y) in enumerate(zip(parts, labels)):
        np.save(tmp_path / f"x{i}.npy", x)
        np.save(tmp_path / f"y{i}.npy", y)
    report = convert.from_npy(tmp_path / "d", {"x": str(tmp_path / "x*.npy"),
                                               "y": [tmp_path / f"y{i}.npy" for i in range(4)]}, chunk_bytes=1000)
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], np.concatenate(parts))
    tools.assert_identical(batch["y"], np.concatenate(labels))
    assert report.num_samples == 738
    convert.from_npy(tmp_path / "one", tmp_path / "x2.npy")
    assert list(shardfeed.open(tmp_path / "one").fields) == ["x"]


def test_npy_structured_fortran_and_big_endian(tmp_path, rng, tools):
    records = np.zeros(50, dtype=[("a", "<f4", (3,)), ("b", "<i2")])
    records["a"] = rng.standard_normal((50, 3))
    records["b"] = np.arange(50)
    np.save(tmp_path / "s.npy", records)
    convert.from_npy(tmp_path / "s", tmp_path / "s.npy")
    batch = read_all(tmp_path / "s")
    tools.assert_identical(batch["a"], records["a"])
    tools.assert_identical(batch["b"], records["b"])

    fortran = np.asfortranarray(rng.standard_normal((300, 7)))
    np.save(tmp_path / "f.npy", fortran)
    convert.from_npy(tmp_path / "f", tmp_path / "f.npy", chunk_bytes=512)
    tools.assert_identical(read_all(tmp_path / "f")["x"], np.ascontiguousarray(fortran))

    big = rng.standard_normal((20, 2)).astype(">f8")
    np.save(tmp_path / "b.npy", big)
    convert.from_npy(tmp_path / "b", tmp_path / "b.npy")
    tools.assert_identical(read_all(tmp_path / "b")["x"], big.astype("<f8"))


def test_empty_npy_gives_an_empty_dataset(tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 4), np.float32))
    report = convert.from_npy(tmp_path / "d", tmp_path / "e.npy")
    ds = shardfeed.open(tmp_path / "d")
    assert len(ds) == 0 and ds.fields["x"].shape == (4,) and report.num_samples == 0


def test_bad_npy_inputs(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b.npy", np.zeros((3, 5)))
    np.save(tmp_path / "o.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "t.npy").write_bytes(b"not numpy at all")
    with pytest.raises(shardfeed.SourceError, match=r"b\.npy holds float64\[5\] rows, .*a\.npy holds float64\[2\]"):
        convert.from_npy(tmp_path / "d", [tmp_path / "a.npy", tmp_path / "b.npy"])
    with pytest.raises(shardfeed.SourceError, match=r"o\.npy: holds Python objects"):
        convert.from_npy(tmp_path / "d", tmp_path / "o.npy")
    with pytest.raises(shardfeed.SourceError, match=r"t\.npy: not a \.npy array"):
        convert.from_npy(tmp_path / "d", tmp_path / "t.npy")
    with pytest.raises(shardfeed.SourceError, match=r"different numbers of rows: \{'x': 3, 'y': 2\}"):
        convert.from_arrays(tmp_path / "d", {"x": np.zeros(3), "y": np.zeros(2)})
    with pytest.raises(shardfeed.SourceError, match="no .npy files in"):
        convert.from_npy(tmp_path / "d", str(tmp_path / "nothing*.npy"))
    with pytest.raises(FileNotFoundError):
        convert.from_npy(tmp_path / "d", tmp_path / "missing.npy")
    with pytest.raises(shardfeed.SchemaError, match="cannot store complex128"):
        convert.from_arrays(tmp_path / "d", {"z": np.zeros(2, complex)})
    np.save(tmp_path / "cut.npy", np.zeros((100, 10)))
    with open(tmp_path / "cut.npy", "r+b") as f:
        f.truncate(4000)
    with pytest.raises(shardfeed.SourceError, match="shorter than its header says"):
        convert.from_npy(tmp_path / "d", tmp_path / "cut.npy")
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_members_stored_or_compressed(tmp_path, rng, tools, compressed):
    save = np.savez_compressed if compressed else np.savez
    xs = [rng.standard_normal((n, 4, 4)).astype(np.float32) for n in (100, 0, 57)]
    for i, x in enumerate(xs):
        save(tmp_path / f"a{i}.npz", image=x, label=np.arange(len(x)), extra=np.zeros(len(x)))
    report = convert.from_npz(tmp_path / "d", sorted(tmp_path.glob("a*.npz")), fields={"x": "image", "y": "label"},
                              chunk_bytes=700)
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], np.concatenate(xs))
    tools.assert_identical(batch["y"], np.concatenate([np.arange(len(x)) for x in xs]))
    assert report.num_samples == 157 and set(batch) == {"x", "y"}
    convert.from_npz(tmp_path / "p", sorted(tmp_path.glob("a*.npz")), fields=["label"], part=(1, 2))
    tools.assert_identical(read_all(tmp_path / "p")["label"], np.concatenate([np.arange(100), np.arange(57)])[78:])


def test_npz_missing_member_and_not_a_zip(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.zeros(3))
    with pytest.raises(shardfeed.SourceError, match=r"a\.npz: no member\(s\) \['y'\]"):
        convert.from_npz(tmp_path / "d", tmp_path / "a.npz", fields=["y"])
    (tmp_path / "b.npz").write_bytes(b"nope")
    with pytest.raises(shardfeed.SourceError, match="not an .npz archive"):
        convert.from_npz(tmp_path / "d", tmp_path / "b.npz")


def test_parts_cover_the_source_exactly_once(tmp_path, rng, tools):
    x = rng.standard_normal((101, 3))
    np.save(tmp_path / "x.npy", x)
    pieces = []
    for k in range(4):
        report = convert.from_npy(tmp_path / f"p{k}", tmp_path / "x.npy", part=(k, 4), chunk_bytes=100)
        pieces.append(read_all(tmp_path / f"p{k}")["x"])
        assert report.num_samples == len(pieces[-1])
    tools.assert_identical(np.concatenate(pieces), x)
    for bad in [(4, 4), (0, 0), (-1, 2), "0/2", (1.0, 2)]:
        with pytest.raises(ValueError, match="part must be"):
            convert.from_npy(tmp_path / "bad", tmp_path / "x.npy", part=bad)


def test_append_mode_and_rollback_of_a_failed_append(tmp_path, tools):
    x = np.arange(10.0)[:, None]
    convert.from_arrays(tmp_path / "d", {"x": x}, dtypes="float32", shard_size=64 + 4 * 3)
    report = convert.from_arrays(tmp_path / "d", {"x": x * 2}, mode="a", shard_size=64 + 4 * 3)  # stored as float32
    assert (report.num_samples, report.dataset_samples) == (10, 20)
    before = sorted(os.listdir(tmp_path / "d"))
    manifest = (tmp_path / "d" / "manifest.json").read_bytes()
    bad = np.arange(30.0)[:, None]
    bad[25] = 1e300
    with pytest.raises(shardfeed.ValueRangeError):
        convert.from_arrays(tmp_path / "d", {"x": bad}, mode="a", shard_size=64 + 4 * 3, chunk_bytes=64)
    assert sorted(os.listdir(tmp_path / "d")) == before
    assert json.loads((tmp_path / "d" / "manifest.json").read_bytes()) == json.loads(manifest)
    tools.assert_identical(read_all(tmp_path / "d")["x"], np.concatenate([x, x * 2]).astype(np.float32))
    with pytest.raises(shardfeed.SchemaError, match="do not match the dataset's"):
        convert.from_arrays(tmp_path / "d", {"x": np.zeros((3, 2))}, mode="a")


def test_a_conversion_into_a_directory_of_other_files_is_refused_naming_it(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "README").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty \\(README\\) and holds no dataset") as caught:
        convert.from_arrays(tmp_path / "d", {"x": np.array([1.0, 2.0])})
    assert caught.value.filename == str(tmp_path / "d")
    np.save(tmp_path / "x.npy", np.arange(4.0))
    with pytest.raises(FileExistsError, match="holds no dataset"):
        convert.from_npy(tmp_path / "d", tmp_path / "x.npy", workers=2)
    assert os.listdir(tmp_path / "d") == ["README"] and sorted(os.listdir(tmp_path)) == ["d", "x.npy"]
    # an empty directory, or the leftovers of a killed writer, are fine
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "shard-000000.rec").write_bytes(b"half")
    with pytest.warns(shardfeed.ShardfeedWarning, match="removed files the manifest does not list"):
        convert.from_arrays(tmp_path / "e", {"x": np.array([1.0, 2.0])})
    assert len(shardfeed.open(tmp_path / "e")) == 2


def test_options_are_checked(tmp_path):
    x = np.zeros(3)
    with pytest.raises(ValueError, match="overflow must be one of"):
        convert.from_arrays(tmp_path / "d", x, overflow="clip")
    with pytest.raises(ValueError, match="chunk_bytes must be a positive int"):
        convert.from_arrays(tmp_path / "d", x, chunk_bytes=0)
    with pytest.raises(shardfeed.SchemaError, match=r"dtypes given for unknown fields \['q'\]"):
        convert.from_arrays(tmp_path / "d", x, dtypes={"q": "float16"})
    convert.from_arrays(tmp_path / "d", x)
    with pytest.raises(FileExistsError):
        convert.from_arrays(tmp_path / "d", x)
    assert len(shardfeed.open(tmp_path / "d")) == 3, "refusing to overwrite keeps the dataset"


CONVERT_BIG = """
import os, resource, sys
import numpy as np
from shardfeed import convert
source, out, dtype = sys.argv[1], sys.argv[2], sys.argv[3]
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = convert.from_npy(out, source, dtypes=dtype)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) // 1024, report.num_samples)
"""


@pytest.mark.parametrize("dtype, budget_mb", [("float32", 48), ("float16", 48), ("bfloat16", 80)])
def test_memory_stays_bounded_on_a_source_larger_than_the_budget(tmp_path, dtype, budget_mb):
    """A 192 MiB .npy converts within a fixed budget of peak RSS growth: chunks, released mapped
    pages and the writer's bounded buffer, not the file's size (page cache is not RSS). bfloat16
    needs more: rounding a write buffer's worth of values takes a few float32-sized temporaries."""
    rows, width = 48 * 1024, 1024
    source = tmp_path / "big.npy"
    mapped = np.lib.format.open_memmap(source, mode="w+", dtype=np.float32, shape=(rows, width))
    for start in range(0, rows, 4096):
        mapped[start:start + 4096] = np.arange(start, start + 4096, dtype=np.float32)[:, None]
    mapped.flush()
    del mapped
    done = subprocess.run([sys.executable, "-c", CONVERT_BIG, str(source), str(tmp_path / "d"), dtype],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    growth_mb, samples = map(int, done.stdout.split())
    assert samples == rows
    assert growth_mb < budget_mb, f"peak RSS grew by {growth_mb} MiB converting a {rows * width * 4 >> 20} MiB file"
    ds = shardfeed.open(tmp_path / "d")
    last = ds.read([0, rows - 1])["x"]
    expected = np.array([0, rows - 1], np.float32)
    np.testing.assert_array_equal(last[:, 0], bf16(expected) if dtype == "bfloat16" else expected.astype(dtype))
    ds.close()


def test_import_shardfeed_does_not_import_the_converters_or_their_extras():
    code = ("import sys, shardfeed\n"
            "loaded = [m for m in ('shardfeed.convert', 'tqdm', 'PIL', 'h5py', 'csv', 'zipfile') if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "assert shardfeed.convert.from_npy and 'shardfeed.convert' in sys.modules\n"
            "assert callable(shardfeed.merge) and shardfeed.MergeResult\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
