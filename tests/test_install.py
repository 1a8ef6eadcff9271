"""The suite tests the installed, compiled package; importing it is light and fast."""

import json
import os
import pathlib
import subprocess
import sys

import shardfeed
from shardfeed import _core

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_tests_use_the_installed_package_not_the_source_tree():
    package = pathlib.Path(shardfeed.__file__).resolve().parent
    source = (REPO / "python" / "shardfeed").resolve()
    assert package != source
    assert source not in package.parents and not str(package).startswith(str(REPO / "python"))
    assert pathlib.Path(_core.__file__).resolve().parent == package


def test_core_is_compiled_not_a_fallback():
    assert _core.COMPILED is True
    assert pathlib.Path(_core.__file__).suffix in (".so", ".pyd")
    assert set(_core.BUILD_INFO) >= {"f16c", "sanitizers", "max_threads"}
    assert _core.BUILD_INFO["max_threads"] >= 1


def test_installed_package_ships_no_sources_but_the_reference_oracle():
    package = pathlib.Path(shardfeed.__file__).parent
    shipped = {p.name for p in package.iterdir()}
    assert not [name for name in shipped if name.endswith((".pyx", ".pxd", ".c", ".h"))], shipped
    assert "_reference.py" in shipped and "py.typed" in shipped


def test_public_api():
    assert set(shardfeed.__all__) >= {
        "Dataset", "Writer", "open", "Batch", "Field", "SchemaError", "ShardFormatError", "ShardReadError",
        "ShardfeedError", "ValueRangeError", "get_num_threads", "set_num_threads",
    }
    for name in shardfeed.__all__:
        assert hasattr(shardfeed, name), name


def test_exceptions_are_also_builtins():
    assert issubclass(shardfeed.SchemaError, ValueError)
    assert issubclass(shardfeed.ValueRangeError, ValueError)
    assert issubclass(shardfeed.ShardFormatError, ValueError)
    assert issubclass(shardfeed.ShardReadError, OSError)
    for cls in (shardfeed.SchemaError, shardfeed.ValueRangeError, shardfeed.ShardFormatError,
                shardfeed.ShardReadError):
        assert issubclass(cls, shardfeed.ShardfeedError)


def test_import_is_light_and_fast():
    # CPU time of the import, not wall time: the suite runs on shared machines (CI measured 1.26 s of
    # wall time at load 8 under AddressSanitizer).
    code = (
        "import sys, time\n"
        "t = time.process_time()\n"
        "import shardfeed\n"
        "elapsed = time.process_time() - t\n"
        "import json\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'torch', 'jax', 'h5py', 'pandas'))\n"
        "print(json.dumps({'elapsed': elapsed, 'heavy': heavy, 'file': shardfeed.__file__}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO),
                          env=env, timeout=60, check=True)
    report = json.loads(done.stdout)
    assert report["heavy"] == []
    assert report["elapsed"] < 1.0, report
    assert not report["file"].startswith(str(REPO / "python"))
