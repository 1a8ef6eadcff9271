"""The writer never loses, truncates or writes through what it did not create: booleans stored as
0/1, new shards under free names only (O_EXCL), no write through a link (lock file, shard names,
temporary manifests), errors that name the file, a commit reported as a commit."""

import errno
import fcntl
import json
import os
import warnings

import numpy as np
import pytest

import shardfeed
from shardfeed.format import HEADER_BYTES, LOCK_NAME, MANIFEST_NAME
from shardfeed.manifest import read_manifest


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


def file_bytes(path):
    with open(path, "rb") as f:
        return f.read()


def outside_file(tmp_path, content=b"precious data, not the library's\n"):
    victim = tmp_path / "victim.txt"
    victim.write_bytes(content)
    return victim, content


def edit_manifest(path, change):
    manifest_path = os.path.join(path, MANIFEST_NAME)
    with open(manifest_path) as f:
        doc = json.load(f)
    change(doc)
    doc["num_samples"] = sum(s["num_samples"] for s in doc["shards"])
    with open(manifest_path, "w") as f:
        json.dump(doc, f)


# ---- item 4: booleans ------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["alone", "with-others", "variable"])
def test_bools_whose_bytes_are_not_0_or_1_are_stored_as_0_and_1(new_path, layout):
    """numpy bools can hold any byte (uint8.view(bool)); each is True unless 0, and is stored as
    1 so that the dataset verifies. 'alone': the large-batch path that skips the write buffer."""
    raw = np.array([[0, 1], [2, 255], [0, 7], [128, 0], [3, 3]], np.uint8)
    flags = raw.view(bool)
    expected = raw != 0
    path = new_path()
    if layout == "alone":
        fields, batch, shard_size = {"b": ("bool", (2,))}, {"b": flags}, HEADER_BYTES + 2 * 2
    elif layout == "with-others":
        fields, batch, shard_size = ({"b": ("bool", (2,)), "y": "int16"}, {"b": flags, "y": np.arange(5)}, 1 << 20)
    else:
        fields, batch, shard_size = {"b": ("bool", (None, 2))}, {"b": [flags[:2], flags[2:], flags[:0]]}, 1 << 20
        expected = [expected[:2], expected[2:], expected[:0]]
    with shardfeed.Writer(path, fields=fields, shard_size=shard_size) as w:
        w.extend(batch)
        w.append({name: values[0] for name, values in batch.items()})
    report = shardfeed.verify(path)
    assert report.ok, str(report)
    got = read_all(path)
    if layout == "variable":
        for i, rows in enumerate(expected + expected[:1]):
            np.testing.assert_array_equal(got["b"][i, :len(rows)], rows)
    else:
        np.testing.assert_array_equal(got["b"], np.concatenate([expected, expected[:1]]))
        assert set(np.unique(got["b"].view(np.uint8))) <= {0, 1}


# ---- item 5: a new shard never takes an existing name -------------------------------------------


def three_shards(tools, path):
    x = np.arange(12, dtype=np.int32).reshape(6, 2)
    return tools.write_dataset(path, {"x": ("int32", (2,))}, {"x": x}, shard_size=HEADER_BYTES + 2 * 8), x


def test_append_after_a_removed_manifest_entry_keeps_every_committed_shard(tools, new_path):
    """The manifest lists shard-000001 and shard-000002 (entry 0 removed by hand): the next shard
    must not be shard-000002, which the manifest lists."""
    path, x = three_shards(tools, new_path())
    edit_manifest(path, lambda doc: doc["shards"].pop(0))
    listed = {name: file_bytes(os.path.join(path, name)) for name in ("shard-000001.rec", "shard-000002.rec")}
    with pytest.warns(shardfeed.ShardfeedWarning, match=r"removed files the manifest does not list .*"
                                                        r"\['shard-000000.crc', 'shard-000000.rec'\]"):
        w = shardfeed.Writer(path, mode="a")  # (the unlisted shard-000000.rec is a leftover now)
    with w:
        w.extend({"x": np.full((3, 2), -1, np.int32)})
    for name, data in listed.items():
        assert file_bytes(os.path.join(path, name)) == data, f"{name} was rewritten"
    assert shardfeed.verify(path).ok
    np.testing.assert_array_equal(read_all(path)["x"], np.concatenate([x[2:], np.full((3, 2), -1)]))
    names = [s.file for s in read_manifest(path).shards]
    assert len(set(names)) == len(names)


def test_append_to_a_merged_dataset_keeps_its_parts_intact(tools, tmp_path):
    """A merged dataset's shards are hard links to the parts' files: truncating one would destroy
    the part's shard too."""
    parts = []
    for k in range(2):
        path, _ = three_shards(tools, tmp_path / f"part{k}")
        parts.append(path)
    target = str(tmp_path / "merged")
    shardfeed.merge(parts, target)
    edit_manifest(target, lambda doc: doc["shards"].pop(0))
    with pytest.warns(shardfeed.ShardfeedWarning, match="removed files the manifest does not list"):
        w = shardfeed.Writer(target, mode="a")
    with w:
        w.extend({"x": np.zeros((4, 2), np.int32)})
    for part in parts:
        assert shardfeed.verify(part).ok
    assert shardfeed.verify(target).ok and len(shardfeed.open(target)) == 5 * 2 + 4


