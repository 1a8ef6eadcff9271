"""shardfeed.merge joins parts without copying shard data; parallel conversion (processes writing
parts, then a merge) gives what a single-process conversion gives."""

import os
import subprocess
import sys

import numpy as np
import pytest

import shardfeed
from shardfeed import convert
from shardfeed.manifest import read_manifest

SHARDFEED = os.path.join(os.path.dirname(sys.executable), "shardfeed")


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


def write(path, x, y, shard_size=64 + 40 * 8):
    convert.from_arrays(path, {"x": x, "y": y}, shard_size=shard_size, metadata={"classes": ["a", "b"]})
    return path


def inode(path):
    return os.stat(path).st_ino


def test_merge_links_shards_in_order_without_copying(tmp_path, rng, tools):
    xs = [rng.standard_normal((n, 4)).astype(np.float32) for n in (25, 0, 13, 40)]
    parts = [write(tmp_path / f"part-{i}", x, np.arange(len(x))) for i, x in enumerate(xs)]
    before = {p: [inode(p / s.file) for s in read_manifest(p).shards] for p in parts}
    result = shardfeed.merge(parts, tmp_path / "all")
    assert (result.num_samples, result.parts, result.moved) == (78, 4, False)
    manifest = read_manifest(tmp_path / "all")
    assert [s.file for s in manifest.shards] == [f"shard-{k:06d}.rec" for k in range(result.num_shards)]
    assert [inode(tmp_path / "all" / s.file) for s in manifest.shards] == [i for p in parts for i in before[p]]
    batch = read_all(tmp_path / "all")
    tools.assert_identical(batch["x"], np.concatenate(xs))
    tools.assert_identical(batch["y"], np.concatenate([np.arange(len(x)) for x in xs]))
    assert shardfeed.open(tmp_path / "all").metadata == {"classes": ["a", "b"]}
    for part, x in zip(parts, xs):  # the parts are still datasets of their own
        tools.assert_identical(read_all(part)["x"], x)
    assert sorted(os.listdir(tmp_path / "all")) == sorted(["manifest.json"] + [s.file for s in manifest.shards]
                                                          + [s.checksums_file for s in manifest.shards])
    assert [s.checksums_file for s in manifest.shards] == [f"shard-{k:06d}.crc" for k in range(result.num_shards)]


def test_merge_with_move_removes_the_parts(tmp_path, rng, tools):
    xs = [rng.standard_normal((n, 2)) for n in (30, 31)]
    parts = [write(tmp_path / f"p{i}", x, np.zeros(len(x))) for i, x in enumerate(xs)]
    result = shardfeed.merge(parts, tmp_path / "all", move=True)
    assert result.moved and not any(os.path.exists(p) for p in parts)
    tools.assert_identical(read_all(tmp_path / "all")["x"], np.concatenate(xs))


@pytest.mark.parametrize("ranges", ["copy_file_range", "pread"])
def test_merge_with_move_copies_where_the_file_system_has_no_hard_links(tmp_path, rng, tools, monkeypatch, ranges):
    import errno

    xs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (30, 17)]
    parts = [write(tmp_path / f"p{i}", x, np.arange(len(x))) for i, x in enumerate(xs)]
    files = sum(2 * len(read_manifest(p).shards) for p in parts)  # .rec and .crc

    def no_link(*args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_link)
    if ranges == "pread":  # in pieces of 100 bytes, each at its offset
        import importlib
        monkeypatch.delattr(os, "copy_file_range", raising=False)
        monkeypatch.setattr(importlib.import_module("shardfeed.merge"), "_COPY_PIECE_BYTES", 100)
    with pytest.raises(OSError, match="pass move=True"):
        shardfeed.merge(parts, tmp_path / "linked")
    assert all(read_all(p)["x"].shape == x.shape for p, x in zip(parts, xs))
    result = shardfeed.merge(parts, tmp_path / "all", move=True)
    assert (result.moved, result.copied, result.num_samples) == (True, files, 47)
    assert not any(os.path.exists(p) for p in parts)
    batch = read_all(tmp_path / "all")
    tools.assert_identical(batch["x"], np.concatenate(xs))
    tools.assert_identical(batch["y"], np.concatenate([np.arange(len(x)) for x in xs]))
    report = shardfeed.verify(tmp_path / "all")
    assert report.ok and not report.notes, str(report)


def test_merge_keeps_variable_length_heaps_valid(tmp_path, rng, tools):
    sequences = [rng.integers(0, 9, int(rng.integers(0, 6))) for _ in range(50)]
    for k, (a, b) in enumerate([(0, 20), (20, 50)]):
        convert.from_iterable(tmp_path / f"p{k}", ({"t": s} for s in sequences[a:b]), fields={"t": ("int16", (None,))},
                              shard_size=64 + 16 * 6)
    shardfeed.merge([tmp_path / "p0", tmp_path / "p1"], tmp_path / "all")
    with shardfeed.open(tmp_path / "all") as ds:
        assert ds.num_shards > 2
        for i, sequence in enumerate(sequences):
            tools.assert_identical(ds[i]["t"], sequence.astype(np.int16))


