"""Compressed fields (zstd): every read of a compressed field returns what the same read of the
same data stored uncompressed returns (every output dtype, conversion, normalisation, read path,
view and loader), the writer's options are checked, and damaged or hostile compressed bytes raise
exceptions that name the file, field and sample, never crash."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shardfeed
from shardfeed import _core
from shardfeed._reference import reference_read
from shardfeed.compression import parse_compress_arguments
from shardfeed.errors import CodecUnavailableError, RecordChecksumError, SchemaError, ShardFormatError, ShardReadError

N = 37
FIELDS = {
    "image": ("uint8", (6, 5, 3)),
    "half": ("float16", (4, 3)),
    "brain": ("bfloat16", (7,)),
    "tokens": ("int32", (16,)),
    "big": ("int64", (3,)),
    "wide": ("float64", (2, 2)),
    "flag": ("bool", (5,)),
    "label": ("int64", ()),
    "seq": ("int16", (None, 2)),
}
COMPRESSED = ["image", "half", "brain", "tokens", "big", "wide", "flag"]
try:
    import ml_dtypes
except ImportError:
    ml_dtypes = None
NEEDS_ML_DTYPES = pytest.mark.skipif(ml_dtypes is None, reason="bfloat16 outputs are ml_dtypes arrays: not installed")


def make_columns(rng, tools):
    columns = {name: tools.random_values(rng, dtype, (N,) + shape) for name, (dtype, shape) in FIELDS.items()
               if name != "seq"}
    columns["image"] = (np.arange(N * 90) % 7).astype(np.uint8).reshape(N, 6, 5, 3)  # compressible too
    columns["tokens"] = rng.integers(-256, 257, (N, 16)).astype(np.int32)  # (exact in float16 and bfloat16)
    columns["label"] = np.arange(N, dtype=np.int64)
    columns["seq"] = [rng.integers(-99, 99, (k % 5, 2)).astype(np.int16) for k in range(N)]
    return columns


@pytest.fixture(scope="module")
def twins(tmp_path_factory, tools):
    """The same samples written twice: compressed (every fixed field but the label) and plain."""
    rng = np.random.default_rng(18)
    columns = make_columns(rng, tools)
    base = tmp_path_factory.mktemp("compress")
    paths = {}
    for kind, compression in (("zstd", {name: "zstd" for name in COMPRESSED}), ("plain", None)):
        path = str(base / kind)
        with shardfeed.Writer(path, FIELDS, shard_size=2000, compression=compression) as writer:
            writer.extend({k: v[:20] for k, v in columns.items()})
            for i in range(20, N):
                writer.append({k: v[i] for k, v in columns.items()})
        paths[kind] = path
    return paths, columns


def test_manifest_names_the_codec_and_shards_split(twins):
    paths, _ = twins
    with open(os.path.join(paths["zstd"], "manifest.json")) as f:
        manifest = json.load(f)
    codecs = {field["name"]: field.get("codec") for field in manifest["fields"]}
    assert codecs == {**{name: "zstd" for name in COMPRESSED}, "label": None, "seq": None}
    assert len(manifest["shards"]) > 1  # the heap's size ends shards too
    ds = shardfeed.open(paths["zstd"])
    assert ds.schema.record_bytes == 16 * 8 + 8  # seven descriptors, the label, the variable field's descriptor


def test_natural_reads_match_numpy(twins, tools, mmap_mode):
    paths, columns = twins
    ds = shardfeed.open(paths["zstd"], mmap=mmap_mode)
    order = np.random.default_rng(1).permutation(N)
    batch = ds.read(order)
    for name, (dtype, _) in FIELDS.items():
        if name == "seq":
            continue
        tools.assert_identical(batch[name], tools.expected_natural(dtype, columns[name][order]), name)
    for k, i in enumerate(order):
        np.testing.assert_array_equal(batch["seq"][k, :batch.lengths["seq"][k]], columns["seq"][i])
    sample = ds[5]
    tools.assert_identical(sample["image"], columns["image"][5])


READS = [
    dict(dtype="float32"),
    dict(dtype="float16"),
    pytest.param(dict(dtype="bfloat16"), marks=NEEDS_ML_DTYPES),
    dict(dtype="auto"),
    dict(dtype={"image": "float16", "tokens": "float32", "wide": "float16", "big": "float32"}, lossy=True),
    dict(dtype="float32", scale={k: 0.5 for k in ("image", "half", "brain", "tokens")},
         offset={k: -1.0 for k in ("image", "half", "brain", "tokens")}),
    dict(dtype="float16", scale={"image": 1 / 255}, offset={"image": -0.5}),
    pytest.param(dict(dtype="bfloat16", scale={"image": [0.1, 0.2, 0.3]}, offset={"image": [1.0, 2.0, 3.0]}),
                 marks=NEEDS_ML_DTYPES),
    dict(dtype={"image": "int16", "tokens": "int64", "half": "float64", "flag": "uint8"}),  # numpy converts
]


@pytest.mark.parametrize("options", READS, ids=range(len(READS)))
@pytest.mark.parametrize("threads", [1, 3])
def test_every_read_option_matches_the_plain_dataset(twins, tools, options, threads, mmap_mode):
    paths, _ = twins
    fields = ["image", "half", "brain", "tokens", "wide", "flag", "label"] + (["big"] if "lossy" in options else [])
    if "scale" in options:
        fields = list(options["scale"])
    order = np.random.default_rng(threads).integers(0, N, 50)
    got = shardfeed.open(paths["zstd"], mmap=mmap_mode).read(order, fields, threads=threads, **options)
    want = shardfeed.open(paths["plain"]).read(order, fields, threads=threads, **options)
    for name in fields:
        tools.assert_identical(got[name], want[name], f"{name} {options}")
    reference, _ = reference_read(paths["zstd"], order, fields, options.get("dtype"), options.get("scale"),
                                  options.get("offset"))
    if "lossy" not in options:  # and the slow reference reader, which decodes each frame on its own
        for name in fields:
            assert reference[name].dtype == got[name].dtype, name
            assert reference[name].tobytes() == got[name].tobytes(), name


def test_out_arrays_and_empty_reads(twins, tools):
    paths, columns = twins
    ds = shardfeed.open(paths["zstd"])
    out = np.full((4, 6, 5, 3), 9.0, np.float32)
    batch = ds.read([3, 1, 4, 1], "image", dtype="float32", out={"image": out})
    assert batch["image"] is out
    tools.assert_identical(out, columns["image"][[3, 1, 4, 1]].astype(np.float32))
    empty = ds.read([], ["image", "tokens"], dtype="float16")
    assert empty["image"].shape == (0, 6, 5, 3) and empty["image"].dtype == np.float16


def test_an_inexact_cast_is_refused_as_for_plain_fields(twins):
    paths, _ = twins
    for kind in ("zstd", "plain"):
        ds = shardfeed.open(paths[kind])
        with pytest.raises(ValueError, match="'big'") as caught:
            ds.read(np.arange(N), "big", dtype="float16")
        if kind == "zstd":
            assert "does not convert exactly" in str(caught.value) or "exact" in str(caught.value)


def test_views_and_loaders_read_the_same_batches(twins, tools):
    paths, _ = twins
    zstd, plain = shardfeed.open(paths["zstd"]), shardfeed.open(paths["plain"])
    train_z, _ = zstd.split([0.7, 0.3], seed=3)
    train_p, _ = plain.split([0.7, 0.3], seed=3)
    tools.assert_identical(train_z.read(np.arange(10))["image"], train_p.read(np.arange(10))["image"])
    options = dict(inputs="image", targets="tokens", seed=4, scale={"image": 1 / 255}, epochs=2)
    count = 0
    for (xz, yz), (xp, yp) in zip(zstd.batches(8, **options), plain.batches(8, **options)):
        tools.assert_identical(xz, xp)
        tools.assert_identical(yz, yp)
        count += 1
    assert count == 2 * -(-N // 8)


def test_verify_reports_the_ratio_and_checked_reads_pass(twins):
    paths, columns = twins
    report = shardfeed.verify(paths["zstd"])
    assert report.ok, str(report)
    image = report.compression["image"]
    assert image.raw == N * 90 and image.samples == N
    ds = shardfeed.open(paths["zstd"])
    descriptors = []  # the stored sizes, from the records themselves
    for shard in ds._manifest.shards:
        records = np.fromfile(os.path.join(paths["zstd"], shard.file), ds.schema.record_dtype,
                              offset=64)
        descriptors.append(records["image"][:, 1])
    assert image.stored == int(np.concatenate(descriptors).sum())
    assert image.ratio > 1.5  # a repeating pattern
    assert "field 'image' (zstd)" in str(report) and report.to_json()["compression"]["image"]["raw_bytes"] == N * 90
    assert {name: size.stored for name, size in ds.compression().items()} == \
        {name: size.stored for name, size in report.compression.items()}
    checked = shardfeed.open(paths["zstd"], verify=True).read(np.arange(N), ["image", "label"])
    np.testing.assert_array_equal(checked["image"], columns["image"])


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def _frame_of(path, sample, field="image"):
    """(heap file, offset, length) of a sample's frame (sample in shard 0)."""
    ds = shardfeed.open(path)
    shard = ds._manifest.shards[0]
    records = np.fromfile(os.path.join(path, shard.file), ds.schema.record_dtype, offset=64)
    offset, length = (int(v) for v in records[field][sample])
    return os.path.join(path, shard.heap_file), offset, length, os.path.join(path, shard.file), ds.schema


