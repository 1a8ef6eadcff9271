"""Hostile dataset directories: only regular files are read, never through a link, without
blocking (FIFOs) and within a bound (the manifest); memory stays bounded whatever counts a
manifest claims; shapes numpy cannot represent, unusable names and huge indices raise shardfeed's
errors naming the field, file or index; verify says what is true and what the next step does."""

import contextlib
import json
import os
import signal
import tracemalloc

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, LOCK_NAME, MANIFEST_NAME
from shardfeed.manifest import MAX_MANIFEST_BYTES


@pytest.fixture
def dataset(tools, new_path):
    """6 samples in 3 shards: x int32[2], t int16[None]."""
    return tools.write_dataset(new_path(), {"x": ("int32", (2,)), "t": ("int16", (None,))},
                               {"x": np.arange(12, dtype=np.int32).reshape(6, 2),
                                "t": [np.arange(i % 3, dtype=np.int16) for i in range(6)]},
                               shard_size=HEADER_BYTES + 2 * 24)


@contextlib.contextmanager
def deadline(seconds=10):
    """Fails (instead of hanging the suite) when the body blocks, e.g. opening a FIFO."""
    def expired(signum, frame):
        raise TimeoutError(f"blocked for {seconds} s")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def replace_with(path, make):
    os.remove(path)
    make(path)


# ---- items 8 and 9: regular files only, never through a link, never blocking ----------------------

KINDS = {
    "fifo": (os.mkfifo, "is a FIFO, not a regular file"),
    "directory": (os.mkdir, "is a directory, not a regular file"),
    "link-outside": (None, "is a symbolic link"),
    "link-inside": (None, "is a symbolic link"),
    "link-dev-zero": (lambda p: os.symlink("/dev/zero", p), "is a symbolic link"),
}


def make_kind(kind, file, tmp_path):
    make, message = KINDS[kind]
    if kind == "link-outside":  # a valid copy of the shard outside the directory: only the link rule refuses it
        copy = tmp_path / "outside-copy"
        with open(file, "rb") as f:
            copy.write_bytes(f.read())
        make = lambda p: os.symlink(copy, p)  # noqa: E731
    elif kind == "link-inside":
        os.rename(file, file + ".real")
        make = lambda p: os.symlink(os.path.basename(p) + ".real", p)  # noqa: E731
        os.close(os.open(file, os.O_CREAT | os.O_WRONLY))
    replace_with(file, make)
    return message


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("which", ["shard-000001.rec", "shard-000001.var"])
def test_a_shard_that_is_not_a_regular_file_is_refused(dataset, tmp_path, kind, which, mmap_mode):
    file = os.path.join(dataset, which)
    message = make_kind(kind, file, tmp_path)
    with deadline():
        with pytest.raises(shardfeed.ShardFormatError, match=f"{file}: {message}"):
            shardfeed.open(dataset, mmap=mmap_mode)
        report = shardfeed.verify(dataset)
    assert report.bad_shards == [1] and report.bad_ranges == [(2, 4)]
    assert any(p.file == file and message in p.message for p in report.problems), str(report)


@pytest.mark.parametrize("kind", KINDS)
def test_a_manifest_that_is_not_a_regular_file_is_refused(dataset, tmp_path, kind):
    manifest = os.path.join(dataset, MANIFEST_NAME)
    message = make_kind(kind, manifest, tmp_path)
    with deadline():
        with pytest.raises(shardfeed.ShardFormatError, match=f"{manifest}: {message}"):
            shardfeed.open(dataset)
        with pytest.raises(shardfeed.ShardFormatError, match=f"{manifest}: {message}"):
            shardfeed.Writer(dataset, mode="a")
        report = shardfeed.verify(dataset)
    assert not report.ok and message in report.problems[0].message


def test_a_lock_file_that_is_a_fifo_does_not_block_verify_or_a_writer(dataset):
    os.mkfifo(os.path.join(dataset, LOCK_NAME))
    with deadline():
        assert shardfeed.verify(dataset).ok
        with pytest.raises(shardfeed.ShardFormatError, match="writer.lock: is a FIFO, not a lock file"):
            shardfeed.Writer(dataset, mode="a")


