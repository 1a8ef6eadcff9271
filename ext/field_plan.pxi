# The typed per-field plan of a read (included by _core.pyx): what Python hands the reader for each
# field, checked once when it is made, and its C form (sf_field_out's affine, ext/reader.h).

cdef class Affine:
    """``out = float32(stored) * scale[p] + offset[p]`` with p = (element // inner) % period: the
    transform of one field in the kernels' layout (ext/cast.h), from ``period`` float32 parameters
    each. The kernels read a window of period + BLOCK parameters where inner == 1 (one parameter per
    element): this class tiles them so, the rule living with the kernels."""
    cdef readonly object scale
    cdef readonly object offset
    cdef readonly size_t inner
    cdef readonly size_t period

    def __cinit__(self, scale, offset, size_t inner=1, size_t period=1):
        if inner < 1 or period < 1:
            raise ValueError(f"bad affine layout inner={inner} period={period}")
        s = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
        o = np.ascontiguousarray(offset, dtype=np.float32).reshape(-1)
        if s.shape[0] != <Py_ssize_t>period or o.shape[0] != <Py_ssize_t>period:
            raise ValueError(f"scale and offset need {period} entries each, got {s.shape[0]} and {o.shape[0]}")
        if inner == 1 and period > 1:
            reps = (period + SF_BLOCK + period - 1) // period  # whole periods covering period + BLOCK
            s, o = np.tile(s, reps), np.tile(o, reps)
        self.scale, self.offset, self.inner, self.period = s, o, inner, period

    def __repr__(self):
        return f"Affine(inner={self.inner}, period={self.period})"


cdef int _fill_affine(sf_affine *affine, _Views views, Affine params, what) except -1:
    """The C description of ``params`` (None: no transform); its arrays are held by ``views``."""
    affine.scale = NULL
    affine.offset = NULL
    affine.inner = 1
    affine.period = 1
    if params is None:
        return 0
    cdef Py_buffer *s = views.acquire(params.scale, PyBUF_C_CONTIGUOUS, what, " scale")
    cdef Py_buffer *o = views.acquire(params.offset, PyBUF_C_CONTIGUOUS, what, " offset")
    affine.scale = <const float *>s.buf
    affine.offset = <const float *>o.buf
    affine.inner = params.inner
    affine.period = params.period
    return 0


cdef class FieldRead:
    """One field of a record read (:meth:`ShardSet.read_records`): ``src_bytes`` bytes at
    ``src_offset`` of each record, ``count`` elements, converted by kernel ``cast`` (CAST_COPY: the
    bytes as stored) into ``out``, a C-contiguous writable buffer of one row per index, with the
    transform ``affine`` (an :class:`Affine`, or None)."""
    cdef readonly int cast
    cdef readonly size_t src_offset
    cdef readonly size_t src_bytes
    cdef readonly size_t count
    cdef readonly object out
    cdef readonly Affine affine

    def __cinit__(self, int cast, size_t src_offset, size_t src_bytes, size_t count, out, Affine affine=None):
        if not sf_cast_valid(cast):
            raise ValueError(f"bad cast {cast}")
        if cast != SF_CAST_COPY and src_bytes != count * sf_cast_itemsize(cast):
            raise ValueError(f"{src_bytes} bytes do not hold {count} elements")
        if affine is not None and cast == SF_CAST_COPY:
            raise ValueError("an affine transform needs a float output")
        self.cast, self.src_offset, self.src_bytes, self.count = cast, src_offset, src_bytes, count
        self.out, self.affine = out, affine
