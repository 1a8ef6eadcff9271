"""CSV converter: columns -> fields, dtypes, several files, bad rows (error naming file and line, or
skipped and counted), quoting, blank lines, empty files, labels and classes, compressed files,
and parts that cover every row exactly once whatever the byte boundaries."""

import gzip
import os

import numpy as np
import pytest

import shardfeed
from shardfeed import convert


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


def write_csv(path, header, rows, newline="\n"):
    with open(path, "w", newline="") as f:
        if header is not None:
            f.write(",".join(header) + newline)
        for row in rows:
            f.write(",".join(map(str, row)) + newline)
    return path


def table(rng, n, k=4):
    values = np.round(rng.standard_normal((n, k)), 3)
    labels = rng.integers(0, 7, n)
    return values, labels


def csv_rows(values, labels):
    return [[*map(repr, v.tolist()), int(l)] for v, l in zip(values, labels)]


HEADER = ["f0", "f1", "f2", "f3", "label"]


def test_default_fields_and_label_round_trip(tmp_path, rng, tools):
    values, labels = table(rng, 300)
    write_csv(tmp_path / "a.csv", HEADER, csv_rows(values, labels))
    report = convert.from_csv(tmp_path / "d", tmp_path / "a.csv", label="label", dtypes={"x": "float64"},
                              chunk_bytes=1000)
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], values)
    tools.assert_identical(batch["label"], labels)
    assert report.num_samples == 300 and report.skipped == 0
    assert report.source_bytes == os.path.getsize(tmp_path / "a.csv") - len("f0,f1,f2,f3,label\n")


def test_chosen_columns_patterns_and_dtypes(tmp_path, rng, tools):
    values, labels = table(rng, 50)
    write_csv(tmp_path / "a.csv", HEADER, csv_rows(values, labels))
    report = convert.from_csv(tmp_path / "d", tmp_path / "a.csv",
                              fields={"x": "f[12]", "first": "f0", "pair": ["f3", "f0"], "y": "label"},
                              dtypes={"x": "float16", "first": "float32", "y": "uint8"})
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], values[:, 1:3].astype(np.float16))
    tools.assert_identical(batch["first"], values[:, 0].astype(np.float32))
    tools.assert_identical(batch["pair"], values[:, [3, 0]].astype(np.float32))
    tools.assert_identical(batch["y"], labels.astype(np.uint8))
    assert report.fields["x"].measured and report.fields["x"].max_rel_error <= 2 ** -11
    assert report.fields["x"].source_dtype == "float64" and report.fields["y"].source_dtype == "int64"


def test_many_files_sorted_naturally_with_empty_ones(tmp_path, rng, tools):
    data = tmp_path / "data"
    data.mkdir()
    chunks = []
    for i in range(12):
        n = 0 if i in (3, 7) else int(rng.integers(1, 40))
        values, labels = table(rng, n)
        chunks.append((values, labels))
        write_csv(data / f"{i}.csv", HEADER, csv_rows(values, labels))
    (data / "12.csv").write_text("")  # not even a header
    report = convert.from_csv(tmp_path / "d", str(data / "*.csv"), label="label", dtypes={"x": "float64"},
                              chunk_bytes=64)
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], np.concatenate([v for v, _ in chunks]))
    tools.assert_identical(batch["label"], np.concatenate([l for _, l in chunks]))
    convert.from_csv(tmp_path / "dir", data, label="label", dtypes={"x": "float64"})
    tools.assert_identical(read_all(tmp_path / "dir")["x"], batch["x"])
    assert report.num_samples == sum(len(l) for _, l in chunks)


def test_header_only_and_all_empty_inputs(tmp_path):
    write_csv(tmp_path / "h.csv", HEADER, [])
    convert.from_csv(tmp_path / "d", tmp_path / "h.csv", label="label")
    ds = shardfeed.open(tmp_path / "d")
    assert len(ds) == 0 and ds.fields["x"].shape == (4,) and ds.fields["label"].dtype == "int64"
    (tmp_path / "e.csv").write_text("\n\n")
    with pytest.raises(shardfeed.SourceError, match="every CSV file is empty"):
        convert.from_csv(tmp_path / "e1", tmp_path / "e.csv")
    convert.from_csv(tmp_path / "e2", tmp_path / "e.csv", fields={"x": ["a", "b"]})
    assert len(shardfeed.open(tmp_path / "e2")) == 0


