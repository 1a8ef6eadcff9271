"""The fuzz targets of fuzz/ as modules, for the tests that drive them with hypothesis
(tests/conftest.py puts this directory on sys.path)."""

import importlib.util
import pathlib
from types import ModuleType

FUZZ_DIR = pathlib.Path(__file__).resolve().parent.parent / "fuzz"


def load(name: str) -> ModuleType:
    """fuzz/<name>.py, imported as ``shardfeed_<name>`` (the fuzz directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"shardfeed_{name}", FUZZ_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
