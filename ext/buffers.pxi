# Buffers held for the length of one call (included by _core.pyx): what every entry point that
# takes Python buffers uses to acquire them, release them together, and name them in errors.

cdef class _Views:
    """Buffers acquired for one call, released together."""
    cdef Py_buffer *views
    cdef int held, capacity

    def __cinit__(self, int capacity):
        self.views = <Py_buffer *>PyMem_Calloc(max(capacity, 1), sizeof(Py_buffer))
        if self.views == NULL:
            raise MemoryError()
        self.capacity = capacity

    cdef Py_buffer *acquire(self, obj, int flags, what, suffix="") except NULL:
        if self.held >= self.capacity:
            raise RuntimeError("internal error: too many buffers")
        try:
            PyObject_GetBuffer(obj, &self.views[self.held], flags)
        except (TypeError, BufferError, ValueError) as exc:
            raise ValueError(f"{_what(what)}{suffix}: {exc}") from None
        self.held += 1
        return &self.views[self.held - 1]

    def __dealloc__(self):
        for i in range(self.held):
            PyBuffer_Release(&self.views[i])
        PyMem_Free(self.views)


cdef class _Int64Copy:
    """A private array of ``n`` int64 for one call, freed with the object."""
    cdef int64_t *data

    def __cinit__(self, size_t n):
        self.data = <int64_t *>PyMem_Malloc(n * sizeof(int64_t) if n else 1)
        if self.data == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.data)


cdef str _what(what):
    """The subject of an error message: ``what`` itself, or "field k" for a field number (formatted
    only when an error is raised, not on every read)."""
    return f"field {what}" if isinstance(what, int) else what
