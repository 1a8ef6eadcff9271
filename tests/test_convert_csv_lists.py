"""CSV cells holding lists of numbers ("607 2214 9 ...") stored as variable-length fields, in Python
(``lists=``) and on the command line (``--list-field``, ``--list-sep``): values, lengths, dtypes,
separators, empty cells, bad items named by file and line, parts."""

import os
import subprocess
import sys

import numpy as np
import pytest

import shardfeed
from shardfeed import convert

SHARDFEED = os.path.join(os.path.dirname(sys.executable), "shardfeed")


def run(*args, **kwargs):
    return subprocess.run([SHARDFEED, *map(str, args)], capture_output=True, text=True, timeout=120, **kwargs)


def write_histories(root, rng, files=3, rows=40, separator=" "):
    """Numbered CSV files 1.csv .. N.csv: user, history (a list), age, next, rating. Returns the rows."""
    os.makedirs(root, exist_ok=True)
    expected = []
    for k in range(1, files + 1):
        lines = ["user,history,age,next,rating"]
        for _ in range(rows):
            history = rng.integers(0, 30000, rng.integers(0, 12))
            row = (int(rng.integers(1e6)), history, int(rng.integers(18, 90)), int(rng.integers(0, 30000)),
                   float(rng.uniform(0, 5)))
            cell = separator.join(map(str, history))
            lines.append(f'{row[0]},"{cell}",{row[2]},{row[3]},{row[4]!r}')
            expected.append(row)
        (root / f"{k}.csv").write_text("\n".join(lines) + "\n")
    return expected


def stored(path, field):
    with shardfeed.open(path) as ds:
        return [ds[i][field] for i in range(len(ds))]


def test_list_cells_become_a_variable_length_field(tmp_path, rng, tools):
    rows = write_histories(tmp_path / "csv", rng, files=11)  # 1..11: natural order puts 10 after 9
    report = convert.from_csv(tmp_path / "d", tmp_path / "csv" / "*.csv", lists=["history"],
                              fields={"history": "history", "age": "age", "next": "next", "rating": "rating"},
                              dtypes={"history": "int32", "age": "uint8", "next": "int64"}, chunk_bytes=300)
    ds = shardfeed.open(tmp_path / "d")
    assert list(ds.fields) == ["history", "age", "next", "rating"]
    assert ds.fields["history"].shape == (None,) and ds.fields["history"].dtype == "int32"
    histories = stored(tmp_path / "d", "history")
    assert len(histories) == len(rows) == report.num_samples
    for got, row in zip(histories, rows):
        tools.assert_identical(got, row[1].astype(np.int32))
    batch = ds.read(np.arange(len(ds)), maxlen=5, pad_value=-1)
    expected = np.full((len(rows), 5), -1, np.int32)
    for i, row in enumerate(rows):
        expected[i, :min(5, len(row[1]))] = row[1][:5]
    tools.assert_identical(batch["history"], expected)
    tools.assert_identical(batch["age"], np.array([r[2] for r in rows], np.uint8))
    tools.assert_identical(batch["rating"], np.array([r[4] for r in rows], np.float32))
    assert "history: int64 -> int32[*]" in str(report)


def test_on_the_command_line_with_one_command(tmp_path, rng, tools):
    rows = write_histories(tmp_path / "csv", rng)
    done = run("convert", tmp_path / "csv" / "*.csv", "--list-field", "history", "--dtype", "history=int32",
               "--field", "age=age", "--field", "rating=rating", "--label", "next", "-o", tmp_path / "d")
    assert done.returncode == 0, done.stderr
    with shardfeed.open(tmp_path / "d") as ds:
        assert sorted(ds.fields) == ["age", "history", "label", "rating"]
        tools.assert_identical(ds.read(np.arange(len(ds)))["label"], np.array([r[3] for r in rows]))
    for got, row in zip(stored(tmp_path / "d", "history"), rows):
        tools.assert_identical(got, row[1].astype(np.int32))
    # without --field: every other column but the label goes to x, the list column does not
    plain = run("convert", tmp_path / "csv" / "*.csv", "--list-field", "history", "--label", "next",
                "-o", tmp_path / "p", "--json")
    assert plain.returncode == 0, plain.stderr
    with shardfeed.open(tmp_path / "p") as ds:
        assert ds.fields["x"].shape == (3,) and ds.fields["history"].dtype == "float32"
        tools.assert_identical(ds.read(np.arange(len(ds)))["x"],
                               np.array([[r[0], r[2], r[4]] for r in rows], np.float32))


