"""Trained zstd dictionaries for compressed fields: every read of a field written with a dictionary
returns what the same read of the same data stored plain returns (numpy reference, the slow
reference reader); the dictionary files are listed with checksums, named per shard, carried along
by merge and the converters' workers; too few samples store frames without one, honestly
reported; damaged, missing or swapped dictionaries, and frames that name another dictionary,
raise exceptions naming the file and field, never garbage."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap

import numpy as np
import pytest

import shardfeed
from shardfeed import _core
from shardfeed._reference import reference_read
from shardfeed.compression import DEFAULT_DICTIONARY_BYTES, parse_compress_arguments, parse_compression
from shardfeed.errors import (
    SchemaError, ShardfeedWarning, ShardFormatError, ShardReadError, ValueRangeError,
)
from shardfeed.format import DICTIONARY_FILE_PATTERN, Schema, file_checksum

RECORD = 256
N = 2400
DICT_BYTES = 4096
FIELDS = {
    "text": ("uint8", (RECORD,)),
    "code": ("int16", (64,)),
    "label": ("int64", ()),
    "seq": ("int16", (None, 2)),
}
DICTIONARY = {"codec": "zstd", "level": 3, "dictionary": DICT_BYTES}


def stdlib_text(count, record, skip=0):
    """``count`` records of ``record`` bytes of the standard library's Python sources (real text,
    as benchmarks/bench_compress.py uses)."""
    data = bytearray()
    for name in sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py"))):
        with open(name, "rb") as f:
            data += f.read()
        if len(data) >= (skip + count) * record:
            break
    data = bytes(data[skip * record:(skip + count) * record])
    assert len(data) == count * record, "not enough standard library sources"
    return np.frombuffer(data, np.uint8).reshape(count, record)


def make_columns(count=N, skip=0):
    text = stdlib_text(count, RECORD, skip)
    return {
        "text": text,
        "code": text[:, :128].copy().view(np.int16).reshape(count, 64),
        "label": np.arange(skip, skip + count, dtype=np.int64),
        "seq": [np.full((k % 4, 2), k, np.int16) for k in range(count)],
    }


def write(path, columns, compression, shard_size=120_000, **options):
    with shardfeed.Writer(str(path), FIELDS, shard_size=shard_size, compression=compression, **options) as writer:
        count = len(columns["label"])
        for start in range(0, count, 700):  # several batches: the first ones are held for training
            writer.extend({k: v[start:start + 700] for k, v in columns.items()})
    return str(path)


@pytest.fixture(scope="module")
def triplets(tmp_path_factory):
    """The same samples written with dictionaries, with zstd and no dictionary, and plain."""
    columns = make_columns()
    base = tmp_path_factory.mktemp("dict")
    paths = {
        "dict": write(base / "dict", columns, {"text": DICTIONARY, "code": DICTIONARY}),
        "zstd": write(base / "zstd", columns, {"text": "zstd", "code": "zstd"}),
        "plain": write(base / "plain", columns, None),
    }
    return paths, columns


def _manifest(path):
    with open(os.path.join(path, "manifest.json")) as f:
        return json.load(f)


def _frame_dictionary_id(frame):
    import ctypes
    lib = ctypes.CDLL("libzstd.so.1")
    lib.ZSTD_getDictID_fromFrame.restype = ctypes.c_uint
    lib.ZSTD_getDictID_fromFrame.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    return lib.ZSTD_getDictID_fromFrame(frame, len(frame))


def _frames(path, field, shard_number=0):
    ds = shardfeed.open(path)
    shard = ds._manifest.shards[shard_number]
    records = np.fromfile(os.path.join(path, shard.file), ds.schema.record_dtype, offset=64)
    with open(os.path.join(path, shard.heap_file), "rb") as f:
        heap = f.read()
    return [heap[int(a):int(a) + int(b)] for a, b in records[field]], records, ds


def test_the_manifest_lists_each_dictionary_and_every_shard_names_it(triplets):
    paths, _ = triplets
    manifest = _manifest(paths["dict"])
    listed = {entry["file"]: entry for entry in manifest["dictionaries"]}
    assert len(listed) == 2 and len(manifest["shards"]) > 2  # one per field; several shards
    for name, entry in listed.items():
        file = os.path.join(paths["dict"], name)
        assert DICTIONARY_FILE_PATTERN.fullmatch(name)
        assert os.path.getsize(file) == entry["size"] <= DICT_BYTES
        assert file_checksum(file) == entry["checksum"]
    for shard in manifest["shards"]:
        assert set(shard["dictionaries"]) == {"text", "code"} and set(shard["dictionaries"].values()) == set(listed)
    with open(os.path.join(paths["dict"], manifest["shards"][0]["dictionaries"]["text"]), "rb") as f:
        wanted = _core.Dictionary("zstd", f.read()).id
    frames, _, _ = _frames(paths["dict"], "text", len(manifest["shards"]) - 1)
    assert {_frame_dictionary_id(frame) for frame in frames} == {wanted}  # every frame names it
    assert "dictionaries" not in _manifest(paths["zstd"])
    assert all("dictionaries" not in shard for shard in _manifest(paths["zstd"])["shards"])
    assert not [n for n in os.listdir(paths["dict"]) if ".tmp-" in n]


READS = [
    dict(),
    dict(dtype="float32"),
    dict(dtype="float16", lossy=True),
    dict(dtype="auto"),
    dict(dtype="float32", scale={"text": 1 / 255, "code": 0.5}, offset={"text": -0.5, "code": 1.0}),
    dict(dtype="float16", scale={"text": 1 / 255}, offset={"text": -0.5}),
    dict(dtype={"text": "int16", "code": "int64"}),  # numpy converts
]


@pytest.mark.parametrize("options", READS, ids=range(len(READS)))
@pytest.mark.parametrize("threads", [1, 3])
def test_every_read_matches_the_plain_dataset_and_numpy(triplets, tools, options, threads, mmap_mode):
    paths, columns = triplets
    order = np.random.default_rng(threads).integers(0, N, 300)
    fields = ["text", "code"] + (["label"] if not options else [])
    if "scale" in options:
        fields = list(options["scale"])
    got = shardfeed.open(paths["dict"], mmap=mmap_mode).read(order, fields, threads=threads, **options)
    want = shardfeed.open(paths["plain"]).read(order, fields, threads=threads, **options)
    for name in fields:
        tools.assert_identical(got[name], want[name], f"{name} {options}")
    if not options:
        np.testing.assert_array_equal(got["text"], columns["text"][order])
        np.testing.assert_array_equal(got["code"], columns["code"][order])
    if "lossy" in options:
        return
    reference, _ = reference_read(paths["dict"], order[:40], fields, options.get("dtype"), options.get("scale"),
                                  options.get("offset"))
    for name in fields:  # the slow reference reader decodes each frame with the dictionary's bytes (ctypes)
        assert reference[name].tobytes() == got[name][:40].tobytes(), name


def test_views_loaders_and_checked_reads(triplets, tools):
    paths, columns = triplets
    with_dict, plain = shardfeed.open(paths["dict"]), shardfeed.open(paths["plain"])
    train_d, _ = with_dict.split([0.7, 0.3], seed=3)
    train_p, _ = plain.split([0.7, 0.3], seed=3)
    tools.assert_identical(train_d.read(np.arange(50))["text"], train_p.read(np.arange(50))["text"])
    options = dict(inputs="text", targets="code", seed=4, scale={"text": 1 / 255}, epochs=1)
    count = 0
    for (xd, yd), (xp, yp) in zip(with_dict.batches(256, **options), plain.batches(256, **options)):
        tools.assert_identical(xd, xp)
        tools.assert_identical(yd, yp)
        count += 1
    assert count == -(-N // 256)
    checked = shardfeed.open(paths["dict"], verify=True).read(np.arange(N)[::-7], ["text", "seq"])
    np.testing.assert_array_equal(checked["text"], columns["text"][::-7])
    ds = shardfeed.open(paths["dict"])
    for i in (0, N // 2, N - 1):
        np.testing.assert_array_equal(ds[i]["code"], columns["code"][i])


def test_a_dictionary_makes_real_text_smaller_and_is_reported(triplets):
    paths, _ = triplets
    with_dict = shardfeed.open(paths["dict"]).compression()["text"]
    without = shardfeed.open(paths["zstd"]).compression()["text"]
    assert with_dict.raw == without.raw == N * RECORD
    assert with_dict.ratio > 1.15 * without.ratio, (with_dict.ratio, without.ratio)
    assert (with_dict.dictionaries, without.dictionaries) == (1, 0)
    assert 0 < with_dict.dictionary_bytes <= DICT_BYTES and with_dict.shards_without_dictionary == 0
    assert "with 1 trained dictionary of" in str(with_dict) and "dictionar" not in str(without)
    report = shardfeed.verify(paths["dict"])
    assert report.ok, str(report)
    assert report.to_json()["compression"]["text"]["dictionaries"] == 1
    assert report.compression["text"].stored == with_dict.stored


def test_appending_continues_with_the_dataset_dictionary(triplets, tmp_path, tools):
    paths, columns = triplets
    path = shutil.copytree(paths["dict"], tmp_path / "appended")
    before = set(os.listdir(path))
    more = {k: v[:50] for k, v in columns.items()}
    with shardfeed.Writer(path, mode="a") as writer:
        writer.extend(more)
    manifest = _manifest(path)
    assert {n for n in os.listdir(path) if n.endswith(".zdict")} == {n for n in before if n.endswith(".zdict")}
    assert manifest["shards"][-1]["dictionaries"] == manifest["shards"][0]["dictionaries"]
    with shardfeed.Writer(path, mode="a", compression={"text": {"codec": "zstd", "dictionary": False}}) as writer:
        writer.extend(more)
    last = _manifest(path)["shards"][-1]
    assert set(last["dictionaries"]) == {"code"}  # text: frames without a dictionary from here
    ds = shardfeed.open(path)
    tools.assert_identical(ds.read(np.arange(N, N + 100))["text"], np.concatenate([columns["text"][:50]] * 2))
    assert ds.compression()["text"].shards_without_dictionary == 1
    assert shardfeed.verify(path).ok


def test_too_few_samples_store_frames_without_a_dictionary_and_say_so(tmp_path, tools):
    columns = make_columns(10)
    with pytest.warns(ShardfeedWarning, match="field 'text' is written without a dictionary: 10 samples are too few"):
        path = write(tmp_path / "small", columns, {"text": {"codec": "zstd", "dictionary": True}})
    manifest = _manifest(path)
    assert "dictionaries" not in manifest and not [n for n in os.listdir(path) if n.endswith(".zdict")]
    ds = shardfeed.open(path)
    tools.assert_identical(ds.read(np.arange(10))["text"], columns["text"])
    assert ds.compression()["text"].dictionaries == 0


def test_the_trainer_refusing_stores_frames_without_a_dictionary(tmp_path, tools, monkeypatch):
    columns = make_columns(100)

    def refuse(*args):  # (zstd's trainer refuses few or tiny samples; the writer's floor keeps it from them)
        raise ValueError("Src size is incorrect")

    monkeypatch.setattr(_core, "train_dictionary", refuse)
    with pytest.warns(ShardfeedWarning, match="field 'text' is written without a dictionary: zstd could not train"):
        path = write(tmp_path / "uniform", columns, {"text": {"codec": "zstd", "dictionary": True}})
    tools.assert_identical(shardfeed.open(path).read(np.arange(100))["text"], columns["text"])
    assert "dictionaries" not in _manifest(path)


def test_merge_carries_each_part_dictionary(tmp_path, tools):
    first, second = make_columns(1500), make_columns(1500, skip=3000)
    parts = [write(tmp_path / "p0", first, {"text": DICTIONARY}), write(tmp_path / "p1", second, {"text": DICTIONARY})]
    names = [_manifest(p)["dictionaries"][0]["file"] for p in parts]
    assert names[0] != names[1]  # trained on other samples
    result = shardfeed.merge(parts, str(tmp_path / "merged"), compression={"text": DICTIONARY})
    merged = str(tmp_path / "merged")
    assert result.num_samples == 3000
    manifest = _manifest(merged)
    assert sorted(d["file"] for d in manifest["dictionaries"]) == sorted(names)
    assert all(os.path.samefile(os.path.join(merged, n), os.path.join(p, n)) for n, p in zip(names, parts))
    ds = shardfeed.open(merged)
    order = np.random.default_rng(5).permutation(3000)
    tools.assert_identical(ds.read(order, dtype="float32")["text"],
                           np.concatenate([first["text"], second["text"]])[order].astype(np.float32))
    assert ds.compression()["text"].dictionaries == 2
    assert shardfeed.verify(merged).ok
    # a part and its copy: one dictionary file, placed once
    copy = str(shutil.copytree(parts[0], tmp_path / "copy"))
    shardfeed.merge([parts[0], copy], str(tmp_path / "twice"), move=True)
    assert [n for n in os.listdir(tmp_path / "twice") if n.endswith(".zdict")] == [names[0]]
    assert not os.path.exists(copy) and not os.path.exists(parts[0])  # moved: the parts are gone
    tools.assert_identical(shardfeed.open(str(tmp_path / "twice")).read(np.arange(3000))["text"],
                           np.concatenate([first["text"]] * 2))
    # a part whose dictionary is damaged is refused before anything is linked
    with open(os.path.join(parts[1], names[1]), "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    with pytest.raises(ShardFormatError, match=f"{names[1]}: the dictionary file does not match its checksum"):
        shardfeed.merge([parts[1]], str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused" / "manifest.json")


def test_merge_refuses_parts_without_the_dictionary_compression_asks(triplets, tmp_path):
    paths, _ = triplets
    with pytest.raises(SchemaError, match="field 'text' has shards without a trained dictionary"):
        shardfeed.merge([paths["zstd"]], str(tmp_path / "m"), compression={"text": DICTIONARY})
    with pytest.raises(SchemaError, match="field 'text' has shards with a trained dictionary"):
        shardfeed.merge([paths["dict"]], str(tmp_path / "m2"),
                        compression={"text": {"codec": "zstd", "dictionary": False}})


@pytest.mark.parametrize("workers", [1, 2])
def test_converters_with_workers_train_per_part(tmp_path, tools, workers):
    text = stdlib_text(3000, RECORD)
    np.save(tmp_path / "text.npy", text)
    out = str(tmp_path / f"c{workers}")
    shardfeed.convert.from_npy(out, str(tmp_path / "text.npy"), field="text", workers=workers,
                               compression={"text": {"codec": "zstd", "dictionary": 2048}})
    ds = shardfeed.open(out)
    order = np.random.default_rng(workers).permutation(3000)
    tools.assert_identical(ds.read(order)["text"], text[order])
    size = ds.compression()["text"]
    assert size.dictionaries >= 1 and size.shards_without_dictionary == 0
    assert shardfeed.verify(out).ok
    assert {n for n in os.listdir(out) if n.endswith(".zdict")} == set(ds._manifest.dictionaries)


@pytest.mark.parametrize("option, message", [
    ({"codec": "zstd", "dictionary": 100}, r"dictionary must be True, False or a size in bytes in \[1024, 1048576\]"),
    ({"codec": "zstd", "dictionary": "yes"}, "dictionary must be True, False or a size"),
    ({"codec": "zstd", "dictionary": 1 << 30}, "dictionary must be"),
    ({"codec": "zstd", "dict": True}, "a compression dict has the keys"),
    ({"level": 3}, "a compression dict has the keys"),
    ({"codec": "zstd", "level": 99, "dictionary": True}, r"zstd level must be an int in \[-7, 22\]"),
])
def test_bad_dictionary_options_name_the_field(tmp_path, option, message):
    with pytest.raises(SchemaError, match=f"field 'text': {message}"):
        shardfeed.Writer(str(tmp_path / "bad"), FIELDS, compression={"text": option})
    assert not os.path.exists(tmp_path / "bad" / "manifest.json")


def test_the_option_forms():
    schema = Schema.from_spec(FIELDS)
    parsed = parse_compression({"text": {"codec": "zstd", "dictionary": True}, "code": ("zstd", 5),
                                "label": {"codec": "zstd", "level": 9, "dictionary": 2048}}, schema)
    assert (parsed["text"].level, parsed["text"].dictionary) == (3, DEFAULT_DICTIONARY_BYTES)
    assert (parsed["code"].level, parsed["code"].dictionary) == (5, None)
    assert (parsed["label"].level, parsed["label"].dictionary) == (9, 2048)
    assert parse_compress_arguments(["a=zstd:3:dict", "b=zstd:dict=16384", "c=zstd:7", "d=zstd", "e=none"]) == {
        "a": {"codec": "zstd", "level": 3, "dictionary": True},
        "b": {"codec": "zstd", "level": None, "dictionary": 16384},
        "c": ("zstd", 7), "d": "zstd", "e": None}
    for bad, why in [("a=zstd:dict=big", "the dictionary size 'big' is not an integer"),
                     ("a=zstd:dict:3", "'3' is not a level or dict"), ("a=zstd:3:4", "'4' is not a level or dict"),
                     ("a=zstd:dict:dict", "'dict' is not a level or dict"), ("a=zstd:x", "the level 'x'")]:
        with pytest.raises(ValueError, match=why):
            parse_compress_arguments([bad])


def test_the_command_line_trains_and_reports_dictionaries(tmp_path):
    shardfeed_cli = os.path.join(os.path.dirname(sys.executable), "shardfeed")
    np.save(tmp_path / "x.npy", stdlib_text(2000, RECORD))

    def run(*args):
        return subprocess.run([shardfeed_cli, *map(str, args)], capture_output=True, text=True, timeout=120)

    done = run("convert", tmp_path / "x.npy", "-o", tmp_path / "d", "--compress", "x=zstd:3:dict=4096", "-q")
    assert done.returncode == 0, done.stderr
    info = run("info", "--shards", tmp_path / "d")
    assert "with 1 trained dictionary of" in info.stdout and "field 'x' with dictionary dict-" in info.stdout, \
        info.stdout
    verified = run("verify", "--json", tmp_path / "d")
    assert verified.returncode == 0, verified.stdout
    assert json.loads(verified.stdout)["compression"]["x"]["dictionaries"] == 1
    for item, message in [("x=zstd:dict=12", "field 'x': dictionary must be True, False or a size in bytes"),
                          ("x=zstd:dict=many", "the dictionary size 'many' is not an integer"),
                          ("x=zstd:3:9", "'9' is not a level or dict[=BYTES] in its place")]:
        bad = run("convert", tmp_path / "x.npy", "-o", tmp_path / "e", "--compress", item, "-q")
        assert bad.returncode in (1, 2) and message in bad.stderr, bad.stderr
        assert not os.path.exists(tmp_path / "e" / "manifest.json")
    merged = run("merge", tmp_path / "d", "-o", tmp_path / "m", "--compress", "x=zstd:dict")
    assert merged.returncode == 0, merged.stderr
    refused = run("merge", tmp_path / "d", "-o", tmp_path / "m2", "--compress", "x=zstd:dict=4096",
                  "--compress", "x=zstd")
    assert refused.returncode == 0, refused.stderr  # the last item for a field counts: plain zstd, any frames


# ---- damaged, missing, swapped dictionaries --------------------------------------------------

def _damage_copy(paths, tmp_path, name):
    path = str(shutil.copytree(paths["dict"], tmp_path / name))
    manifest = _manifest(path)
    return path, manifest, manifest["shards"][0]["dictionaries"]["text"]


def _rewrite_manifest(path, manifest):
    with open(os.path.join(path, "manifest.json"), "w") as f:
        json.dump(manifest, f)


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "not a dictionary", "link"])
def test_a_bad_dictionary_file_is_named_at_open_and_by_verify(triplets, tmp_path, damage):
    paths, _ = triplets
    path, manifest, name = _damage_copy(paths, tmp_path, damage.replace(" ", "_"))
    file = os.path.join(path, name)
    if damage == "missing":
        os.unlink(file)
    elif damage == "truncated":
        os.truncate(file, 100)
    elif damage == "flipped":
        with open(file, "r+b") as f:
            f.seek(2000)
            byte = f.read(1)
            f.seek(2000)
            f.write(bytes([byte[0] ^ 1]))
    elif damage == "link":  # the same bytes, through a symbolic link: never read
        os.rename(file, str(tmp_path / "elsewhere.zdict"))
        os.symlink(str(tmp_path / "elsewhere.zdict"), file)
    else:  # junk of the right size and checksum: the manifest was rewritten to match it
        with open(file, "wb") as f:
            f.write(b"junk" * 300)
        for entry in manifest["dictionaries"]:
            if entry["file"] == name:
                entry["size"], entry["checksum"] = 1200, file_checksum(file)
        _rewrite_manifest(path, manifest)
    expected = {"missing": (ShardReadError, "No such file"),
                "truncated": (ShardFormatError, "has 100 bytes, the manifest says"),
                "flipped": (ShardFormatError, "does not match its checksum"),
                "not a dictionary": (ShardFormatError, "not a zstd dictionary"),
                "link": (ShardFormatError, "is a symbolic link")}[damage]
    with pytest.raises(expected[0], match=expected[1]) as caught:
        shardfeed.open(path)
    assert name in str(caught.value) or getattr(caught.value, "filename", None) == file
    report = shardfeed.verify(path)
    assert not report.ok and any(p.file == file and "dictionary" in p.message for p in report.problems), str(report)
    assert report.bad_ranges == [(0, N)], str(report)  # every shard uses it


def test_a_frame_naming_another_dictionary_is_refused_not_decoded(triplets, tmp_path):
    paths, columns = triplets
    path, manifest, name = _damage_copy(paths, tmp_path, "swapped")
    code = manifest["shards"][0]["dictionaries"]["code"]
    for shard in manifest["shards"]:  # text's frames read with code's dictionary: valid, but not theirs
        shard["dictionaries"]["text"] = code
    _rewrite_manifest(path, manifest)
    report = shardfeed.verify(path)  # the files are all intact: the frames' headers say it
    assert not report.ok and report.bad_ranges == [(0, N)], str(report)
    assert f"the frames of compressed field 'text' name another dictionary than the manifest gives the shard ({code})" \
        in str(report)
    ds = shardfeed.open(path)
    with pytest.raises(ShardReadError, match=r"compressed frame of field 'text' of sample [01] .*names dictionary \d+, "
                                             r"not the one the manifest gives its shard") as caught:
        ds.read([0, 1], "text", dtype="float32")
    assert caught.value.filename == os.path.join(path, manifest["shards"][0]["heap"]["file"])
    np.testing.assert_array_equal(ds.read([0, 1], "code")["code"], columns["code"][:2])
    for shard in manifest["shards"]:  # text's shards said to use no dictionary
        del shard["dictionaries"]["text"]
    _rewrite_manifest(path, manifest)
    with pytest.raises(ShardReadError, match=r"field 'text' of sample \d+ .*names dictionary \d+"):
        shardfeed.open(path).read(np.arange(N), "text")
    assert "name another dictionary than the manifest gives the shard (none)" in str(shardfeed.verify(path))
    with pytest.raises(ValueError, match="names dictionary"):  # the single-frame route checks it too
        frames, _, _ = _frames(paths["dict"], "text")
        _core.decompress("zstd", np.frombuffer(frames[0], np.uint8), RECORD)


@pytest.mark.parametrize("entry, message", [
    ({"file": "../dict-0000000000000000.zdict", "size": 10, "checksum": "crc32:00000000"}, "not a dictionary name"),
    ({"file": "shard-000000.rec", "size": 10, "checksum": "crc32:00000000"}, "not a dictionary name"),
    ({"file": "dict-0000000000000000.zdict", "size": 0, "checksum": "crc32:00000000"}, "has size 0"),
    ({"file": "dict-0000000000000000.zdict", "size": 10}, "must have exactly the keys"),
])
def test_hostile_manifest_entries_are_refused(triplets, tmp_path, entry, message):
    paths, _ = triplets
    path, manifest, _ = _damage_copy(paths, tmp_path, "hostile")
    manifest["dictionaries"].append(entry)
    _rewrite_manifest(path, manifest)
    with pytest.raises(ShardFormatError, match=message):
        shardfeed.open(path)


def test_a_shard_naming_an_unlisted_dictionary_or_field_is_refused(triplets, tmp_path):
    paths, _ = triplets
    path, manifest, name = _damage_copy(paths, tmp_path, "unlisted")
    manifest["shards"][0]["dictionaries"]["label"] = name
    _rewrite_manifest(path, manifest)
    with pytest.raises(ShardFormatError, match="names a dictionary for 'label', which is not a compressed field"):
        shardfeed.open(path)
    del manifest["shards"][0]["dictionaries"]["label"]
    manifest["shards"][0]["dictionaries"]["text"] = "dict-ffffffffffffffff.zdict"
    _rewrite_manifest(path, manifest)
    with pytest.raises(ShardFormatError, match="is not in the manifest's dictionaries"):
        shardfeed.open(path)


def test_a_killed_writer_dictionary_is_removed_by_the_next_writer(triplets, tmp_path, tools):
    paths, columns = triplets
    path = str(shutil.copytree(paths["zstd"], tmp_path / "killed"))
    leftovers = ["dict-0123456789abcdef.zdict", "dict-0123456789abcdef.zdict.tmp-999"]
    for name in leftovers:  # what a writer killed after training, before its first commit, leaves
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * 64)
    assert "uncommitted files" in " ".join(shardfeed.verify(path).notes)
    with pytest.warns(ShardfeedWarning, match="dict-0123456789abcdef.zdict"):
        with shardfeed.Writer(path, mode="a") as writer:
            writer.extend({k: v[:5] for k, v in columns.items()})
    assert not any(os.path.exists(os.path.join(path, n)) for n in leftovers)
    tools.assert_identical(shardfeed.open(path).read(np.arange(N, N + 5))["text"], columns["text"][:5])


def test_a_link_planted_at_a_dictionary_name_is_removed_never_written_through(tmp_path, tools):
    columns = make_columns(1700)
    first = write(tmp_path / "first", columns, {"text": DICTIONARY})
    name = _manifest(first)["dictionaries"][0]["file"]  # the same samples train the same bytes
    outside = tmp_path / "outside"
    outside.write_bytes(b"precious")
    path = tmp_path / "second"
    path.mkdir()
    os.symlink(str(outside), str(path / name))
    with pytest.warns(ShardfeedWarning, match=f"removed files the manifest does not list .*{name}"):
        write(path, columns, {"text": DICTIONARY})
    assert outside.read_bytes() == b"precious" and not os.path.islink(path / name)
    assert _manifest(str(path))["dictionaries"][0]["file"] == name
    tools.assert_identical(shardfeed.open(str(path)).read(np.arange(1700))["text"], columns["text"])


def test_held_samples_are_copies_the_caller_may_reuse(tmp_path, tools):
    columns = make_columns(1200)
    path = str(tmp_path / "reused")
    batch = {k: (v[:100].copy() if isinstance(v, np.ndarray) else list(v[:100])) for k, v in columns.items()}
    with shardfeed.Writer(path, FIELDS, compression={"text": DICTIONARY}) as writer:
        writer.extend(batch)  # held until the dictionary is trained
        batch["text"][:] = 0  # the caller's buffer, reused
        batch["code"][:] = 0
        writer.extend({k: v[100:] for k, v in columns.items()})
    ds = shardfeed.open(path)
    assert ds.compression()["text"].dictionaries == 1
    tools.assert_identical(ds.read(np.arange(1200))["text"], columns["text"])
    tools.assert_identical(ds.read(np.arange(1200))["code"], columns["code"])


def test_a_writer_interrupted_while_holding_samples_leaves_the_dataset_as_committed(tmp_path):
    columns = make_columns(200)
    path = str(tmp_path / "interrupted")
    writer = shardfeed.Writer(path, FIELDS, compression={"text": {"codec": "zstd", "dictionary": True}})
    writer.extend({k: v[:100] for k, v in columns.items()})
    assert len(writer) == 100  # held for training: counted, not written
    with pytest.raises(ValueRangeError, match="field 'code'"):
        bad = {k: v[:10] for k, v in columns.items()}
        bad["code"] = bad["code"].astype(np.int64) + 40000  # out of int16's range: refused, nothing held
        writer.extend(bad)
    assert len(writer) == 100
    writer._abandon()  # what an interrupt in extend does
    assert shardfeed.open(path).num_shards == 0 and not [n for n in os.listdir(path) if "dict" in n]
    # trained and written, no shard committed yet: the dictionary file goes with the shard's files
    columns = make_columns(1700)
    writer = shardfeed.Writer(path + "-trained", FIELDS, compression={"text": DICTIONARY})
    writer.extend(columns)
    assert [n for n in os.listdir(path + "-trained") if n.endswith(".zdict")]  # trained, in use
    writer._abandon()
    assert shardfeed.open(path + "-trained").num_shards == 0
    assert sorted(os.listdir(path + "-trained")) == ["manifest.json"]


SHIM = r"""
#include <dlfcn.h>
#include <stddef.h>
static void *real(const char *name)
{
    static void *lib;
    if (!lib)
        lib = dlopen("libzstd.so.1", RTLD_NOW | RTLD_LOCAL);
    return dlsym(lib, name);
}
#define FORWARD(ret, name, params, args) \
    ret name params { static ret (*f) params; if (!f) f = (ret (*) params)real(#name); return f args; }
FORWARD(void *, ZSTD_createCCtx, (void), ())
FORWARD(size_t, ZSTD_freeCCtx, (void *c), (c))
FORWARD(void *, ZSTD_createDCtx, (void), ())
FORWARD(size_t, ZSTD_freeDCtx, (void *c), (c))
FORWARD(size_t, ZSTD_compressCCtx, (void *c, void *d, size_t cap, const void *s, size_t n, int l), (c, d, cap, s, n, l))
FORWARD(size_t, ZSTD_decompressDCtx, (void *c, void *d, size_t cap, const void *s, size_t n), (c, d, cap, s, n))
FORWARD(unsigned, ZSTD_isError, (size_t r), (r))
FORWARD(const char *, ZSTD_getErrorName, (size_t r), (r))
FORWARD(unsigned long long, ZSTD_getFrameContentSize, (const void *s, size_t n), (s, n))
FORWARD(size_t, ZSTD_compressBound, (size_t n), (n))
FORWARD(size_t, ZSTD_decompress, (void *d, size_t cap, const void *s, size_t n), (d, cap, s, n))
"""

MISSING_SYMBOL = textwrap.dedent("""
    import sys, numpy as np, shardfeed
    from shardfeed.errors import CodecUnavailableError
    dataset, new = sys.argv[1], sys.argv[2]
    ds = shardfeed.open(dataset)  # opens: the other fields can be read
    try:
        ds.read([0, 1], "text")
    except CodecUnavailableError as exc:
        print("READ", exc)
    print("OTHER", ds.read([0, 1], "label")["label"].tolist())
    try:
        shardfeed.Writer(new, {"x": ("uint8", (64,))}, compression={"x": {"codec": "zstd", "dictionary": True}})
    except CodecUnavailableError as exc:
        print("WRITE", exc)
    with shardfeed.Writer(new + "-plain", {"x": ("uint8", (64,))}, compression={"x": "zstd"}) as w:
        w.extend({"x": np.zeros((3, 64), np.uint8)})
    print("PLAIN", shardfeed.open(new + "-plain").read([2], "x")["x"].sum())
""")


def test_a_library_without_the_dictionary_functions_names_them(triplets, tmp_path):
    paths, columns = triplets
    source = tmp_path / "shim.c"
    source.write_text(SHIM)
    shim = tmp_path / "libzstd-shim.so"
    built = subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(shim), str(source), "-ldl"], capture_output=True,
                           text=True)
    assert built.returncode == 0, built.stderr
    env = dict(os.environ, SHARDFEED_ZSTD_LIBRARY=str(shim))
    result = subprocess.run([sys.executable, "-c", MISSING_SYMBOL, paths["dict"], str(tmp_path / "new")],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert f"field 'text' is compressed with zstd and trained dictionaries, but the zstd library ({shim}) has no " \
           "function ZDICT_trainFromBuffer" in lines["READ"]
    assert lines["OTHER"] == "[0, 1]"
    assert "field 'x' is compressed with a zstd dictionary, but the zstd library" in lines["WRITE"]
    assert "ZDICT_trainFromBuffer" in lines["WRITE"]
    assert lines["PLAIN"] == "0"
    assert not os.path.exists(tmp_path / "new" / "manifest.json")


def test_dictionaries_work_after_tensorflow_put_its_own_zstd_in_the_global_scope(tmp_path):
    """TensorFlow's libtensorflow_framework exports the zstd it bundles into the process's global
    symbol scope. The system libzstd that the core loads must still call its own functions: with
    its internal calls bound to TensorFlow's zstd (another version), a compression dictionary made
    by one and freed by the other crashed the interpreter (found by the whole suite, where Keras
    tests import TensorFlow before these)."""
    pytest.importorskip("tensorflow")
    code = textwrap.dedent(f"""
        import ctypes, os, sys, warnings
        import tensorflow  # noqa: F401
        import numpy as np
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        import shardfeed
        from test_compression_dict import FIELDS, DICTIONARY, make_columns, write
        from shardfeed._reference import reference_read
        scope = ctypes.CDLL(None)
        print("global zstd:", hasattr(scope, "ZSTD_createCDict_advanced"))
        columns = make_columns(1200)
        for name, option in (("dict", DICTIONARY), ("zstd", "zstd")):
            path = write(os.path.join({str(tmp_path)!r}, name), columns, {{"text": option, "code": option}})
            with shardfeed.open(path) as ds:
                idx = np.random.default_rng(0).permutation(len(ds))[:500]
                batch = ds.read(idx, ["text", "code"])
                assert np.array_equal(batch["text"], columns["text"][idx]), name
                assert np.array_equal(batch["code"], columns["code"][idx]), name
                ref, _ = reference_read(path, idx[:50], ["text"])
                assert np.array_equal(ref["text"], columns["text"][idx[:50]]), name
            del ds
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=str(tmp_path))
    assert done.returncode == 0 and done.stdout.endswith("ok\n"), (done.returncode, done.stdout, done.stderr[-3000:])
