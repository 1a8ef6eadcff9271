"""Property tests: Dataset.read agrees bit for bit with the pure-Python reference reader
(shardfeed._reference) for random schemas, dtypes, shard sizes, casts, affine parameters, maxlen,
pad values and index arrays (duplicates, unsorted, negative, crossing shards), on both read paths.

Profiles: SHARDFEED_HYPOTHESIS_PROFILE=ci-heavy runs many more examples (see conftest.py)."""

import numpy as np
from hypothesis import assume, given, note
from hypothesis import strategies as st

import shardfeed
from shardfeed._reference import reference_read
from shardfeed.errors import SchemaError
from shardfeed.format import HEADER_BYTES, Schema

DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "bfloat16", "float32", "float64"]

fixed_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
variable_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(lambda rest: (None,) + tuple(rest))
field_specs = st.tuples(st.sampled_from(DTYPES), st.one_of(fixed_shapes, fixed_shapes, variable_shapes))
schemas = st.lists(field_specs, min_size=1, max_size=4).map(lambda specs: {f"f{i}": s for i, s in enumerate(specs)})


@st.composite
def datasets(draw):
    fields = draw(schemas)
    try:
        record_bytes = Schema.from_spec(fields).record_bytes
    except SchemaError:  # every field has zero size
        assume(False)
    n = draw(st.integers(0, 40))
    per_shard = draw(st.integers(1, 9))
    shard_size = HEADER_BYTES + per_shard * record_bytes + draw(st.integers(0, record_bytes - 1))
    lengths = draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    seed = draw(st.integers(0, 2 ** 32 - 1))
    return fields, n, shard_size, lengths, seed


def affine_params(draw, shape):
    """None, a scalar, per channel along one axis, or an array over trailing axes."""
    kind = draw(st.sampled_from(["none", "none", "scalar", "axis", "trailing"]))
    value = st.floats(-1e4, 1e4, allow_nan=False, width=32)
    if kind == "none":
        return None
    if kind == "scalar" or not shape:
        return draw(value)
    if kind == "axis":
        axis = draw(st.integers(0, len(shape) - 1))
        param_shape = (shape[axis],) + (1,) * (len(shape) - axis - 1)
    else:
        param_shape = shape[draw(st.integers(0, len(shape) - 1)):]
    size = int(np.prod(param_shape))
    return np.array(draw(st.lists(value, min_size=size, max_size=size)), np.float32).reshape(param_shape)


try:
    import ml_dtypes  # noqa: F401  (bfloat16 outputs are ml_dtypes arrays)
    BFLOAT16 = ["bfloat16"]
except ImportError:
    BFLOAT16 = []


@st.composite
def read_requests(draw, fields, n):
    names = draw(st.one_of(st.none(), st.lists(st.sampled_from(sorted(fields)), min_size=1, unique=True)))
    chosen = list(fields) if names is None else names
    indices = draw(st.lists(st.integers(-n, n - 1), max_size=60)) if n else []
    kwargs = {"dtype": {}, "scale": {}, "offset": {}, "maxlen": {}, "pad_value": {}, "padding": {},
              "truncating": {}}
    for name in chosen:
        dtype, shape = fields[name]
        row_shape = shape[1:] if shape and shape[0] is None else shape
        kwargs["scale"][name] = affine_params(draw, row_shape)
        kwargs["offset"][name] = affine_params(draw, row_shape)
        affine = kwargs["scale"][name] is not None or kwargs["offset"][name] is not None
        kwargs["dtype"][name] = draw(st.sampled_from([None, "auto", "float32", "float16"] + BFLOAT16))
        if not affine and draw(st.booleans()):
            natural = "float32" if dtype == "bfloat16" else dtype
            kwargs["dtype"][name] = draw(st.sampled_from([natural, "int8", "uint16", "int64", "float64", "bool"]))
        if shape and shape[0] is None:
            kwargs["maxlen"][name] = draw(st.one_of(st.none(), st.integers(0, 7)))
            kwargs["pad_value"][name] = draw(st.integers(0, 1))
            kwargs["padding"][name] = draw(st.sampled_from(["post", "pre"]))
            kwargs["truncating"][name] = draw(st.sampled_from(["post", "pre"]))
    # dict options are per field; a plain value is fine when one field is read (or for dtype)
    if len(set(map(str, kwargs["dtype"].values()))) == 1 and draw(st.booleans()):
        kwargs["dtype"] = next(iter(kwargs["dtype"].values()), None)
    return names, np.array(indices, dtype=np.int64), kwargs


def write(path, fields, n, shard_size, lengths, seed, tools):
    rng = np.random.default_rng(seed)
    columns = {}
    for k, (name, (dtype, shape)) in enumerate(fields.items()):
        if shape and shape[0] is None:
            columns[name] = [tools.random_values(rng, dtype, (m,) + shape[1:]) for m in np.roll(lengths, k)]
        else:
            columns[name] = tools.random_values(rng, dtype, (n,) + shape)
    with shardfeed.Writer(path, fields=fields, shard_size=shard_size) as w:
        for start in range(0, n, 16):  # several extend calls
            w.extend({name: values[start:start + 16] for name, values in columns.items()})


@given(dataset=datasets(), data=st.data())
def test_read_matches_reference(tools, new_path, dataset, data):
    fields, n, shard_size, lengths, seed = dataset
    path = new_path("prop")
    write(path, fields, n, shard_size, lengths, seed, tools)
    ds = shardfeed.open(path, mmap=data.draw(st.booleans(), "mmap"), threads=data.draw(st.integers(1, 8), "threads"))
    assert len(ds) == n
    for _ in range(3):
        names, indices, kwargs = data.draw(read_requests(fields, n), "request")
        batch = ds.read(indices, names, lossy=True, **kwargs)  # the reference converts as lossy=True does
        values, lengths_expected = reference_read(path, indices, names, **kwargs)
        note(f"num_shards={ds.num_shards}")
        assert list(batch) == list(values)
        for name in values:
            tools.assert_identical(batch[name], values[name], name)
        assert batch.lengths.keys() == lengths_expected.keys()
        for name in lengths_expected:
            tools.assert_identical(batch.lengths[name], lengths_expected[name], f"lengths of {name}")
