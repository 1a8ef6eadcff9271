"""Variable-length fields: padding to the longest sample or to maxlen (truncating), pad values,
lengths, casts to float32 (including the 8-byte types that convert through a scratch buffer)."""

import re

import numpy as np
import pytest

import shardfeed
from shardfeed._reference import reference_read

LENGTHS = [3, 0, 7, 1, 12, 5, 0, 2, 9, 4, 6, 1]


@pytest.fixture(scope="module")
def var_dataset(tmp_path_factory):
    rng = np.random.default_rng(11)
    n = len(LENGTHS)
    columns = {
        "tok": [rng.integers(-1000, 1000, k).astype(np.int32) for k in LENGTHS],
        "wav": [rng.standard_normal(k).astype(np.float16) for k in LENGTHS],
        "pts": [rng.standard_normal((k, 3)) for k in LENGTHS],                            # float64 rows
        "ids": [rng.integers(0, 2 ** 63, (k,), dtype=np.int64) for k in LENGTHS[::-1]],   # other lengths
        "grid": [rng.integers(0, 256, (k, 2, 3), dtype=np.uint8) for k in LENGTHS],
        "label": np.arange(n, dtype=np.int64),
    }
    fields = {"tok": ("int32", (None,)), "wav": ("float16", (None,)), "pts": ("float64", (None, 3)),
              "ids": ("int64", (None,)), "grid": ("uint8", (None, 2, 3)), "label": ("int64", ())}
    path = str(tmp_path_factory.mktemp("var") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=300) as w:
        w.extend({k: v[:5] for k, v in columns.items()})
        for i in range(5, n):
            w.append({k: v[i] for k, v in columns.items()})
    return path, columns


def padded(rows, indices, length, pad, dtype):
    """numpy original rows, padded/truncated to `length`, as `dtype`."""
    rows = [np.asarray(rows[i]) for i in indices]
    out = np.full((len(rows), length) + rows[0].shape[1:], pad, dtype=dtype)
    with np.errstate(over="ignore"):
        for k, r in enumerate(rows):
            out[k, :min(len(r), length)] = r[:length].astype(dtype)
    return out


def lengths_of(rows, indices, length=None):
    return np.array([len(rows[i]) if length is None else min(len(rows[i]), length) for i in indices], np.int64)


INDICES = np.array([4, 0, 1, 11, 4, 8, 6, 2, -1, 10, 3, 7, 9, 5])


def test_dataset_spans_several_shards(var_dataset):
    path, _ = var_dataset
    assert shardfeed.open(path).num_shards >= 3


@pytest.mark.parametrize("name", ["tok", "wav", "pts", "ids", "grid"])
def test_padding_to_the_longest(tools, var_dataset, name):
    path, columns = var_dataset
    batch = shardfeed.open(path).read(INDICES, fields=[name, "label"])
    rows = columns[name]
    longest = max(len(rows[i]) for i in INDICES)
    tools.assert_identical(batch[name], padded(rows, INDICES, longest, 0, rows[0].dtype))
    tools.assert_identical(batch.lengths[name], lengths_of(rows, INDICES))
    assert list(batch.lengths) == [name]
    tools.assert_identical(batch["label"], INDICES % len(LENGTHS))


@pytest.mark.parametrize("maxlen", [0, 1, 4, 12, 20])
@pytest.mark.parametrize("name", ["tok", "pts", "ids", "grid"])
def test_maxlen_truncates_and_pads(tools, var_dataset, name, maxlen):
    path, columns = var_dataset
    batch = shardfeed.open(path).read(INDICES, fields=name, maxlen=maxlen, pad_value=7)
    rows = columns[name]
    tools.assert_identical(batch[name], padded(rows, INDICES, maxlen, 7, rows[0].dtype))
    tools.assert_identical(batch.lengths[name], lengths_of(rows, INDICES, maxlen))


@pytest.mark.parametrize("maxlen", [None, 2, 5, 15])
@pytest.mark.parametrize("name", ["tok", "wav", "pts", "ids", "grid"])
def test_cast_to_float32(tools, var_dataset, name, maxlen):
    path, columns = var_dataset
    batch = shardfeed.open(path).read(INDICES, fields=name, dtype="float32", maxlen=maxlen, pad_value=-0.5, lossy=True)
    rows = columns[name]
    length = max(len(rows[i]) for i in INDICES) if maxlen is None else maxlen
    tools.assert_identical(batch[name], padded(rows, INDICES, length, -0.5, np.float32))
    tools.assert_identical(batch.lengths[name], lengths_of(rows, INDICES, maxlen))


