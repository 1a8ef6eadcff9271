"""The writer: casts, values that do not fit, schema checks, append mode, metadata, shard sizes,
and that an error or an interruption leaves a dataset that opens with the samples written before."""

import errno
import json
import os

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, MANIFEST_NAME, Schema, file_checksum


def load_manifest(path):
    with open(os.path.join(path, MANIFEST_NAME)) as f:
        return json.load(f)


def read_all(path, **kw):
    ds = shardfeed.open(path)
    return ds.read(np.arange(len(ds)), **kw)


# ---- casts ------------------------------------------------------------------------------------


def test_float64_is_rounded_to_float16_and_float32_like_numpy(tools, rng, new_path):
    values = rng.standard_normal((50, 4)) * np.logspace(-9, 4, 4)
    path = tools.write_dataset(new_path(), {"h": ("float16", (4,)), "f": ("float32", (4,))}, {"h": values, "f": values})
    batch = read_all(path)
    tools.assert_identical(batch["h"], values.astype(np.float16))
    tools.assert_identical(batch["f"], values.astype(np.float32))


def test_float64_to_bfloat16_rounds_once_to_nearest_even(new_path):
    one = 1.0
    cases = {  # float64 value -> the nearest bfloat16 (8 significant bits), ties to even
        one: one,
        one + 2 ** -8: one,                              # tie -> even (1.0)
        one + 3 * 2 ** -8: one + 2 ** -6,                # tie -> even (1 + 2/128)
        one + 2 ** -8 + 2 ** -40: one + 2 ** -7,         # above the tie: rounding via float32 first would tie
        one + 2 ** -8 - 2 ** -40: one,
        -(one + 2 ** -8 + 2 ** -40): -(one + 2 ** -7),
        3.0e38: float(np.uint32(0x7F62 << 16).view(np.float32)),  # 0x7F61B1E6 as float32 rounds up
        2.0 ** -133: 2.0 ** -133,                        # bfloat16 subnormal
        -0.0: -0.0,
        np.inf: np.inf,
    }
    inputs = np.array(list(cases), dtype=np.float64)
    path = new_path()
    with shardfeed.Writer(path, fields={"b": ("bfloat16", ())}) as w:
        w.extend({"b": inputs})
    got = read_all(path)["b"]
    np.testing.assert_array_equal(got.view(np.uint32), np.array(list(cases.values()), np.float32).view(np.uint32))
    assert got.view(np.uint32)[-2] == 0x80000000  # -0.0 kept


def test_float32_and_float16_inputs_to_bfloat16(new_path):
    path = new_path()
    with shardfeed.Writer(path, fields={"b": ("bfloat16", (3,))}) as w:
        w.append({"b": np.array([1.5, -2.25, 65504], np.float16)})
        w.append({"b": np.array([1 + 2 ** -8, 1 + 2 ** -7 + 2 ** -8, np.nan], np.float32)})
    got = read_all(path)["b"]
    np.testing.assert_array_equal(got[0], [1.5, -2.25, 65536.0])  # 65504 rounds up in bfloat16
    np.testing.assert_array_equal(got[1, :2], [1.0, 1 + 2 ** -6])
    assert np.isnan(got[1, 2])


def test_integers_into_float_and_bool_fields(tools, new_path):
    path = tools.write_dataset(new_path(), {"f": ("float16", ()), "b": ("bool", ()), "u": ("uint8", ())},
                               {"f": np.array([0, 2048, 2049, -7]), "b": np.array([0, 1, 1, 0]),
                                "u": np.array([0.0, 255.0, 3.0, 1.0])})
    batch = read_all(path)
    tools.assert_identical(batch["f"], np.array([0, 2048, 2048, -7], np.float16))
    tools.assert_identical(batch["b"], np.array([False, True, True, False]))
    tools.assert_identical(batch["u"], np.array([0, 255, 3, 1], np.uint8))


# ---- values that do not fit -------------------------------------------------------------------