@pytest.mark.parametrize("separator", [";", ",", "|"])
def test_a_separator_chosen_by_the_user(tmp_path, rng, tools, separator):
    rows = write_histories(tmp_path / "csv", rng, files=1, separator=separator)
    convert.from_csv(tmp_path / "d", tmp_path / "csv", fields={"h": "history"}, lists={"h": separator},
                     dtypes={"h": "float64"})
    for got, row in zip(stored(tmp_path / "d", "h"), rows):
        tools.assert_identical(got, row[1].astype(np.float64))
    done = run("convert", tmp_path / "csv", "--field", "h=history", "--list-field", "h", "--list-sep", separator,
               "--dtype", "h=int16", "-o", tmp_path / "c", "--workers", "2")
    assert done.returncode == 0, done.stderr
    for got, row in zip(stored(tmp_path / "c", "h"), rows):
        tools.assert_identical(got, row[1].astype(np.int16))


def test_bad_items_and_values_that_do_not_fit_are_named(tmp_path):
    (tmp_path / "a.csv").write_text('id,h\n1,"1 2 3"\n2,""\n3,"4 x5 6"\n4,"70000"\n')
    with pytest.raises(shardfeed.SourceError, match=r"a.csv, line 4: column 'h': item 'x5' is not an integer"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", fields={"h": "h"}, lists=["h"], dtypes={"h": "int32"})
    assert not os.path.exists(tmp_path / "d")
    report = convert.from_csv(tmp_path / "d", tmp_path / "a.csv", fields={"h": "h"}, lists=["h"],
                              dtypes={"h": "int32"}, on_error="skip")
    assert report.skipped == 1 and [list(h) for h in stored(tmp_path / "d", "h")] == [[1, 2, 3], [], [70000]]
    with pytest.raises(shardfeed.ValueRangeError, match=r"a.csv, line 5: .*field 'h'"):
        convert.from_csv(tmp_path / "e", tmp_path / "a.csv", fields={"h": "h"}, lists=["h"], dtypes={"h": "int16"},
                         on_error="skip")
    done = run("convert", tmp_path / "a.csv", "--list-field", "h", "--dtype", "h=int32", "-o", tmp_path / "c")
    assert done.returncode == 1 and "line 4: column 'h': item 'x5' is not an integer (--on-error skip" in done.stderr


def test_list_options_are_checked(tmp_path):
    (tmp_path / "a.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(shardfeed.SchemaError, match="list field 'v': takes one column"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", fields={"v": ["a", "b"]}, lists=["v"])
    with pytest.raises(shardfeed.SchemaError, match="no column 'q'"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", lists=["q"])
    with pytest.raises(ValueError, match="the separator must be a non-empty string"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", lists={"a": ""})
    np.save(tmp_path / "x.npy", np.zeros(2))
    done = run("convert", tmp_path / "x.npy", "--list-field", "a", "-o", tmp_path / "o")
    assert done.returncode == 2 and "--list-field applies to csv sources, not npy" in done.stderr


def test_list_cells_with_named_classes_and_mixed_kinds_in_one_chunk(tmp_path, tools):
    (tmp_path / "a.csv").write_text('kind,h,w,n\ncat,"1 2",0.5,7\ndog,"",1.5,8\ncat,"3",2.5,9\n')
    convert.from_csv(tmp_path / "d", tmp_path / "a.csv", fields={"h": "h", "w": "w", "n": "n"}, lists=["h"],
                     label="kind", classes="auto", dtypes={"h": "int64", "w": "float64", "n": "uint16"})
    with shardfeed.open(tmp_path / "d") as ds:
        batch = ds.read(np.arange(3))
        assert ds.metadata["classes"] == ["cat", "dog"]
    tools.assert_identical(batch["label"], np.array([0, 1, 0]))
    tools.assert_identical(batch["w"], np.array([0.5, 1.5, 2.5]))
    tools.assert_identical(batch["n"], np.array([7, 8, 9], np.uint16))
    tools.assert_identical(batch["h"], np.array([[1, 2], [0, 0], [3, 0]]))
    tools.assert_identical(batch.lengths["h"], np.array([2, 0, 1]))
