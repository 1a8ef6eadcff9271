# The codecs of compressed fields (included by _core.pyx): which are usable here, and the writer's
# compression of a batch of samples on the pool's threads (ext/codec.h, ext/compressed.c). The
# reads are ShardSet.read_compressed.

CODECS = {"zstd": SF_CODEC_ZSTD}


cdef int _codec_id(str codec) except -1:
    try:
        return CODECS[codec]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}; this shardfeed knows {', '.join(CODECS)}") from None


def codec_unavailable(str codec):
    """None when ``codec`` can be used in this process, else why not (naming the library that
    could not be loaded). The library is loaded on the first call."""
    cdef const char *why = sf_codec_unavailable(_codec_id(codec))
    return None if why == NULL else why.decode("utf-8", "replace")


def codec_library(str codec):
    """The library file ``codec`` is loaded from (``SHARDFEED_ZSTD_LIBRARY`` overrides the default)."""
    return sf_codec_library(_codec_id(codec)).decode("utf-8", "replace")


def compress_samples(str codec, int level, const unsigned char[::1] src not None, size_t raw_bytes,
                     size_t threads):
    """Compresses the samples of ``src`` (contiguous, ``raw_bytes`` each), one frame each, on
    ``threads`` native threads. Returns ``(frames, lengths)``: a uint8 array of the frames one after
    the other and an int64 array of their sizes."""
    cdef int codec_id = _codec_id(codec)
    cdef size_t n = <size_t>src.shape[0] // raw_bytes if raw_bytes else 0
    if raw_bytes == 0 or <size_t>src.shape[0] != n * raw_bytes:
        raise ValueError(f"{src.shape[0]} bytes are not whole samples of {raw_bytes} bytes")
    why = codec_unavailable(codec)
    if why is not None:
        raise RuntimeError(why)
    cdef size_t bound = sf_codec_bound(codec_id, raw_bytes), r, at = 0
    frames = np.empty(n * bound, dtype=np.uint8)
    lengths = np.empty(n, dtype=np.int64)
    cdef unsigned char[::1] out = frames
    cdef int64_t[::1] sizes = lengths
    cdef sf_error err
    cdef int rc = 0
    if n:
        with nogil:
            rc = sf_compress_samples(codec_id, level, <const char *>&src[0], n, raw_bytes, <char *>&out[0], bound,
                                     &sizes[0], threads, &err)
    if rc != 0:
        if err.kind == SF_ERR_NOMEM:
            raise MemoryError("out of memory compressing samples")
        detail = err.detail.decode("utf-8", "replace") if err.detail != NULL else "failed"
        raise RuntimeError(f"{codec} could not compress sample {err.sample} of the batch: {detail}")
    for r in range(n):  # the frames one after the other (each is at most `bound` bytes)
        if at != r * bound:
            memmove(&out[at], &out[r * bound], <size_t>sizes[r])
        at += <size_t>sizes[r]
    return frames[:at], lengths


def decompress(str codec, const unsigned char[::1] frame not None, size_t raw_bytes):
    """One frame decoded to exactly ``raw_bytes`` bytes (a bytes object), on the calling thread;
    ValueError saying why where it does not decode or decodes to another size. For the reference
    reader and the tests; reads decode on the pool (ShardSet.read_compressed)."""
    cdef int codec_id = _codec_id(codec)
    why = codec_unavailable(codec)
    if why is not None:
        raise CodecUnavailableError(why)
    out = bytearray(raw_bytes)
    cdef unsigned char[::1] dst = out
    cdef unsigned char dummy = 0
    cdef long long found = -1
    cdef const char *detail = NULL
    cdef int rc
    if frame.shape[0] == 0:
        raise ValueError("an empty frame")
    with nogil:
        rc = sf_codec_decompress(codec_id, &dst[0] if raw_bytes else &dummy, raw_bytes, &frame[0], frame.shape[0],
                                 &found, &detail)
    if rc == SF_ERR_NOMEM:
        raise MemoryError()
    if rc != SF_OK:
        message = detail.decode("utf-8", "replace") if detail != NULL else "failed"
        raise ValueError(f"the frame does not decode to {raw_bytes} bytes ({message}"
                         + (f": {found} bytes" if found >= 0 else "") + ")")
    return bytes(out)