OVERFLOWS = [
    ("float16", (2,), 70000.0, "overflows float16"),
    ("float16", (), -1e5, "overflows float16"),
    ("bfloat16", (2,), 1e39, "overflows bfloat16"),
    ("float32", (2,), -1e39, "overflows float32"),
    ("uint8", (2,), 256, r"out of the range \[0, 255\] of uint8"),
    ("uint8", (), -1, r"out of the range \[0, 255\] of uint8"),
    ("int8", (2,), -129, r"out of the range \[-128, 127\] of int8"),
    ("int32", (), 2 ** 31, r"out of the range \[-2147483648, 2147483647\] of int32"),
    ("uint64", (), -1, "out of the range .* of uint64"),
    ("int16", (2,), 1.5, "is not an integer in the range of int16"),
    ("uint16", (), 65536.0, "is not an integer in the range of uint16"),
    ("int64", (), float(2 ** 63), "is not an integer in the range of int64"),
    ("int32", (2,), np.nan, "is not an integer in the range of int32"),
    ("bool", (), 2, "is not 0 or 1, cannot be stored as bool"),
]


@pytest.mark.parametrize("dtype, shape, bad, message", OVERFLOWS, ids=[f"{o[0]}-{o[2]}" for o in OVERFLOWS])
def test_value_that_does_not_fit_raises_naming_field_and_sample(new_path, dtype, shape, bad, message):
    path = new_path()
    float_input = isinstance(bad, float)
    good = np.zeros((10,) + shape, np.float64 if float_input else np.int64)
    bad_batch = np.zeros((6,) + shape, good.dtype)
    bad_batch.reshape(6, -1)[4, -1] = bad
    with pytest.raises(shardfeed.ValueRangeError, match=f"field 'x', sample 14: value .*{message}") as info:
        with shardfeed.Writer(path, fields={"x": (dtype, shape), "y": "int64"}) as w:
            w.extend({"x": good, "y": np.arange(10)})
            w.extend({"x": bad_batch, "y": np.arange(6)})
    assert isinstance(info.value, ValueError)
    # The dataset written so far stays intact: the earlier samples, nothing of the failed batch.
    ds = shardfeed.open(path)
    assert len(ds) == 10
    np.testing.assert_array_equal(ds.read(np.arange(10))["y"], np.arange(10))


def test_bad_value_in_append_names_the_global_sample(new_path):
    path = new_path()
    w = shardfeed.Writer(path, fields={"x": ("uint8", (3,))})
    for i in range(7):
        w.append({"x": [i, i, i]})
    with pytest.raises(shardfeed.ValueRangeError, match=r"field 'x', sample 7: value (np\.\w+\()?300\b"):
        w.append({"x": [1, 300, 2]})
    w.append({"x": [9, 9, 9]})  # the writer stays usable
    w.close()
    np.testing.assert_array_equal(read_all(path)["x"][:, 0], [0, 1, 2, 3, 4, 5, 6, 9])


def test_bad_value_in_variable_field_names_field_and_sample(new_path):
    path = new_path()
    with shardfeed.Writer(path, fields={"t": ("int8", (None,)), "y": "int64"}) as w:
        w.extend({"t": [[1, 2], [3]], "y": [0, 1]})
        with pytest.raises(shardfeed.ValueRangeError, match=r"field 't', sample 4: value (np\.\w+\()?200\b.*int8"):
            w.extend({"t": [[1], [2, 3, 4], [5, 200]], "y": [2, 3, 4]})
    assert len(shardfeed.open(path)) == 2


def test_non_finite_input_is_stored_not_refused(tools, new_path):
    values = np.array([np.inf, -np.inf, np.nan, 1.0])
    path = tools.write_dataset(new_path(), {"h": ("float16", ()), "b": ("bfloat16", ()), "f": ("float32", ())},
                               {"h": values, "b": values, "f": values})
    batch = read_all(path)
    for name in "hbf":
        np.testing.assert_array_equal(batch[name], values.astype(batch[name].dtype))


# ---- schema checks ----------------------------------------------------------------------------


