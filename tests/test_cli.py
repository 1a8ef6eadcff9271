"""The data commands of the installed ``shardfeed`` entry point, run as subprocesses: convert, info,
head, merge, bench, their --help, --quiet, output when not on a terminal (no progress bar) and
on one (a progress bar), and exit codes (0 success, 1 data error, 2 usage error)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import shardfeed

BIN = os.path.dirname(sys.executable)
SHARDFEED = os.path.join(BIN, "shardfeed")


def run(*args, timeout=60, **kwargs):
    return subprocess.run([SHARDFEED, *map(str, args)], capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture
def npy(tmp_path, rng):
    x = rng.standard_normal((300, 8))
    y = rng.integers(0, 3, 300)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    return x, y


@pytest.fixture
def dataset(tmp_path, npy):
    done = run("convert", f"x={tmp_path / 'x.npy'}", f"label={tmp_path / 'y.npy'}", "-o", tmp_path / "d",
               "--metadata", '{"classes": ["cat", "dog", "eel"]}', "--shard-size", "8K", "-q")
    assert done.returncode == 0, done.stderr
    return tmp_path / "d"


def test_entry_point_is_installed_next_to_the_interpreter():
    assert os.access(SHARDFEED, os.X_OK), SHARDFEED
    done = run("--help")
    assert done.returncode == 0
    for command in ("convert", "info", "head", "merge", "bench", "verify", "demo"):
        assert command in done.stdout
    module = subprocess.run([sys.executable, "-m", "shardfeed", "head", "--help"], capture_output=True, text=True,
                            timeout=60)
    assert module.returncode == 0 and "--start" in module.stdout


@pytest.mark.parametrize("command, expected", [
    ("convert", ["SOURCE", "--field", "--dtype", "--label", "--labels", "--on-error", "--overflow", "--workers",
                 "--part", "--quiet", "Exit status: 0 success, 1 data error, 2 usage error", "shardfeed convert"]),
    ("info", ["--json", "--shards"]),
    ("head", ["-n", "--start", "--fields", "--json"]),
    ("merge", ["PART", "--output", "--move", "--metadata", "without copying"]),
    ("bench", ["--batch-size", "--seconds", "--no-cold", "numpy.memmap", "page-cached", "cold"]),
])
def test_every_command_has_a_helpful_help(command, expected):
    done = run(command, "--help")
    assert done.returncode == 0 and done.stderr == ""
    for text in expected:
        assert text in done.stdout, (command, text)


def test_convert_npy_prints_a_report_and_no_progress_bar_when_not_on_a_terminal(tmp_path, npy, tools):
    x, y = npy
    done = run("convert", f"x={tmp_path / 'x.npy'}", f"y={tmp_path / 'y.npy'}", "-o", tmp_path / "d",
               "--dtype", "x=float16")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", "progress bars are for terminals only"
    assert "wrote 300 samples" in done.stdout and "x: float64 -> float16[8]: 2,400 values, rel error <= " in done.stdout
    batch = shardfeed.open(tmp_path / "d").read(np.arange(300))
    tools.assert_identical(batch["x"], x.astype(np.float16))
    tools.assert_identical(batch["y"], y)


def test_convert_quiet_and_json(tmp_path, npy):
    quiet = run("convert", tmp_path / "x.npy", "-o", tmp_path / "q", "-q")
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    report = run("convert", tmp_path / "x.npy", "-o", tmp_path / "j", "--json", "--dtype", "bfloat16")
    doc = json.loads(report.stdout)
    assert doc["num_samples"] == 300 and doc["fields"][0]["dtype"] == "bfloat16" and doc["fields"][0]["measured"]
    assert 0 < doc["fields"][0]["max_rel_error"] <= 2 ** -8


def test_convert_csv_bad_row_is_a_data_error(tmp_path):
    (tmp_path / "a.csv").write_text("u,v,label\n1,2,0\n3,x,1\n5,6,1\n")
    done = run("convert", tmp_path / "a.csv", "-o", tmp_path / "d", "--label", "label")
    assert done.returncode == 1 and done.stdout == ""
    assert f"{tmp_path / 'a.csv'}, line 3: column 'v': 'x' is not a number" in done.stderr
    assert "Traceback" not in done.stderr and not os.path.exists(tmp_path / "d")
    skipped = run("convert", tmp_path / "a.csv", "-o", tmp_path / "d", "--label", "label", "--on-error", "skip")
    assert skipped.returncode == 0 and "skipped 1 bad rows" in skipped.stdout
    assert len(shardfeed.open(tmp_path / "d")) == 2


@pytest.mark.parametrize("args, message", [
    (["nothing.xyz", "-o", "o"], "cannot tell what kind of source"),
    (["x.npy"], "the following arguments are required: -o/--output"),
    (["x.npy", "-o", "o", "--dtype", "float128"], "unknown dtype 'float128'"),
    (["x.npy", "-o", "o", "--part", "4/4"], "expected K/N with 0 <= K < N"),
    (["x.npy", "-o", "o", "--label", "y"], "--label applies to csv sources, not npy"),
    (["x.npy", "-o", "o", "--shard-size", "lots"], "not a size"),
    (["x.npy", "-o", "o", "--metadata", "[1]"], "metadata must be a JSON object"),
    (["x.npy", "-o", "o", "--workers", "2", "--part", "0/2"], "--workers and --part do not go together"),
    (["a.csv", "-o", "o", "--field", "x"], "--field expects NAME=VALUE"),
    (["x.npy", "-o", "o", "--overflow", "wrap"], "invalid choice: 'wrap'"),
])
def test_convert_usage_errors_exit_2(tmp_path, npy, args, message):
    (tmp_path / "a.csv").write_text("u,v\n1,2\n")
    done = run("convert", *args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr and "usage: shardfeed convert" in done.stderr


def test_convert_images_hdf5_and_workers(tmp_path, rng, tools):
    Image = pytest.importorskip("PIL.Image")
    h5py = pytest.importorskip("h5py")
    for label in ("a", "b"):
        os.makedirs(tmp_path / "img" / label)
        for i in range(3):
            Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).save(tmp_path / "img" / label / f"{i}.png")
    done = run("convert", tmp_path / "img", "-o", tmp_path / "i", "--labels", "folders", "--size", "8x6",
               "--channels-first")
    assert done.returncode == 0, done.stderr
    ds = shardfeed.open(tmp_path / "i")
    assert ds.fields["image"].shape == (3, 6, 8) and ds.metadata["classes"] == ["a", "b"] and len(ds) == 6
    ds.close()
    with h5py.File(tmp_path / "a.h5", "w") as f:
        f.create_dataset("grp/feat", data=np.arange(40.0).reshape(20, 2))
    done = run("convert", tmp_path / "a.h5", "-o", tmp_path / "h", "--field", "x=/grp/feat", "--workers", "2")
    assert done.returncode == 0, done.stderr
    assert "2 parts merged" in done.stdout
    tools.assert_identical(shardfeed.open(tmp_path / "h").read(np.arange(20))["x"], np.arange(40.0).reshape(20, 2))


def test_convert_missing_input_is_a_data_error(tmp_path):
    done = run("convert", tmp_path / "missing.npy", "-o", tmp_path / "d")
    assert done.returncode == 1 and "No such file" in done.stderr and "Traceback" not in done.stderr


def test_info_shows_schema_counts_shards_and_metadata(dataset):
    done = run("info", dataset)
    assert done.returncode == 0, done.stderr
    assert "300 samples in" in done.stdout and "shards: " in done.stdout
    assert "  x: float64[8]" in done.stdout and "  label: int64[]" in done.stdout
    assert '"classes": ["cat", "dog", "eel"]' in done.stdout
    listing = run("info", dataset, "--shards")
    assert listing.stdout.count("shard-0") == shardfeed.open(dataset).num_shards > 1
    assert json.loads(run("info", dataset, "--json").stdout)["num_samples"] == 300
    missing = run("info", dataset.parent / "nothing")
    assert missing.returncode == 1 and "error:" in missing.stderr


def test_head_prints_samples_readably(dataset, npy):
    x, y = npy
    done = run("head", dataset, "-n", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].endswith("300 samples; showing 0..1")
    assert lines[1] == "[0]" and lines[2].startswith("  x      float64[8]  [")
    assert "(min " in lines[2] or len(x[0]) <= 12
    assert lines[3] == f"  label  int64[]  {y[0]} ({['cat', 'dog', 'eel'][y[0]]})"
    tail = run("head", dataset, "--start", "-1", "--fields", "label", "--json")
    doc = json.loads(tail.stdout)
    assert doc == {"index": 299, "label": int(y[299])}
    full = [json.loads(line) for line in run("head", dataset, "-n", "3", "--json").stdout.splitlines()]
    np.testing.assert_array_equal([d["x"] for d in full], x[:3])
    bad = run("head", dataset, "--fields", "nope")
    assert bad.returncode == 2 and "no field 'nope'" in bad.stderr


@pytest.mark.parametrize("command", [["head", "-n", "300"], ["info", "--shards"], ["head", "-n", "300", "--json"]])
def test_output_into_a_closed_pipe_ends_quietly(dataset, command):
    """`shardfeed info DS --shards | head -1`: the command stops without a word, with the status of a
    tool that SIGPIPE ended (141), every time (the pipe closed before or while it writes)."""
    for attempt in range(5):
        proc = subprocess.Popen([SHARDFEED, command[0], str(dataset), *command[1:]], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        if attempt % 2:
            proc.stdout.readline()
        proc.stdout.close()  # before the first line on even attempts: the very first write fails
        err = proc.stderr.read().decode()
        proc.stderr.close()
        status = proc.wait(timeout=60)
        # closed before the first write: always 141; after a line, 0 when the rest fitted in the pipe
        assert status == 141 or (attempt % 2 and status == 0), (status, err)
        assert err == "", err
    # through a shell pipeline, as a user types it
    done = subprocess.run(f"'{SHARDFEED}' {command[0]} '{dataset}' {' '.join(command[1:])} | head -1; "
                          "echo \"status ${PIPESTATUS[0]}\"", shell=True, executable="/bin/bash", capture_output=True,
                          text=True, timeout=60)
    assert done.stderr == "" and done.stdout.splitlines()[-1] in ("status 141", "status 0"), done


def test_merge_command(tmp_path, npy, tools):
    x, _ = npy
    for k in range(3):
        done = run("convert", tmp_path / "x.npy", "-o", tmp_path / f"part-{k}", "--part", f"{k}/3", "-q")
        assert done.returncode == 0, done.stderr
    parts = [tmp_path / f"part-{k}" for k in range(3)]
    done = run("merge", *parts, "-o", tmp_path / "all")
    assert done.returncode == 0, done.stderr
    assert "300 samples in 3 shard(s) from 3 part(s), linked without copying" in done.stdout
    tools.assert_identical(shardfeed.open(tmp_path / "all").read(np.arange(300))["x"], x)
    again = run("merge", *parts, "-o", tmp_path / "all")
    assert again.returncode == 1 and "already exists" in again.stderr
    run("convert", tmp_path / "y.npy", "-o", tmp_path / "other", "-q")
    mismatch = run("merge", tmp_path / "part-0", tmp_path / "other", "-o", tmp_path / "bad")
    assert mismatch.returncode == 1 and "differ from those of" in mismatch.stderr
    moved = run("merge", *parts, "-o", tmp_path / "moved", "--move", "-q")
    assert moved.returncode == 0 and moved.stdout == "" and not any(os.path.exists(p) for p in parts)
    assert run("merge", "-o", tmp_path / "x").returncode == 2


def test_bench_measures_page_cached_and_cold_against_memmap(dataset):
    done = run("bench", dataset, "--seconds", "0.05", "--batch-size", "64", "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["samples"] == 300 and result["same_values_as_memmap"] is True
    seen = {(e["condition"], e["reader"]) for e in result["results"]}
    assert {("page-cached", "shardfeed"), ("page-cached", "memmap")} <= seen
    if hasattr(os, "posix_fadvise"):
        assert {("cold", "shardfeed"), ("cold", "memmap")} <= seen
    for entry in result["results"]:
        assert entry["samples_per_s"] > 0 and entry["ratio_to_memmap"] > 0
    text = run("bench", dataset, "--seconds", "0.02", "--no-cold")
    assert text.returncode == 0 and "page-cached  shardfeed" in text.stdout and "as many samples/s as numpy.memmap" \
        in text.stdout and "cold" not in text.stdout
    assert run("bench", dataset, "--seconds", "0.02", "-q").stdout == ""


def test_bench_without_memmap_for_variable_length_fields(tmp_path):
    from shardfeed import convert
    convert.from_iterable(tmp_path / "v", ({"t": np.arange(i % 5)} for i in range(50)), fields={"t": ("int64", (None,))})
    done = run("bench", tmp_path / "v", "--seconds", "0.02", "--json", "--no-cold")
    result = json.loads(done.stdout)
    assert done.returncode == 0 and result["memmap"].startswith("no: variable-length")
    assert [e["reader"] for e in result["results"]] == ["shardfeed"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pty progress check written for Linux")
def test_progress_bar_on_a_terminal_and_quiet_turns_it_off(tmp_path, npy):
    pytest.importorskip("tqdm")
    import fcntl
    import pty
    import struct
    import termios

    def on_a_terminal(*args):
        pid, fd = pty.fork()
        if pid == 0:  # child: stdout and stderr are an 80-column terminal
            fcntl.ioctl(1, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
            os.execv(SHARDFEED, [SHARDFEED, *map(str, args)])
        output = b""
        while True:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        os.close(fd)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), output.decode(errors="replace")

    code, output = on_a_terminal("convert", tmp_path / "x.npy", "-o", tmp_path / "t", "--chunk-size", "1K")
    assert code == 0 and "converting" in output and "B/s" in output and "wrote 300 samples" in output
    code, output = on_a_terminal("convert", tmp_path / "x.npy", "-o", tmp_path / "q", "--quiet")
    assert code == 0 and output.strip() == ""