def test_a_damaged_frame_is_named_by_verify_and_by_reads(twins, tmp_path):
    paths, _ = twins
    path = _copy(paths["zstd"], tmp_path / "damaged")
    heap, offset, length, _, _ = _frame_of(path, 2)
    with open(heap, "r+b") as f:  # the frame's magic number: no longer a zstd frame
        f.seek(offset)
        f.write(b"\0\0\0\0")
    report = shardfeed.verify(path)
    assert not report.ok and report.bad_ranges == [(2, 3)], str(report)
    assert "compressed values" in str(report)
    with pytest.raises(ShardReadError, match=r"field 'image' of sample 2 .*do not decode \(not a zstd frame\)") as caught:
        shardfeed.open(path).read([0, 1, 2, 3], "image")
    assert caught.value.filename == heap
    with pytest.raises(RecordChecksumError, match="sample 2"):
        shardfeed.open(path, verify=True).read([2], "image")
    np.testing.assert_array_equal(shardfeed.open(path).read([0, 1, 3], "image")["image"],
                                  shardfeed.open(paths["zstd"]).read([0, 1, 3], "image")["image"])


def _set_descriptor(rec_path, schema, sample, field, offset, length):
    records = np.fromfile(rec_path, schema.record_dtype, offset=64)
    at = 64 + sample * schema.record_bytes + schema.fields[field].offset
    with open(rec_path, "r+b") as f:
        f.seek(at)
        f.write(np.array([offset, length], "<u8").tobytes())
    return records


