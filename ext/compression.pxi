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


def dictionaries_unavailable(str codec):
    """None when ``codec``'s compression dictionaries can be trained and used in this process,
    else why not (the library, or the function it lacks)."""
    cdef const char *why = sf_codec_dictionaries_unavailable(_codec_id(codec))
    return None if why == NULL else why.decode("utf-8", "replace")


def train_dictionary(str codec, const unsigned char[::1] samples not None, const uint64_t[::1] sizes not None,
                     size_t capacity):
    """A dictionary of at most ``capacity`` bytes trained on the samples that lie one after another
    in ``samples`` (sample k: ``sizes[k]`` bytes), as bytes. CodecUnavailableError where the
    library has no dictionary functions; ValueError saying why where training fails (too few or
    too uniform samples)."""
    cdef int codec_id = _codec_id(codec)
    why = dictionaries_unavailable(codec)
    if why is not None:
        raise CodecUnavailableError(why)
    cdef size_t n = sizes.shape[0], k, total = 0
    if n == 0 or n > 0xFFFFFFFF:
        raise ValueError(f"cannot train a dictionary on {n} samples")
    cdef size_t *lengths = <size_t *>PyMem_Malloc(n * sizeof(size_t))
    if lengths == NULL:
        raise MemoryError()
    out = bytearray(capacity)
    cdef unsigned char[::1] dst = out
    cdef size_t got = 0
    cdef const char *detail = NULL
    cdef int rc
    try:
        for k in range(n):
            lengths[k] = <size_t>sizes[k]
            total += lengths[k]
        if total != <size_t>samples.shape[0] or capacity == 0:
            raise ValueError(f"{samples.shape[0]} bytes of samples, their sizes add up to {total}")
        with nogil:
            rc = sf_codec_train(codec_id, &dst[0], capacity, &samples[0], lengths, <unsigned>n, &got, &detail)
    finally:
        PyMem_Free(lengths)
    if rc != SF_OK:
        raise ValueError((detail.decode("utf-8", "replace") if detail != NULL else "failed"))
    return bytes(out[:got])


cdef class Dictionary:
    """A trained compression dictionary of ``codec`` loaded once (``data``: the dictionary file's
    bytes): a decompression dictionary shared read-only by the pool's threads, and a compression
    dictionary per level, made when first asked for. ``id``: the id in its header, which each
    frame written with it names. ValueError where ``data`` is not a dictionary of the codec;
    CodecUnavailableError where the library has no dictionary functions."""

    cdef int codec_id
    cdef void *ddict
    cdef void *cdict
    cdef int cdict_level
    cdef readonly unsigned id
    cdef readonly size_t size
    cdef bytes data

    def __cinit__(self, str codec, bytes data not None):
        self.codec_id = _codec_id(codec)
        why = dictionaries_unavailable(codec)
        if why is not None:
            raise CodecUnavailableError(why)
        self.data = data
        self.size = len(data)
        self.id = sf_codec_dictionary_id(self.codec_id, <const char *>data, len(data))
        if self.id == 0:
            raise ValueError(f"not a {codec} dictionary (its {len(data)} bytes have no dictionary header)")
        cdef const char *detail = NULL
        self.ddict = sf_codec_ddict_create(self.codec_id, <const char *>data, len(data), &detail)
        if self.ddict == NULL:
            raise ValueError(detail.decode("utf-8", "replace") if detail != NULL else "cannot load the dictionary")

    def __dealloc__(self):
        sf_codec_ddict_free(self.codec_id, self.ddict)
        sf_codec_cdict_free(self.codec_id, self.cdict)

    cdef void *compression_dictionary(self, int level) except NULL:
        cdef const char *detail = NULL
        if self.cdict != NULL and self.cdict_level == level:
            return self.cdict
        sf_codec_cdict_free(self.codec_id, self.cdict)
        self.cdict = sf_codec_cdict_create(self.codec_id, <const char *>self.data, len(self.data), level, &detail)
        if self.cdict == NULL:
            raise ValueError(detail.decode("utf-8", "replace") if detail != NULL else "cannot load the dictionary")
        self.cdict_level = level
        return self.cdict


