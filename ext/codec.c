/* The run-time loaded compression codecs; see codec.h. */
#define _GNU_SOURCE 1
#define _DEFAULT_SOURCE 1
#include "codec.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "sf_error.h"

/* The stable (non-experimental) part of zstd's ABI that shardfeed uses, declared here so that no
 * zstd header is needed to build (the functions and their signatures are unchanged since v1.0). */
typedef struct ZSTD_CCtx_s ZSTD_CCtx;
typedef struct ZSTD_DCtx_s ZSTD_DCtx;
typedef struct ZSTD_CDict_s ZSTD_CDict;
typedef struct ZSTD_DDict_s ZSTD_DDict;
#define SF_ZSTD_CONTENTSIZE_UNKNOWN (0ULL - 1)
#define SF_ZSTD_CONTENTSIZE_ERROR (0ULL - 2)

static struct {
    ZSTD_CCtx *(*createCCtx)(void);
    size_t (*freeCCtx)(ZSTD_CCtx *);
    ZSTD_DCtx *(*createDCtx)(void);
    size_t (*freeDCtx)(ZSTD_DCtx *);
    size_t (*compressCCtx)(ZSTD_CCtx *, void *, size_t, const void *, size_t, int);
    size_t (*decompressDCtx)(ZSTD_DCtx *, void *, size_t, const void *, size_t);
    unsigned (*isError)(size_t);
    const char *(*getErrorName)(size_t);
    unsigned long long (*getFrameContentSize)(const void *, size_t);
    size_t (*compressBound)(size_t);
    /* Dictionaries (optional: zdict.h's trainer and zstd.h's dictionary functions, stable since 1.0). */
    size_t (*trainFromBuffer)(void *, size_t, const void *, const size_t *, unsigned);
    unsigned (*zdictIsError)(size_t);
    const char *(*zdictErrorName)(size_t);
    unsigned (*getDictID_fromDict)(const void *, size_t);
    unsigned (*getDictID_fromFrame)(const void *, size_t);
    ZSTD_CDict *(*createCDict)(const void *, size_t, int);
    size_t (*freeCDict)(ZSTD_CDict *);
    ZSTD_DDict *(*createDDict)(const void *, size_t);
    size_t (*freeDDict)(ZSTD_DDict *);
    size_t (*compress_usingCDict)(ZSTD_CCtx *, void *, size_t, const void *, size_t, const ZSTD_CDict *);
    size_t (*decompress_usingDDict)(ZSTD_DCtx *, void *, size_t, const void *, size_t, const ZSTD_DDict *);
} zstd;

#ifdef __APPLE__
#define SF_ZSTD_DEFAULT "libzstd.1.dylib"
#else
#define SF_ZSTD_DEFAULT "libzstd.so.1"
#endif

static pthread_once_t load_once = PTHREAD_ONCE_INIT;
static const char *zstd_missing;   /* NULL once loaded */
static char zstd_why[512];
static const char *dictionaries_missing = "the zstd library is not loaded"; /* NULL once found */
static char dictionaries_why[512];
static char zstd_library[256] = SF_ZSTD_DEFAULT;
static pthread_key_t thread_key;
static int thread_key_ok;

/* What one thread keeps between calls. */
typedef struct thread_state {
    ZSTD_CCtx *cctx;
    ZSTD_DCtx *dctx;
    void *scratch[2];
    size_t scratch_bytes[2];
} thread_state;

static void free_thread_state(void *vstate)
{
    thread_state *state = vstate;
    if (state->cctx)
        zstd.freeCCtx(state->cctx);
    if (state->dctx)
        zstd.freeDCtx(state->dctx);
    free(state->scratch[0]);
    free(state->scratch[1]);
    free(state);
}

/* RTLD_DEEPBIND: the library's calls to its own exported functions bind to itself. Without it, in
 * a process whose global scope already holds another zstd's symbols (TensorFlow's
 * libtensorflow_framework exports the zstd it bundles), the system library's internal calls went to
 * that other version: a compression dictionary made by one and freed by the other crashed the
 * interpreter. (AddressSanitizer's and ThreadSanitizer's runtimes refuse RTLD_DEEPBIND; their
 * builds are tested in a venv without TensorFlow.) */
#if defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define SF_SANITIZED 1
#endif
#endif
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define SF_SANITIZED 1
#endif
#if defined(RTLD_DEEPBIND) && !defined(SF_SANITIZED)
#define SF_DLOPEN_FLAGS (RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND)
#else
#define SF_DLOPEN_FLAGS (RTLD_NOW | RTLD_LOCAL)
#endif

typedef struct symbol_slot {
    void **slot;
    const char *symbol;
} symbol_slot;

/* Looks up each of table[0..n) in lib into its slot; returns the first symbol missing, or NULL. */
static const char *look_up(void *lib, const symbol_slot *table, size_t n)
{
    for (size_t k = 0; k < n; k++) {
        *table[k].slot = dlsym(lib, table[k].symbol);
        if (!*table[k].slot)
            return table[k].symbol;
    }
    return NULL;
}

