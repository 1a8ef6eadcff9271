"""A new user's data, converted as it means: one .npy file per sample (and the note when files of
identical shape are concatenated instead), 'file label' lists separated by spaces, folders of
images in mixed modes, and an output directory that already holds other files. Python and the
command line (through the installed entry point, as a user runs it)."""

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


def read_all(path):
    with shardfeed.open(path) as ds:
        return ds.read(np.arange(len(ds)))


@pytest.fixture
def waves(tmp_path, rng):
    """12 per-sample files waves/w<i>.npy of shape (4, 16), float64."""
    os.makedirs(tmp_path / "waves")
    samples = [rng.standard_normal((4, 16)) for _ in range(12)]
    for i, sample in enumerate(samples):
        np.save(tmp_path / "waves" / f"w{i}.npy", sample)
    return tmp_path / "waves", np.stack(samples)


# ---- item 1: one sample per file ---------------------------------------------------------------


def test_files_of_identical_shape_concatenated_say_so_with_the_other_meaning(tmp_path, waves, tools):
    root, samples = waves
    report = convert.from_npy(tmp_path / "rows", str(root / "*.npy"))
    tools.assert_identical(read_all(tmp_path / "rows")["x"], samples.reshape(48, 16))  # natural order w0..w11
    note = ("12 files of identical shape (4, 16) were concatenated along their first axis into 48 samples of "
            "float64[16] in field 'x'; if each file is one sample, convert them with sample_per_file=True")
    assert report.notes == [note] and f"note: {note}" in str(report)
    done = run("convert", root / "*.npy", "-o", tmp_path / "cli")
    assert done.returncode == 0, done.stderr
    assert "if each file is one sample, convert them with --sample-per-file" in done.stdout
    # files of different shapes are surely chunks of rows: no note
    np.save(tmp_path / "a.npy", np.zeros((3, 2)))
    np.save(tmp_path / "b.npy", np.zeros((5, 2)))
    assert convert.from_npy(tmp_path / "ab", [tmp_path / "a.npy", tmp_path / "b.npy"]).notes == []


def test_one_sample_per_file_in_python_and_on_the_command_line(tmp_path, waves, tools):
    root, samples = waves
    report = convert.from_npy(tmp_path / "py", str(root / "*.npy"), sample_per_file=True, field="wave",
                              dtypes={"wave": "float32"})
    batch = read_all(tmp_path / "py")
    tools.assert_identical(batch["wave"], samples.astype(np.float32))
    assert list(batch) == ["wave"] and report.num_samples == 12 and report.notes == []
    # a glob named NAME=..., a list of files, and a directory
    done = run("convert", f"wave={root / '*.npy'}", "--sample-per-file", "-o", tmp_path / "glob")
    assert done.returncode == 0, done.stderr
    assert "wrote 12 samples" in done.stdout and "wave: float64 -> float64[4, 16]" in done.stdout
    tools.assert_identical(read_all(tmp_path / "glob")["wave"], samples)
    listed = run("convert", root / "w3.npy", root / "w1.npy", "--sample-per-file", "-o", tmp_path / "list")
    assert listed.returncode == 0, listed.stderr
    tools.assert_identical(read_all(tmp_path / "list")["x"], samples[[3, 1]])
    directory = run("convert", f"wave={root}", "--from", "npy", "--sample-per-file", "-o", tmp_path / "dir",
                    "--workers", "2")
    assert directory.returncode == 0, directory.stderr
    tools.assert_identical(read_all(tmp_path / "dir")["wave"], samples)
    # without the option, a directory given --from npy is chunks of rows
    rows = run("convert", root, "--from", "npy", "-o", tmp_path / "rows")
    assert rows.returncode == 0 and "--sample-per-file" in rows.stdout
    assert shardfeed.open(tmp_path / "rows").fields["x"].shape == (16,)


