"""`shardfeed demo`, the README's first command: trains a Keras model from a synthetic dataset and
reports per-epoch samples/s and memory; --read-only reads batches (and works without Keras)."""

import os
import re
import subprocess
import sys

import pytest


def run_demo(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-m", "shardfeed", "demo", "--dir", str(tmp_path), *args],
                          capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert not os.listdir(tmp_path), "the demo leaves its temporary dataset behind"
    return done.stdout


def test_demo_trains_a_keras_model(tmp_path):
    pytest.importorskip("keras", reason="the tensorflow extra is not installed")
    out = run_demo(tmp_path, "--samples", "3000", "--epochs", "2", "--batch-size", "128")
    assert "wrote 3,000 samples" in out and "training a Keras" in out
    epochs = re.findall(r"epoch (\d)/2: loss ([\d.]+), accuracy ([\d.]+), val_accuracy ([\d.]+) \| ([\d,]+) "
                        r"samples/s \| peak RSS [\d.]+ [KMG]iB, private [\d.]+ [KMG]iB", out)
    assert [e[0] for e in epochs] == ["1", "2"], out
    assert float(epochs[1][1]) < float(epochs[0][1])  # it learns
    assert re.search(r"dataset [\d.]+ [KMG]iB; peak RSS [\d.]+ [KMG]iB = [\d.]+ x the dataset", out), out


def test_demo_read_only(tmp_path):
    out = run_demo(tmp_path, "--samples", "2000", "--epochs", "2", "--read-only")
    assert re.search(r"read 4,000 samples in [\d.]+ s: [\d,]+ samples/s", out), out