static void load_zstd(void)
{
    const char *name = getenv("SHARDFEED_ZSTD_LIBRARY");
    if (name && *name)
        snprintf(zstd_library, sizeof zstd_library, "%s", name);
    thread_key_ok = pthread_key_create(&thread_key, free_thread_state) == 0;
    void *lib = dlopen(zstd_library, SF_DLOPEN_FLAGS);
    if (!lib) {
        const char *error = dlerror();
        snprintf(zstd_why, sizeof zstd_why, "the zstd library (%s) cannot be loaded: %s", zstd_library,
                 error ? error : "not found");
        zstd_missing = zstd_why;
        return;
    }
    const symbol_slot wanted[] = {
        {(void **)&zstd.createCCtx, "ZSTD_createCCtx"},
        {(void **)&zstd.freeCCtx, "ZSTD_freeCCtx"},
        {(void **)&zstd.createDCtx, "ZSTD_createDCtx"},
        {(void **)&zstd.freeDCtx, "ZSTD_freeDCtx"},
        {(void **)&zstd.compressCCtx, "ZSTD_compressCCtx"},
        {(void **)&zstd.decompressDCtx, "ZSTD_decompressDCtx"},
        {(void **)&zstd.isError, "ZSTD_isError"},
        {(void **)&zstd.getErrorName, "ZSTD_getErrorName"},
        {(void **)&zstd.getFrameContentSize, "ZSTD_getFrameContentSize"},
        {(void **)&zstd.compressBound, "ZSTD_compressBound"},
    };
    const char *absent = look_up(lib, wanted, sizeof wanted / sizeof wanted[0]);
    if (absent) {
        snprintf(zstd_why, sizeof zstd_why, "the zstd library (%s) has no function %s (zstd 1.3 or newer "
                 "is needed)", zstd_library, absent);
        zstd_missing = zstd_why;
        return; /* (the library stays loaded: harmless) */
    }
    if (!thread_key_ok) {
        snprintf(zstd_why, sizeof zstd_why, "no thread-specific key is left for the zstd contexts");
        zstd_missing = zstd_why;
        return;
    }
    zstd_missing = NULL;
    const symbol_slot optional[] = {
        {(void **)&zstd.trainFromBuffer, "ZDICT_trainFromBuffer"},
        {(void **)&zstd.zdictIsError, "ZDICT_isError"},
        {(void **)&zstd.zdictErrorName, "ZDICT_getErrorName"},
        {(void **)&zstd.getDictID_fromDict, "ZSTD_getDictID_fromDict"},
        {(void **)&zstd.getDictID_fromFrame, "ZSTD_getDictID_fromFrame"},
        {(void **)&zstd.createCDict, "ZSTD_createCDict"},
        {(void **)&zstd.freeCDict, "ZSTD_freeCDict"},
        {(void **)&zstd.createDDict, "ZSTD_createDDict"},
        {(void **)&zstd.freeDDict, "ZSTD_freeDDict"},
        {(void **)&zstd.compress_usingCDict, "ZSTD_compress_usingCDict"},
        {(void **)&zstd.decompress_usingDDict, "ZSTD_decompress_usingDDict"},
    };
    absent = look_up(lib, optional, sizeof optional / sizeof optional[0]);
    if (absent) {
        snprintf(dictionaries_why, sizeof dictionaries_why, "the zstd library (%s) has no function %s: it "
                 "cannot train or use compression dictionaries", zstd_library, absent);
        dictionaries_missing = dictionaries_why;
        return;
    }
    dictionaries_missing = NULL;
}

const char *sf_codec_unavailable(int codec)
{
    if (codec != SF_CODEC_ZSTD)
        return "unknown codec";
    pthread_once(&load_once, load_zstd);
    return zstd_missing;
}

const char *sf_codec_library(int codec)
{
    (void)sf_codec_unavailable(codec);
    return zstd_library;
}

size_t sf_codec_bound(int codec, size_t raw_bytes)
{
    return sf_codec_unavailable(codec) ? 0 : zstd.compressBound(raw_bytes);
}

static thread_state *this_thread(void)
{
    thread_state *state = pthread_getspecific(thread_key);
    if (!state) {
        state = calloc(1, sizeof *state);
        if (!state || pthread_setspecific(thread_key, state) != 0) {
            free(state);
            return NULL;
        }
    }
    return state;
}

void *sf_codec_scratch(int slot, size_t bytes)
{
    thread_state *state = this_thread();
    if (!state)
        return NULL;
    if (state->scratch_bytes[slot] < bytes || !state->scratch[slot]) {
        size_t want = bytes ? bytes : 1;
        void *grown = realloc(state->scratch[slot], want);
        if (!grown)
            return NULL;
        state->scratch[slot] = grown;
        state->scratch_bytes[slot] = want;
    }
    return state->scratch[slot];
}