def test_sample_per_file_usage_errors(tmp_path, waves):
    root, _ = waves
    (tmp_path / "a.csv").write_text("u\n1\n")
    done = run("convert", tmp_path / "a.csv", "--sample-per-file", "-o", tmp_path / "o")
    assert done.returncode == 2 and "--sample-per-file applies to .npy files and directories of samples, not csv" \
        in done.stderr
    done = run("convert", root / "*.npy", "--sample-per-file", "--labels", tmp_path / "l.txt", "-o", tmp_path / "o")
    assert done.returncode == 2 and "--labels applies to files sources, not npy" in done.stderr


# ---- item 2: 'file label' lists ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["spaces", "tabs", "commas", "quoted-spaces", "header-and-comments"])
def test_label_lists_in_the_forms_people_keep(tmp_path, rng, tools, form):
    os.makedirs(tmp_path / "s")
    names = ["a.npy", "b c.npy", "d.npy"] if form == "quoted-spaces" else ["a.npy", "b.npy", "d.npy"]
    values = {}
    for i, name in enumerate(names):
        values[name] = rng.standard_normal(3)
        np.save(tmp_path / "s" / name, values[name])
    labels = {names[0]: 2, names[1]: 0, names[2]: 1}
    lines = {
        "spaces": [f"{n}   {labels[n]}" for n in names],
        "tabs": [f"{n}\t{labels[n]}" for n in names],
        "commas": [f"{n},{labels[n]}" for n in names],
        "quoted-spaces": [f'"{names[0]}" 2', "b\\ c.npy 0", f"'{names[2]}' 1"],
        "header-and-comments": ["file label", "# the training list", ""] + [f"{n} {labels[n]}  # ok" for n in names],
    }[form]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    convert.from_files(tmp_path / "py", tmp_path / "s", labels=tmp_path / "list.txt")
    batch = read_all(tmp_path / "py")
    tools.assert_identical(batch["x"], np.stack([values[n] for n in names]))
    tools.assert_identical(batch["label"], np.array([labels[n] for n in names]))
    done = run("convert", tmp_path / "s", "--labels", tmp_path / "list.txt", "-o", tmp_path / "cli")
    assert done.returncode == 0, done.stderr
    tools.assert_identical(read_all(tmp_path / "cli")["label"], batch["label"])


def test_a_bad_label_list_line_is_named(tmp_path):
    os.makedirs(tmp_path / "s")
    np.save(tmp_path / "s" / "a.npy", np.zeros(2))
    (tmp_path / "list.txt").write_text("a.npy 1\nmy file.npy 2\n")
    with pytest.raises(shardfeed.SourceError, match=r"list.txt, line 2: expected 2 columns \(file, label\), got 3: "
                                                    r"\['my', 'file.npy', '2'\] \(quote a name that has spaces"):
        convert.from_files(tmp_path / "d", tmp_path / "s", labels=tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text('a.npy 1\n"b.npy 2\n')
    done = run("convert", tmp_path / "s", "--labels", tmp_path / "list.txt", "-o", tmp_path / "d")
    assert done.returncode == 1 and "list.txt, line 2: unbalanced quotes" in done.stderr


# ---- item 5: image modes -----------------------------------------------------------------------

def _images(root, modes):
    Image = pytest.importorskip("PIL.Image", reason="Pillow (the images extra) is not installed")
    os.makedirs(root)
    rng = np.random.default_rng(7)
    made = {}
    for i, mode in enumerate(modes):
        channels = {"L": 1, "RGB": 3, "RGBA": 4, "LA": 2}[mode]
        pixels = rng.integers(0, 256, (5, 6, channels), dtype=np.uint8)
        image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels, mode)
        image.save(root / f"{i:02d}.png")
        made[f"{i:02d}.png"] = image
    return made