def test_a_new_shard_skips_a_name_whose_heap_file_is_listed(tools, new_path):
    """Shard 0's heap is listed as shard-000001.var: the next shard cannot be shard-000001."""
    path = tools.write_dataset(new_path(), {"t": ("int8", (None,))}, {"t": [np.arange(3), np.arange(5)]})
    os.rename(os.path.join(path, "shard-000000.var"), os.path.join(path, "shard-000001.var"))
    edit_manifest(path, lambda doc: doc["shards"][0]["heap"].update(file="shard-000001.var"))
    heap = file_bytes(os.path.join(path, "shard-000001.var"))
    with shardfeed.Writer(path, mode="a") as w:
        w.extend({"t": [np.arange(2)]})
    assert file_bytes(os.path.join(path, "shard-000001.var")) == heap
    assert shardfeed.verify(path).ok
    got = read_all(path)
    np.testing.assert_array_equal(got.lengths["t"], [3, 5, 2])
    np.testing.assert_array_equal(got["t"][1], np.arange(5))


def test_shard_files_are_created_never_reused(tools, new_path, monkeypatch):
    """Under a race (a file appears under the chosen name after the writer looked), O_EXCL makes
    the writer take the next name instead of truncating the file."""
    from shardfeed import shardfile
    path, x = three_shards(tools, new_path())
    planted = os.path.join(path, "shard-000003.rec")
    real = shardfile.create_new

    def racing(name, *args):
        if name == planted and not os.path.exists(planted):
            with open(planted, "wb") as f:
                f.write(b"someone else's file")
        return real(name, *args)
    monkeypatch.setattr(shardfile, "create_new", racing)
    with shardfeed.Writer(path, mode="a") as w:
        w.extend({"x": np.ones((1, 2), np.int32)})
    assert file_bytes(planted) == b"someone else's file"
    assert [s.file for s in read_manifest(path).shards][-1] == "shard-000004.rec"
    assert shardfeed.verify(path).ok


# ---- item 7: no write through a link --------------------------------------------------------------


def test_a_lock_file_that_is_a_symlink_is_refused_and_its_target_untouched(tools, new_path, tmp_path):
    path, _ = three_shards(tools, new_path())
    victim, content = outside_file(tmp_path)
    os.symlink(victim, os.path.join(path, LOCK_NAME))
    with pytest.raises(shardfeed.ShardFormatError, match="writer.lock: is a symbolic link, not a lock file"):
        shardfeed.Writer(path, mode="a")
    assert victim.read_bytes() == content and os.path.islink(os.path.join(path, LOCK_NAME))


def test_a_lock_file_hard_linked_to_another_file_is_replaced_not_written(tools, new_path, tmp_path):
    path, _ = three_shards(tools, new_path())
    victim, content = outside_file(tmp_path, b"4242 elsewhere\n")  # reads as a stale lock
    os.link(victim, os.path.join(path, LOCK_NAME))
    with pytest.warns(shardfeed.ShardfeedWarning, match="pid 4242 on host elsewhere"):
        with shardfeed.Writer(path, mode="a") as w:
            assert not os.path.samestat(os.stat(victim), os.stat(os.path.join(path, LOCK_NAME)))
            w.extend({"x": np.ones((1, 2), np.int32)})
    assert victim.read_bytes() == content
    assert not os.path.exists(os.path.join(path, LOCK_NAME))


def test_a_listed_shard_that_is_a_link_is_never_written_through(tools, new_path, tmp_path):
    """The manifest lists shard-000001.rec only (so the next shard would be shard-000001), and that
    file is a link to a file outside the dataset."""
    path, _ = three_shards(tools, new_path())
    victim, content = outside_file(tmp_path, file_bytes(os.path.join(path, "shard-000001.rec")))
    os.remove(os.path.join(path, "shard-000001.rec"))
    os.symlink(victim, os.path.join(path, "shard-000001.rec"))
    edit_manifest(path, lambda doc: doc["shards"].__delitem__(slice(0, 3, 2)))
    with pytest.warns(shardfeed.ShardfeedWarning, match="removed files the manifest does not list"):
        w = shardfeed.Writer(path, mode="a")
    with w:
        w.extend({"x": np.ones((2, 2), np.int32)})
    assert victim.read_bytes() == content and os.path.islink(os.path.join(path, "shard-000001.rec"))


def test_a_planted_temporary_manifest_link_is_not_written_through(tools, tmp_path):
    """merge writes the target's manifest through a temporary file: a link under that name is
    replaced by a new file, never followed."""
    part, _ = three_shards(tools, tmp_path / "part")
    target = tmp_path / "merged"
    target.mkdir()
    victim, content = outside_file(tmp_path)
    os.symlink(victim, target / f"{MANIFEST_NAME}.tmp-{os.getpid()}")
    shardfeed.merge([part], str(target))
    assert victim.read_bytes() == content
    assert shardfeed.verify(str(target)).ok and sorted(os.listdir(target)) == [MANIFEST_NAME] + [
        f"shard-{k:06d}.{e}" for k in range(3) for e in ("crc", "rec")]