def test_extend_with_wrong_shape_names_the_field(new_path):
    with shardfeed.Writer(new_path(), fields={"img": ("uint8", (2, 3)), "y": "int64"}) as w:
        wrong = r"field 'img': expected a batch of shape \(n, 2, 3\).*got \(4, 3, 2\)"
        with pytest.raises(shardfeed.SchemaError, match=wrong):
            w.extend({"img": np.zeros((4, 3, 2)), "y": np.zeros(4)})
        with pytest.raises(shardfeed.SchemaError, match=r"field 'y'.*got \(4, 1\)"):
            w.extend({"img": np.zeros((4, 2, 3)), "y": np.zeros((4, 1))})
        with pytest.raises(shardfeed.SchemaError, match=r"field 'y' has 3 samples, other fields have 4"):
            w.extend({"img": np.zeros((4, 2, 3)), "y": np.zeros(3)})
        with pytest.raises(shardfeed.SchemaError, match=r"missing \['y'\], unknown \[\]"):
            w.extend({"img": np.zeros((4, 2, 3))})
        with pytest.raises(shardfeed.SchemaError, match=r"missing \[\], unknown \['z'\]"):
            w.append({"img": np.zeros((2, 3)), "y": 1, "z": 2})
        with pytest.raises(shardfeed.SchemaError, match="field 'img'"):
            w.append({"img": np.zeros(6), "y": 1})
        with pytest.raises(TypeError, match="expected a dict"):
            w.extend([np.zeros((1, 2, 3)), np.zeros(1)])
        with pytest.raises(shardfeed.SchemaError, match="cannot store <U1 values as uint8"):
            w.append({"img": np.full((2, 3), "a"), "y": 1})
        assert len(w) == 0
        w.append({"img": np.ones((2, 3)), "y": 5})
    assert len(shardfeed.open(w.path)) == 1


def test_variable_field_with_wrong_row_shape_names_field_and_sample(new_path):
    with shardfeed.Writer(new_path(), fields={"r": ("float32", (None, 3))}) as w:
        w.append({"r": np.zeros((2, 3))})
        wrong = r"field 'r', sample 2: expected shape \(rows, 3\).*got \(2, 4\)"
        with pytest.raises(shardfeed.SchemaError, match=wrong):
            w.extend({"r": [np.zeros((1, 3)), np.zeros((2, 4))]})
        with pytest.raises(shardfeed.SchemaError, match=r"field 'r', sample 1: .*got \(3,\)"):
            w.append({"r": np.zeros(3)})
        assert len(w) == 1


@pytest.mark.parametrize("fields, message", [
    ({"x": ("complex64", ())}, "unsupported dtype"),
    ({"x": (">f4", ())}, "unsupported dtype"),
    ({"x": ("float32", (3, None))}, "only the first dimension may be None"),
    ({"x": ("float32", (-1,))}, "dimensions must be ints in \\[0, 2147483647\\]"),
    ({"x": ("float32", "abc")}, "shape must be a tuple of ints"),
    ({"x": ("float32", (2,), 3)}, r"expected \(dtype, shape\)"),
    ({"": "float32"}, "bad field name"),
    ({"a/b": "float32"}, "bad field name"),
    ({}, "at least one field"),
    ({"x": ("float32", (0,)), "y": ("int8", (2, 0))}, "zero size"),
])
def test_bad_schemas(new_path, fields, message):
    with pytest.raises(shardfeed.SchemaError, match=message):
        shardfeed.Writer(new_path(), fields=fields)


def test_schema_layout_is_naturally_aligned():
    schema = Schema.from_spec({"a": "uint8", "b": ("float64", (2,)), "c": ("int16", ()), "v": ("int32", (None,))})
    offsets = {name: f.offset for name, f in schema.fields.items()}
    assert offsets == {"a": 0, "b": 8, "c": 24, "v": 32}
    assert schema.record_bytes == 48


def test_mode_w_refuses_an_existing_dataset(tools, new_path):
    path = tools.write_dataset(new_path(), {"x": "int8"}, {"x": np.arange(3)})
    with pytest.raises(FileExistsError) as info:
        shardfeed.Writer(path, fields={"x": "int8"})
    assert info.value.errno == errno.EEXIST and info.value.filename == path
    assert "mode='a'" in str(info.value)
    np.testing.assert_array_equal(read_all(path)["x"], np.arange(3))  # untouched


def test_bad_mode_and_shard_size(new_path):
    with pytest.raises(ValueError, match="mode must be 'w'.*or 'a'"):
        shardfeed.Writer(new_path(), fields={"x": "int8"}, mode="x")
    for size in (0, HEADER_BYTES, 10.5, True):
        with pytest.raises(ValueError, match="shard_size must be an int"):
            shardfeed.Writer(new_path(), fields={"x": "int8"}, shard_size=size)
    with pytest.raises(shardfeed.SchemaError, match="fields are required"):
        shardfeed.Writer(new_path())


