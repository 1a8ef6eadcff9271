"""Write numpy arrays, read them back: every dtype and shape, both record read paths, and the
index forms (crossing shards, duplicates, unsorted, negative, empty)."""

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, STORED_DTYPES, Schema

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64"]
FIXED_SHAPES = {"scalar": (), "vector": (5,), "cube": (2, 3, 4), "empty": (0,), "empty_inner": (3, 0, 2)}
VARIABLE_SHAPES = {"seq": (None,), "rows": (None, 3)}
N = 13


def test_the_dtype_list_is_the_supported_list():
    assert sorted(DTYPES) == sorted(STORED_DTYPES)


def all_shapes_dataset(tools, rng, path, dtype, records_per_shard=3):
    fields = {name: (dtype, shape) for name, shape in {**FIXED_SHAPES, **VARIABLE_SHAPES}.items()}
    columns = {name: tools.random_values(rng, dtype, (N,) + shape) for name, shape in FIXED_SHAPES.items()}
    lengths = rng.integers(0, 6, size=N)
    lengths[4] = 0
    for name, shape in VARIABLE_SHAPES.items():
        columns[name] = [tools.random_values(rng, dtype, (n,) + shape[1:]) for n in lengths]
    record_bytes = Schema.from_spec(fields).record_bytes
    tools.write_dataset(path, fields, columns, shard_size=HEADER_BYTES + records_per_shard * record_bytes)
    return columns


def expected_batch(tools, dtype, columns, indices, as_float32):
    """The batch a read should return, from the numpy originals."""
    def convert(values):
        with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float32 overflows to inf
            return np.asarray(values).astype(np.float32) if as_float32 else tools.expected_natural(dtype, values)
    expected, lengths = {}, {}
    for name in FIXED_SHAPES:
        expected[name] = convert(columns[name][indices])
    for name, shape in VARIABLE_SHAPES.items():
        rows = [convert(columns[name][i]) for i in indices]
        longest = max((len(r) for r in rows), default=0)
        out = np.zeros((len(rows), longest) + shape[1:], dtype=convert(columns[name][0]).dtype)
        for k, r in enumerate(rows):
            out[k, :len(r)] = r
        expected[name] = out
        lengths[name] = np.array([len(r) for r in rows], dtype=np.int64)
    return expected, lengths