def test_merge_refuses_parts_that_do_not_match(tmp_path, rng):
    write(tmp_path / "a", np.zeros((3, 4), np.float32), np.zeros(3))
    write(tmp_path / "b", np.zeros((3, 5), np.float32), np.zeros(3))
    convert.from_arrays(tmp_path / "c", {"x": np.zeros((3, 4), np.float32), "y": np.zeros(3)},
                        metadata={"classes": ["z"]})
    with pytest.raises(shardfeed.SchemaError, match=r"b: fields .* differ from those of"):
        shardfeed.merge([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(shardfeed.SourceError, match=r"metadata differs .* \(keys \['classes'\]\); pass metadata="):
        shardfeed.merge([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    assert not os.path.exists(tmp_path / "m" / "manifest.json")
    shardfeed.merge([tmp_path / "a", tmp_path / "c"], tmp_path / "m", metadata={"classes": ["q"]})
    assert shardfeed.open(tmp_path / "m").metadata == {"classes": ["q"]}
    with pytest.raises(FileExistsError):
        shardfeed.merge([tmp_path / "a"], tmp_path / "m")
    with pytest.raises(ValueError, match="listed twice"):
        shardfeed.merge([tmp_path / "a", tmp_path / "a"], tmp_path / "n")
    with pytest.raises(ValueError, match="cannot be the merge target"):
        shardfeed.merge([tmp_path / "a"], tmp_path / "a")
    with pytest.raises(ValueError, match="no parts"):
        shardfeed.merge([], tmp_path / "n")
    with pytest.raises(FileNotFoundError, match="not a shardfeed dataset"):
        shardfeed.merge([tmp_path / "nothing"], tmp_path / "n")
    shard = tmp_path / "a" / read_manifest(tmp_path / "a").shards[0].file
    with open(shard, "ab") as f:
        f.write(b"x")
    with pytest.raises(shardfeed.SourceError, match="bytes, its manifest says"):
        shardfeed.merge([tmp_path / "a"], tmp_path / "n")
    assert not os.path.exists(tmp_path / "n" / "manifest.json")


def test_parallel_conversion_equals_a_single_process_conversion(tmp_path, rng, tools):
    x = rng.standard_normal((2000, 6))
    np.save(tmp_path / "x.npy", x)
    single = convert.from_npy(tmp_path / "one", tmp_path / "x.npy", dtypes="float16", chunk_bytes=4096)
    report = convert.from_npy(tmp_path / "many", tmp_path / "x.npy", dtypes="float16", workers=3, chunk_bytes=4096)
    tools.assert_identical(read_all(tmp_path / "many")["x"], read_all(tmp_path / "one")["x"])
    assert report.parts == 3 and report.num_samples == 2000 and report.source_bytes == single.source_bytes
    assert report.fields["x"].max_abs_error == single.fields["x"].max_abs_error
    assert report.fields["x"].max_rel_error == single.fields["x"].max_rel_error
    assert sorted(os.listdir(tmp_path)) == ["many", "one", "x.npy"], "no part directories left behind"


def test_parallel_conversion_failure_leaves_nothing(tmp_path):
    lines = ["a,b"] + [f"{i},{i}" for i in range(300)]
    lines[250] = "1,oops"
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(shardfeed.SourceError, match=r"d\.csv, line 251: column 'b'"):
        convert.from_csv(tmp_path / "out", tmp_path / "d.csv", workers=2)
    assert sorted(os.listdir(tmp_path)) == ["d.csv"]


def test_parts_written_by_concurrent_processes_merge_into_the_single_process_result(tmp_path, rng, tools):
    """Four `shardfeed convert --part K/4` processes running at the same time, then `shardfeed merge`:
    the same samples, fields and metadata as one `shardfeed convert`."""
    data = tmp_path / "data"
    data.mkdir()
    for i in range(5):
        rows = [",".join(f"{v:.4f}" for v in rng.standard_normal(3)) + f",{['cat', 'dog'][int(rng.integers(0, 2))]}"
                for _ in range(int(rng.integers(50, 150)))]
        (data / f"{i}.csv").write_text("a,b,c,animal\n" + "\n".join(rows) + "\n")
    common = ["--label", "animal", "--classes", "cat,dog", "--dtype", "x=float16", "--chunk-size", "1K", "-q"]
    subprocess.run([SHARDFEED, "convert", str(data / "*.csv"), "-o", str(tmp_path / "single")] + common,
                   check=True, timeout=60)
    running = [subprocess.Popen([SHARDFEED, "convert", str(data / "*.csv"), "-o", str(tmp_path / "parts" / f"part-{k}"),
                                 "--part", f"{k}/4"] + common, stderr=subprocess.PIPE, text=True) for k in range(4)]
    for process in running:
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
    parts = [str(tmp_path / "parts" / f"part-{k}") for k in range(4)]
    done = subprocess.run([SHARDFEED, "merge"] + parts + ["-o", str(tmp_path / "merged")], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    single, merged = read_all(tmp_path / "single"), read_all(tmp_path / "merged")
    assert set(single) == set(merged) == {"x", "label"}
    for name in single:
        tools.assert_identical(merged[name], single[name])
    one, many = shardfeed.open(tmp_path / "single"), shardfeed.open(tmp_path / "merged")
    assert one.metadata == many.metadata == {"classes": ["cat", "dog"]}
    assert one.schema == many.schema
    assert [len(read_all(p)["label"]) for p in parts].count(0) == 0
