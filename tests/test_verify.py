"""shardfeed.verify / Dataset.verify / `shardfeed verify`: every shard's checksum and structure,
naming the bad shards and, where the structure shows them, the bad samples."""

import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import shardfeed
from shardfeed.cli import main
from shardfeed.format import HEADER_BYTES, MANIFEST_NAME
from shardfeed.writer import LOCK_NAME

N = 40
RECORD = 32  # x: float16[4] at 0, ok: bool at 8, t: descriptor at 16


@pytest.fixture
def dataset(new_path):
    """40 samples, 10 per shard: x float16[4], ok bool, t int32[None] (sample i has i % 5 rows)."""
    path = new_path()
    columns = {"x": np.arange(N * 4, dtype=np.float16).reshape(N, 4), "ok": np.arange(N) % 3 == 0,
               "t": [np.full(i % 5, i, np.int32) for i in range(N)]}
    with shardfeed.Writer(path, fields={"x": ("float16", (4,)), "ok": "bool", "t": ("int32", (None,))},
                          shard_size=HEADER_BYTES + 10 * RECORD) as w:
        w.extend(columns)
    return path


def shard(path, number, ext=".rec"):
    return os.path.join(path, f"shard-{number:06d}{ext}")


def patch(file, offset, data):
    with open(file, "r+b") as f:
        f.seek(offset)
        f.write(data)


def record_at(sample_in_shard, field_offset=0):
    return HEADER_BYTES + sample_in_shard * RECORD + field_offset


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "shardfeed", "verify", *args], capture_output=True, text=True,
                          timeout=60)


def test_an_intact_dataset_is_ok(dataset, capfd):
    report = shardfeed.verify(dataset)
    assert report.ok and report.problems == [] and report.notes == []
    assert (report.num_samples, report.num_shards, report.bad_shards, report.bad_ranges) == (N, 4, [], [])
    np.testing.assert_array_equal(report.good_indices(), np.arange(N))
    assert str(report) == f"{dataset}: ok, {N} samples in 4 shard(s)"
    assert shardfeed.open(dataset).verify().ok
    assert main(["verify", dataset]) == 0
    assert capfd.readouterr().out == f"{dataset}: ok, {N} samples in 4 shard(s)\n"
    assert main(["verify", "--json", dataset]) == 0
    doc = json.loads(capfd.readouterr().out)
    assert doc["ok"] is True and doc["num_samples"] == N and doc["problems"] == []


def test_a_changed_byte_marks_its_shard_in_an_old_dataset(dataset, capfd, tools):
    """A dataset without per-record checksums (format version 1): the whole shard is suspect.
    (tests/test_record_checksums.py: with them, exactly the damaged sample is named.)"""
    tools.as_format_v1(dataset)
    patch(shard(dataset, 2), record_at(3), b"\x55")  # inside x of sample 23: only the checksum can tell
    report = shardfeed.verify(dataset)
    assert not report.ok and report.bad_shards == [2] and report.bad_ranges == [(20, 30)]
    [problem] = report.problems
    assert problem.file == shard(dataset, 2) and problem.shard == 2 and problem.samples == [(20, 30)]
    assert "does not match the manifest's crc32:" in problem.message and "suspect" in problem.message
    np.testing.assert_array_equal(report.good_indices(), np.r_[0:20, 30:40])
    assert report.num_bad_samples == 10
    assert main(["verify", dataset]) == 1
    out = capfd.readouterr().out
    assert f"1 problem(s) in shard(s) [2]; 10 of {N} samples bad or suspect" in out and shard(dataset, 2) in out
    # what the report offers for training on the rest: a view without the bad shard
    rest = shardfeed.open(dataset).subset(report.good_indices())
    assert len(rest) == 30


def test_a_corrupt_descriptor_names_the_sample(dataset):
    patch(shard(dataset, 1), record_at(4, 16 + 8), (10 ** 6).to_bytes(8, "little"))  # sample 14: a million rows
    report = shardfeed.verify(dataset)
    exact = [p for p in report.problems if "points outside its heap file" in p.message]
    assert len(exact) == 1 and exact[0].samples == [(14, 15)] and exact[0].file == shard(dataset, 1)
    assert exact[0].message == "sample 14: variable field 't' points outside its heap file"
    [checksum] = [p for p in report.problems if "CRC32C" in p.message]  # and its record checksum
    assert checksum.samples == [(14, 15)] and checksum.message.startswith("sample 14: record failed")
    assert report.bad_shards == [1] and len(report.problems) == 2 and report.bad_ranges == [(14, 15)]
    assert str(report).count("sample 14") == 2  # the heap file is not blamed for what a damaged record points at


