# Batch memory (included by _core.pyx): the Python side of ext/batch_memory.c.

# Memory for large output arrays, kept for reuse when numpy frees them (ext/batch_memory.h: why,
# and the cache's limits). Every call holds the GIL, which is what serialises the cache.
BATCH_MEMORY_CACHE = {"blocks": SF_BATCH_CACHE_SLOTS, "bytes": SF_BATCH_CACHE_BYTES}


cdef class BatchMemory:
    """A page-aligned, writable block of anonymous memory for one output array (``np.frombuffer``
    views it and keeps this object as its base); back to the cache when the last view is freed."""
    cdef void *data
    cdef size_t size

    def __cinit__(self, size_t nbytes):
        self.size = sf_batch_size(nbytes)
        self.data = sf_batch_alloc(nbytes)
        if self.data == NULL:
            raise MemoryError(f"could not map {self.size} bytes for a batch array: {os.strerror(errno)}")

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.size, 0, flags)

    def __dealloc__(self):
        if self.data != NULL:
            sf_batch_release(self.data, self.size)


def cached_batch_memory():
    """The sizes in bytes of the blocks now cached for reuse (oldest first)."""
    cdef size_t sizes[SF_BATCH_CACHE_SLOTS]
    cdef size_t count = sf_batch_cached(sizes)
    return [sizes[i] for i in range(count)]


def free_batch_memory():
    """Unmaps every cached block and frees the bounce buffers idle io_uring rings keep for direct
    reads; returns the bytes released."""
    return sf_batch_free_cached() + sf_uring_free_kept()
