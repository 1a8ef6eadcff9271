"""Directory of per-sample files: images (Pillow) and .npy files, labels from sub-folders or a
CSV/JSON listing, file lists as the index (separate datasets or splits of one), bad files refused
or skipped, resizing and layouts, parts."""

import json
import os

import numpy as np
import pytest

import shardfeed
from shardfeed import convert

Image = pytest.importorskip("PIL.Image", reason="Pillow (the images extra) is not installed")


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


def make_images(root, rng, classes=("cat", "dog", "eel"), per_class=(4, 3, 5), size=(6, 5), mode="RGB"):
    """PNG files root/<class>/<i>.png; returns {relative name: (pixels, class)}."""
    made = {}
    for name, count in zip(classes, per_class):
        os.makedirs(root / name, exist_ok=True)
        for i in range(count):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            pixels = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(pixels, mode).save(root / name / f"{i}.png")
            made[f"{name}/{i}.png"] = (pixels if pixels.ndim == 3 else pixels[:, :, None], name)
    return made


def test_images_with_folder_labels_round_trip_exactly(tmp_path, rng, tools):
    made = make_images(tmp_path / "img", rng)
    report = convert.from_files(tmp_path / "d", tmp_path / "img", labels="folders", chunk_bytes=200, threads=3)
    ds = shardfeed.open(tmp_path / "d")
    names = sorted(made, key=lambda n: (n.split("/")[0], int(n.split("/")[1][:-4])))
    batch = ds.read(np.arange(len(ds)))
    tools.assert_identical(batch["image"], np.stack([made[n][0] for n in names]))
    assert ds.metadata["classes"] == ["cat", "dog", "eel"]
    tools.assert_identical(batch["label"], np.array([["cat", "dog", "eel"].index(made[n][1]) for n in names]))
    assert ds.metadata["image"] == {"mode": "RGB", "layout": "hwc"}
    assert ds.fields["image"].dtype == "uint8" and ds.fields["image"].shape == (5, 6, 3)
    assert report.num_samples == 12 and report.source_bytes == sum(
        os.path.getsize(tmp_path / "img" / n) for n in names)
    ds.close()


def test_file_lists_are_the_index_for_separate_datasets_and_splits(tmp_path, rng, tools):
    made = make_images(tmp_path / "img", rng)
    train, val = ["dog/2.png", "cat/0.png", "eel/4.png"], ["cat/3.png", "dog/0.png"]
    (tmp_path / "train.txt").write_text("# training images\n" + "\n".join(train) + "\n\n")
    (tmp_path / "val.txt").write_text("\n".join(val))
    convert.from_files(tmp_path / "train", tmp_path / "img", files=tmp_path / "train.txt", labels="folders")
    convert.from_files(tmp_path / "val", tmp_path / "img", files=tmp_path / "val.txt", labels="folders")
    for split, names in (("train", train), ("val", val)):
        batch = read_all(tmp_path / split)
        tools.assert_identical(batch["image"], np.stack([made[n][0] for n in names]))
        assert shardfeed.open(tmp_path / split).metadata["classes"] == ["cat", "dog", "eel"]  # all folders
    convert.from_files(tmp_path / "both", tmp_path / "img", splits={"train": tmp_path / "train.txt", "val": val},
                       labels="folders")
    ds = shardfeed.open(tmp_path / "both")
    assert ds.metadata["splits"] == {"train": [0, 3], "val": [3, 5]}
    tools.assert_identical(ds.read(np.arange(3, 5))["image"], np.stack([made[n][0] for n in val]))
    ds.close()


@pytest.mark.parametrize("listing", ["labels.csv", "labels.json", "pairs.json", "dict"])
def test_labels_from_a_listing(tmp_path, rng, tools, listing):
    made = make_images(tmp_path / "img", rng)
    names = ["eel/1.png", "cat/2.png", "dog/0.png"]
    labels = {"eel/1.png": "fish", "cat/2.png": "mammal", "dog/0.png": "mammal"}
    if listing == "labels.csv":
        (tmp_path / listing).write_text("file,label\n" + "".join(f"{n},{labels[n]}\n" for n in names))
        source = tmp_path / listing
    elif listing == "labels.json":
        (tmp_path / listing).write_text(json.dumps(labels))
        source = tmp_path / listing
    elif listing == "pairs.json":
        (tmp_path / listing).write_text(json.dumps([[n, labels[n]] for n in names]))
        source = tmp_path / listing
    else:
        source = labels
    convert.from_files(tmp_path / "d", tmp_path / "img", labels=source)
    ds = shardfeed.open(tmp_path / "d")
    assert ds.metadata["classes"] == ["fish", "mammal"]
    batch = ds.read(np.arange(3))
    tools.assert_identical(batch["label"], np.array([0, 1, 1]))
    tools.assert_identical(batch["image"], np.stack([made[n][0] for n in names]))
    ds.close()


