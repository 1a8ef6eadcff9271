"""Output dtypes of Dataset.read: dtype="auto" (floats as float32, integers and bool as stored),
checked against numpy's astype of the written values and against the slow reference reader."""

import numpy as np
import pytest

import shardfeed
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
    """The documented table, written out independently of shardfeed.dataset.AUTO_DTYPES."""
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
        assert shardfeed.dataset.AUTO_DTYPES[stored] == auto_dtype(stored)
        assert shardfeed.dataset.output_dtype(ds.fields[name], "auto") == auto_dtype(stored)
        assert shardfeed.dataset.output_dtype(ds.fields[name], "auto", affine=True) == np.float32
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