# ---- append mode ------------------------------------------------------------------------------


def test_append_mode_continues_a_dataset(tools, rng, new_path):
    fields = {"x": ("float16", (4,)), "t": ("int32", (None,))}
    x = tools.random_values(rng, "float16", (23, 4))
    t = [rng.integers(-9, 9, size=rng.integers(0, 5)).astype(np.int32) for _ in range(23)]
    path = tools.write_dataset(new_path(), fields, {"x": x[:10], "t": t[:10]}, shard_size=HEADER_BYTES + 4 * 24,
                               metadata={"source": "first", "keep": 1})
    shards_before = shardfeed.open(path).num_shards
    with shardfeed.Writer(path, mode="a", shard_size=HEADER_BYTES + 4 * 24, metadata={"source": "second"}) as w:
        assert len(w) == 10
        w.extend({"x": x[10:20], "t": t[10:20]})
    with shardfeed.Writer(path, fields=fields, mode="a") as w:  # the same fields may be given
        for i in range(20, 23):
            w.append({"x": x[i], "t": t[i]})
    ds = shardfeed.open(path)
    assert len(ds) == 23 and ds.num_shards > shards_before
    assert ds.metadata == {"source": "second", "keep": 1}
    batch = ds.read(np.arange(23))
    tools.assert_identical(batch["x"], x)
    for i in range(23):
        np.testing.assert_array_equal(batch["t"][i, :batch.lengths["t"][i]], t[i])


def test_append_mode_schema_mismatch(tools, new_path):
    path = tools.write_dataset(new_path(), {"x": ("float16", (4,))}, {"x": np.zeros((2, 4))})
    for fields in ({"x": ("float32", (4,))}, {"x": ("float16", (5,))}, {"y": ("float16", (4,))},
                   {"x": ("float16", (4,)), "y": "int8"}):
        with pytest.raises(shardfeed.SchemaError, match=f"{MANIFEST_NAME}: fields .* differ from the dataset's"):
            shardfeed.Writer(path, fields=fields, mode="a")
    assert len(shardfeed.open(path)) == 2


def test_append_mode_needs_a_dataset(new_path):
    with pytest.raises(FileNotFoundError):
        shardfeed.Writer(new_path(), mode="a")


# ---- metadata, manifest, shards ---------------------------------------------------------------


def test_metadata_round_trip(tools, new_path):
    metadata = {"classes": ["a", "b"], "stats": {"mean": [0.1, 0.2], "std": 1.5}, "n": 3, "ok": True, "none": None,
                "unicode": "ünï"}
    path = tools.write_dataset(new_path(), {"x": "int8"}, {"x": [1]}, metadata=metadata)
    assert shardfeed.open(path).metadata == metadata
    with shardfeed.Writer(path, mode="a") as w:
        assert w.metadata == metadata
        w.metadata["added"] = [1]
    assert shardfeed.open(path).metadata == {**metadata, "added": [1]}


@pytest.mark.parametrize("metadata", [{"x": float("nan")}, {"x": object()}, {"x": np.float32(1)}])
def test_metadata_must_be_json(new_path, metadata):
    with pytest.raises(ValueError, match="metadata must be JSON-serialisable"):
        shardfeed.Writer(new_path(), fields={"x": "int8"}, metadata=metadata)


def test_shard_files_respect_the_size_cap_and_manifest_checksums(tools, rng, new_path):
    path = new_path()
    shard_size = HEADER_BYTES + 7 * 24 + 5
    with shardfeed.Writer(path, fields={"x": ("float64", (3,))}, shard_size=shard_size) as w:
        w.extend({"x": rng.standard_normal((30, 3))})
        w.extend({"x": rng.standard_normal((20, 3))})
    manifest = load_manifest(path)
    assert [s["num_samples"] for s in manifest["shards"]] == [7] * 7 + [1]
    for shard in manifest["shards"]:
        file = os.path.join(path, shard["file"])
        assert os.path.getsize(file) == shard["size"] <= shard_size
        assert file_checksum(file) == shard["checksum"]
    assert sorted(os.listdir(path)) == sorted([MANIFEST_NAME] + [s["file"] for s in manifest["shards"]]
                                              + [s["checksums"]["file"] for s in manifest["shards"]])


