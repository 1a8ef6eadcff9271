"""The reference reader (the oracle of test_properties) agrees with the numpy originals and does
not use the compiled core."""

import ast
import inspect

import numpy as np
import pytest

from shardfeed import _reference
from shardfeed._reference import reference_read

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64"]


def test_reference_is_independent_of_the_core():
    tree = ast.parse(inspect.getsource(_reference))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {"_core", "dataset", "shardfeed._core", "shardfeed.dataset", "Dataset"} & imported, imported


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_reads_the_numpy_originals(tools, rng, new_path, dtype):
    fields = {"s": (dtype, ()), "m": (dtype, (2, 3)), "v": (dtype, (None, 2))}
    n = 11
    columns = {"s": tools.random_values(rng, dtype, (n,)), "m": tools.random_values(rng, dtype, (n, 2, 3)),
               "v": [tools.random_values(rng, dtype, (k, 2)) for k in rng.integers(0, 4, n)]}
    path = tools.write_dataset(new_path(), fields, columns, shard_size=64 + 3 * 64)
    indices = np.array([10, -1, 0, 3, 3, 7, -11])
    values, lengths = reference_read(path, indices)
    for name in ("s", "m"):
        tools.assert_identical(values[name], tools.expected_natural(dtype, columns[name][indices]))
    for k, i in enumerate(indices):
        row = columns["v"][i]
        tools.assert_identical(values["v"][k, :len(row)], tools.expected_natural(dtype, row))
        assert not values["v"][k, len(row):].any()
        assert lengths["v"][k] == len(row)
    with np.errstate(over="ignore", invalid="ignore"):
        as_float = reference_read(path, indices, fields=["m"], dtype="float32")[0]["m"]
        tools.assert_identical(as_float, np.asarray(columns["m"][indices]).astype(np.float32))
    affine = reference_read(path, indices[:2], fields="m", scale=np.float32([1, 2, 3]), offset=-1.0)[0]["m"]
    with np.errstate(over="ignore", invalid="ignore"):
        manual = columns["m"][indices[:2]].astype(np.float32) * np.float32([1, 2, 3]) + np.float32(-1.0)
    tools.assert_identical(affine, manual)


def test_reference_index_errors(tools, new_path):
    path = tools.write_dataset(new_path(), {"x": "int8"}, {"x": [1, 2, 3]})
    with pytest.raises(IndexError):
        reference_read(path, [3])
    with pytest.raises(IndexError):
        reference_read(path, [-4])
    values, lengths = reference_read(path, [])
    tools.assert_identical(values["x"], np.empty(0, np.int8))
    assert lengths == {}