int sf_codec_compress(int codec, void *dst, size_t cap, const void *src, size_t n, int level,
                      const void *cdict, size_t *out_bytes, const char **why)
{
    *why = cdict ? sf_codec_dictionaries_unavailable(codec) : sf_codec_unavailable(codec);
    if (*why)
        return SF_ERR_CODEC;
    thread_state *state = this_thread();
    if (state && !state->cctx)
        state->cctx = zstd.createCCtx();
    if (!state || !state->cctx)
        return SF_ERR_NOMEM;
    size_t got = cdict ? zstd.compress_usingCDict(state->cctx, dst, cap, src, n, cdict)
                       : zstd.compressCCtx(state->cctx, dst, cap, src, n, level);
    if (zstd.isError(got)) {
        *why = zstd.getErrorName(got);
        return SF_ERR_CORRUPT;
    }
    *out_bytes = got;
    return SF_OK;
}

int sf_codec_decompress(int codec, void *dst, size_t raw_bytes, const void *src, size_t n,
                        const void *ddict, unsigned dict_id, long long *found_bytes, const char **why)
{
    *found_bytes = -1;
    *why = ddict ? sf_codec_dictionaries_unavailable(codec) : sf_codec_unavailable(codec);
    if (*why)
        return SF_ERR_CODEC;
    unsigned long long declared = zstd.getFrameContentSize(src, n);
    if (declared == SF_ZSTD_CONTENTSIZE_ERROR) {
        *why = "not a zstd frame";
        return SF_ERR_CORRUPT;
    }
    if (declared != SF_ZSTD_CONTENTSIZE_UNKNOWN && declared != (unsigned long long)raw_bytes) {
        *found_bytes = declared > (unsigned long long)0x7fffffffffffffffLL ? -1 : (long long)declared;
        *why = "the frame's content size";
        return SF_ERR_SIZE;
    }
    /* The frame header's dictionary id (0: none) must be the shard's: a frame decoded with another
     * dictionary than its own could decode to wrong bytes of the right size. (Where the library
     * has no dictionary functions, no dataset with dictionaries is read: ddict is then NULL and
     * the frame must name none, which zstd's own decoder checks.) */
    if (zstd.getDictID_fromFrame) {
        unsigned named = zstd.getDictID_fromFrame(src, n);
        if (named != dict_id) {
            *found_bytes = (long long)named;
            *why = named ? "the frame names another dictionary" : "the frame names no dictionary";
            return SF_ERR_DICTIONARY;
        }
    }
    thread_state *state = this_thread();
    if (state && !state->dctx)
        state->dctx = zstd.createDCtx();
    if (!state || !state->dctx)
        return SF_ERR_NOMEM;
    size_t got = ddict ? zstd.decompress_usingDDict(state->dctx, dst, raw_bytes, src, n, ddict)
                       : zstd.decompressDCtx(state->dctx, dst, raw_bytes, src, n);
    if (zstd.isError(got)) {
        *why = zstd.getErrorName(got);
        return SF_ERR_CORRUPT;
    }
    if (got != raw_bytes) {
        *found_bytes = (long long)got;
        *why = "the decoded bytes";
        return SF_ERR_SIZE;
    }
    return SF_OK;
}

const char *sf_codec_dictionaries_unavailable(int codec)
{
    const char *why = sf_codec_unavailable(codec);
    return why ? why : dictionaries_missing;
}

int sf_codec_train(int codec, void *dst, size_t capacity, const void *samples, const size_t *sizes,
                   unsigned n, size_t *out_bytes, const char **why)
{
    *why = sf_codec_dictionaries_unavailable(codec);
    if (*why)
        return SF_ERR_CODEC;
    size_t got = zstd.trainFromBuffer(dst, capacity, samples, sizes, n);
    if (zstd.zdictIsError(got)) {
        *why = zstd.zdictErrorName(got);
        return SF_ERR_CODEC;
    }
    *out_bytes = got;
    return SF_OK;
}

unsigned sf_codec_dictionary_id(int codec, const void *dict, size_t n)
{
    return sf_codec_dictionaries_unavailable(codec) ? 0 : zstd.getDictID_fromDict(dict, n);
}

void *sf_codec_ddict_create(int codec, const void *dict, size_t n, const char **why)
{
    *why = sf_codec_dictionaries_unavailable(codec);
    if (*why)
        return NULL;
    ZSTD_DDict *ddict = zstd.createDDict(dict, n);
    if (!ddict)
        *why = "zstd could not load the dictionary (out of memory, or not a dictionary)";
    return ddict;
}

void sf_codec_ddict_free(int codec, void *ddict)
{
    if (ddict && !sf_codec_dictionaries_unavailable(codec))
        zstd.freeDDict(ddict);
}

void *sf_codec_cdict_create(int codec, const void *dict, size_t n, int level, const char **why)
{
    *why = sf_codec_dictionaries_unavailable(codec);
    if (*why)
        return NULL;
    ZSTD_CDict *cdict = zstd.createCDict(dict, n, level);
    if (!cdict)
        *why = "zstd could not load the dictionary (out of memory, or not a dictionary)";
    return cdict;
}

void sf_codec_cdict_free(int codec, void *cdict)
{
    if (cdict && !sf_codec_dictionaries_unavailable(codec))
        zstd.freeCDict(cdict);
}