def test_a_bad_value_names_file_and_line(tmp_path, rng):
    values, labels = table(rng, 30)
    rows = csv_rows(values, labels)
    rows[20][2] = "oops"
    write_csv(tmp_path / "0.csv", HEADER, csv_rows(*table(rng, 5)))
    write_csv(tmp_path / "1.csv", HEADER, rows)
    with pytest.raises(shardfeed.SourceError, match=r"1\.csv, line 22: column 'f2': 'oops' is not a number"):
        convert.from_csv(tmp_path / "d", [tmp_path / "0.csv", tmp_path / "1.csv"], label="label")
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize("bad_row, message", [
    (["1.5", "2", "3", "4", "x"], "column 'label': 'x' is not an integer"),
    (["1.5", "2", "3", "4", "2.5"], "column 'label': '2.5' is not an integer"),
    (["1.5", "2", "3", "4"], "4 columns, the header has 5"),
    (["1.5", "2", "3", "4", "5", "6"], "6 columns, the header has 5"),
    (["1.5", "", "3", "4", "5"], "column 'f1': '' is not a number"),
    (["1.5", "2", "3", "4", "99999999999999999999"], "column 'label': '99999999999999999999' is not an integer"),
])
def test_bad_rows_error_or_are_skipped_and_counted(tmp_path, rng, tools, bad_row, message):
    values, labels = table(rng, 40)
    rows = csv_rows(values, labels)
    rows.insert(17, bad_row)
    write_csv(tmp_path / "a.csv", HEADER, rows)
    with pytest.raises(shardfeed.SourceError, match=f"a\\.csv, line 19: {message}"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", label="label")
    report = convert.from_csv(tmp_path / "d", tmp_path / "a.csv", label="label", on_error="skip",
                              dtypes={"x": "float64"}, chunk_bytes=200)
    assert report.skipped == 1 and "line 19" in report.skipped_examples[0] and message in report.skipped_examples[0]
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], values)
    tools.assert_identical(batch["label"], labels)
    assert "skipped 1 bad rows" in str(report)


def test_quotes_blank_lines_crlf_and_bom(tmp_path, tools):
    text = '\ufefff0,"f1",label\r\n1.5,"2.5",1\r\n\r\n"3",4,2\r\n  \r\n5,6e-1,3\r\n'
    (tmp_path / "q.csv").write_bytes(text.encode("utf-8"))
    convert.from_csv(tmp_path / "d", tmp_path / "q.csv", label="label", dtypes={"x": "float64"})
    batch = read_all(tmp_path / "d")
    tools.assert_identical(batch["x"], np.array([[1.5, 2.5], [3, 4], [5, 0.6]]))
    tools.assert_identical(batch["label"], np.array([1, 2, 3]))
    (tmp_path / "u.csv").write_bytes(b"a,b\n1,2\n\xff,3\n4,5\n")
    with pytest.raises(shardfeed.SourceError, match=r"u\.csv, line 3: not UTF-8"):
        convert.from_csv(tmp_path / "u", tmp_path / "u.csv")
    report = convert.from_csv(tmp_path / "u2", tmp_path / "u.csv", on_error="skip")
    assert report.skipped == 1 and report.num_samples == 2


def test_headers_must_agree(tmp_path, rng):
    write_csv(tmp_path / "a.csv", HEADER, csv_rows(*table(rng, 3)))
    write_csv(tmp_path / "b.csv", ["f0", "f1", "f2", "f3", "target"], csv_rows(*table(rng, 3)))
    with pytest.raises(shardfeed.SourceError, match=r"b\.csv: header .* differs from the header of .*a\.csv"):
        convert.from_csv(tmp_path / "d", [tmp_path / "a.csv", tmp_path / "b.csv"])


def test_no_header_tsv_and_gzip(tmp_path, rng, tools):
    values, labels = table(rng, 25)
    lines = ["\t".join([*map(repr, v.tolist()), str(int(l))]) for v, l in zip(values, labels)]
    (tmp_path / "a.tsv").write_text("\n".join(lines) + "\n")
    convert.from_csv(tmp_path / "t", tmp_path / "a.tsv", header=False, label=4, dtypes={"x": "float64"})
    batch = read_all(tmp_path / "t")
    tools.assert_identical(batch["x"], values)
    tools.assert_identical(batch["label"], labels)
    with gzip.open(tmp_path / "a.csv.gz", "wt") as f:
        f.write(",".join(HEADER) + "\n" + "".join(",".join(map(str, r)) + "\n" for r in csv_rows(values, labels)))
    convert.from_csv(tmp_path / "g", tmp_path / "a.csv.gz", label="label", dtypes={"x": "float64"})
    tools.assert_identical(read_all(tmp_path / "g")["x"], values)


