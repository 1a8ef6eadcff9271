"""Any Python iterable of samples: dicts or tuples, inferred or declared schemas, variable-length
fields, empty iterables, inconsistent samples, precision and overflow."""

import os

import numpy as np
import pytest

import shardfeed
from shardfeed import convert


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


def test_generator_of_dicts_with_an_inferred_schema(tmp_path, rng, tools):
    images = rng.integers(0, 256, (250, 4, 4), dtype=np.uint8)
    labels = rng.integers(0, 3, 250)
    samples = ({"image": image, "label": int(label), "weight": 0.5} for image, label in zip(images, labels))
    report = convert.from_iterable(tmp_path / "d", samples, chunk_bytes=500, dtypes={"weight": "float16"})
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["image"], images)
    tools.assert_identical(batch["label"], labels.astype(np.int64))
    tools.assert_identical(batch["weight"], np.full(250, 0.5, np.float16))
    assert report.num_samples == 250
    assert (report.fields["label"].source_dtype, report.fields["weight"].source_dtype) == ("int64", "float64")


def test_tuples_name_their_fields(tmp_path, tools):
    convert.from_iterable(tmp_path / "p", [(np.ones(2), 1), (np.zeros(2), 0)])
    assert list(shardfeed.open(tmp_path / "p").fields) == ["x", "y"]
    convert.from_iterable(tmp_path / "t", [(1, 2, 3)])
    assert list(shardfeed.open(tmp_path / "t").fields) == ["x0", "x1", "x2"]
    convert.from_iterable(tmp_path / "n", iter([(np.ones(2), 7)]), fields={"a": ("float32", (2,)), "b": "int8"})
    batch = read_all(tmp_path / "n")
    tools.assert_identical(batch["a"], np.ones((1, 2), np.float32))
    tools.assert_identical(batch["b"], np.array([7], np.int8))


def test_variable_length_fields_need_a_declared_schema(tmp_path, rng, tools):
    sequences = [rng.integers(0, 100, int(rng.integers(0, 9))) for _ in range(60)]
    sequences[0], sequences[1] = np.arange(3), np.arange(5)  # inferred from the first: int64[3]; the second differs
    samples = ({"tokens": s, "y": len(s)} for s in sequences)
    with pytest.raises(shardfeed.SchemaError, match="different shapes"):
        convert.from_iterable(tmp_path / "bad", ({"tokens": s} for s in sequences))
    assert not os.path.exists(tmp_path / "bad")
    convert.from_iterable(tmp_path / "d", samples, fields={"tokens": ("int32", (None,)), "y": "int64"},
                          chunk_bytes=100, total=60)
    with shardfeed.open(tmp_path / "d") as ds:
        for i in (0, 17, 59):
            tools.assert_identical(ds[i]["tokens"], sequences[i].astype(np.int32))


def test_empty_iterables(tmp_path):
    with pytest.raises(shardfeed.SchemaError, match="empty and no fields"):
        convert.from_iterable(tmp_path / "e", [])
    report = convert.from_iterable(tmp_path / "f", [], fields={"x": ("float32", (3,))})
    assert report.num_samples == 0 and len(shardfeed.open(tmp_path / "f")) == 0


def test_inconsistent_samples(tmp_path):
    with pytest.raises(shardfeed.SchemaError, match=r"sample 1 has fields \['x'\], expected \['x', 'y'\]"):
        convert.from_iterable(tmp_path / "a", [{"x": 1, "y": 2}, {"x": 1}])
    with pytest.raises(shardfeed.SchemaError, match="sample 2 has 1 values, expected 2"):
        convert.from_iterable(tmp_path / "b", [(1, 2), (3, 4), (5,)])
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")


def test_precision_and_overflow_name_the_sample(tmp_path, rng):
    values = rng.standard_normal((40, 3))
    report = convert.from_iterable(tmp_path / "p", ({"x": v} for v in values), dtypes="bfloat16", chunk_bytes=64)
    assert report.fields["x"].measured and 0 < report.fields["x"].max_rel_error <= 2 ** -8
    values[33, 1] = 1e39
    with pytest.raises(shardfeed.ValueRangeError, match=r"sample 33 of the iterable: field 'x', sample 33: value 1e\+39 "
                       "overflows bfloat16"):
        convert.from_iterable(tmp_path / "o", ({"x": v} for v in values), dtypes="bfloat16", chunk_bytes=64)