def test_affine_on_variable_rows_leaves_padding_untransformed(tools, var_dataset):
    path, columns = var_dataset
    scale, offset = np.array([2.0, -1.0, 0.5]), np.array([1.0, 0.0, -3.0])
    batch = shardfeed.open(path).read(INDICES, fields="pts", scale=scale, offset=offset, maxlen=8, pad_value=99)
    rows = [(np.asarray(r).astype(np.float32) * scale.astype(np.float32) + offset.astype(np.float32)).astype(np.float32)
            for r in columns["pts"]]
    tools.assert_identical(batch["pts"], padded(rows, INDICES, 8, 99, np.float32))


def test_per_field_maxlen_and_pad_value(tools, var_dataset):
    path, columns = var_dataset
    batch = shardfeed.open(path).read(INDICES, fields=["tok", "wav", "ids"], maxlen={"tok": 3, "wav": 20},
                                      pad_value={"tok": -1, "ids": 5})
    tools.assert_identical(batch["tok"], padded(columns["tok"], INDICES, 3, -1, np.int32))
    tools.assert_identical(batch["wav"], padded(columns["wav"], INDICES, 20, 0, np.float16))
    longest = max(len(columns["ids"][i]) for i in INDICES)
    tools.assert_identical(batch["ids"], padded(columns["ids"], INDICES, longest, 5, np.int64))


def test_nan_pad_value(var_dataset):
    path, columns = var_dataset
    batch = shardfeed.open(path).read([1, 2], fields="wav", pad_value=np.nan)
    assert np.isnan(batch["wav"][0]).all() and batch.lengths["wav"].tolist() == [0, 7]


def test_all_samples_empty(tools, var_dataset):
    path, _ = var_dataset
    ds = shardfeed.open(path)
    batch = ds.read([1, 6, 1], fields=["tok", "grid"], dtype="float32")
    tools.assert_identical(batch["tok"], np.empty((3, 0), np.float32))
    tools.assert_identical(batch["grid"], np.empty((3, 0, 2, 3), np.float32))
    tools.assert_identical(batch.lengths["tok"], np.zeros(3, np.int64))


def test_getitem_returns_unpadded_rows(tools, var_dataset):
    path, columns = var_dataset
    ds = shardfeed.open(path)
    for i in range(len(LENGTHS)):
        sample = ds[i]
        for name in ("tok", "wav", "pts", "ids", "grid"):
            tools.assert_identical(sample[name], np.asarray(columns[name][i]))


def test_out_buffer_sets_maxlen(tools, var_dataset):
    path, columns = var_dataset
    out = {"tok": np.full((len(INDICES), 6), 123, np.int32)}
    batch = shardfeed.open(path).read(INDICES, fields="tok", out=out, pad_value=-2)
    assert batch["tok"] is out["tok"]
    tools.assert_identical(out["tok"], padded(columns["tok"], INDICES, 6, -2, np.int32))
    tools.assert_identical(batch.lengths["tok"], lengths_of(columns["tok"], INDICES, 6))


def test_out_buffer_errors(var_dataset):
    path, _ = var_dataset
    ds = shardfeed.open(path)
    with pytest.raises(ValueError, match=re.escape("out['tok']: shape (14, 6) (expected (14, 4))")):
        ds.read(INDICES, fields="tok", out={"tok": np.zeros((14, 6), np.int32)}, maxlen=4)
    with pytest.raises(ValueError, match=re.escape("out['tok'] must have shape (batch, maxlen, ...)")):
        ds.read(INDICES, fields="tok", out={"tok": np.zeros(14, np.int32)})
    with pytest.raises(ValueError, match=re.escape("out['pts']: dtype float64 (expected float32)")):
        ds.read(INDICES, fields="pts", dtype="float32", out={"pts": np.zeros((14, 3, 3))})


@pytest.mark.parametrize("maxlen", [-1, 1.5, True, "3"])
def test_bad_maxlen(var_dataset, maxlen):
    path, _ = var_dataset
    with pytest.raises(ValueError, match=f"maxlen for field 'tok' must be an int >= 0, got {re.escape(repr(maxlen))}"):
        shardfeed.open(path).read([0], fields="tok", maxlen=maxlen)


def test_bad_pad_value(var_dataset):
    path, _ = var_dataset
    ds = shardfeed.open(path)
    with pytest.raises(ValueError, match=r"pad_value -1 does not fit field 'grid' read as uint8"):
        ds.read([0], fields="grid", pad_value=-1)
    with pytest.raises(ValueError, match=r"pad_value 'x' does not fit field 'tok' read as int32"):
        ds.read([0], fields="tok", pad_value="x")
    with pytest.raises(ValueError, match="pad_value for field 'tok' must be a scalar"):
        ds.read([0], fields="tok", pad_value=[1, 2])
    ds.read([0], fields="grid", pad_value=-1, dtype="float32")  # fits float32