def test_integer_labels_and_missing_labels(tmp_path, rng, tools):
    make_images(tmp_path / "img", rng)
    (tmp_path / "l.csv").write_text("cat/0.png,7\ncat/1.png,3\n")
    convert.from_files(tmp_path / "d", tmp_path / "img", labels=tmp_path / "l.csv")
    assert "classes" not in shardfeed.open(tmp_path / "d").metadata
    tools.assert_identical(read_all(tmp_path / "d")["label"], np.array([7, 3]))
    with pytest.raises(shardfeed.SourceError, match=r"dog/1\.png: no label for it"):
        convert.from_files(tmp_path / "e", tmp_path / "img", files=["cat/0.png", "dog/1.png"],
                           labels=tmp_path / "l.csv")
    report = convert.from_files(tmp_path / "s", tmp_path / "img", files=["cat/0.png", "dog/1.png"],
                                labels=tmp_path / "l.csv", on_error="skip")
    assert report.skipped == 1 and report.num_samples == 1


def test_bad_and_odd_files_error_or_skip(tmp_path, rng, tools):
    made = make_images(tmp_path / "img", rng, per_class=(3, 3, 3))
    (tmp_path / "img" / "dog" / "1.png").write_bytes(b"\x89PNG truncated")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(tmp_path / "img" / "eel" / "2.png")
    with pytest.raises(shardfeed.SourceError, match=r"dog/1\.png: cannot read"):
        convert.from_files(tmp_path / "d", tmp_path / "img", labels="folders")
    assert not os.path.exists(tmp_path / "d")
    report = convert.from_files(tmp_path / "d", tmp_path / "img", labels="folders", on_error="skip")
    assert report.skipped == 2 and report.num_samples == 7
    assert any("eel/2.png: has shape (9, 9, 3), the first sample (5, 6, 3); pass size=" in e
               for e in report.skipped_examples)
    kept = ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/2.png", "eel/0.png", "eel/1.png"]
    tools.assert_identical(read_all(tmp_path / "d")["image"], np.stack([made[n][0] for n in kept]))


def test_resize_layout_and_mode(tmp_path, rng):
    os.makedirs(tmp_path / "img")
    sizes = [(6, 5), (10, 3), (4, 4)]
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L").save(tmp_path / "img" / f"{i}.png")
    Image.fromarray(rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)).save(tmp_path / "img" / "3.jpg")
    with pytest.raises(shardfeed.SourceError, match=r"img/1\.png: has shape \(3, 10, 3\)"):
        convert.from_files(tmp_path / "a", tmp_path / "img")
    convert.from_files(tmp_path / "b", tmp_path / "img", size=(8, 8), layout="chw", image_mode="RGB")
    ds = shardfeed.open(tmp_path / "b")
    assert ds.fields["image"].shape == (3, 8, 8) and len(ds) == 4 and ds.metadata["image"]["layout"] == "chw"
    gray = np.asarray(Image.open(tmp_path / "img" / "0.png").convert("RGB").resize((8, 8), Image.BILINEAR))
    np.testing.assert_array_equal(ds[0]["image"], np.moveaxis(gray, -1, 0))
    ds.close()
    convert.from_files(tmp_path / "c", tmp_path / "img", files=["0.png"])
    assert shardfeed.open(tmp_path / "c").fields["image"].shape == (5, 6, 1)  # grayscale keeps a channel axis


def test_per_sample_npy_files(tmp_path, rng, tools):
    root = tmp_path / "arrays"
    samples = {}
    for label in ("a", "b"):
        os.makedirs(root / label)
        for i in range(4):
            samples[f"{label}/{i}.npy"] = rng.standard_normal((3, 2)).astype(np.float32)
            np.save(root / label / f"{i}.npy", samples[f"{label}/{i}.npy"])
    report = convert.from_files(tmp_path / "d", root, labels="folders", dtypes={"x": "float16"}, part=(1, 2))
    batch = read_all(tmp_path / "d")
    names = ["b/0.npy", "b/1.npy", "b/2.npy", "b/3.npy"]
    tools.assert_identical(batch["x"], np.stack([samples[n] for n in names]).astype(np.float16))
    tools.assert_identical(batch["label"], np.array([1, 1, 1, 1]))
    assert report.fields["x"].measured


def test_empty_and_mixed_inputs(tmp_path, rng):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(shardfeed.SourceError, match="no files to convert"):
        convert.from_files(tmp_path / "d", tmp_path / "empty")
    (tmp_path / "list.txt").write_text("# nothing\n")
    with pytest.raises(shardfeed.SourceError, match="no files to convert"):
        convert.from_files(tmp_path / "d", tmp_path / "empty", files=tmp_path / "list.txt")
    os.makedirs(tmp_path / "mixed")
    np.save(tmp_path / "mixed" / "a.npy", np.zeros(2))
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(shardfeed.SourceError, match="must all be .npy or all images"):
        convert.from_files(tmp_path / "d", tmp_path / "mixed")
    with pytest.raises(shardfeed.SourceError, match="not inside a class sub-folder"):
        convert.from_files(tmp_path / "d", tmp_path / "mixed", files=["a.npy"], labels="folders")
    assert not os.path.exists(tmp_path / "d")
