"""Fuzzing in the normal suite: hypothesis drives fuzz/fuzz_format.py's target (raw manifest bytes,
JSON edits of a valid manifest, shard-header bytes, shard and heap contents), and random JSON
documents go to the manifest parser. Every input gives a clean shardfeed exception or a valid
dataset; verify() flags exactly the shards whose bytes changed. The long run (>= 100,000 inputs,
atheris) is documented in docs/reliability.md."""

import json

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import shardfeed
from shardfeed.format import HEADER_BYTES
from shardfeed.manifest import parse_manifest

import fuzz_targets

fuzz = fuzz_targets.load("fuzz_format")


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return fuzz.Target(str(tmp_path_factory.mktemp("fuzz")))


@pytest.mark.parametrize("kind", range(len(fuzz.KINDS)), ids=fuzz.KINDS)
@given(data=st.binary(max_size=300))
def test_fuzz_target(target, kind, data):
    target.run(bytes([kind]) + data)


def test_the_oracles_catch_broken_checks(target, monkeypatch):
    """The target is not vacuous: an unchanged input opens and reads, and the oracles fail on a
    header check that accepts anything and on a verify() that misses a changed shard."""
    opened = target.opened
    target.run(bytes([1, 0, 0, 1]))  # a JSON "edit" that keeps the document
    assert target.opened == opened + 1
    header = target.files["shard-000001.rec"][:HEADER_BYTES]
    target.check_header_oracle("shard-000001.rec", header[:44] + b"\1" * 20)  # reserved bytes are not checked
    monkeypatch.setattr(fuzz, "check_header", lambda *args: None)
    with pytest.raises(AssertionError, match="damaged header was accepted"):
        target.check_header_oracle("shard-000001.rec", b"X" * HEADER_BYTES)
    with pytest.raises(AssertionError):
        target.verify_oracle({"shard-000001.rec"})  # the work copy is intact: verify() flags nothing


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=True) | st.text(max_size=20)
    | st.sampled_from(fuzz.INTERESTING[-12:]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=30)


@given(doc=st.fixed_dictionaries({}, optional={
    "format": st.just("shardfeed") | json_values, "version": st.just(1) | json_values,
    "fields": json_values, "record_bytes": json_values, "num_samples": json_values,
    "shards": json_values, "metadata": json_values}))
@example(doc={"format": "shardfeed", "version": 1, "metadata": None, "num_samples": None, "record_bytes": None,
              "shards": None, "fields": {"0": {"": ""}}})  # found by this test: a ValueError from numpy escaped
def test_random_manifest_documents(doc):
    try:
        manifest = parse_manifest("m.json", json.dumps(doc).encode())
    except shardfeed.ShardFormatError as exc:
        assert str(exc).startswith("m.json: ")
    else:
        assert manifest.num_samples == doc["num_samples"]


@pytest.mark.parametrize("dtype", [{"": ""}, {"a": 1}, object(), [("a", "i4")], "i4,i4", ">i4"])
def test_dtypes_numpy_cannot_take_or_we_do_not_store_are_schema_errors(new_path, dtype):
    with pytest.raises(shardfeed.SchemaError, match="field 'x': unsupported dtype"):
        shardfeed.Writer(new_path(), fields={"x": (dtype, ())})