def test_a_frame_of_another_size_is_refused(twins, tmp_path):
    paths, _ = twins
    path = _copy(paths["zstd"], tmp_path / "resized")
    _, offset, length, rec, schema = _frame_of(path, 1, "brain")  # 14 bytes where image has 90
    _set_descriptor(rec, schema, 0, "image", offset, length)
    with pytest.raises(ShardReadError, match=r"field 'image' of sample 0 .*decode to 14 bytes, not the field's size"):
        shardfeed.open(path).read([0], "image", dtype="float32")
    np.testing.assert_array_equal(shardfeed.open(path).read([0], "brain")["brain"],
                                  shardfeed.open(paths["zstd"]).read([0], "brain")["brain"])


@pytest.mark.parametrize("case", ["empty", "too long", "outside"])
def test_absurd_lengths_are_refused(twins, tmp_path, case):
    paths, _ = twins
    path = _copy(paths["zstd"], tmp_path / case.replace(" ", "_"))
    heap, offset, length, rec, schema = _frame_of(path, 0)
    heap_size = os.path.getsize(heap)
    new = {"empty": (offset, 0), "too long": (64, heap_size - 64), "outside": (offset, 1 << 62)}[case]
    _set_descriptor(rec, schema, 0, "image", *new)
    if case == "outside":
        with pytest.raises(ShardFormatError, match="sample 0 of field 'image' points at .* bytes .*outside"):
            shardfeed.open(path).read([0], "image")
    else:
        why = {"empty": "empty", "too long": "longer than any frame of the field's size"}[case]
        with pytest.raises(ShardReadError, match=f"field 'image' of sample 0 .*do not decode \\({why}\\)"):
            shardfeed.open(path).read([0], "image")
    report = shardfeed.verify(path)
    assert not report.ok and report.bad_ranges[0][0] == 0, str(report)


