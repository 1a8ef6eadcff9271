"""The command line speaks its own language: usage errors exit 2 with argparse's kind of message,
library messages name options (--append) rather than Python arguments (mode='a'), --version,
help without reStructuredText markup, dataset-provided strings escaped before they reach the
terminal, and an optional framework's absence named with the extra that installs it. Everything
runs the installed entry point in a subprocess, as a user does."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import shardfeed

SHARDFEED = os.path.join(os.path.dirname(sys.executable), "shardfeed")
PYTHON_TERMS = re.compile(r"mode='a'|metadata=|size=\(|overflow='|on_error=|dtypes=|sample_per_file|Writer\(")


def run(*args, **kwargs):
    return subprocess.run([SHARDFEED, *map(str, args)], capture_output=True, text=True, timeout=120, **kwargs)


@pytest.fixture
def dataset(tmp_path):
    np.save(tmp_path / "x.npy", np.arange(30.0).reshape(10, 3))
    done = run("convert", tmp_path / "x.npy", "-o", tmp_path / "d", "-q")
    assert done.returncode == 0, done.stderr
    return tmp_path / "d"


def assert_usage_error(done, *texts):
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "" and "usage: shardfeed" in done.stderr and "Traceback" not in done.stderr, done.stderr
    for text in texts:
        assert text in done.stderr, (text, done.stderr)


@pytest.mark.parametrize("args, texts", [
    (["-n", "0"], ["argument -n: expected an integer >= 1, got '0'"]),
    (["-n", "-3"], ["argument -n: expected an integer >= 1, got '-3'"]),
    (["--start", "10"], ["--start 10 is outside the dataset's 10 samples (0 to 9, or -10 to -1 from the end)"]),
    (["--start", "-11"], ["--start -11 is outside the dataset's 10 samples"]),
    (["--fields", "nope"], ["--fields: no field 'nope'; the dataset has x"]),
])
def test_head_usage_errors_exit_2(dataset, args, texts):
    assert_usage_error(run("head", dataset, *args), *texts)


def test_head_edges_that_are_not_errors(dataset):
    last = run("head", dataset, "--start", "-1", "--json")
    assert last.returncode == 0 and json.loads(last.stdout)["index"] == 9
    many = run("head", dataset, "-n", "100", "--start", "8")
    assert many.returncode == 0 and many.stdout.splitlines()[0].endswith("10 samples; showing 8..9")


def test_convert_dtype_for_a_field_the_source_lacks_lists_the_fields(tmp_path):
    (tmp_path / "a.csv").write_text("u,v,t\n1,2,0\n")
    done = run("convert", tmp_path / "a.csv", "-o", tmp_path / "o", "--label", "t", "--dtype", "wave=float16")
    assert_usage_error(done, "--dtype given for wave, which the source does not have; its fields are: x, label")
    assert not os.path.exists(tmp_path / "o")
    np.save(tmp_path / "w.npy", np.zeros((4, 2)))
    done = run("convert", f"wave={tmp_path / 'w.npy'}", "-o", tmp_path / "o", "--dtype", "x=float16")
    assert_usage_error(done, "its fields are: wave")


def test_convert_size_must_be_positive(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    os.makedirs(tmp_path / "img")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    for size in ("0x0", "5x0", "0x5", "axb", "5"):
        assert_usage_error(run("convert", tmp_path / "img", "-o", tmp_path / "o", "--size", size),
                           f"--size expects WIDTHxHEIGHT, both at least 1 (e.g. 64x64), got '{size}'")
    assert not os.path.exists(tmp_path / "o")


def test_messages_name_options_not_python_arguments(tmp_path, dataset):
    # a dataset exists: --append, not mode='a'
    again = run("convert", tmp_path / "x.npy", "-o", dataset)
    assert again.returncode == 1 and "use --append to add to it" in again.stderr, again.stderr
    # parts with different metadata: --metadata, not metadata=
    other = run("convert", tmp_path / "x.npy", "-o", tmp_path / "m", "--metadata", '{"k": 1}', "-q")
    assert other.returncode == 0
    merged = run("merge", dataset, tmp_path / "m", "-o", tmp_path / "all")
    assert merged.returncode == 1 and "pass --metadata to choose" in merged.stderr, merged.stderr
    # an overflow: --overflow saturate
    np.save(tmp_path / "big.npy", np.array([1.0, 1e6]))
    big = run("convert", tmp_path / "big.npy", "-o", tmp_path / "b", "--dtype", "float16")
    assert big.returncode == 1 and "pass --overflow saturate to store" in big.stderr, big.stderr
    # a bad CSV row: --on-error skip
    (tmp_path / "a.csv").write_text("u,v\n1,x\n")
    bad = run("convert", tmp_path / "a.csv", "-o", tmp_path / "c")
    assert bad.returncode == 1 and "(--on-error skip skips such rows)" in bad.stderr, bad.stderr
    for done in (again, merged, big, bad):
        assert not PYTHON_TERMS.search(done.stderr), done.stderr


def test_verify_notes_name_the_append_option(dataset):
    (dataset / "shard-000099.rec").write_bytes(b"left by a killed writer")
    done = run("verify", dataset)
    assert done.returncode == 0, done
    assert "removed by the next conversion with --append" in done.stdout and not PYTHON_TERMS.search(done.stdout)


def test_image_size_message_names_the_size_option(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    os.makedirs(tmp_path / "img")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(np.zeros((5, 4, 3), np.uint8)).save(tmp_path / "img" / "b.png")
    done = run("convert", tmp_path / "img", "-o", tmp_path / "o")
    assert done.returncode == 1 and "pass --size WxH to resize" in done.stderr and not PYTHON_TERMS.search(done.stderr)


def test_version():
    done = run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"shardfeed {shardfeed.__version__}"


@pytest.mark.parametrize("command", [[], ["demo"], ["info"], ["verify"], ["convert"], ["head"], ["merge"], ["bench"]])
def test_help_has_no_restructuredtext_markup(command):
    done = run(*command, "--help")
    assert done.returncode == 0 and done.stdout.startswith("usage: shardfeed")
    assert not re.search(r"``|:(func|meth|class|mod|attr):`", done.stdout), done.stdout


def test_dataset_provided_strings_are_escaped_before_the_terminal(tmp_path):
    """A manifest's field names, metadata and class names reach the terminal escaped: no ESC, BEL or
    bidirectional override in anything `info`, `head`, `verify` or `convert` print."""
    name = "a\x1b[2Jb"  # ESC [2J clears the screen
    meta = {"note": "x\x1b[31mred\u202ereversed", "classes": ["c\x1b]0;title\x07"]}
    with shardfeed.Writer(tmp_path / "d", fields={name: ("float32", (2,)), "label": ("int64", ())},
                          metadata=meta) as writer:
        writer.extend({name: np.zeros((3, 2)), "label": np.zeros(3, np.int64)})
    outputs = {}
    for args in (["info", tmp_path / "d"], ["info", tmp_path / "d", "--shards"], ["head", tmp_path / "d", "-n", "1"],
                 ["verify", tmp_path / "d"], ["head", tmp_path / "d", "--fields", "q\x1bz"]):
        done = run(*args)
        outputs[" ".join(map(str, args[2:])) or args[0]] = done
        text = done.stdout + done.stderr
        assert not any(c in text for c in "\x1b\x07\u202e"), repr(text)
    assert "a\\x1b[2Jb: float32[2]" in outputs["info"].stdout
    assert "\\u001b[31mred\\u202e" in outputs["info"].stdout  # JSON escapes of the metadata
    assert "a\\x1b[2Jb  float32[2]" in outputs["-n 1"].stdout and "(c\\x1b]0;title\\x07)" in outputs["-n 1"].stdout
    assert "no field 'q\\x1bz'" in outputs["--fields q\x1bz"].stderr
    # a converted source's names (an .npz member) in the report
    np.savez(tmp_path / "s.npz", **{"m\x1b[1m": np.zeros((2, 2))})
    done = run("convert", tmp_path / "s.npz", "-o", tmp_path / "n")
    assert done.returncode == 0 and "m\\x1b[1m: float64 -> float64[2]" in done.stdout and "\x1b" not in done.stdout


@pytest.mark.parametrize("module, framework, message", [
    ("shardfeed.keras", "keras", "shardfeed.keras needs Keras 3"),
    ("shardfeed.tf", "tensorflow", "shardfeed.tf (Dataset.to_tf_dataset) needs TensorFlow"),
])
def test_framework_module_without_its_framework_names_the_extra(module, framework, message):
    code = f"import sys; sys.modules[{framework!r}] = None; import {module}"  # as if it were not installed
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: " + message) and "pip install 'shardfeed[tensorflow]'" in last, done.stderr