def test_variable_heap_ends_a_shard_within_one_batch(new_path):
    path = new_path()
    shard_size = 4000
    rows = [np.arange(n, dtype=np.float32) for n in [100, 300, 5, 900, 0, 2000, 10, 10, 700, 1]]
    with shardfeed.Writer(path, fields={"v": ("float32", (None,))}, shard_size=shard_size) as w:
        w.extend({"v": rows})  # one batch, far more heap bytes than one shard
    manifest = load_manifest(path)
    assert len(manifest["shards"]) > 1
    first = 0
    for shard in manifest["shards"]:
        heap = shard["heap"]
        assert os.path.getsize(os.path.join(path, heap["file"])) == heap["size"]
        assert file_checksum(os.path.join(path, heap["file"])) == heap["checksum"]
        last = rows[first + shard["num_samples"] - 1].nbytes
        assert heap["size"] - last < shard_size  # only the sample that crossed the cap goes past it
        first += shard["num_samples"]
    batch = read_all(path)
    for i, r in enumerate(rows):
        np.testing.assert_array_equal(batch["v"][i, :len(r)], r)


def test_interrupted_writer_leaves_committed_shards_readable(tools, rng, new_path):
    path = new_path()
    x = rng.standard_normal((40, 2))
    w = shardfeed.Writer(path, fields={"x": ("float64", (2,))}, shard_size=HEADER_BYTES + 16 * 6)
    w.extend({"x": x[:27]})  # 4 full shards of 6 committed, 3 samples pending
    ds = shardfeed.open(path)
    assert len(ds) == 24 and ds.num_shards == 4
    tools.assert_identical(ds.read(np.arange(24))["x"], x[:24])
    assert not [name for name in os.listdir(path) if ".tmp" in name]
    w.extend({"x": x[27:]})
    w.close()
    w.close()  # twice is fine
    with pytest.raises(ValueError, match="is closed"):
        w.append({"x": [0.0, 0.0]})
    tools.assert_identical(read_all(path)["x"], x)


def test_variable_field_accepts_a_2d_array_batch(tools, new_path):
    path = tools.write_dataset(new_path(), {"v": ("int16", (None,))}, {"v": np.arange(12).reshape(3, 4)})
    batch = read_all(path)
    tools.assert_identical(batch["v"], np.arange(12, dtype=np.int16).reshape(3, 4))
    tools.assert_identical(batch.lengths["v"], np.array([4, 4, 4]))


WRITE_BIG = """
import resource, sys
import numpy as np
import shardfeed
path, total_mb = sys.argv[1], int(sys.argv[2])
rng = np.random.default_rng(0)
chunk = rng.standard_normal((256, 64, 64)).astype(np.float32)  # 4 MiB per extend
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with shardfeed.Writer(path, fields={"x": ("float16", (64, 64)), "y": ("int64", ())}, shard_size=64 << 20) as w:
    for i in range(total_mb * 2 // 4):  # float16 records: 2 MiB of shard data per extend
        w.extend({"x": chunk, "y": np.arange(i * 256, (i + 1) * 256)})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((peak - base) // 1024)
"""


def test_writer_memory_stays_bounded_whatever_the_dataset_size(new_path):
    """Writing 8x more data than the allowed memory growth: peak RSS grows by about one write
    buffer and one batch, not with the dataset (page cache is not counted in RSS)."""
    import subprocess
    import sys

    path = new_path()
    total_mb = 256
    done = subprocess.run([sys.executable, "-c", WRITE_BIG, path, str(total_mb)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    growth_mb = int(done.stdout.strip())
    assert growth_mb < total_mb // 8, f"peak RSS grew by {growth_mb} MiB writing {total_mb} MiB"
    ds = shardfeed.open(path)
    assert len(ds) == total_mb * 2 // 4 * 256 and ds.num_shards >= 4
    np.testing.assert_array_equal(ds.read([0, len(ds) - 1], "y")["y"], [0, len(ds) - 1])