@pytest.mark.parametrize("as_float32", [False, True], ids=["stored", "float32"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_every_dtype_and_shape_round_trips(tools, rng, new_path, mmap_mode, dtype, as_float32):
    path = new_path(dtype)
    columns = all_shapes_dataset(tools, rng, path, dtype)
    ds = shardfeed.open(path, mmap=mmap_mode)
    assert ds.num_shards == 5 and len(ds) == N
    indices = np.array([12, 0, 3, 2, 3, 11, -1, 4, 7, 5, 6, 9, 1, 0, -13, 8, 10], dtype=np.int64)
    batch = ds.read(indices, dtype="float32" if as_float32 else None, lossy=True)
    expected, lengths = expected_batch(tools, dtype, columns, indices % N, as_float32)
    assert list(batch) == list(FIXED_SHAPES) + list(VARIABLE_SHAPES)
    for name in batch:
        tools.assert_identical(batch[name], expected[name], f"{dtype} field {name}")
    assert set(batch.lengths) == set(VARIABLE_SHAPES)
    for name in VARIABLE_SHAPES:
        tools.assert_identical(batch.lengths[name], lengths[name], f"lengths of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_getitem_and_slices(tools, rng, new_path, dtype):
    path = new_path(dtype)
    columns = all_shapes_dataset(tools, rng, path, dtype)
    ds = shardfeed.open(path)
    for i in (0, 4, 5, N - 1, -1, -N, np.int64(7), np.uint8(3)):
        sample = ds[i]
        assert list(sample) == list(FIXED_SHAPES) + list(VARIABLE_SHAPES)
        for name in FIXED_SHAPES:  # a scalar field gives a numpy scalar, as numpy indexing does
            assert isinstance(sample[name], np.ndarray if FIXED_SHAPES[name] else np.generic)
            tools.assert_identical(np.asarray(sample[name]), tools.expected_natural(dtype, columns[name][int(i)]), name)
        for name in VARIABLE_SHAPES:  # unpadded
            tools.assert_identical(sample[name], tools.expected_natural(dtype, columns[name][int(i)]), name)
    for window in (slice(2, 9), slice(None, None, -2), slice(-4, None), slice(5, 5), slice(100, 200)):
        batch = ds[window]
        picked = np.arange(N)[window]
        expected, lengths = expected_batch(tools, dtype, columns, picked, False)
        for name in batch:
            tools.assert_identical(batch[name], expected[name], f"{window} {name}")
        for name in VARIABLE_SHAPES:
            tools.assert_identical(batch.lengths[name], lengths[name])


def simple_dataset(tools, rng, new_path, n, records_per_shard=4, dtype="float32"):
    columns = {"x": tools.random_values(rng, dtype, (n, 3)), "y": np.arange(n, dtype=np.int64)}
    path = tools.write_dataset(new_path(), {"x": (dtype, (3,)), "y": "int64"}, columns,
                               shard_size=HEADER_BYTES + records_per_shard * 24)
    return path, columns


@pytest.mark.parametrize("kind", ["crossing", "duplicates", "unsorted", "negative", "reversed"])
def test_index_forms(tools, rng, new_path, mmap_mode, kind):
    path, columns = simple_dataset(tools, rng, new_path, 50)
    ds = shardfeed.open(path, mmap=mmap_mode)
    assert ds.num_shards == 13
    indices = {
        "crossing": np.arange(2, 48),
        "duplicates": np.array([7, 7, 7, 0, 0, 49, 49, 8, 7]),
        "unsorted": rng.permutation(50),
        "negative": np.array([-1, -50, -25, 3, -4, 49]),
        "reversed": np.arange(49, -1, -1),
    }[kind]
    batch = ds.read(indices)
    tools.assert_identical(batch["x"], columns["x"][indices])
    tools.assert_identical(batch["y"], columns["y"][indices])
    assert batch.lengths == {}


@pytest.mark.parametrize("index_dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint32, np.uint64])
def test_index_array_dtypes(tools, rng, new_path, index_dtype):
    path, columns = simple_dataset(tools, rng, new_path, 20)
    ds = shardfeed.open(path)
    indices = np.array([19, 0, 5, 5, 12], dtype=index_dtype)
    tools.assert_identical(ds.read(indices)["y"], np.array([19, 0, 5, 5, 12], dtype=np.int64))
    tools.assert_identical(ds.read([3, 1])["y"], np.array([3, 1], dtype=np.int64))  # plain lists too


def test_large_random_batches_use_many_threads(tools, rng, new_path, mmap_mode):
    path, columns = simple_dataset(tools, rng, new_path, 3000, records_per_shard=100)
    ds = shardfeed.open(path, mmap=mmap_mode, threads=8)
    for _ in range(5):
        indices = rng.integers(-3000, 3000, size=4096)
        batch = ds.read(indices)
        tools.assert_identical(batch["x"], columns["x"][indices])
        tools.assert_identical(batch["y"], columns["y"][indices])
    batch = ds.read(indices, threads=1)
    tools.assert_identical(batch["x"], columns["x"][indices])


@pytest.mark.parametrize("empty", [[], np.array([], dtype=np.int64), np.array([], dtype=np.float64)])
def test_empty_index_array(tools, rng, new_path, mmap_mode, empty):
    path = new_path()
    columns = all_shapes_dataset(tools, rng, path, "float16")
    batch = shardfeed.open(path, mmap=mmap_mode).read(empty)
    for name, shape in FIXED_SHAPES.items():
        tools.assert_identical(batch[name], np.empty((0,) + shape, np.float16))
    for name, shape in VARIABLE_SHAPES.items():
        tools.assert_identical(batch[name], np.empty((0, 0) + shape[1:], np.float16))
        tools.assert_identical(batch.lengths[name], np.empty(0, np.int64))
    assert columns  # the dataset itself is not empty


def test_empty_dataset(new_path):
    path = new_path()
    with shardfeed.Writer(path, fields={"x": ("float16", (4,)), "v": ("uint8", (None, 2))}, metadata={"a": 1}):
        pass
    ds = shardfeed.open(path)
    assert len(ds) == 0 and ds.num_shards == 0 and ds.metadata == {"a": 1}
    batch = ds.read([], dtype="float32")
    assert batch["x"].shape == (0, 4) and batch["x"].dtype == np.float32
    assert batch["v"].shape == (0, 0, 2) and batch.lengths["v"].shape == (0,)
    assert ds[:]["x"].shape == (0, 4)
    with pytest.raises(IndexError, match=r"index 0 .*out of range for a dataset of 0 samples"):
        ds[0]
    with pytest.raises(IndexError, match="out of range"):
        ds.read([-1])


def test_one_sample_dataset(tools, new_path, mmap_mode):
    path = tools.write_dataset(new_path(), {"img": ("uint8", (2, 2, 3)), "label": "int64", "tok": ("int32", (None,))},
                               {"img": np.arange(12, dtype=np.uint8).reshape(1, 2, 2, 3), "label": np.array([7]),
                                "tok": [np.array([5, -6, 7], dtype=np.int32)]})
    ds = shardfeed.open(path, mmap=mmap_mode)
    assert len(ds) == 1
    sample = ds[0]
    tools.assert_identical(sample["img"], np.arange(12, dtype=np.uint8).reshape(2, 2, 3))
    tools.assert_identical(np.asarray(sample["label"]), np.array(7, dtype=np.int64))
    tools.assert_identical(sample["tok"], np.array([5, -6, 7], dtype=np.int32))
    assert ds[-1]["label"] == 7 and ds[-1]["label"].dtype == np.int64
    batch = ds.read([0, 0, -1], dtype="float32")
    tools.assert_identical(batch["label"], np.full(3, 7, np.float32))
    tools.assert_identical(batch["tok"], np.tile(np.float32([5, -6, 7]), (3, 1)))
    with pytest.raises(IndexError):
        ds[1]


def test_read_subset_of_fields_keeps_requested_order(tools, rng, new_path, mmap_mode):
    fields = {"a": ("uint8", (3,)), "b": ("float64", ()), "c": ("int16", (2, 2)), "d": ("float16", (5,))}
    columns = {name: tools.random_values(rng, dt, (30,) + shape) for name, (dt, shape) in fields.items()}
    ds = shardfeed.open(tools.write_dataset(new_path(), fields, columns, shard_size=300), mmap=mmap_mode)
    indices = rng.integers(0, 30, size=40)
    for selection in (["d", "a"], ["c"], "b", ["b", "d", "c", "a"]):
        batch = ds.read(indices, fields=selection)
        names = [selection] if isinstance(selection, str) else selection
        assert list(batch) == names
        for name in names:
            tools.assert_identical(batch[name], columns[name][indices])


def test_per_field_dtype(tools, rng, new_path):
    fields = {"a": ("uint8", (3,)), "b": ("float16", ()), "c": ("bfloat16", (2,))}
    columns = {name: tools.random_values(rng, dt, (10,) + shape) for name, (dt, shape) in fields.items()}
    ds = shardfeed.open(tools.write_dataset(new_path(), fields, columns))
    batch = ds.read(np.arange(10), dtype={"a": "float32", "b": None})
    tools.assert_identical(batch["a"], columns["a"].astype(np.float32))
    tools.assert_identical(batch["b"], columns["b"])
    tools.assert_identical(batch["c"], columns["c"])
    tools.assert_identical(ds.read([1], dtype=np.float32)["b"], columns["b"][[1]].astype(np.float32))
    tools.assert_identical(ds.read([1], dtype=np.uint8, fields="a")["a"], columns["a"][[1]])


def test_read_into_out_buffers(tools, rng, new_path, mmap_mode):
    fields = {"x": ("float16", (4, 2)), "y": ("int64", ()), "v": ("int16", (None,))}
    columns = {"x": tools.random_values(rng, "float16", (20, 4, 2)), "y": np.arange(20) * 3,
               "v": [np.arange(i % 5, dtype=np.int16) for i in range(20)]}
    ds = shardfeed.open(tools.write_dataset(new_path(), fields, columns, shard_size=200), mmap=mmap_mode)
    indices = np.array([19, 2, 2, 7])
    out = {"x": np.full((4, 4, 2), np.nan, np.float32), "y": np.zeros(4, np.float32), "v": np.zeros((4, 6), np.float32)}
    batch = ds.read(indices, dtype="float32", out=out)
    for name in out:
        assert batch[name] is out[name]
    tools.assert_identical(out["x"], columns["x"][indices].astype(np.float32))
    tools.assert_identical(out["y"], (indices * 3).astype(np.float32))
    expected_v = np.zeros((4, 6), np.float32)
    for k, i in enumerate(indices):
        expected_v[k, :i % 5] = np.arange(i % 5)
    tools.assert_identical(out["v"], expected_v)
    tools.assert_identical(batch.lengths["v"], indices % 5)


def test_dataset_attributes(tools, new_path):
    path = tools.write_dataset(new_path(), {"x": ("bfloat16", (2, 3)), "t": ("int8", (None, 4))},
                               {"x": np.zeros((3, 2, 3)), "t": [np.zeros((1, 4))] * 3},
                               metadata={"classes": ["cat", "dog"], "mean": [0.5, 0.25], "nested": {"k": None}})
    with shardfeed.open(path) as ds:
        assert len(ds) == 3
        assert list(ds.fields) == ["x", "t"]
        assert ds.fields["x"].dtype == "bfloat16" and ds.fields["x"].shape == (2, 3)
        assert ds.fields["t"].shape == (None, 4) and ds.fields["t"].variable
        assert ds.metadata == {"classes": ["cat", "dog"], "mean": [0.5, 0.25], "nested": {"k": None}}
        assert repr(ds).startswith("<shardfeed.Dataset") and "3 samples" in repr(ds)


@pytest.mark.parametrize("order", [["z", "a", "b"], ["a", "z", "b"], ["b", "a", "z"], ["a", "b", "z"]])
def test_zero_size_field_sharing_an_offset_in_any_read_order(tools, new_path, mmap_mode, order):
    """A zero-size field sits at the offset of the next field; reading them in any order works
    (found by test_properties: fields ['f1', 'f0'] raised 'bytes [0, 0) overlap another field')."""
    fields = {"a": ("uint8", ()), "z": ("float64", (0, 2)), "b": ("uint8", (3,))}
    assert Schema.from_spec(fields).fields["z"].offset == Schema.from_spec(fields).fields["b"].offset
    columns = {"a": np.arange(5), "z": np.zeros((5, 0, 2)), "b": np.arange(15).reshape(5, 3)}
    ds = shardfeed.open(tools.write_dataset(new_path(), fields, columns), mmap=mmap_mode)
    for dtype in (None, "float32"):
        batch = ds.read([4, 0, 2], fields=order, dtype=dtype)
        assert list(batch) == order
        want = np.float32 if dtype else None
        tools.assert_identical(batch["a"], np.array([4, 0, 2], want or np.uint8))
        tools.assert_identical(batch["z"], np.zeros((3, 0, 2), want or np.float64))
        tools.assert_identical(batch["b"], columns["b"][[4, 0, 2]].astype(want or np.uint8))


def test_affine_on_a_zero_size_field(tools, new_path):
    """Per-channel parameters with zero channels, or over a zero-size axis, transform nothing."""
    fields = {"e": ("uint8", (0,)), "f": ("uint8", (3, 0)), "x": ("int8", ())}
    path = tools.write_dataset(new_path(), fields, {"e": np.zeros((2, 0)), "f": np.zeros((2, 3, 0)), "x": [1, 2]})
    ds = shardfeed.open(path)
    batch = ds.read([1, 0], scale={"e": np.ones(0), "f": np.ones((3, 1))}, offset={"e": 1.0, "f": np.ones(0)})
    tools.assert_identical(batch["e"], np.empty((2, 0), np.float32))
    tools.assert_identical(batch["f"], np.empty((2, 3, 0), np.float32))
    tools.assert_identical(batch["x"], np.array([2, 1], np.int8))


def test_index_arrays_are_not_modified_and_may_be_read_only_or_strided(tools, rng, new_path, mmap_mode):
    path, columns = simple_dataset(tools, rng, new_path, 30)
    ds = shardfeed.open(path, mmap=mmap_mode)
    indices = np.array([-1, 5, -30, 29, 0, -7, 3, 3], dtype=np.int64)
    kept = indices.copy()
    tools.assert_identical(ds.read(indices)["y"], kept % 30)
    tools.assert_identical(indices, kept)  # negatives were wrapped in a copy
    read_only = kept.copy()
    read_only.flags.writeable = False
    tools.assert_identical(ds.read(read_only)["x"], columns["x"][kept])
    strided = (np.arange(60, dtype=np.int64) - 30)[::-2]  # 29, 27, ..., -29: not contiguous
    assert not strided.flags.c_contiguous
    tools.assert_identical(ds.read(strided)["y"], strided % 30)
    tools.assert_identical(ds.read(np.array([-3, 2], dtype=np.int8))["y"], np.array([27, 2], dtype=np.int64))


def test_many_fields_need_more_iovecs_than_iov_max(rng, new_path, mmap_mode):
    """1500 fields, every other one read: about 1500 preadv segments per record, past IOV_MAX (1024)."""
    fields = {f"f{i}": ("float16", ()) if i % 3 == 0 else ("uint8", ()) for i in range(1500)}
    columns = {name: rng.integers(0, 100, 40).astype(dtype) for name, (dtype, _) in fields.items()}
    path = new_path()
    with shardfeed.Writer(path, fields=fields) as w:
        w.extend(columns)
    ds = shardfeed.open(path, mmap=mmap_mode)
    names = list(fields)[::2]
    indices = rng.integers(0, 40, 100)
    batch = ds.read(indices, fields=names, dtype={name: "float32" for name in names[::2]})
    for name in names:
        np.testing.assert_array_equal(batch[name], columns[name][indices].astype(batch[name].dtype), err_msg=name)
    assert batch["f0"].dtype == np.float32 and batch["f2"].dtype == np.uint8 and batch["f6"].dtype == np.float16