def test_class_names(tmp_path, tools):
    write_csv(tmp_path / "a.csv", ["x", "species"], [[1, "setosa"], [2, "virginica"], [3, "setosa"],
                                                     [4, '"versicolor"']])
    with pytest.raises(shardfeed.SourceError, match=r"column 'species': 'setosa' is not an integer"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", label="species")
    convert.from_csv(tmp_path / "auto", tmp_path / "a.csv", label="species", classes="auto")
    ds = shardfeed.open(tmp_path / "auto")
    assert ds.metadata["classes"] == ["setosa", "versicolor", "virginica"]
    tools.assert_identical(ds.read(np.arange(4))["label"], np.array([0, 2, 0, 1]))
    convert.from_csv(tmp_path / "given", tmp_path / "a.csv", label="species",
                     classes=["virginica", "setosa", "versicolor"])
    tools.assert_identical(read_all(tmp_path / "given")["label"], np.array([1, 0, 1, 2]))
    with pytest.raises(shardfeed.SourceError, match=r"line 3: column 'species': label 'virginica' is not one of"):
        convert.from_csv(tmp_path / "few", tmp_path / "a.csv", label="species", classes=["setosa", "versicolor"])
    report = convert.from_csv(tmp_path / "skip", tmp_path / "a.csv", label="species", on_error="skip",
                              classes=["setosa", "versicolor"])
    assert report.skipped == 1 and report.num_samples == 3


def test_overflow_names_file_and_line(tmp_path):
    write_csv(tmp_path / "a.csv", ["v"], [[1.0], [2.0], [1e10], [3.0]])
    with pytest.raises(shardfeed.ValueRangeError, match=r"a\.csv, line 4: field 'x', sample 2: value 10000000000\.0 "
                       r"overflows float16"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", dtypes="float16")
    write_csv(tmp_path / "i.csv", ["v", "label"], [[1.0, 1], [2.0, 300]])
    with pytest.raises(shardfeed.ValueRangeError, match=r"i\.csv, line 3: field 'label', sample 1: value 300 is out "
                       r"of the range \[0, 255\] of uint8"):
        convert.from_csv(tmp_path / "e", tmp_path / "i.csv", label="label", dtypes={"label": "uint8"})
    report = convert.from_csv(tmp_path / "s", tmp_path / "a.csv", dtypes="float16", overflow="saturate")
    assert report.fields["x"].saturated == 1
    np.testing.assert_array_equal(read_all(tmp_path / "s")["x"][:, 0], np.array([1, 2, 65504, 3], np.float16))


def test_bad_field_specs(tmp_path, rng):
    write_csv(tmp_path / "a.csv", HEADER, csv_rows(*table(rng, 3)))
    for fields, message in [({"x": "nope"}, "no column 'nope'"), ({"x": "z*"}, "no column matches 'z\\*'"),
                            ({"x": []}, "no columns"), ({"x": 9}, "column index 9 out of range")]:
        with pytest.raises(shardfeed.SchemaError, match=message):
            convert.from_csv(tmp_path / "d", tmp_path / "a.csv", fields=fields)
    with pytest.raises(shardfeed.SchemaError, match="both a feature field and the label field"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", fields={"label": "f0"}, label="label")
    with pytest.raises(ValueError, match="delimiter"):
        convert.from_csv(tmp_path / "d", tmp_path / "a.csv", delimiter=",,")
    with pytest.raises(shardfeed.SourceError, match="no CSV files in"):
        convert.from_csv(tmp_path / "d", str(tmp_path / "*.nothing"))
    assert not os.path.exists(tmp_path / "d")


@pytest.mark.parametrize("parts", [2, 3, 7])
def test_parts_split_bytes_into_whole_lines_exactly_once(tmp_path, rng, tools, parts):
    files, expected = [], []
    for i in range(3):
        values, labels = table(rng, int(rng.integers(0, 60)))
        rows = csv_rows(values, labels)
        if i == 1 and rows:
            rows.insert(len(rows) // 2, ["bad"] * 5)
        write_csv(tmp_path / f"{i}.csv", HEADER, rows)
        files.append(tmp_path / f"{i}.csv")
        expected.append(values)
    pieces, skipped = [], []
    for k in range(parts):
        report = convert.from_csv(tmp_path / f"p{k}", files, label="label", dtypes={"x": "float64"}, part=(k, parts),
                                  on_error="skip", chunk_bytes=150)
        pieces.append(read_all(tmp_path / f"p{k}")["x"])
        skipped += report.skipped_examples
    tools.assert_identical(np.concatenate(pieces), np.concatenate(expected))
    assert len(skipped) == (1 if len(expected[1]) else 0)
    if skipped:
        line = int(skipped[0].split("line ")[1].split(":")[0])
        assert line == 2 + len(expected[1]) // 2, skipped[0]  # line numbers stay right in later parts
