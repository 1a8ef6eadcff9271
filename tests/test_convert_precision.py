"""The precision report counts what a narrower float did to the values, checked against numpy's own
rounding: how many became subnormal or 0, how many overflowed (saturated), and the relative error
over the normal range, with one line per field that says what to do."""

import os
import subprocess
import sys

import numpy as np

from shardfeed import convert

SHARDFEED = os.path.join(os.path.dirname(sys.executable), "shardfeed")
TINY16 = float(np.finfo(np.float16).tiny)


def expected_counts(x, stored, tiny, largest):
    """The report's counts, computed from the source and numpy's float16 cast."""
    x, s = x.astype(np.float64).ravel(), stored.astype(np.float64).ravel()
    finite = np.isfinite(x) & np.isfinite(s)
    x, s = x[finite], s[finite]
    nonzero = x != 0
    normal = nonzero & (np.abs(x) >= tiny) & (np.abs(x) <= largest)
    return {
        "values": x.size,
        "zeroed": int(np.count_nonzero(nonzero & (s == 0))),
        "subnormal": int(np.count_nonzero((s != 0) & (np.abs(s) < tiny))),
        "normal_rel_error": float((np.abs(s - x)[normal] / np.abs(x[normal])).max()),
        "max_rel_error": float((np.abs(s - x)[nonzero] / np.abs(x[nonzero])).max()),
    }


def test_counts_match_numpy_for_float16(tmp_path, rng):
    # mostly normal values, some in float16's subnormal range, some below its smallest subnormal
    x = rng.standard_normal((2000, 32))
    x[:40] *= 1e-6   # 2.5% subnormal in float16 (many still nonzero)
    x[40:45] *= 1e-9  # these round to 0
    x[45, :3] = [0.0, np.inf, np.nan]  # exact zero, and non-finite values: not counted
    report = convert.from_arrays(tmp_path / "d", {"x": x}, dtypes={"x": "float16"}, chunk_bytes=4096)
    field = report.fields["x"]
    want = expected_counts(x, x.astype(np.float16), TINY16, 65504.0)
    got = {k: getattr(field, k) for k in want}
    assert got == want
    assert want["zeroed"] > 0 and want["subnormal"] > 0 and want["normal_rel_error"] <= 2.0 ** -11
    assert want["max_rel_error"] == 1.0  # a value that became 0: why a maximum alone misleads
    line = next(line for line in str(report).splitlines() if line.startswith("  x: "))
    n = want["values"]
    assert line == (
        f"  x: float64 -> float16[32]: {n:,} values, rel error <= {want['normal_rel_error']:.3g} in float16's "
        f"normal range (|v| >= 6.1e-05); {want['subnormal']:,} ({100 * want['subnormal'] / n:.2g}%) became "
        f"subnormal (fewer significant bits); {want['zeroed']:,} ({100 * want['zeroed'] / n:.2g}%) became 0; "
        f"max rel error 1; to keep the small values, store 'x' as bfloat16 (float32's range, 8 significant bits) "
        f"or float32 (dtypes={{'x': 'bfloat16'}}) or scale the values up before converting")


def test_saturated_values_are_counted_apart_from_the_normal_range(tmp_path, rng):
    x = rng.uniform(-1000, 1000, (500, 4))
    x[7, 1], x[300, 2] = 1e6, -7e4
    report = convert.from_arrays(tmp_path / "d", x, dtypes="float16", overflow="saturate")
    field = report.fields["x"]
    assert field.saturated == 2 and field.zeroed == field.subnormal == 0
    inside = np.abs(x) <= 65504
    stored = np.where(inside, x, 0).astype(np.float16).astype(np.float64)
    assert field.normal_rel_error == (np.abs(stored - x)[inside] / np.abs(x[inside])).max() <= 2.0 ** -11
    assert "2 (0.1%) overflowed (saturated)" in str(report)
    assert "to keep the large values, store 'x' as bfloat16" in str(report)


def test_bfloat16_and_float32_keep_float32s_range(tmp_path, rng):
    x = rng.standard_normal(1000) * 1e-30  # subnormal in float16, normal in bfloat16 and float32
    for target in ("bfloat16", "float32"):
        field = convert.from_arrays(tmp_path / target, x, dtypes=target).fields["x"]
        assert field.subnormal == field.zeroed == 0 and field.values == 1000
        assert field.normal_rel_error == field.max_rel_error <= {"bfloat16": 2.0 ** -8, "float32": 2.0 ** -24}[target]


def test_the_command_line_line_names_its_options_and_parallel_parts_add_up(tmp_path, rng):
    x = rng.standard_normal((400, 8))
    x[::50] *= 1e-9
    np.save(tmp_path / "x.npy", x)
    done = subprocess.run([SHARDFEED, "convert", str(tmp_path / "x.npy"), "-o", str(tmp_path / "d"), "--dtype",
                           "float16", "--workers", "2"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    want = expected_counts(x, x.astype(np.float16), TINY16, 65504.0)
    assert "3,200 values" in done.stdout and f"{want['zeroed']:,} (" in done.stdout
    assert "(--dtype x=bfloat16)" in done.stdout and "dtypes=" not in done.stdout
