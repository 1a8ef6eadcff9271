"""grain and JAX: datasets and views as grain data sources (MapDataset, DataLoader at 0 and 2
workers, the batched _getitems), and multi-host input with ds.shard(jax.process_index(),
jax.process_count()) + jax.make_array_from_process_local_data, in one process and in a two-process
JAX job on this machine. Every batch is checked against numpy."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import shardfeed

N = 157

# grain's worker processes forked from this multi-threaded process: Python >= 3.12 warns (see test_torch.py).
pytestmark = pytest.mark.filterwarnings("ignore:This process .* is multi-threaded, use of fork:DeprecationWarning")


@pytest.fixture(scope="module")
def data(tmp_path_factory, tools):
    """A dataset whose label is the sample's index; tok (variable length) only in ``mixed``."""
    path, columns = tools.indexed_dataset(tmp_path_factory.mktemp("grain") / "ds", N, (2, 3), seed=21,
                                          shard_size=1000)
    with shardfeed.open(path) as ds:
        yield ds, columns


def check_samples(samples, columns, indices):
    assert len(samples) == len(indices)
    for sample, i in zip(samples, indices):
        assert set(sample) == {"x", "label"}
        np.testing.assert_array_equal(sample["x"], columns["x"][i])
        assert sample["label"] == columns["label"][i]


# ---- grain -------------------------------------------------------------------------------------


def test_batched_getitems_of_datasets_views_and_variable_fields(data, tmp_path):
    ds, columns = data
    view = ds.split([0.5, 0.5], seed=2)[1]
    check_samples(ds._getitems([4, 0, 4, N - 1]), columns, [4, 0, 4, N - 1])
    positions = [3, 1, len(view) - 1]
    check_samples(view._getitems(positions), columns, view.indices(positions))
    assert ds._getitems([]) == []
    with pytest.raises(IndexError):
        view._getitems([len(view)])
    rows = [np.arange(k, dtype=np.int16) for k in (3, 0, 5)]
    with shardfeed.Writer(tmp_path / "var", fields={"tok": ("int16", (None,))}) as w:
        for row in rows:
            w.append({"tok": row})
    with shardfeed.open(tmp_path / "var") as var:
        for sample, i in zip(var._getitems([2, 1, 0]), [2, 1, 0]):
            np.testing.assert_array_equal(sample["tok"], rows[i])  # unpadded, as var[i]


def test_grain_map_dataset_source(data):
    grain = pytest.importorskip("grain", reason="grain is not installed (pip install grain)")
    from grain._src.python.dataset import base
    ds, columns = data
    view = ds.split([0.8, 0.2], seed=4)[0]
    assert isinstance(view, base.SupportsBatchedReadRandomAccessDataSource)
    assert isinstance(ds, base.SupportsBatchedReadRandomAccessDataSource)
    source = grain.MapDataset.source(view)
    assert len(source) == len(view)
    check_samples(source._getitems([5, 2]), columns, view.indices([5, 2]))  # through the batched read
    batches = list(source.shuffle(seed=3).batch(16))
    seen = np.concatenate([b["label"] for b in batches])
    assert sorted(seen) == sorted(view.indices().tolist())
    for b in batches:
        np.testing.assert_array_equal(b["x"], columns["x"][b["label"]])


@pytest.mark.parametrize("workers", [0, 2])
def test_grain_dataloader(data, workers):
    grain = pytest.importorskip("grain", reason="grain is not installed (pip install grain)")
    if workers:  # grain's worker processes read absl flags, which a program run by absl.app.run has parsed
        from absl import flags
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
    ds, columns = data
    view = ds.split([0.9, 0.1], seed=6)[0]
    sampler = grain.samplers.IndexSampler(num_records=len(view), shard_options=grain.sharding.NoSharding(),
                                          shuffle=True, num_epochs=1, seed=5)
    loader = grain.DataLoader(data_source=view, sampler=sampler, operations=[grain.transforms.Batch(batch_size=20)],
                              worker_count=workers)
    labels = []
    for batch in loader:
        np.testing.assert_array_equal(batch["x"], columns["x"][batch["label"]])
        labels.extend(batch["label"].tolist())
    assert sorted(labels) == sorted(view.indices().tolist())


# ---- JAX multi-host ----------------------------------------------------------------------------


def host_batches(ds, host, hosts, steps, batch, seed):
    """Host ``host``'s first ``steps`` batches of labels: its shard's order, the seed every host shares."""
    part = ds.shard(host, hosts)
    sampler = shardfeed.Sampler(part, batch, seed=seed)
    return [sampler.batch(0, b) for b in range(steps)]


def free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_hosts(ds, tmp_path, processes):
    """Runs jax_host.py as ``processes`` JAX processes (subprocesses: the test process never starts
    a JAX backend, which would warn at every later fork) and returns their results."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "jax_host.py")
    port = str(free_port())
    outs = [str(tmp_path / f"host{p}.npz") for p in range(processes)]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    hosts = [subprocess.Popen([sys.executable, script, str(processes), str(p), port, ds.path, outs[p]], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(processes)]
    logs = [h.communicate(timeout=240)[0] for h in hosts]
    for h, log in zip(hosts, logs):
        assert h.returncode == 0, log[-3000:]
    return [np.load(out) for out in outs]


@pytest.mark.parametrize("processes", [1, 2])
def test_jax_hosts_assemble_disjoint_host_batches(data, tmp_path, processes):
    pytest.importorskip("jax", reason="jax is not installed (pip install \"shardfeed[jax]\")")
    from jax_host import BATCH, SEED, STEPS
    ds, columns = data
    results = run_hosts(ds, tmp_path, processes)
    parts = [host_batches(ds, p, processes, STEPS, BATCH, SEED) for p in range(processes)]
    for p, result in enumerate(results):
        assert (int(result["index"]), int(result["count"])) == (p, processes)
        for step in range(STEPS):
            ids = np.concatenate([part[step] for part in parts])  # the global batch: host 0's rows, then host 1's
            np.testing.assert_array_equal(result["label"][step], ids.astype(np.float32))
            np.testing.assert_array_equal(result["x"][step], columns["x"][ids].astype(np.float32))
    every = np.concatenate([np.concatenate(part) for part in parts])
    assert len(np.unique(every)) == len(every)  # the hosts' parts are disjoint