def test_merge_honours_the_writer_locks(tools, tmp_path):
    part, _ = three_shards(tools, tmp_path / "part")
    target = tmp_path / "merged"
    target.mkdir()
    from shardfeed.lock import WriterLock
    held = WriterLock(str(target))
    try:
        with pytest.raises(shardfeed.WriterLockedError):
            shardfeed.merge([part], str(target))
    finally:
        held.release()
    with shardfeed.Writer(part, mode="a"):  # a part being written is not moved away
        with pytest.raises(shardfeed.WriterLockedError):
            shardfeed.merge([part], str(target), move=True)
    assert shardfeed.verify(part).ok and not os.path.exists(target / MANIFEST_NAME)


# ---- item 12: errors name the file; a commit is reported as one ---------------------------------


def test_a_failing_lock_names_the_lock_file(tools, new_path, monkeypatch):
    path, _ = three_shards(tools, new_path())

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")  # (as the kernel's: no file name)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    with pytest.raises(shardfeed.ShardWriteError, match="taking its lock: No locks available") as info:
        shardfeed.Writer(path, mode="a")
    assert info.value.filename == path and info.value.errno == errno.ENOLCK


def test_a_failing_directory_listing_names_the_directory(tools, new_path, monkeypatch):
    path, _ = three_shards(tools, new_path())
    from shardfeed import writer

    def failing(directory):
        raise OSError(errno.EIO, "Input/output error")
    monkeypatch.setattr(writer.os, "listdir", failing)
    with pytest.raises(shardfeed.ShardWriteError, match="Input/output error") as info:
        shardfeed.Writer(path, mode="a")
    assert info.value.filename == path
    monkeypatch.undo()
    shardfeed.Writer(path, mode="a").close()  # the failed open released the lock


def test_a_manifest_that_cannot_be_read_is_named(tools, new_path):
    path, _ = three_shards(tools, new_path())
    manifest = os.path.join(path, MANIFEST_NAME)
    os.rename(manifest, manifest + ".saved")
    os.mkdir(manifest)
    with pytest.raises(shardfeed.ShardFormatError, match=f"{manifest}: is a directory, not a regular file"):
        shardfeed.Writer(path, mode="a")
    assert not os.path.exists(os.path.join(path, LOCK_NAME))


def test_close_that_committed_but_cannot_remove_the_lock_warns(tools, new_path, monkeypatch):
    path, x = three_shards(tools, new_path())
    lock_path = os.path.join(path, LOCK_NAME)
    real_unlink = os.unlink

    def unlink(name, *args, **kwargs):
        if os.fspath(name) == lock_path:
            raise PermissionError(errno.EACCES, "Permission denied", lock_path)
        return real_unlink(name, *args, **kwargs)
    w = shardfeed.Writer(path, mode="a")
    w.extend({"x": np.full((3, 2), 9, np.int32)})
    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.warns(shardfeed.ShardfeedWarning, match=r"all 9 samples are committed, but the lock file .* could "
                                                        r"not be removed \(Permission denied\)"):
        w.close()
    monkeypatch.undo()
    np.testing.assert_array_equal(read_all(path)["x"], np.concatenate([x, np.full((3, 2), 9)]))
    assert os.path.getsize(lock_path) == 0  # names no writer: the next one takes it over silently
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        shardfeed.Writer(path, mode="a").close()
    assert not os.path.exists(lock_path) and shardfeed.verify(path).notes == []


def test_an_interrupt_inside_fdopen_ends_the_writer_with_that_interrupt(tools, new_path, monkeypatch):
    """SIGTERM's handler (the demo's: sys.exit) can raise inside os.fdopen after its file object was
    made: that object closes the descriptor as the exception unwinds it. The shard file's cleanup
    then closes it again (EBADF), which used to replace the interrupt with a ShardWriteError (the
    demo exited 1 instead of 143, seen once in CI). The interrupt must come through, and the shard
    file must go."""
    from shardfeed import shardfile
    path = new_path()
    real_fdopen = os.fdopen
    calls = []

    def fdopen_then_interrupted(fd, *args, **kwargs):
        calls.append(fd)
        real_fdopen(fd, *args, **kwargs).close()  # as the file object does when it goes
        raise KeyboardInterrupt

    writer = shardfeed.Writer(path, {"x": ("float32", (4,))})
    monkeypatch.setattr(shardfile.os, "fdopen", fdopen_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        writer.extend({"x": np.zeros((3, 4), np.float32)})
    monkeypatch.undo()
    assert calls
    assert not [name for name in os.listdir(path) if name.endswith(".rec")]
    with shardfeed.open(path) as ds:
        assert len(ds) == 0
