"""Manifest validation at open: every problem is a ShardFormatError (a ValueError) naming the
manifest; shard names can never point outside the dataset directory."""

import json
import os
import pathlib
import re

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, LOCK_NAME, MANIFEST_NAME, file_checksum


@pytest.fixture
def dataset(tools, new_path):
    path = tools.write_dataset(new_path(), {"x": ("float32", (2,)), "t": ("int8", (None,))},
                               {"x": np.arange(12.0).reshape(6, 2), "t": [np.arange(k) for k in range(6)]},
                               shard_size=HEADER_BYTES + 3 * 24)
    return path


def edit_manifest(path, change):
    manifest_path = os.path.join(path, MANIFEST_NAME)
    with open(manifest_path) as f:
        doc = json.load(f)
    change(doc)
    with open(manifest_path, "w") as f:
        json.dump(doc, f)
    return manifest_path


def expect_format_error(path, message):
    manifest_path = os.path.join(path, MANIFEST_NAME)
    with pytest.raises(shardfeed.ShardFormatError, match=re.escape(f"{manifest_path}: {message}")) as info:
        shardfeed.open(path)
    assert isinstance(info.value, ValueError) and isinstance(info.value, shardfeed.ShardfeedError)
    return info.value


def test_the_fixture_is_valid(dataset):
    ds = shardfeed.open(dataset)
    assert len(ds) == 6 and ds.num_shards == 2


@pytest.mark.parametrize("name", ["../outside.rec", "/etc/passwd", "sub/shard.rec", "..", ".", "", "a\\b",
                                  "nul\0byte", "lone\ud800surrogate", 7, None])
def test_shard_names_must_stay_inside_the_dataset(dataset, name):
    # a valid copy of the shard just outside the directory: only the name check can refuse it
    shard = pathlib.Path(dataset, "shard-000000.rec").read_bytes()
    pathlib.Path(dataset).parent.joinpath("outside.rec").write_bytes(shard)

    def change(doc):
        doc["shards"][0]["file"] = name
    edit_manifest(dataset, change)
    expect_format_error(dataset, f"shard 0 file name {name!r} is not a plain file name inside the dataset directory")


@pytest.mark.parametrize("name", [MANIFEST_NAME, LOCK_NAME, "manifest.json.tmp-123", "merge.journal",
                                  "merge.journal.tmp-9"])
def test_names_the_library_writes_itself_are_never_shards(dataset, name):
    """A writer replaces or removes these files (lock, temporary manifests, merge journal): a shard
    listed under such a name would be destroyed, or written through. The shard is renamed to the
    name, so only the name check can refuse it."""
    if name != MANIFEST_NAME:
        os.rename(os.path.join(dataset, "shard-000000.rec"), os.path.join(dataset, name))

    def change(doc):
        doc["shards"][0]["file"] = name
    edit_manifest(dataset, change)
    expect_format_error(dataset, f"shard 0 file name {name!r} is the name of a file shardfeed writes itself")