def test_a_bad_bool_names_the_samples(dataset):
    patch(shard(dataset, 3), record_at(2, 8), b"\x02")
    patch(shard(dataset, 3), record_at(5, 8), b"\xff")
    report = shardfeed.verify(dataset)
    [exact] = [p for p in report.problems if "bool" in p.message]
    assert exact.message == "samples 32, 35: bool field 'ok' holds values other than 0 and 1"
    assert exact.samples == [(32, 33), (35, 36)]


def test_a_truncated_record_file(dataset):
    os.truncate(shard(dataset, 0), record_at(6) + 5)  # 6 whole records and part of the 7th
    report = shardfeed.verify(dataset)
    messages = [p.message for p in report.problems]
    assert f"file is {record_at(6) + 5} bytes, the manifest says {record_at(10)} (truncated)" in messages
    [missing] = [p for p in report.problems if "missing" in p.message]
    assert missing.message.startswith("the records of samples 6-9 are missing") and missing.samples == [(6, 10)]
    assert report.bad_ranges == [(0, 10)]  # the checksum puts the rest in doubt too


def test_a_truncated_heap_names_the_samples_it_lost(dataset):
    # shard 1's heap holds samples 10..19 with 0,1,2,3,4,0,1,2,3,4 rows of 4 bytes; keep 6 rows
    os.truncate(shard(dataset, 1, ".var"), HEADER_BYTES + 6 * 4)
    report = shardfeed.verify(dataset)
    [cut] = [p for p in report.problems if "past the end" in p.message]
    assert cut.file == shard(dataset, 1, ".var")
    assert cut.samples == [(14, 15), (16, 20)]  # sample 13 ends exactly at row 6; 15 has no rows
    assert cut.message == ("samples 14, 16-19: the rows of variable field 't' are past the end of the "
                           "truncated file")


@pytest.mark.parametrize("damage, message", [
    (lambda p: os.remove(shard(p, 2)), "cannot open: No such file or directory"),
    (lambda p: os.remove(shard(p, 2, ".var")), "cannot open: No such file or directory"),
    (lambda p: patch(shard(p, 2), 0, b"NOTSHARD"), "not a shardfeed shard"),
    (lambda p: patch(shard(p, 2, ".var"), 8, b"\x07"), "shard format version 7"),
])
def test_unreadable_shards_are_bad_as_a_whole(dataset, damage, message):
    damage(dataset)
    report = shardfeed.verify(dataset)
    assert report.bad_shards == [2] and report.bad_ranges == [(20, 30)]
    assert any(message in p.message for p in report.problems), [p.message for p in report.problems]


def test_extra_data_and_several_bad_shards(dataset):
    with open(shard(dataset, 3), "ab") as f:
        f.write(b"\0" * 7)
    patch(shard(dataset, 0, ".var"), HEADER_BYTES + 1, b"\x01")  # the first row: sample 1's (sample 0 has none)
    report = shardfeed.verify(dataset)
    assert report.bad_shards == [0, 3] and report.bad_ranges == [(1, 2), (30, 40)]
    assert any(p.message.endswith("(extra data)") for p in report.problems)


def test_an_unreadable_manifest(dataset, capfd):
    with open(os.path.join(dataset, MANIFEST_NAME), "w") as f:
        f.write('{"format": "shardfeed", "version": 1}')
    report = shardfeed.verify(dataset)
    assert not report.ok and report.bad_shards == [] and report.num_samples == 0
    [problem] = report.problems
    assert problem.file == os.path.join(dataset, MANIFEST_NAME)
    assert problem.message.startswith("cannot read the manifest: unknown keys [] / missing keys")
    assert main(["verify", dataset]) == 1
    assert "cannot read the manifest" in capfd.readouterr().out


def test_no_dataset_here(new_path):
    path = new_path()
    report = shardfeed.verify(path)
    assert not report.ok and report.problems[0].message == "no such directory: not a dataset"
    assert str(report) == f"{path}: 1 problem(s)\n  {path}: no such directory: not a dataset"
    done = run_cli(path)
    assert done.returncode == 1 and "no such directory" in done.stdout and "0 of 0" not in done.stdout
    os.makedirs(path)  # a directory without a manifest
    report = shardfeed.verify(path)
    assert report.problems[0].message == "cannot read the manifest: No such file or directory"
    assert str(report).splitlines()[0] == f"{path}: 1 problem(s)"


def test_cli_usage_errors_exit_2(dataset):
    assert run_cli().returncode == 2
    done = run_cli("--no-such-option", dataset)
    assert done.returncode == 2 and "unrecognized arguments" in done.stderr
    with pytest.raises(SystemExit) as info:
        main(["verify"])
    assert info.value.code == 2


def test_cli_exit_status_from_a_subprocess(dataset):
    assert run_cli(dataset).returncode == 0
    patch(shard(dataset, 1), record_at(0), b"\x01\x02")
    done = run_cli("--json", dataset)
    assert done.returncode == 1 and json.loads(done.stdout)["bad_shards"] == [1]


