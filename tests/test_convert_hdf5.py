"""HDF5 converter (h5py): chunk by chunk, several files, chosen datasets, empty and bad inputs."""

import os

import numpy as np
import pytest

import shardfeed
from shardfeed import convert

h5py = pytest.importorskip("h5py", reason="h5py (the hdf5 extra) is not installed")


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


def write_h5(path, **datasets):
    with h5py.File(path, "w") as f:
        for name, (data, chunks) in datasets.items():
            f.create_dataset(name, data=data, chunks=chunks, compression="gzip" if chunks else None)
    return path


def test_round_trip_of_chunked_and_contiguous_datasets(tmp_path, rng, tools):
    x = rng.standard_normal((513, 4, 3)).astype(np.float32)
    y = rng.integers(0, 9, 513).astype(np.int32)
    write_h5(tmp_path / "a.h5", x=(x, (64, 4, 3)), y=(y, None))
    report = convert.from_hdf5(tmp_path / "d", tmp_path / "a.h5", chunk_bytes=3000)
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], x)
    tools.assert_identical(batch["y"], y)
    assert report.num_samples == 513 and report.source_bytes == x.nbytes + y.nbytes


def test_several_files_chosen_datasets_and_precision(tmp_path, rng, tools):
    xs = [np.round(rng.standard_normal((n, 5)), 3) for n in (40, 0, 17)]  # no float16 subnormals
    for i, x in enumerate(xs):
        with h5py.File(tmp_path / f"{i}.h5", "w") as f:
            f.create_dataset("group/features", data=x, maxshape=(None, 5))
            f.create_dataset("labels", data=np.arange(len(x)), maxshape=(None,))
    report = convert.from_hdf5(tmp_path / "d", str(tmp_path / "*.h5"),
                               datasets={"x": "/group/features", "y": "labels"}, dtypes={"x": "float16"})
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], np.concatenate(xs).astype(np.float16))
    tools.assert_identical(batch["y"], np.concatenate([np.arange(len(x)) for x in xs]))
    assert report.fields["x"].measured and report.fields["x"].max_rel_error <= 2 ** -11
    convert.from_hdf5(tmp_path / "l", tmp_path / "0.h5", datasets=["group/features"], part=(1, 2))
    tools.assert_identical(read_all(tmp_path / "l")["features"], xs[0][20:])


def test_empty_and_bad_inputs(tmp_path):
    write_h5(tmp_path / "e.h5", x=(np.zeros((0, 2), np.float32), None))
    convert.from_hdf5(tmp_path / "d", tmp_path / "e.h5")
    assert len(shardfeed.open(tmp_path / "d")) == 0
    with h5py.File(tmp_path / "g.h5", "w") as f:
        f.create_group("only_a_group")
    with pytest.raises(shardfeed.SourceError, match="no datasets at the top of the file"):
        convert.from_hdf5(tmp_path / "x", tmp_path / "g.h5")
    with pytest.raises(shardfeed.SourceError, match=r"e\.h5: no dataset 'nope'"):
        convert.from_hdf5(tmp_path / "x", tmp_path / "e.h5", datasets=["nope"])
    (tmp_path / "t.h5").write_bytes(b"not hdf5")
    with pytest.raises(shardfeed.SourceError, match=r"t\.h5: cannot open as HDF5"):
        convert.from_hdf5(tmp_path / "x", tmp_path / "t.h5")
    write_h5(tmp_path / "s.h5", x=(np.array(["a", "b"], dtype="S1"), None))
    with pytest.raises(shardfeed.SchemaError, match="cannot store"):
        convert.from_hdf5(tmp_path / "x", tmp_path / "s.h5")
    write_h5(tmp_path / "u.h5", x=(np.zeros(3), None), y=(np.zeros(4), None))
    with pytest.raises(shardfeed.SourceError, match="different numbers of rows"):
        convert.from_hdf5(tmp_path / "x", tmp_path / "u.h5")
    assert not os.path.exists(tmp_path / "x")
