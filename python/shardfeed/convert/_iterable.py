"""Converting any iterable of samples (dicts or tuples), gathered into chunks."""

from __future__ import annotations

import itertools
from typing import Any, Dict, Iterable, List, Mapping, Optional

import numpy as np

from ..errors import SchemaError
from ..format import Schema
from ..writer import DEFAULT_SHARD_SIZE
from ._options import DEFAULT_CHUNK_BYTES, PathLike, Progress, check_dtypes_cover, common_options, dtype_for, \
    source_dtype_name
from ._report import ConversionReport
from ._sink import Sink


def from_iterable(path: PathLike, samples: Iterable[Any], *, fields: Optional[Mapping[str, Any]] = None,
                  dtypes: Any = None, total: Optional[int] = None, shard_size: int = DEFAULT_SHARD_SIZE,
                  metadata: Optional[Mapping[str, Any]] = None, mode: str = "w", overflow: str = "error",
                  progress: Progress = False, chunk_bytes: int = DEFAULT_CHUNK_BYTES, compression: Any = None) -> ConversionReport:
    """Writes samples from any iterable (a generator, a list, a torch/tf dataset iterated in Python):
    dicts ``{"x": ..., "y": ...}`` or tuples (fields in order: ``fields`` names them; without it,
    a pair is ``x, y`` and longer tuples ``x0, x1, ...``).

    ``fields``: the schema as for :class:`shardfeed.Writer` (needed for variable-length fields and
    for an empty iterable); by default inferred from the first sample (dtype and shape per value,
    Python ints as int64 and floats as float64, then ``dtypes`` applied). ``total``: the number of
    samples, for the progress bar. Samples are gathered into chunks of about ``chunk_bytes``."""
    iterator = iter(samples)
    first = next(iterator, None)
    names: List[str]
    if fields is not None:
        declared = Schema.from_spec(fields)
        names = list(declared.fields)
        check_dtypes_cover(dtypes, names)
        spec = {n: (dtype_for(n, dtypes, f.dtype), f.shape) for n, f in declared.fields.items()}
        source_dtypes: Dict[str, str] = {}
    elif first is None:
        raise SchemaError("the iterable is empty and no fields were given: cannot infer the schema")
    else:
        names = _sample_names(first)
        values = _sample_values(first, names, 0)
        check_dtypes_cover(dtypes, names)
        source_dtypes = {n: source_dtype_name(np.asarray(v).dtype) for n, v in values.items()}
        spec = {n: (dtype_for(n, dtypes, source_dtypes[n]), np.shape(values[n])) for n, v in values.items()}
    schema = Schema.from_spec(spec)
    fixed_bytes = schema.record_bytes
    common = common_options(shard_size, metadata, mode, overflow, progress, chunk_bytes, compression)
    with Sink(path, spec, source_dtypes, shard_size=common["shard_size"], metadata=metadata, mode=mode,
              overflow=overflow, progress=progress, total=total, unit="samples", compression=compression) as sink:
        pending: Dict[str, List[Any]] = {n: [] for n in names}
        pending_bytes = 0
        number = 0
        flush_at = max(1, chunk_bytes)

        def flush() -> None:
            nonlocal pending_bytes
            if not pending[names[0]]:
                return
            count = len(pending[names[0]])
            batch = {}
            for n in names:
                f = schema.fields[n]
                if f.variable:
                    batch[n] = pending[n]
                else:
                    try:
                        batch[n] = np.stack([np.asarray(v) for v in pending[n]])
                    except ValueError:
                        shapes = {np.shape(v) for v in pending[n]}
                        raise SchemaError(f"field {n!r}: samples {number - count}..{number - 1} have different "
                                          f"shapes {sorted(shapes)}; declare a variable-length field with "
                                          "fields=") from None
            first_number = number - count
            sink.put(batch, pending_bytes, locate=lambda row: f"sample {first_number + row} of the iterable",
                     advance=count)
            for n in names:
                pending[n].clear()
            pending_bytes = 0

        for sample in itertools.chain([] if first is None else [first], iterator):
            values = _sample_values(sample, names, number)
            for n in names:
                pending[n].append(values[n])
            number += 1
            pending_bytes += fixed_bytes + sum(np.asarray(values[f.name]).nbytes for f in schema.variable_fields)
            if pending_bytes >= flush_at:
                flush()
        flush()
    return sink.report


def _sample_names(sample: Any) -> List[str]:
    if isinstance(sample, Mapping):
        return list(sample)
    if isinstance(sample, (tuple, list)):
        return ["x", "y"] if len(sample) == 2 else [f"x{i}" for i in range(len(sample))]
    return ["x"]


def _sample_values(sample: Any, names: List[str], number: int) -> Dict[str, Any]:
    if isinstance(sample, Mapping):
        if set(sample) != set(names):
            raise SchemaError(f"sample {number} has fields {sorted(sample)}, expected {sorted(names)}")
        return {n: sample[n] for n in names}
    if isinstance(sample, (tuple, list)):
        if len(sample) != len(names):
            raise SchemaError(f"sample {number} has {len(sample)} values, expected {len(names)} ({names})")
        return dict(zip(names, sample))
    if len(names) != 1:
        raise SchemaError(f"sample {number} is a single value, expected {len(names)} ({names})")
    return {names[0]: sample}