@pytest.mark.parametrize("name", ["../x.var", "/tmp/x.var"])
def test_heap_names_must_stay_inside_the_dataset(dataset, name):
    def change(doc):
        doc["shards"][1]["heap"]["file"] = name
    edit_manifest(dataset, change)
    expect_format_error(dataset, f"shard 1 heap file name {name!r} is not a plain file name")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(extra=1), "unknown keys ['extra'] / missing keys []"),
    (lambda d: d.pop("metadata"), "unknown keys [] / missing keys ['metadata']"),
    (lambda d: d.update(version=3), "format version 3, this shardfeed reads versions 1, 2"),
    (lambda d: d.update(version=True), "format version True, this shardfeed reads versions 1, 2"),
    (lambda d: d.update(format="other"), "not a shardfeed manifest (format 'other')"),
    (lambda d: d.update(record_bytes=32), "record_bytes 32 does not match the schema's 24"),
    (lambda d: d.update(num_samples=7), "num_samples 7 is not the sum of the shards' counts (6)"),
    (lambda d: d.update(metadata=[1]), "metadata must be a JSON object"),
    (lambda d: d.update(shards={}), "shards must be a list"),
    (lambda d: d["fields"][0].update(dtype="float128"), "field 'x': unknown dtype 'float128'"),
    (lambda d: d["fields"][0].update(extra=1), "bad field entry"),
    (lambda d: d["fields"].append(dict(d["fields"][0])), "duplicate field names: ['x']"),
    (lambda d: d["shards"][0].update(extra=1), "shard 0 must have exactly the keys"),
    (lambda d: d["shards"][0].update(num_samples=2), "shard 0 (shard-000000.rec) has size 136, but 2 records of "
                                                     "24 bytes need 112"),
    (lambda d: d["shards"][0].update(num_samples=-1), "shard 0 num_samples must be an integer in [0, 2**62), got -1"),
    (lambda d: d["shards"][0].update(size="136"), "shard 0 size must be an integer in [0, 2**62), got '136'"),
    (lambda d: d["shards"][0].update(checksum="md5:00"), "shard 0 checksum 'md5:00' is not 'crc32:<8 hex digits>'"),
    (lambda d: d["shards"][1].update(file="shard-000000.rec"), "file 'shard-000000.rec' is listed twice"),
    (lambda d: d["shards"][1]["heap"].update(size=10), "shard 1 heap size 10 is below the header size"),
    (lambda d: d["shards"][1].pop("heap"), "shard 1 must have exactly the keys"),
])
def test_bad_manifest_contents(dataset, change, message):
    edit_manifest(dataset, change)
    expect_format_error(dataset, message)


@pytest.mark.parametrize("text, message", [
    (b"{not json", "not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"\xff\xfe", "not valid JSON"),
    (b"[" * 100000 + b"]" * 100000, "not valid JSON"),
])
def test_manifest_that_is_not_a_json_object(dataset, text, message):
    with open(os.path.join(dataset, MANIFEST_NAME), "wb") as f:
        f.write(text)
    expect_format_error(dataset, message)


def test_heap_file_of_wrong_size(dataset):
    heap = os.path.join(dataset, "shard-000001.var")
    size = os.path.getsize(heap)
    with open(heap, "ab") as f:
        f.write(b"x")
    with pytest.raises(shardfeed.ShardFormatError, match=re.escape(f"{heap}: file is {size + 1} bytes, the manifest "
                                                                   f"says {size} (extra data)")):
        shardfeed.open(dataset)


def test_writer_append_refuses_a_bad_manifest_too(dataset):
    edit_manifest(dataset, lambda d: d["shards"][0].update(file="../escape.rec"))
    with pytest.raises(shardfeed.ShardFormatError, match="is not a plain file name"):
        shardfeed.Writer(dataset, mode="a")


def test_manifest_may_list_empty_shards(dataset):
    """A shard with no samples (header-only files) anywhere in the list is skipped over."""
    root = pathlib.Path(dataset)
    for ext in (".rec", ".var"):
        header = (root / f"shard-000000{ext}").read_bytes()[:HEADER_BYTES]
        for k in range(3):
            (root / f"empty-{k}{ext}").write_bytes(header)

    def change(doc):
        def empty(k):
            return {"file": f"empty-{k}.rec", "num_samples": 0, "size": HEADER_BYTES,
                    "checksum": file_checksum(root / f"empty-{k}.rec"),
                    "heap": {"file": f"empty-{k}.var", "size": HEADER_BYTES,
                             "checksum": file_checksum(root / f"empty-{k}.var")}}
        first, second = doc["shards"]
        doc["shards"] = [empty(0), first, empty(1), second, empty(2)]
    edit_manifest(dataset, change)
    for mmap in (True, False):
        ds = shardfeed.open(dataset, mmap=mmap)
        assert len(ds) == 6 and ds.num_shards == 5
        batch = ds.read([5, 0, 3, 2, -1, 1])
        np.testing.assert_array_equal(batch["x"][:, 0], [10.0, 0.0, 6.0, 4.0, 10.0, 2.0])
        np.testing.assert_array_equal(batch.lengths["t"], [5, 0, 3, 2, 5, 1])
        np.testing.assert_array_equal(batch["t"][0], np.arange(5))
