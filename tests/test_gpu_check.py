"""benchmarks/gpu_check.py (GPU training end to end, issue 18) on the CPU, with a one-convolution
model and a dataset of a few dozen 16 px images, so that the command cannot rot before a GPU runs it:
the dataset it writes, numpy's reference for a fed batch, the checks of every feed against it, the
reader row, the table, the refusal to run without a GPU, and the whole command on each route."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

import shardfeed

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_check  # noqa: E402
import gpu_data  # noqa: E402
from gpu_data import Config, Row  # noqa: E402

TINY = Config(model="tiny", image_size=16, classes=10, batch=4, warmup=2, steps=3, reader_seconds=0.2)
TINY_ARGS = ["--allow-cpu", "--model", "tiny", "--image-size", "16", "--classes", "10", "--batch", "4",
             "--warmup", "2", "--steps", "3", "--reader-seconds", "0.2", "--dataset-gb", "0.0001"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    path = os.fspath(tmp_path_factory.mktemp("gpu-check") / "images")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu_data, "WRITE_CHUNK_BYTES", 3 * TINY.image_bytes)  # 14 chunks, the last partial
        gpu_data.write_images(path, 40, TINY)
    return path


def test_written_images_and_reference(images):
    with shardfeed.open(images) as ds:
        stored = ds.read(np.arange(len(ds)), ["image", "label"])
    assert len(stored["image"]) == 40
    ids = np.arange(40)
    assert np.array_equal(stored["image"], gpu_data.images_at(ids, TINY))
    assert np.array_equal(stored["label"], ids % TINY.classes)
    assert len({bytes(img) for img in stored["image"]}) == 40  # no two images alike
    # The reference is the ImageNet normalisation, (x / 255 - mean) / std per channel.
    expected = (stored["image"] / 255.0 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    np.testing.assert_allclose(gpu_data.reference_images(ids, TINY), expected, rtol=1e-5, atol=1e-5)


def test_check_batch_rejects_anything_but_numpy_values():
    ids = np.array([5, 0, 33, 7])
    x, y = gpu_data.reference_images(ids, TINY), ids % TINY.classes
    gpu_data.check_batch("feed", 0, x, y, ids, TINY)
    off = x.copy()
    off[2, 3, 4, 1] = np.nextafter(off[2, 3, 4, 1], np.float32(np.inf))  # one ulp
    with pytest.raises(RuntimeError, match="feed: batch 0 differs from numpy's normalisation"):
        gpu_data.check_batch("feed", 0, off, y, ids, TINY)
    with pytest.raises(RuntimeError, match="differs"):
        gpu_data.check_batch("feed", 0, x.astype(np.float64), y, ids, TINY)
    with pytest.raises(RuntimeError, match="wrong labels"):
        gpu_data.check_batch("feed", 1, x, y[::-1], ids, TINY)


def test_keras_feeds_are_checked_against_numpy(images, monkeypatch):
    """The feeds given to model.fit hand out numpy's batches, and fail on anything else."""
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    pytest.importorskip("tensorflow", reason="the tensorflow extra is not installed")
    import gpu_routes
    with shardfeed.open(images) as ds:
        # the feeds read a view of the timed batches' samples, spread over the dataset
        sampler = shardfeed.Sampler(gpu_routes.timed_view(ds, TINY), TINY.batch, seed=TINY.seed, drop_remainder=True)
        sequence = gpu_routes.CheckedSequence(ds, TINY, "seq")
        batches = gpu_routes.checked_batches(ds, TINY, "gen")
        for step in range(TINY.check_steps + 1):
            indices = sampler.indices(step)
            for x, y in (sequence[step], next(batches)):
                gpu_data.check_batch("test", step, x, y, indices, TINY)
        batches.close()
        wrong = dict(gpu_data.read_options(), offset={"image": gpu_data.NORM_OFFSET + np.float32(1e-3)})
        monkeypatch.setattr(gpu_routes, "read_options", lambda: wrong)
        with pytest.raises(RuntimeError, match="seq: batch 0 differs"):
            gpu_routes.CheckedSequence(ds, TINY, "seq")[0]
        with pytest.raises(RuntimeError, match="gen: batch 0 differs"):
            next(gpu_routes.checked_batches(ds, TINY, "gen"))


