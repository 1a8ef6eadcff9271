"""Declares the compiled core; all metadata lives in pyproject.toml.

Build switches (environment variables):
  SHARDFEED_SANITIZE=address,undefined   build with those sanitizers (also: thread)
  SHARDFEED_DEBUG=1                      -O0 -g
  SHARDFEED_WERROR=1                     -Wall -Wextra -Werror on the C sources' warnings
"""

import os
import sys

from Cython.Build import cythonize
from setuptools import Extension, setup

SOURCES = ["ext/_core.pyx", "ext/pool.c", "ext/reader.c", "ext/records.c", "ext/mapped.c", "ext/checked.c",
           "ext/heap.c", "ext/compressed.c", "ext/codec.c", "ext/io.c", "ext/ring.c", "ext/uring.c", "ext/cast.c",
           "ext/crc32c.c", "ext/crc32c_x86.c", "ext/crc32c_arm.c", "ext/batch_memory.c", "ext/permutation.c"]
HEADERS = ["native.pxd", "batch_memory.h", "cast.h", "cast_half.h", "codec.h", "crc32c.h", "crc32c_kernels.h", "io.h", "pool.h",
           "reader.h", "records.h", "sf_error.h", "batch_memory.pxi", "buffers.pxi", "checksums.pxi", "compression.pxi",
           "field_plan.pxi", "read_io.pxi", "ring.h", "uring.h", "permutation.h", "permutation.pxi"]


def core_extension() -> Extension:
    if os.name != "posix" or sys.platform.startswith(("win", "cygwin", "emscripten", "wasi")):
        raise SystemExit(
            f"shardfeed needs POSIX pread()/preadv(), mmap() and pthreads; this platform "
            f"({sys.platform}) does not provide them, and there is no pure-Python fallback build."
        )
    if sys.byteorder != "little":
        raise SystemExit("shardfeed stores little-endian data and its reader supports little-endian hosts only")

    # -O3: the conversion kernels rely on auto-vectorisation. -ffp-contract=off: the affine
    # transform must round like numpy's separate multiply and add (no fused multiply-add).
    compile_args = ["-O3", "-fvisibility=hidden", "-pthread", "-fno-strict-aliasing", "-ffp-contract=off"]
    link_args = ["-pthread"]
    macros = []
    if os.environ.get("SHARDFEED_DEBUG"):
        compile_args += ["-O0", "-g"]
    if os.environ.get("SHARDFEED_WERROR"):
        compile_args += ["-Wall", "-Wextra", "-Werror", "-Wno-unused-function", "-Wno-unreachable-code"]
    sanitizers = os.environ.get("SHARDFEED_SANITIZE", "").strip()
    if sanitizers:
        flags = [f"-fsanitize={sanitizers}", "-fno-omit-frame-pointer", "-fno-sanitize-recover=all", "-g"]
        compile_args += flags
        link_args += flags
        macros.append(("SF_SANITIZERS", f'"{sanitizers}"'))
    return Extension(
        "shardfeed._core",
        sources=SOURCES,
        include_dirs=["ext"],
        depends=[os.path.join("ext", name) for name in HEADERS],
        extra_compile_args=compile_args,
        extra_link_args=link_args,
        define_macros=macros,
        libraries=["dl"] if sys.platform.startswith("linux") else [],  # dlopen of the codecs (ext/codec.c)
    )


setup(
    ext_modules=cythonize(
        [core_extension()],
        include_path=["ext"],
        compiler_directives={"language_level": 3, "embedsignature": True},
    ),
)