def test_a_heap_truncated_after_open_is_an_error_not_a_crash(twins, tmp_path):
    paths, _ = twins
    path = _copy(paths["zstd"], tmp_path / "truncated")
    ds = shardfeed.open(path)
    heap, offset, length, _, _ = _frame_of(path, 3)
    os.truncate(heap, offset + length // 2)
    with pytest.raises(ShardReadError, match="file ended before the data of sample 3"):
        ds.read([3], "image")


def test_appending_keeps_the_codecs(twins, tmp_path, tools):
    paths, columns = twins
    path = _copy(paths["zstd"], tmp_path / "appended")
    more = {k: v[:3] for k, v in columns.items()}
    with shardfeed.Writer(path, FIELDS, mode="a") as writer:  # the dataset's codecs
        writer.extend(more)
    with shardfeed.Writer(path, mode="a", compression={"image": ("zstd", 19)}) as writer:  # a level
        writer.extend(more)
    ds = shardfeed.open(path)
    assert ds.schema.codecs["image"] == "zstd" and len(ds) == N + 6
    tools.assert_identical(ds.read(np.arange(N, N + 6))["image"], np.concatenate([columns["image"][:3]] * 2))
    with pytest.raises(SchemaError, match="field 'label' is stored uncompressed in the dataset"):
        shardfeed.Writer(path, mode="a", compression={"label": "zstd"})
    with pytest.raises(SchemaError, match="field 'image' is stored with zstd"):
        shardfeed.Writer(path, mode="a", compression={"image": None})
    assert shardfeed.verify(path).ok


@pytest.mark.parametrize("compression, message", [
    ({"image": "brotli"}, "field 'image': unknown codec 'brotli'"),
    ({"imgae": "zstd"}, "compression names field 'imgae', which the dataset does not have"),
    ({"seq": "zstd"}, "field 'seq': a variable-length field cannot be compressed"),
    ({"image": ("zstd", 99)}, r"field 'image': zstd level must be an int in \[-7, 22\], got 99"),
    ({"image": ("zstd", 3, 4)}, "field 'image': compression must be a codec name or"),
    (["zstd"], "compression must be"),
    ({"empty": "zstd"}, r"field 'empty': shape \[0, 3\] holds no values to compress"),
])
def test_bad_compression_options_name_the_field(tmp_path, compression, message):
    with pytest.raises(SchemaError, match=message):
        shardfeed.Writer(str(tmp_path / "bad"), {"image": ("uint8", (4,)), "seq": ("int16", (None,)),
                                                 "empty": ("float32", (0, 3))}, compression=compression)
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")


def test_one_codec_for_every_fixed_field(tmp_path):
    fields = {"a": ("uint8", (4,)), "b": ("float32", ()), "c": ("int8", (None,)), "d": ("int16", (0,))}
    with shardfeed.Writer(str(tmp_path / "all"), fields, compression="zstd") as writer:
        writer.extend({"a": np.ones((3, 4), np.uint8), "b": np.arange(3.0), "c": [np.ones(2, np.int8)] * 3,
                       "d": np.zeros((3, 0), np.int16)})
    assert shardfeed.open(str(tmp_path / "all")).schema.codecs == {"a": "zstd", "b": "zstd"}


def test_a_codec_this_shardfeed_does_not_know_is_refused(twins, tmp_path):
    paths, _ = twins
    path = _copy(paths["zstd"], tmp_path / "future")
    manifest_path = os.path.join(path, "manifest.json")
    with open(manifest_path) as f:
        manifest = json.load(f)
    manifest["fields"][0]["codec"] = "zstd-next"
    with open(manifest_path, "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ShardFormatError, match="field 'image': codec 'zstd-next' is not one this shardfeed knows"):
        shardfeed.open(path)


def test_the_cli_compress_option_parses_items():
    assert parse_compress_arguments(["image=zstd", "tokens=zstd:9", "label=none"]) == \
        {"image": "zstd", "tokens": ("zstd", 9), "label": None}
    for bad in ("image", "image=", "image=zstd:x"):
        with pytest.raises(ValueError, match="--compress"):
            parse_compress_arguments([bad])


def test_decompress_helper_names_the_size():
    frames, lengths = _core.compress_samples("zstd", 3, np.arange(200, dtype=np.uint8), 100, 2)
    assert lengths.tolist() == [len(frames) // 2] * 2 or lengths.sum() == len(frames)
    assert _core.decompress("zstd", frames[:lengths[0]], 100) == bytes(range(100))
    with pytest.raises(ValueError, match="does not decode to 50 bytes .*100 bytes"):
        _core.decompress("zstd", frames[:lengths[0]], 50)


MISSING_LIBRARY = textwrap.dedent("""
    import numpy as np, shardfeed, sys
    from shardfeed.errors import CodecUnavailableError
    path, new = sys.argv[1], sys.argv[2]
    try:
        shardfeed.open(path).read([0], "image")
    except CodecUnavailableError as exc:
        print("READ", exc)
    print("OTHER", shardfeed.open(path).read([0, 1], ["label", "seq"])["label"].tolist())
    try:
        shardfeed.Writer(new, {"x": ("uint8", (3,))}, compression={"x": "zstd"})
    except CodecUnavailableError as exc:
        print("WRITE", exc)
    with shardfeed.Writer(new + "-plain", {"x": ("uint8", (3,))}) as w:
        w.extend({"x": np.ones((2, 3), np.uint8)})
    print("PLAIN", len(shardfeed.open(new + "-plain")))
""")


def test_a_missing_zstd_library_names_the_field_and_the_library(twins, tmp_path):
    paths, columns = twins
    env = dict(os.environ, SHARDFEED_ZSTD_LIBRARY="libzstd-missing.so.9")
    result = subprocess.run([sys.executable, "-c", MISSING_LIBRARY, paths["zstd"], str(tmp_path / "new")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert "field 'image' is compressed with zstd, but the zstd library (libzstd-missing.so.9) cannot be loaded" \
        in lines["READ"]
    assert lines["OTHER"] == str(columns["label"][:2].tolist())
    assert "field 'x' is compressed with zstd, but the zstd library (libzstd-missing.so.9)" in lines["WRITE"]
    assert lines["PLAIN"] == "2"
    assert not os.path.exists(tmp_path / "new" / "manifest.json")
    assert issubclass(CodecUnavailableError, shardfeed.OptionalDependencyError)


def test_merge_keeps_the_codecs_and_refuses_other_ones(twins, tmp_path, tools):
    paths, columns = twins
    merged = str(tmp_path / "merged")
    second = _copy(paths["zstd"], tmp_path / "second")
    result = shardfeed.merge([paths["zstd"], second], merged, compression={"image": "zstd"})
    assert result.num_samples == 2 * N
    ds = shardfeed.open(merged)
    assert ds.schema.codecs == shardfeed.open(paths["zstd"]).schema.codecs
    tools.assert_identical(ds.read(np.arange(N, 2 * N))["image"], columns["image"])
    assert shardfeed.verify(merged).compression["image"].raw == 2 * N * 90
    with pytest.raises(SchemaError, match="field 'label' is stored uncompressed, not with zstd as compression asks"):
        shardfeed.merge([paths["zstd"]], str(tmp_path / "m2"), compression={"label": "zstd"})
    with pytest.raises(SchemaError, match="differ from those of"):  # a compressed and a plain part
        shardfeed.merge([paths["zstd"], paths["plain"]], str(tmp_path / "m3"))
    assert not os.path.exists(tmp_path / "m2" / "manifest.json") and not os.path.exists(tmp_path / "m3" / "manifest.json")


@pytest.mark.parametrize("workers", [1, 2])
def test_converters_take_the_option(tmp_path, workers, tools):
    images = (np.arange(40 * 8 * 8 * 3) % 11).astype(np.uint8).reshape(40, 8, 8, 3)
    labels = np.arange(40)
    report = shardfeed.convert.from_arrays(str(tmp_path / f"a{workers}"), {"image": images, "label": labels},
                                           compression={"image": ("zstd", 7)})
    np.save(tmp_path / "images.npy", images)
    shardfeed.convert.from_npy(str(tmp_path / f"n{workers}"), str(tmp_path / "images.npy"), field="image",
                               workers=workers, compression={"image": "zstd"})
    samples = ({"image": images[i], "label": labels[i]} for i in range(40))
    shardfeed.convert.from_iterable(str(tmp_path / f"i{workers}"), samples, compression={"image": "zstd"})
    for name in ("a", "n", "i"):
        ds = shardfeed.open(str(tmp_path / f"{name}{workers}"))
        assert ds.schema.codecs == {"image": "zstd"}, name
        tools.assert_identical(ds.read(np.arange(40)[::-1])["image"], images[::-1])
    assert report.num_samples == 40
    with pytest.raises(SchemaError, match="field 'image': unknown codec"):
        shardfeed.convert.from_arrays(str(tmp_path / "bad"), {"image": images}, compression={"image": "lzma"})


def test_the_command_line_compresses_and_reports_the_ratio(tmp_path):
    shardfeed_cli = os.path.join(os.path.dirname(sys.executable), "shardfeed")
    np.save(tmp_path / "x.npy", (np.arange(30 * 64) % 5).astype(np.uint8).reshape(30, 64))

    def run(*args):
        return subprocess.run([shardfeed_cli, *map(str, args)], capture_output=True, text=True, timeout=120)

    done = run("convert", tmp_path / "x.npy", "-o", tmp_path / "d", "--compress", "x=zstd:9", "-q")
    assert done.returncode == 0, done.stderr
    info = run("info", tmp_path / "d")
    assert "x: uint8[64] zstd" in info.stdout and "field 'x' (zstd):" in info.stdout, info.stdout
    assert "1.9 KiB of values" in info.stdout  # 30 * 64 bytes
    verified = run("verify", "--json", tmp_path / "d")
    ratio = json.loads(verified.stdout)["compression"]["x"]
    assert ratio["raw_bytes"] == 30 * 64 and ratio["ratio"] > 3
    bad = run("convert", tmp_path / "x.npy", "-o", tmp_path / "e", "--compress", "y=zstd", "-q")
    assert bad.returncode == 1 and "--compress names field 'y'" in bad.stderr, bad.stderr
    usage = run("convert", tmp_path / "x.npy", "-o", tmp_path / "f", "--compress", "x", "-q")
    assert usage.returncode == 2 and "expected FIELD=CODEC" in usage.stderr
    merged = run("merge", tmp_path / "d", "-o", tmp_path / "m", "--compress", "x=zstd")
    assert merged.returncode == 0, merged.stderr