def test_reader_row(images):
    row = gpu_check.reader_row(images, TINY)
    assert row.images_per_s > 0 and row.per_core > 0 and 0 < row.cores_busy
    assert "FFCV" in row.note and row.data == gpu_data.PAGE_CACHE


def test_table_states_each_rows_verdict():
    rows = [Row("TensorFlow", "synthetic batch on the device", "-", 1000.0, 64.0, 1.0, device="GPU: X"),
            Row("TensorFlow", "fit(ShardSequence)", "page cache", 960.0, 66.7, 0.96, device="GPU: X"),
            Row("TensorFlow", "fit(ds.batches)", "page cache", 500.0, 128.0, 0.5, device="GPU: X"),
            Row("TensorFlow", "fit(ShardSequence)", "out-of-core", note="skipped: needs root")]
    lines = gpu_check.format_table(rows).splitlines()
    assert len(lines) == 2 + len(rows)
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [c[6] for c in cells] == ["1.00", "0.96", "0.50", ""]
    assert [c[-1] for c in cells] == ["", "met (>= 0.95)", "NOT met (>= 0.95)", "skipped: needs root"]


def test_refuses_to_run_without_a_gpu(monkeypatch, tmp_path, capfd):
    monkeypatch.setattr(gpu_check, "probe_devices", lambda routes: {route: None for route in routes})
    assert gpu_check.main(TINY_ARGS[1:] + ["--tmp", os.fspath(tmp_path)]) == 2
    assert "--allow-cpu" in capfd.readouterr().err
    assert os.listdir(tmp_path) == []  # nothing written
    for bad in (["--steps", "0"], ["--warmup", "1"], ["--dataset-gb", "-1"], ["--routes", "jax"]):
        with pytest.raises(SystemExit) as exit_:
            gpu_check.main(TINY_ARGS + bad)
        assert exit_.value.code == 2


def _table_rows(output: str):
    lines = [line for line in output.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def _number(text: str) -> float:
    return float(text.replace(",", ""))


@pytest.mark.parametrize("route,library", [("tf", "tensorflow"), ("torch", "torch")])
def test_command_on_the_cpu(route, library, tmp_path, capfd):
    """The whole command, one route at a time: probe, dataset, reader row, the route's process,
    its rows (every feed checked against numpy on the way), the table; the dataset removed."""
    pytest.importorskip(library, reason=f"{library} is not installed (an optional extra)")
    assert gpu_check.main(TINY_ARGS + ["--routes", route, "--tmp", os.fspath(tmp_path)]) == 0
    out = capfd.readouterr().out
    assert os.listdir(tmp_path) == []
    rows = _table_rows(out)
    assert rows[0]["route"] == "reader alone" and _number(rows[0]["images/s"]) > 0
    trained = [r for r in rows[1:] if r["route"] == gpu_check.ROUTE_NAMES[route]]
    feeds = {"tf": ["synthetic batch on the device", "fit(ShardSequence)", "fit(ds.batches)", "fit(ShardSequence)"],
             "torch": ["synthetic batch on the device", "fit(ShardSequence)",
                       "loop: ds.read -> pinned -> non_blocking copy",
                       "loop: ds.read -> pinned -> non_blocking copy"]}[route]
    assert [r["feed"] for r in trained] == feeds, out
    assert all(r["device"] == "CPU" for r in trained)
    assert trained[0]["x synthetic"] == "1.00"
    for row in trained[:3]:
        rate, ratio = _number(row["images/s"]), _number(row["x synthetic"])
        assert rate > 0 and 0 < ratio < 50 and math.isfinite(ratio), row
        step_ms = _number(row["step ms"])  # images/s printed to 1, step ms to 0.1
        tolerance = 0.5 / rate + 0.05 / max(step_ms, 0.05) + 1e-3
        assert math.isclose(rate * step_ms / 1000, TINY.batch, rel_tol=tolerance), row
        assert row["target"] in ("", "met (>= 0.95)", "NOT met (>= 0.95)")
    out_of_core = trained[3]
    if out_of_core["target"].startswith("skipped:"):
        assert out_of_core["images/s"] == ""
    else:
        assert out_of_core["data"].startswith("out-of-core: evicted, cgroup") and _number(out_of_core["images/s"]) > 0