cdef class FieldDictionaries:
    """One compressed field's dictionary in each shard of a dataset (None: the shard's frames use
    none), for ShardSet.read_compressed."""

    cdef const void **ddicts
    cdef unsigned *ids
    cdef size_t n
    cdef list kept

    def __cinit__(self, list per_shard not None):
        self.n = len(per_shard)
        self.kept = list(per_shard)
        self.ddicts = <const void **>PyMem_Calloc(self.n if self.n else 1, sizeof(void *))
        self.ids = <unsigned *>PyMem_Calloc(self.n if self.n else 1, sizeof(unsigned))
        if self.ddicts == NULL or self.ids == NULL:
            raise MemoryError()
        cdef size_t s
        cdef Dictionary one
        for s in range(self.n):
            if per_shard[s] is not None:
                one = <Dictionary?>per_shard[s]
                self.ddicts[s] = one.ddict
                self.ids[s] = one.id

    def __dealloc__(self):
        PyMem_Free(self.ddicts)
        PyMem_Free(self.ids)

    def __len__(self):
        return self.n


def compress_samples(str codec, int level, const unsigned char[::1] src not None, size_t raw_bytes,
                     size_t threads, Dictionary dictionary=None):
    """Compresses the samples of ``src`` (contiguous, ``raw_bytes`` each), one frame each, on
    ``threads`` native threads, with ``dictionary`` where given. Returns ``(frames, lengths)``: a
    uint8 array of the frames one after the other and an int64 array of their sizes."""
    cdef int codec_id = _codec_id(codec)
    cdef size_t n = <size_t>src.shape[0] // raw_bytes if raw_bytes else 0
    if raw_bytes == 0 or <size_t>src.shape[0] != n * raw_bytes:
        raise ValueError(f"{src.shape[0]} bytes are not whole samples of {raw_bytes} bytes")
    why = codec_unavailable(codec)
    if why is not None:
        raise RuntimeError(why)
    cdef const void *cdict = NULL if dictionary is None else dictionary.compression_dictionary(level)
    cdef size_t bound = sf_codec_bound(codec_id, raw_bytes), r, at = 0
    frames = np.empty(n * bound, dtype=np.uint8)
    lengths = np.empty(n, dtype=np.int64)
    cdef unsigned char[::1] out = frames
    cdef int64_t[::1] sizes = lengths
    cdef sf_error err
    cdef int rc = 0
    if n:
        with nogil:
            rc = sf_compress_samples(codec_id, level, cdict, <const char *>&src[0], n, raw_bytes, <char *>&out[0], bound,
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


def decompress(str codec, const unsigned char[::1] frame not None, size_t raw_bytes, Dictionary dictionary=None):
    """One frame decoded to exactly ``raw_bytes`` bytes (a bytes object), with ``dictionary`` where
    given, on the calling thread; ValueError saying why where it does not decode, names another
    dictionary, or decodes to another size. For the tests; reads decode on the pool
    (ShardSet.read_compressed)."""
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
    cdef const void *ddict = NULL if dictionary is None else dictionary.ddict
    cdef unsigned dict_id = 0 if dictionary is None else dictionary.id
    if frame.shape[0] == 0:
        raise ValueError("an empty frame")
    with nogil:
        rc = sf_codec_decompress(codec_id, &dst[0] if raw_bytes else &dummy, raw_bytes, &frame[0], frame.shape[0],
                                 ddict, dict_id, &found, &detail)
    if rc == SF_ERR_NOMEM:
        raise MemoryError()
    if rc == SF_ERR_DICTIONARY:
        raise ValueError(f"the frame names dictionary {found}, not {dict_id}")
    if rc != SF_OK:
        message = detail.decode("utf-8", "replace") if detail != NULL else "failed"
        raise ValueError(f"the frame does not decode to {raw_bytes} bytes ({message}"
                         + (f": {found} bytes" if found >= 0 else "") + ")")
    return bytes(out)