def test_dataset_verify_checks_the_shards_it_opened(dataset):
    ds = shardfeed.open(dataset)
    with shardfeed.Writer(dataset, mode="a") as w:  # appended after the open: not part of ds
        w.extend({"x": np.zeros((5, 4)), "ok": np.ones(5, bool), "t": [np.arange(2)] * 5})
    patch(shard(dataset, 4), record_at(0), b"\x01")
    assert ds.verify().ok and ds.verify().num_samples == N
    assert shardfeed.verify(dataset).bad_shards == [4]


def test_reading_in_small_pieces_gives_the_same_report(dataset, monkeypatch):
    patch(shard(dataset, 1), record_at(7, 8), b"\x03")
    whole = shardfeed.verify(dataset).to_json()
    monkeypatch.setattr(importlib.import_module("shardfeed.verification"), "_CHUNK_BYTES", RECORD * 3)
    assert shardfeed.verify(dataset).to_json() == whole
    assert [p["samples"] for p in whole["problems"] if "bool" in p["message"]] == [[[17, 18]]]


def test_notes_on_writers(dataset):
    # a writer at work: its lock is held, its shard is not listed yet
    with shardfeed.Writer(dataset, mode="a", shard_size=HEADER_BYTES + 10 * RECORD) as w:
        w.extend({"x": np.zeros((3, 4)), "ok": np.ones(3, bool), "t": [np.arange(2)] * 3})
        w._shard.records.file.flush()
        report = shardfeed.verify(dataset)
        assert report.ok
        assert report.notes == [f"a writer (pid {os.getpid()}) is at work: samples after the {N} committed are not "
                                "listed yet",
                                "uncommitted files ['shard-000004.crc', 'shard-000004.rec', 'shard-000004.var']: ignored by readers, "
                                "removed by the next Writer(path, mode='a')"]
    # the leftovers of a writer that was killed: its pid in a lock file nobody holds
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with open(os.path.join(dataset, LOCK_NAME), "w") as f:
        f.write(f"{pid} {os.uname().nodename}\n")
    with open(shard(dataset, 5), "wb") as f:
        f.write(b"SHRDFEED")
    report = shardfeed.verify(dataset)
    assert report.ok and report.notes[0] == (f"the writer pid {pid} did not finish (killed?): the dataset holds the "
                                             f"{N + 3} samples it committed")
    assert "uncommitted files ['shard-000005.rec']" in report.notes[1]
    with pytest.warns(shardfeed.ShardfeedWarning, match=f"pid {pid} .*removed its uncommitted files "
                                                        r"\['shard-000005.rec'\]"):
        shardfeed.Writer(dataset, mode="a").close()
    assert shardfeed.verify(dataset).notes == []


def test_an_io_error_while_reading_is_reported_not_raised(dataset, monkeypatch):
    """EIO half-way through a shard (a failing disk): a problem for that shard, the others checked."""
    module = importlib.import_module("shardfeed.verification")

    class Failing:
        def __init__(self, file):
            self.file, self.reads = open(file, "rb"), 0

        def read(self, size=-1):
            self.reads += 1
            if self.reads > 3:  # the header (twice), then one piece of 4 records
                raise OSError(5, "Input/output error")
            return self.file.read(size)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    real_open = module._open_shard_file

    def fake_open(file):
        return Failing(file) if file == shard(dataset, 1) else real_open(file)
    monkeypatch.setattr(module, "_CHUNK_BYTES", RECORD * 4)
    monkeypatch.setattr(module, "_open_shard_file", fake_open)
    report = shardfeed.verify(dataset)
    assert report.bad_shards == [1] and report.bad_ranges == [(10, 20)]
    [problem] = report.problems
    assert problem.message == "cannot read past sample 14: Input/output error"


def test_sample_ranges_are_described_by_one_formatter():
    """The problems' texts (structure and per-record checksums) come from one formatter."""
    from shardfeed.verification import describe_samples

    assert describe_samples([(14, 15)]) == "sample 14"
    assert describe_samples([(14, 15), (16, 20)]) == "samples 14, 16-19"
    assert describe_samples([(50, 52)], with_count=True) == "samples 50-51 (2 samples)"
    assert describe_samples([(23, 24)], with_count=True) == "sample 23"
    many = [(k, k + 1) for k in range(0, 24, 2)]  # 12 single samples: the first 10 shown, then the count
    assert describe_samples(many) == "samples 0, 2, 4, 6, 8, 10, 12, 14, 16, 18 ... (12 samples)"
    assert describe_samples(many, with_count=True) == describe_samples(many)
    assert shardfeed.verify is shardfeed.verification.verify and callable(shardfeed.verify)
