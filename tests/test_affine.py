"""The fused affine transform out = float32(x) * scale + offset: scalar, per channel along the
first, a middle or the last axis, elementwise; bit-identical to numpy's float32 formula."""

import re

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES


def formula(x, scale=None, offset=None):
    """numpy's float32 result of x * scale + offset (separately rounded multiply and add)."""
    s = np.asarray(1.0 if scale is None else scale, np.float32)
    o = np.asarray(0.0 if offset is None else offset, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        x = x.astype(np.float32) if x.dtype != np.float32 else x
        return (x * s + o).astype(np.float32)


def assert_bits(actual, expected):
    assert actual.dtype == np.float32 and actual.shape == expected.shape, (actual.dtype, actual.shape, expected.shape)
    np.testing.assert_array_equal(actual.view(np.uint32), expected.view(np.uint32))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """uint8 images channels-first (3, 9, 13), channels-last (9, 13, 3) (sizes off SF_BLOCK=256),
    and a float16 field, over several shards."""
    rng = np.random.default_rng(7)
    n = 24
    columns = {
        "chw": rng.integers(0, 256, (n, 3, 9, 13), dtype=np.uint8),
        "hwc": rng.integers(0, 256, (n, 9, 13, 3), dtype=np.uint8),
        "big": rng.integers(0, 256, (n, 11, 37, 3), dtype=np.uint8),
        "h": (rng.standard_normal((n, 5, 4)) * 100).astype(np.float16),
    }
    fields = {name: (str(a.dtype), a.shape[1:]) for name, a in columns.items()}
    path = str(tmp_path_factory.mktemp("affine") / "ds")
    with shardfeed.Writer(path, fields=fields, shard_size=HEADER_BYTES + 5 * 2000) as w:
        w.extend(columns)
    return path, columns


MEAN = np.array([0.485, 0.456, 0.406]) * 255
STD = np.array([0.229, 0.224, 0.225]) * 255

CASES = {
    "scalar": ("chw", 1 / 255, -0.5),
    "scalar-scale-only": ("hwc", np.float32(1 / 127.5), None),
    "scalar-offset-only": ("h", None, 3.25),
    "first-axis": ("chw", (1 / STD).reshape(3, 1, 1), (-MEAN / STD).reshape(3, 1, 1)),
    "first-axis-scalar-offset": ("chw", (1 / STD).reshape(3, 1, 1), 0.5),
    "first-axis-scalar-scale": ("chw", 2.0, (-MEAN).reshape(3, 1, 1)),
    "last-axis": ("hwc", 1 / STD, -MEAN / STD),
    "last-axis-big": ("big", 1 / STD, -MEAN / STD),
    "last-axis-scale-only": ("big", 1 / STD, None),
    "middle-axis": ("hwc", np.linspace(0.5, 2, 13).reshape(13, 1), np.linspace(-3, 3, 13).reshape(13, 1)),
    "row-axis": ("big", np.linspace(0.1, 1, 11).reshape(11, 1, 1), -1.0),
    "two-axes": ("hwc", np.linspace(0.5, 2, 9 * 3).reshape(9, 1, 3), 0.25),
    "elementwise": ("chw", np.linspace(0.01, 1, 3 * 9 * 13).reshape(3, 9, 13),
                    np.linspace(-1, 1, 3 * 9 * 13).reshape(3, 9, 13)),
    "elementwise-big": ("big", np.linspace(0.01, 1, 11 * 37 * 3).reshape(11, 37, 3), -0.5),
    "float16-per-column": ("h", np.array([1, -1, 0.5, 3]), np.array([0, 1, 2, 3])),
    "size-1-dims": ("hwc", np.array([[[2.0]]]), np.array([[0.5]])),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_affine_matches_numpy_formula(images, mmap_mode, case, dtype):
    path, columns = images
    name, scale, offset = CASES[case]
    ds = shardfeed.open(path, mmap=mmap_mode)
    indices = np.array([23, 0, 5, 5, 11, 17, 2, 9, 20, 1])
    got = ds.read(indices, fields=name, dtype=dtype, scale=scale, offset=offset)[name]
    assert_bits(got, formula(columns[name][indices], scale, offset))


def test_affine_is_not_the_identity(images):
    """Guards the comparison above: the transformed values really differ from the plain cast."""
    path, columns = images
    got = shardfeed.open(path).read([0], fields="chw", scale=1 / 255, offset=-0.5)["chw"]
    assert got.min() >= -0.5 and got.max() <= 0.5
    assert not np.array_equal(got, columns["chw"][[0]].astype(np.float32))


def test_affine_per_field_dicts_and_out(images, mmap_mode):
    path, columns = images
    ds = shardfeed.open(path, mmap=mmap_mode)
    indices = np.arange(23, -1, -3)
    out = {"chw": np.full((8, 3, 9, 13), np.nan, np.float32), "hwc": np.full((8, 9, 13, 3), np.nan, np.float32),
           "h": np.empty((8, 5, 4), np.float16)}
    scale = {"chw": (1 / STD).reshape(3, 1, 1), "hwc": 1 / STD}
    offset = {"chw": (-MEAN / STD).reshape(3, 1, 1)}
    batch = ds.read(indices, fields=["chw", "hwc", "h"], scale=scale, offset=offset, out=out)
    assert all(batch[k] is out[k] for k in out)
    assert_bits(out["chw"], formula(columns["chw"][indices], scale["chw"], offset["chw"]))
    assert_bits(out["hwc"], formula(columns["hwc"][indices], scale["hwc"]))
    np.testing.assert_array_equal(out["h"].view(np.uint16), columns["h"][indices].view(np.uint16))


def test_affine_extreme_values(tools, new_path, mmap_mode):
    """inf, nan, -0.0 and overflow through the transform behave as in numpy."""
    values = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, -65504.0, 6e-8], np.float16)
    ds = shardfeed.open(tools.write_dataset(new_path(), {"x": ("float16", (8,))}, {"x": values[None]}),
                        mmap=mmap_mode)
    for scale, offset in [(0.0, 0.0), (-1.0, 0.0), (1e35, 0.0), (1.0, -0.0), (-2.0, np.inf), (None, -0.0)]:
        got = ds.read([0], scale=scale, offset=offset)["x"]
        assert_bits(got, formula(values[None], scale, offset))


