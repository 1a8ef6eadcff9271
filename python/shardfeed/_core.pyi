"""Type stub of the compiled core (ext/_core.pyx)."""

from typing import Any, Dict, List, Optional, Sequence, Tuple

COMPILED: bool
BLOCK: int
BUILD_INFO: Dict[str, Any]

def allow_f16c(allowed: bool) -> bool: ...
def pool_size() -> int: ...
def convert(cast: int, src: Any, dst: Any, scale: Any = ..., offset: Any = ..., inner: int = ...,
            period: int = ...) -> None: ...

class ShardSet:
    paths: Tuple[str, ...]
    heap_paths: Tuple[str, ...]
    num_samples: int
    mapped: bool
    def __init__(self, record_fds: Sequence[int], heap_fds: Optional[Sequence[int]], counts: Sequence[int],
                 paths: Sequence[str], heap_paths: Optional[Sequence[str]], header_bytes: int,
                 record_bytes: int, use_map: bool) -> None: ...
    def close(self) -> None: ...
    def read_records(self, indices: Any, fields: List[tuple], use_map: bool, threads: int) -> int: ...
    def advise(self, indices: Any) -> int: ...
    def read_heap(self, samples: Any, shards: Any, offsets: Any, rows: Any, cast: int, row_elems: int,
                  src_row_bytes: int, out: Any, max_rows: int, pad: Any, scale: Any, offset: Any,
                  inner: int, period: int, threads: int) -> None: ...
