"""The suite's own safety nets work: a test whose stderr shows "Exception ignored" fails, warnings
are errors, and the header names the seed and the hypothesis profile."""

import os
import pathlib

import pytest

pytest_plugins = ["pytester"]

CONFTEST = pathlib.Path(__file__).with_name("conftest.py").read_text()
TESTS = '''
import sys


class Noisy:
    def __del__(self):
        raise RuntimeError("from a finaliser")


def test_prints_exception_ignored():
    sys.stderr.write("Exception ignored in: <function f>\\nTraceback ...\\n")


def test_unraisable_exception():
    Noisy()


def test_warning():
    import warnings
    warnings.warn("careful", UserWarning)


def test_clean():
    sys.stderr.write("harmless\\n")
'''


@pytest.fixture
def inner_run(pytester):
    pytester.makeconftest(CONFTEST)
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(test_inner=TESTS)
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:randomly", "-rA")


def test_guards_fail_what_they_should(inner_run):
    text = inner_run.stdout.str()
    assert inner_run.ret != 0
    assert inner_run.parseoutcomes() == {"passed": 2, "failed": 2, "errors": 1}
    assert "ERROR test_inner.py::test_prints_exception_ignored" in text
    assert "stderr shows an exception that was ignored:\nException ignored in: <function f>" in text
    assert "FAILED test_inner.py::test_unraisable_exception" in text and "PytestUnraisableExceptionWarning" in text
    assert "FAILED test_inner.py::test_warning" in text and "UserWarning: careful" in text
    assert "PASSED test_inner.py::test_clean" in text
    assert "ERROR test_inner.py::test_clean" not in text
    # the header names the seed, the hypothesis profile and the compiled core
    assert "SHARDFEED_TEST_SEED=" in text
    profile = os.environ.get("SHARDFEED_HYPOTHESIS_PROFILE", "fast")
    assert "hypothesis" in text and f"profile {profile!r}" in text
    assert "compiled core: True" in text