# ---- padding and truncating sides (keras.utils.pad_sequences semantics) -------------------------


def sided(rows, indices, length, pad, dtype, padding, truncating):
    """numpy: each row cut to `length` keeping its first ("post") or last ("pre") rows, then padded
    after ("post") or before ("pre") it."""
    rows = [np.asarray(rows[i]) for i in indices]
    out = np.full((len(rows), length) + rows[0].shape[1:], pad, dtype=dtype)
    with np.errstate(over="ignore"):
        for k, r in enumerate(rows):
            kept = (r[:length] if truncating == "post" else r[max(0, len(r) - length):]).astype(dtype)
            if padding == "post":
                out[k, :len(kept)] = kept
            else:
                out[k, length - len(kept):] = kept
    return out


@pytest.mark.parametrize("truncating", ["post", "pre"])
@pytest.mark.parametrize("padding", ["post", "pre"])
@pytest.mark.parametrize("maxlen", [None, 0, 3, 20])
@pytest.mark.parametrize("name, dtype", [("tok", None), ("pts", None), ("grid", None), ("ids", None),
                                         ("pts", "float32"), ("grid", "float16"), ("tok", "int16"),
                                         ("wav", "float32")])
def test_padding_and_truncating_sides(tools, var_dataset, name, dtype, maxlen, padding, truncating):
    """Native copies and conversions (in place and through scratch) and numpy conversions alike."""
    path, columns = var_dataset
    ds = shardfeed.open(path)
    batch = ds.read(INDICES, fields=name, dtype=dtype, maxlen=maxlen, pad_value=7, padding=padding,
                    truncating=truncating)
    rows = columns[name]
    length = max(len(rows[i]) for i in INDICES) if maxlen is None else maxlen
    want = np.dtype(dtype) if dtype else np.asarray(rows[0]).dtype
    tools.assert_identical(batch[name], sided(rows, INDICES, length, 7, want, padding, truncating))
    tools.assert_identical(batch.lengths[name], lengths_of(rows, INDICES, maxlen))
    values, lengths = reference_read(path, INDICES, name, dtype=dtype, maxlen=maxlen, pad_value=7, padding=padding,
                                     truncating=truncating)
    tools.assert_identical(batch[name], values[name])
    tools.assert_identical(batch.lengths[name], lengths[name])


def test_pre_padding_with_scale_and_out(tools, var_dataset):
    path, columns = var_dataset
    out = {"pts": np.full((len(INDICES), 5, 3), 123, np.float32)}
    batch = shardfeed.open(path).read(INDICES, fields="pts", out=out, scale=2.0, pad_value=-1, padding="pre",
                                      truncating="pre")
    rows = [(np.asarray(r).astype(np.float32) * np.float32(2)).astype(np.float32) for r in columns["pts"]]
    assert batch["pts"] is out["pts"]
    tools.assert_identical(out["pts"], sided(rows, INDICES, 5, -1, np.float32, "pre", "pre"))


def test_sides_per_field(tools, var_dataset):
    path, columns = var_dataset
    batch = shardfeed.open(path).read(INDICES, fields=["tok", "grid"], maxlen=4, padding={"tok": "pre"},
                                      truncating={"grid": "pre"})
    tools.assert_identical(batch["tok"], sided(columns["tok"], INDICES, 4, 0, np.int32, "pre", "post"))
    tools.assert_identical(batch["grid"], sided(columns["grid"], INDICES, 4, 0, np.uint8, "post", "pre"))


@pytest.mark.parametrize("option", ["padding", "truncating"])
def test_bad_side(var_dataset, option):
    path, _ = var_dataset
    with pytest.raises(ValueError, match=f"{option} for field 'tok' must be 'post' or 'pre', got 'front'"):
        shardfeed.open(path).read([0], fields="tok", **{option: "front"})


def test_same_as_keras_pad_sequences(var_dataset):
    keras = pytest.importorskip("keras", reason="keras is not installed: compared with numpy above only")
    path, columns = var_dataset
    ds = shardfeed.open(path)
    rows = [columns["tok"][i].tolist() for i in INDICES]
    for padding in ("pre", "post"):
        for truncating in ("pre", "post"):
            for maxlen in (1, 4, 9, 15):
                expected = keras.utils.pad_sequences(rows, maxlen=maxlen, dtype="int32", padding=padding,
                                                     truncating=truncating, value=-3)
                got = ds.read(INDICES, fields="tok", maxlen=maxlen, pad_value=-3, padding=padding,
                              truncating=truncating)["tok"]
                np.testing.assert_array_equal(got, expected, err_msg=f"{padding} {truncating} {maxlen}")
                assert got.dtype == expected.dtype