def test_a_manifest_larger_than_the_bound_is_refused_unread(dataset):
    manifest = os.path.join(dataset, MANIFEST_NAME)
    os.truncate(manifest, MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    tracemalloc.start()
    try:
        with pytest.raises(shardfeed.ShardFormatError, match=f"{manifest}: {MAX_MANIFEST_BYTES + 1} bytes, larger "
                                                             "than a manifest may be"):
            shardfeed.open(dataset)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


# ---- item 10: memory bounded whatever the manifest claims ---------------------------------------


def claim(path, counts):
    """Rewrites the manifest of a one-field (int8) dataset to claim ``counts`` samples per shard,
    as a manifest without per-record checksums (format version 1) claims them: a checksums entry
    would have to claim a file of 4 bytes per sample too, which the manifest's parser refuses."""
    manifest = os.path.join(path, MANIFEST_NAME)
    with open(manifest) as f:
        doc = json.load(f)
    first = {key: value for key, value in doc["shards"][0].items() if key != "checksums"}
    doc["shards"] = [dict(first, num_samples=n, size=HEADER_BYTES + n) for n in counts]
    for k, shard in enumerate(doc["shards"]):
        shard["file"] = f"shard-{k:06d}.rec"
    doc["num_samples"] = sum(counts)
    with open(manifest, "w") as f:
        json.dump(doc, f)


@pytest.mark.parametrize("counts", [[10 ** 12], [250_000_000, 2 ** 40, 7]])
def test_verify_and_open_use_bounded_memory_whatever_the_manifest_claims(tools, new_path, counts):
    path = tools.write_dataset(new_path(), {"b": "int8"}, {"b": np.arange(5, dtype=np.int8)})
    for k in range(1, len(counts)):
        os.link(os.path.join(path, "shard-000000.rec"), os.path.join(path, f"shard-{k:06d}.rec"))
    claim(path, counts)
    tracemalloc.start()
    try:
        report = shardfeed.verify(path)
        with pytest.raises(shardfeed.ShardFormatError, match="the manifest says"):
            shardfeed.open(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 32 << 20, peak  # a few read pieces of 4 MiB, whatever the claims
    starts = np.cumsum([0] + counts)
    missing = [p for p in report.problems if "are missing" in p.message]
    assert [p.samples for p in missing] == [[(int(starts[k]) + 5, int(starts[k + 1]))] for k in range(len(counts))]
    assert report.num_bad_samples == sum(counts) - 5 * len(counts)  # each shard's 5 records are there
    assert f"samples 5-{counts[0] - 1} are missing" in missing[0].message


# ---- item 11: shapes numpy cannot represent, unusable names, huge indices ------------------------


@pytest.mark.parametrize("shape, message", [
    ([1] * 65, "shape has 65 dimensions, at most 30"),
    ([0, 2 ** 31], r"bad shape \(0, 2147483648\) \(dimensions must be ints in \[0, 2147483647\]\)"),
    ([None, 0, 2 ** 40], r"bad shape \(None, 0, 1099511627776\) \(dimensions must be ints in"),
])
def test_shapes_numpy_cannot_represent_are_format_errors_naming_the_field(tools, new_path, shape, message):
    path = tools.write_dataset(new_path(), {"x": ("int8", (2,)), "big": ("int8", (0,))},
                               {"x": np.zeros((1, 2), np.int8), "big": np.zeros((1, 0), np.int8)})
    manifest = os.path.join(path, MANIFEST_NAME)
    with open(manifest) as f:
        doc = json.load(f)
    doc["fields"][1]["shape"] = shape
    with open(manifest, "w") as f:
        json.dump(doc, f)
    for call in (shardfeed.open, lambda p: shardfeed.Writer(p, mode="a")):
        with pytest.raises(shardfeed.ShardFormatError, match=f"{manifest}: field 'big': {message}"):
            call(path)
    assert "field 'big': " in shardfeed.verify(path).problems[0].message
    with pytest.raises(shardfeed.SchemaError, match=f"field 'big': {message}"):
        shardfeed.Writer(new_path(), fields={"big": ("int8", tuple(shape))})


def test_a_lone_surrogate_in_a_path_is_a_shardfeed_error(new_path, tmp_path):
    bad = new_path() + "\ud800"
    with pytest.raises(shardfeed.ShardReadError, match="not a usable file name") as info:
        shardfeed.open(bad)
    assert info.value.filename == bad
    with pytest.raises(shardfeed.ShardWriteError, match="not a usable file name"):
        shardfeed.Writer(bad, fields={"x": "int8"})
    with pytest.raises(shardfeed.ShardWriteError, match="not a usable file name"):
        shardfeed.merge([str(tmp_path)], bad)
    with pytest.raises(shardfeed.ShardReadError, match="not a usable file name"):
        shardfeed.merge([bad], str(tmp_path / "t"))
    report = shardfeed.verify(bad)
    assert not report.ok and "not a usable file name" in report.problems[0].message


def test_non_utf8_names_work(tools, tmp_path):
    """A directory whose name is not UTF-8 (bytes path, or the str Python decodes it to)."""
    raw = os.fsencode(str(tmp_path)) + b"/data-\xff\xfe"
    path = tools.write_dataset(raw, {"x": "int16"}, {"x": np.arange(4)})
    with shardfeed.open(raw) as ds:
        np.testing.assert_array_equal(ds.read([3, 0])["x"], [3, 0])
    assert shardfeed.verify(os.fsdecode(raw)).ok and os.fsdecode(path) == os.fsdecode(raw)


@pytest.mark.parametrize("index", [2 ** 63, -2 ** 63 - 1, np.uint64(2 ** 64 - 1), 2 ** 100])
def test_huge_indices_are_index_errors(dataset, index):
    ds = shardfeed.open(dataset)
    with pytest.raises(IndexError, match=f"index {int(index)} is out of range for a dataset of 6 samples"):
        ds[index]


def test_a_maxlen_no_array_can_hold_is_refused_naming_the_field(dataset):
    ds = shardfeed.open(dataset)
    limit = 2 ** 62  # bytes: more than numpy's sizes (intp) can describe
    with pytest.raises(shardfeed.OutputSizeError, match=r"field 't': a batch of 2 samples padded to "
                       rf"maxlen=4611686018427387904 rows .* more than the {limit} bytes an output array") as info:
        ds.read([0, 1], maxlen=2 ** 62)
    assert isinstance(info.value, ValueError) and isinstance(info.value, shardfeed.ShardfeedError)
    assert (info.value.field, info.value.limit) == ("t", limit)
    assert info.value.nbytes == 2 * 2 ** 62 * np.dtype(ds.fields["t"].dtype).itemsize
    with pytest.raises(shardfeed.OutputSizeError, match="field 't'"):  # the array passed as out= too
        ds.read([0, 1], maxlen=2 ** 61, fields="t", out={"t": np.empty((2, 3), np.int64)})
    np.testing.assert_array_equal(ds.read([2], maxlen=3)["t"], [[0, 1, 0]])


# ---- item 13: verify says what is true --------------------------------------------------------------


def test_verify_on_a_damaged_manifest_claims_nothing_false(dataset):
    """One trailing byte: the shards are committed, and mode='a' refuses the dataset, removing
    nothing; the report must say exactly that."""
    with open(os.path.join(dataset, MANIFEST_NAME), "ab") as f:
        f.write(b"x")
    files = sorted(os.listdir(dataset))
    report = shardfeed.verify(dataset)
    text = str(report)
    assert "uncommitted" not in text and "did not finish" not in text and "removed by" not in text, text
    assert report.notes == ["the manifest cannot be read, so which shard files are committed is unknown; nothing "
                            "is removed, and Writer(path, mode='a') refuses the dataset until manifest.json is "
                            "repaired or restored"]
    assert text.splitlines()[0] == f"{dataset}: 1 problem(s)"
    with pytest.raises(shardfeed.ShardFormatError):  # what the note says the next step does
        shardfeed.Writer(dataset, mode="a")
    assert sorted(os.listdir(dataset)) == files


def test_a_stale_lock_with_a_damaged_manifest_claims_no_sample_count(dataset):
    with open(os.path.join(dataset, MANIFEST_NAME), "ab") as f:
        f.write(b"x")
    with open(os.path.join(dataset, LOCK_NAME), "w") as f:
        f.write(f"999999999 {os.uname().nodename}\n")
    notes = shardfeed.verify(dataset).notes
    assert notes[0] == "the writer pid 999999999 did not finish (killed?)"
