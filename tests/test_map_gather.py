"""The map path gathers small records of one converted field into a scratch buffer and converts a
group at a time: many groups per batch, per-channel transforms in phase, zero-size records."""
import numpy as np
import pytest

import shardfeed


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    rng = np.random.default_rng(11)
    n = 3000
    columns = {
        "h": (rng.standard_normal((n, 2, 3)) * 50).astype(np.float16),   # 12 B: ~680 records a group
        "chw": rng.integers(0, 256, (n, 3, 4, 5), dtype=np.uint8),
        "hwc": rng.integers(0, 256, (n, 4, 5, 3), dtype=np.uint8),
        "empty": np.zeros((n, 0), np.float16),
    }
    path = str(tmp_path_factory.mktemp("gather") / "ds")
    with shardfeed.Writer(path, fields={k: (str(a.dtype), a.shape[1:]) for k, a in columns.items()},
                          shard_size=shardfeed.format.HEADER_BYTES + 7000 * 12) as w:
        w.extend(columns)
    return path, columns


STD = np.array([0.229, 0.224, 0.225]) * 255
CASES = [("h", None, None), ("h", np.array([1.0, -2.0, 0.5]), 3.0),
         ("chw", (1 / STD).reshape(3, 1, 1), (-1 / STD).reshape(3, 1, 1)), ("hwc", 1 / STD, -0.5)]


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("name,scale,offset", CASES)
def test_gathered_groups_match_numpy(small, threads, name, scale, offset):
    path, columns = small
    indices = np.random.default_rng(threads).integers(0, 3000, 2500)
    with shardfeed.open(path, mmap=True, threads=threads) as ds:
        got = ds.read(indices, fields=name, dtype="float32", scale=scale, offset=offset)[name]
    x = columns[name][indices].astype(np.float32)
    want = (x * np.asarray(1.0 if scale is None else scale, np.float32)
            + np.asarray(0.0 if offset is None else offset, np.float32)).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))


def test_zero_size_records(small):
    path, _ = small
    with shardfeed.open(path, mmap=True) as ds:
        assert ds.read([5, 1, 2999], fields="empty", dtype="float32")["empty"].shape == (3, 0)
