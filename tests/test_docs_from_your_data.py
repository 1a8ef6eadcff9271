"""docs/from-your-data.md, run as a user would: every fenced ``bash`` and ``python`` block of the
page, in order, in a directory holding small generated data laid out as the page says (per-sample
.npy files with a 'file label' list and split lists; numbered CSV files with list cells). The
datasets the commands write are checked against the generated data, so the page cannot rot."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest

import shardfeed

PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "from-your-data.md")
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)


def blocks():
    with open(PAGE, encoding="utf-8") as f:
        return BLOCK.findall(f.read())


def make_waves(root, rng, count=60, classes=10):
    os.makedirs(root / "waves")
    names = [f"wave_{i:05d}.npy" for i in range(1, count + 1)]
    waves = {n: rng.standard_normal((32, 256)) * 0.5 for n in names}
    labels = {n: int(rng.integers(0, classes)) for n in names}
    for name in names:
        np.save(root / "waves" / name, waves[name])
    order = list(rng.permutation(names))  # the list's order is the dataset's
    (root / "labels.txt").write_text("".join(f"{n} {labels[n]}\n" for n in order))
    (root / "train.txt").write_text("".join(f"{n}\n" for n in order[:48]))
    (root / "val.txt").write_text("".join(f"{n}\n" for n in order[48:]))
    return order, waves, labels


def make_logs(root, rng, files=12, rows=25, items=1000):
    os.makedirs(root / "logs")
    expected = []
    for k in range(1, files + 1):
        lines = ["user,history,age,next_item,rating"]
        for r in range(rows):
            history = rng.integers(1, items, rng.integers(0, 30))
            row = dict(history=history, age=float(rng.integers(18, 80)), next_item=int(rng.integers(0, items)),
                       rating=float(rng.integers(0, 11)) / 2)
            lines.append(f'{k * 100 + r},"{" ".join(map(str, history))}",{row["age"]:g},{row["next_item"]},'
                         f'{row["rating"]}')
            expected.append(row)
        (root / "logs" / f"{k}.csv").write_text("\n".join(lines) + "\n")
    return expected


def run_block(kind, text, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    command = ["bash", "-euo", "pipefail", "-c", text] if kind == "bash" else [sys.executable, "-c", text]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=str(cwd), env=env)
    assert done.returncode == 0, f"{kind} block failed:\n{text}\n--- stdout\n{done.stdout[-3000:]}\n" \
                                 f"--- stderr\n{done.stderr[-3000:]}"
    return done.stdout


def test_the_page_has_the_two_scenarios():
    found = blocks()
    commands = "\n".join(text for kind, text in found if kind == "bash")
    assert "--labels labels.txt" in commands and "--split train=train.txt" in commands
    assert "--list-field history" in commands
    assert sum(kind == "python" for kind, _ in found) >= 3


def test_every_command_of_the_page_runs_on_generated_data(tmp_path, rng, tools):
    pytest.importorskip("keras", reason="the tensorflow extra is not installed")
    order, waves, labels = make_waves(tmp_path, rng)
    rows = make_logs(tmp_path, rng)
    outputs = [run_block(kind, text, tmp_path) for kind, text in blocks()]

    with shardfeed.open(tmp_path / "data" / "waves") as ds:
        batch = ds.read(np.arange(len(ds)))
        tools.assert_identical(batch["wave"], np.stack([waves[n] for n in order]).astype(np.float16))
        tools.assert_identical(batch["label"], np.array([labels[n] for n in order]))
    with shardfeed.open(tmp_path / "data" / "waves-split") as ds:
        assert ds.metadata["splits"] == {"train": [0, 48], "val": [48, 60]}
    assert any("48 training and 12 validation samples" in out for out in outputs)
    with shardfeed.open(tmp_path / "data" / "logs") as ds:
        assert ds.fields["history"].shape == (None,) and ds.fields["history"].dtype == "int32"
        for i, row in enumerate(rows):
            sample = ds[i]
            tools.assert_identical(sample["history"], row["history"].astype(np.int32))
            assert (sample["age"], sample["next_item"], sample["rating"]) == (row["age"], row["next_item"],
                                                                             row["rating"])
    fits = [out for out in outputs if "val_loss" in out]
    assert len(fits) == 2, outputs  # both models trained with validation
