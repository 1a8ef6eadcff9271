"""The report every converter returns: what was written, how fast, and what storing each field
in its dtype did to the values (see :mod:`shardfeed.convert._precision`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field as _dataclass_field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .._text import human_bytes
from . import _precision, _sample_files

MAX_EXAMPLES = 20  # skipped rows/files listed in a report


@dataclass
class FieldReport:
    """What converting did to one field. When the stored dtype is a float narrower than the source
    (``measured``), over the ``values`` finite on both sides: ``max_abs_error``/``max_rel_error``,
    the largest relative error in the stored dtype's normal range (``normal_rel_error``), and how
    many nonzero values became ``subnormal`` or ``zeroed`` (see :mod:`shardfeed.convert._precision`);
    ``saturated`` counts values clipped by ``overflow="saturate"``."""

    name: str
    source_dtype: str
    dtype: str
    shape: Tuple[Optional[int], ...]
    measured: bool = False
    max_abs_error: float = 0.0
    max_rel_error: float = 0.0
    saturated: int = 0
    values: int = 0
    normal_rel_error: float = 0.0
    subnormal: int = 0
    zeroed: int = 0

    def merged(self, others: Sequence["FieldReport"]) -> "FieldReport":
        """This report combined with those of the other parts of a parallel conversion."""
        every = [self, *others]
        return FieldReport(self.name, self.source_dtype, self.dtype, self.shape,
                           measured=any(f.measured for f in every),
                           max_abs_error=max(f.max_abs_error for f in every),
                           max_rel_error=max(f.max_rel_error for f in every),
                           saturated=sum(f.saturated for f in every), values=sum(f.values for f in every),
                           normal_rel_error=max(f.normal_rel_error for f in every),
                           subnormal=sum(f.subnormal for f in every), zeroed=sum(f.zeroed for f in every))


@dataclass
class ConversionReport:
    """Returned by every converter; ``str(report)`` is a readable summary."""

    path: str
    num_samples: int  # samples this conversion wrote
    dataset_samples: int  # samples in the dataset afterwards (more when appending)
    num_shards: int
    source_bytes: int
    dataset_bytes: int
    seconds: float
    fields: Dict[str, FieldReport]
    skipped: int = 0
    skipped_examples: List[str] = _dataclass_field(default_factory=list)
    parts: int = 1
    notes: List[str] = _dataclass_field(default_factory=list)  # what the reader of the report should know
    image_mode: Optional[str] = None  # from_files: the mode images are stored in
    images_converted: Dict[str, int] = _dataclass_field(default_factory=dict)  # original mode -> images

    @property
    def mb_per_s(self) -> float:
        """Source megabytes (1e6 bytes) converted per second."""
        return self.source_bytes / self.seconds / 1e6 if self.seconds > 0 else float("inf")

    def to_json(self) -> Dict[str, Any]:
        doc = asdict(self)
        doc["fields"] = [asdict(f) for f in self.fields.values()]
        doc["mb_per_s"] = self.mb_per_s
        return doc

    def __str__(self) -> str:
        lines = [f"{self.path}: wrote {self.num_samples} samples ({human_bytes(self.source_bytes)} of source data) in "
                 f"{self.seconds:.2f} s, {self.mb_per_s:.1f} MB/s"
                 + (f", {self.parts} parts merged" if self.parts > 1 else "")]
        if self.dataset_samples != self.num_samples:
            lines.append(f"dataset now holds {self.dataset_samples} samples")
        lines.append(f"{self.num_shards} shard(s), {human_bytes(self.dataset_bytes)}")
        for f in self.fields.values():
            shape = ", ".join("*" if d is None else str(d) for d in f.shape)
            line = f"  {f.name}: {f.source_dtype} -> {f.dtype}[{shape}]"
            advice = ""
            if f.measured:
                counts, advice = _precision.describe(f)
                line += f": {counts}"
            elif f.saturated:
                line += f", {f.saturated:,} values saturated"
            lines.append(line + (f"; {advice}" if advice else ""))
        if self.skipped:
            lines.append(f"skipped {self.skipped} bad rows/files, e.g.:")
            lines += [f"  {example}" for example in self.skipped_examples[:5]]
        if self.images_converted:
            lines.append(_sample_files.describe_conversions(self.images_converted, self.image_mode or "?",
                                                            self.num_samples + self.skipped))
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)
