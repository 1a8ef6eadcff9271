# CRC32C of Python buffers (included by _core.pyx): the kernels of ext/crc32c.c, and the per-record
# checksums the writer stores (docs/format.md).

def crc32c(data, unsigned int crc=0):
    """CRC32C (Castagnoli) of the bytes of ``data`` (any contiguous buffer), continuing from ``crc``
    like ``zlib.crc32``, with the kernel in use (:func:`crc32c_kernels`)."""
    cdef _Views views = _Views(1)
    cdef Py_buffer *view = views.acquire(data, PyBUF_C_CONTIGUOUS, "crc32c data")
    cdef uint32_t result
    with nogil:
        result = sf_crc32c(crc, view.buf, <size_t>view.len)
    return result


def crc32c_copy(dst, src, unsigned int crc=0):
    """Copies the bytes of ``src`` into ``dst`` (a writable buffer of the same size) and returns
    their CRC32C, computed in the same pass (the kernel of checked reads; for tests)."""
    cdef _Views views = _Views(2)
    cdef Py_buffer *out = views.acquire(dst, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS, "crc32c_copy dst")
    cdef Py_buffer *view = views.acquire(src, PyBUF_C_CONTIGUOUS, "crc32c_copy src")
    cdef uint32_t result
    if out.len != view.len:
        raise ValueError(f"crc32c_copy: dst has {out.len} bytes, src {view.len}")
    with nogil:
        result = sf_crc32c_copy(crc, out.buf, view.buf, <size_t>view.len)
    return result


def crc32c_kernels():
    """The CRC32C kernels this CPU can run, fastest first (the first is in use unless
    :func:`use_crc32c_kernel` chose another); ``"table"`` (slicing by 8) is always last."""
    names = []
    cdef const char *name = sf_crc32c_kernel_name(0)
    while name != NULL:
        names.append(name.decode())
        name = sf_crc32c_kernel_name(len(names))
    return names


def use_crc32c_kernel(str name):
    """Makes every checksum use kernel ``name`` (one of :func:`crc32c_kernels`); returns the name
    of the kernel in use before. For tests and benchmarks; not while other threads read."""
    before = sf_crc32c_kernel().decode()
    if sf_crc32c_use(name.encode()) != 0:
        raise ValueError(f"CRC32C kernel {name!r} is not available here; these are: {crc32c_kernels()}")
    return before


def record_checksums(data, size_t record_bytes):
    """The CRC32C of each ``record_bytes``-byte record of ``data`` (a contiguous buffer of whole
    records), as a uint32 array: the per-record checksums of the format (docs/format.md)."""
    cdef _Views views = _Views(1)
    cdef Py_buffer *view = views.acquire(data, PyBUF_C_CONTIGUOUS, "records")
    if record_bytes == 0 or <size_t>view.len % record_bytes:
        raise ValueError(f"{view.len} bytes are not whole records of {record_bytes} bytes")
    cdef size_t count = <size_t>view.len // record_bytes
    out = np.empty(count, np.uint32)
    cdef uint32_t[::1] sums = out
    if count:
        with nogil:
            sf_crc32c_records(view.buf, record_bytes, count, &sums[0])
    return out