def test_affine_on_every_convertible_dtype(tools, rng, new_path):
    dtypes = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
              "float16", "bfloat16", "float32", "float64"]
    fields = {d: (d, (4, 3)) for d in dtypes}
    columns = {d: tools.random_values(rng, d, (6, 4, 3)) for d in dtypes}
    ds = shardfeed.open(tools.write_dataset(new_path(), fields, columns))
    scale = {d: np.array([0.5, -2.0, 1e-3]) for d in dtypes}
    offset = {d: np.array([[1.0], [2.0], [-3.0], [0.25]]) for d in dtypes}
    batch = ds.read(np.arange(6)[::-1], scale=scale, offset=offset, lossy=True)
    for d in dtypes:
        assert_bits(batch[d], formula(columns[d][::-1], scale[d], offset[d]))


@pytest.mark.parametrize("field, scale, offset", [
    ("hwc", np.ones(4), None),                   # per channel on the wrong axis length
    ("chw", np.ones(3), None),                   # (3,) lines up with the last axis (13), not the first
    ("chw", 1.0, np.ones((3, 9))),
    ("hwc", np.ones((1, 9, 13, 3)), None),       # more dimensions than the field
    ("h", np.ones((2, 5, 4)), np.ones((2, 5, 4))),
])
def test_affine_shapes_that_do_not_broadcast(images, field, scale, offset):
    path, columns = images
    shapes = [np.shape(1.0 if a is None else a) for a in (scale, offset)]
    expected = (f"field '{field}': scale {shapes[0]} / offset {shapes[1]} do not broadcast to the field's shape "
                f"{columns[field].shape[1:]}")
    with pytest.raises(ValueError, match=re.escape(expected)):
        shardfeed.open(path).read([0], fields=field, scale=scale, offset=offset)


def test_affine_needs_float32_output_and_one_field(images):
    path, _ = images
    ds = shardfeed.open(path)
    with pytest.raises(ValueError, match=r"field 'chw' \(uint8\): scale/offset need a float32, float16 or "
                                         r"bfloat16 output, not uint8"):
        ds.read([0], fields="chw", dtype="uint8", scale=2.0)
    with pytest.raises(ValueError, match="scale applies to one field; pass a dict"):
        ds.read([0], fields=["chw", "hwc"], scale=2.0)
    with pytest.raises(ValueError, match="offset applies to one field; pass a dict"):
        ds.read([0], offset=1.0)
    out = {"chw": np.empty((1, 3, 9, 13), np.uint8)}
    with pytest.raises(ValueError, match=r"out\['chw'\]: dtype uint8 \(expected float32\)"):
        ds.read([0], fields="chw", scale=2.0, out=out)
