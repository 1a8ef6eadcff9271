"""Fuzzing of dataset directories (fuzz/fuzz_layout.py): FIFOs, directories, symbolic and hard
links in every position, huge claimed counts, shapes numpy cannot represent, names that are not
UTF-8 or not encodable, irregular shard names; open, verify, append and merge must raise only
shardfeed's errors, never block, never write outside the dataset, never lose a committed sample."""

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import fuzz_targets

fuzz = fuzz_targets.load("fuzz_layout")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return fuzz.Target(str(tmp_path_factory.mktemp("fuzz-layout")))


def placing(position, kind, shard=1, mutations=1):
    return bytes([mutations, 1, fuzz.POSITIONS.index(position), fuzz.KINDS.index(kind), shard])


def editing(edit, *more):
    return bytes([1, 0, fuzz.EDITS.index(edit), *more])


# every position with every kind, and every manifest edit, once
ALL_CASES = ([placing(p, k) for p in fuzz.POSITIONS for k in fuzz.KINDS]
             + [editing(e, b, b) for e in fuzz.EDITS for b in range(4)])


@pytest.mark.parametrize("data", ALL_CASES, ids=lambda d: d.hex())
def test_every_position_kind_and_edit(target, data):
    target.run(data)


@given(data=st.binary(max_size=24))
@example(data=placing("lock", "link-victim"))
@example(data=placing("next-rec", "hard-link-victim"))
@example(data=editing("rename-shards"))
def test_random_layouts(target, data):
    target.run(data)


def test_the_oracles_catch_broken_code(target, monkeypatch):
    """The target is not vacuous: it finds a writer that writes through its lock file, a reader
    that blocks on a FIFO, and an append that truncates a listed shard."""
    import os

    from shardfeed import lock, manifest, shardfile, writer
    runs = dict(target.runs)
    target.run(b"")  # an unchanged dataset: opens, appends, merges
    assert target.runs["opened"] > runs["opened"] and target.runs["appended"] > runs["appended"]

    def through_link(self, directory):  # a lock opened the old way: O_CREAT without O_EXCL, followed
        self.path = os.path.join(directory, "writer.lock")
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT)
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"1 x\n", 0)
        self.fd, self.stale, self._finalizer = fd, None, None
    monkeypatch.setattr(lock.WriterLock, "__init__", through_link)
    with pytest.raises(fuzz.Finding, match="victim file outside the dataset was written"):
        target.run(placing("lock", "link-victim"))
    monkeypatch.undo()

    def blocking_open(path, what=""):
        return os.open(path, os.O_RDONLY)
    monkeypatch.setattr(manifest, "open_regular", blocking_open)
    real_deadline = fuzz._deadline
    monkeypatch.setattr(fuzz, "_deadline", lambda seconds: real_deadline(1))
    with pytest.raises(fuzz.Finding, match="blocked"):
        target.run(placing("manifest", "fifo"))
    monkeypatch.undo()

    monkeypatch.setattr(shardfile, "create_new", lambda path, mode=0o644: os.open(path, os.O_WRONLY | os.O_CREAT |
                                                                                os.O_TRUNC, mode))
    monkeypatch.setattr(writer.Writer, "_listed_names", lambda self: set())
    with pytest.raises(fuzz.Finding, match="an append changed committed samples|no longer opens"):
        target.run(editing("rename-shards"))