def test_mixed_image_modes_default_to_the_mode_that_loses_no_colour(tmp_path, tools):
    made = _images(tmp_path / "img", ["L", "L", "RGB", "L", "RGBA"])  # the first in sorted order is gray
    report = convert.from_files(tmp_path / "d", tmp_path / "img")
    expected = np.stack([np.asarray(made[n].convert("RGB")) for n in sorted(made)])
    tools.assert_identical(read_all(tmp_path / "d")["image"], expected)
    assert report.image_mode == "RGB" and report.images_converted == {"L": 3, "RGBA": 1}
    text = str(report)
    assert "4 of 5 images converted to RGB (from 3 L, 1 RGBA); their transparency was dropped: " \
           "image_mode='RGBA' keeps it" in text
    assert shardfeed.open(tmp_path / "d").metadata["image"]["mode"] == "RGB"
    # RGBA only when asked; on the command line in its own terms
    done = run("convert", tmp_path / "img", "--image-mode", "RGBA", "-o", tmp_path / "rgba")
    assert done.returncode == 0, done.stderr
    assert "4 of 5 images converted to RGBA (from 3 L, 1 RGB)" in done.stdout
    tools.assert_identical(read_all(tmp_path / "rgba")["image"],
                           np.stack([np.asarray(made[n].convert("RGBA")) for n in sorted(made)]))
    done = run("convert", tmp_path / "img", "-o", tmp_path / "cli")
    assert done.returncode == 0 and "--image-mode RGBA keeps it" in done.stdout, done.stdout


def test_gray_images_stay_gray_and_uniform_modes_are_not_reported(tmp_path, tools):
    made = _images(tmp_path / "gray", ["L", "LA", "L"])
    report = convert.from_files(tmp_path / "g", tmp_path / "gray")
    assert report.image_mode == "L" and report.images_converted == {"LA": 1}
    tools.assert_identical(read_all(tmp_path / "g")["image"],
                           np.stack([np.asarray(made[n].convert("L"))[:, :, None] for n in sorted(made)]))
    _images(tmp_path / "rgb", ["RGB", "RGB"])
    report = convert.from_files(tmp_path / "r", tmp_path / "rgb", workers=2)
    assert report.image_mode == "RGB" and report.images_converted == {} and "converted to" not in str(report)


# ---- item 6: an output directory of other files ------------------------------------------------


def test_output_into_the_image_folder_itself_is_refused_naming_it(tmp_path):
    made = _images(tmp_path / "img", ["RGB", "RGB"])
    done = run("convert", tmp_path / "img", "-o", tmp_path / "img")
    assert done.returncode == 1, done
    assert f"the output directory is not empty (00.png, 01.png) and holds no dataset: give a new or empty " \
           f"directory: '{tmp_path / 'img'}'" in done.stderr
    assert sorted(os.listdir(tmp_path / "img")) == sorted(made)


def test_npy_headers_are_parsed_one_thread_at_a_time(tmp_path, waves, tools, monkeypatch):
    """numpy parses a .npy header with ast.literal_eval, which CPython before 3.11.8 can fail in
    two threads at once (SystemError "AST constructor recursion depth mismatch", seen once in
    this suite): the decoding threads of from_files must not parse headers concurrently, and the
    samples they read stay exact."""
    import threading
    import time

    root, samples = waves
    real = np.lib.format.read_array_header_1_0
    inside, most = [0], [0]
    count = threading.Lock()

    def slow_header(f, *args, **kwargs):
        with count:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        time.sleep(0.005)  # long enough for another decoding thread to arrive
        try:
            return real(f, *args, **kwargs)
        finally:
            with count:
                inside[0] -= 1

    monkeypatch.setattr(np.lib.format, "read_array_header_1_0", slow_header)
    names = [f"w{i}.npy" for i in range(len(samples))]
    convert.from_files(tmp_path / "out", root, files=names, field="wave", threads=6)
    tools.assert_identical(read_all(tmp_path / "out")["wave"], samples)
    assert most[0] == 1


def test_a_truncated_npy_sample_is_named(tmp_path, waves):
    root, _ = waves
    with open(root / "w5.npy", "r+b") as f:
        f.truncate(os.path.getsize(root / "w5.npy") - 8)
    with pytest.raises(shardfeed.SourceError, match=r"w5\.npy: .*truncated \.npy file \(504 of 512 data bytes\)"):
        convert.from_files(tmp_path / "out", root)
