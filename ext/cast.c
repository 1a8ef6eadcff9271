/* Conversion kernels; see cast.h. Each call works through the elements in blocks: a block of
 * stored bytes is converted into a local float block (simple loops the compiler vectorizes),
 * transformed, narrowed to the 16-bit output if one was asked for, and copied out. Reading a whole
 * block before storing any of it keeps the in-place rule true, and the transform runs on a local
 * array that aliases nothing. Integer sources wider than 16 bits and float64 converted to a 16-bit
 * output without a transform take a scalar path that rounds once from the exact value. */
#include "cast.h"

#include <stdint.h>

#include "cast_half.h"

#ifdef SF_HAVE_F16C_PATH /* x86-64 with GCC or clang: immintrin.h, included by cast_half.h */
#define SF_HAVE_STREAM_STORES 1
#endif

/* The block loops below are simple enough for the compiler to vectorise; with ifunc support
 * (GCC on Linux/glibc) they are also built for AVX2, picked at load time by CPU. Only integer
 * conversions, float32 multiplies and adds are vectorised, which round exactly like the scalar
 * code (no FMA: -ffp-contract=off and the avx2 target does not enable FMA). */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__) && \
    defined(__GLIBC__)
#define SF_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define SF_CLONES
#endif


int sf_cast_valid(int cast)
{
    int stored = sf_cast_stored(cast), out = sf_cast_out(cast);
    if (cast < 0 || stored >= SF_CAST_COUNT || out >= SF_OUT_COUNT)
        return 0;
    return stored != SF_CAST_COPY || out == 0;
}

size_t sf_cast_itemsize(int cast)
{
    static const size_t sizes[SF_CAST_COUNT] = {0, 2, 2, 4, 8, 1, 1, 2, 2, 4, 4, 8, 8};
    return sf_cast_valid(cast) ? sizes[sf_cast_stored(cast)] : 0;
}

size_t sf_cast_out_itemsize(int cast)
{
    if (!sf_cast_valid(cast) || cast == SF_CAST_COPY)
        return 0;
    return sf_cast_out(cast) == SF_OUT_F32 ? 4 : 2;
}

void sf_cast_allow_f16c(int allowed)
{
#ifdef SF_HAVE_F16C_PATH
    f16c_allowed = allowed != 0;
#else
    (void)allowed;
#endif
}

int sf_cast_has_f16c(void)
{
#ifdef SF_HAVE_F16C_PATH
    return have_f16c();
#else
    return 0;
#endif
}

/* Whether integer v is exactly the float w (w is the output, or the float32 step before a
 * transform): w converted back to an integer type that holds all of v's values, once w is known
 * to be in its range (w >= the type's minimum always holds: it is v rounded). */
#define SF_EXACT_ANY(v, w) ((void)(v), (void)(w), 1) /* 8-, 16-bit integers in float32; floats */
#define SF_EXACT_I32(v, w) ((w) < 0x1p31f && (int32_t)(w) == (v))
#define SF_EXACT_U32(v, w) ((w) < 0x1p32f && (int64_t)(w) == (int64_t)(v))
#define SF_EXACT_I64(v, w) ((w) >= -0x1p63f && (w) < 0x1p63f && (int64_t)(w) == (v))
#define SF_EXACT_U64(v, w) ((w) >= 0.0f && (w) < 0x1p64f && (uint64_t)(w) == (v))

/* Block kernels: convert m <= SF_BLOCK stored elements at `in` (any alignment: every element is
 * loaded with a fixed-size memcpy, which compiles to a plain unaligned load) into the local float
 * block `out`. The caller stores `out` only after the whole block was read, which is what makes
 * the in-place layout safe. */

/* Integer block kernels: out = (float)v, returning 1 when some v was not exact in float32 (never
 * for 8- and 16-bit integers: their check compiles to nothing). */
#define SF_INT_BLOCK(name, type, exact)                                  \
    SF_INLINE int name(float *out, const unsigned char *in, size_t m)    \
    {                                                                    \
        int inexact = 0;                                                 \
        for (size_t j = 0; j < m; j++) {                                 \
            type v;                                                      \
            memcpy(&v, in + j * sizeof v, sizeof v);                     \
            out[j] = (float)v;                                           \
            inexact |= !exact(v, out[j]);                                \
        }                                                                \
        return inexact;                                                  \
    }

SF_INT_BLOCK(u8_block, uint8_t, SF_EXACT_ANY)
SF_INT_BLOCK(i8_block, int8_t, SF_EXACT_ANY)
SF_INT_BLOCK(u16_block, uint16_t, SF_EXACT_ANY)
SF_INT_BLOCK(i16_block, int16_t, SF_EXACT_ANY)
SF_INT_BLOCK(u32_block, uint32_t, SF_EXACT_U32)
SF_INT_BLOCK(i32_block, int32_t, SF_EXACT_I32)
SF_INT_BLOCK(u64_block, uint64_t, SF_EXACT_U64)
SF_INT_BLOCK(i64_block, int64_t, SF_EXACT_I64)

SF_INLINE void f64_block(float *out, const unsigned char *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        double v;
        memcpy(&v, in + 8 * j, 8);
        out[j] = (float)v;
    }
}

/* Bit copies (never through a float register, so NaN payloads stay as they are). */
SF_INLINE void f32_block(float *out, const unsigned char *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint32_t bits;
        memcpy(&bits, in + 4 * j, 4);
        memcpy(&out[j], &bits, 4);
    }
}




static inline double as_double(double x) { return x; }

/* 1 when some 16-bit output h[j] is not the exact value out[j] of an integer source. */
SF_INLINE int narrow_inexact(const uint16_t *h, const float *out, size_t m, int out_kind)
{
    int inexact = 0;
    for (size_t j = 0; j < m; j++)
        inexact |= (out_kind == SF_OUT_F16 ? half_to_float(h[j]) : bf16_to_float(h[j])) != out[j];
    return inexact;
}

/* Integers wider than 16 bits and float64 to a 16-bit output without a transform, one rounding
 * from the value (through double: exact for 32-bit integers; 64-bit ones are rounded to odd on
 * the way, and beyond 2^53 overflow float16 anyway). Returns 1 when some integer was not
 * converted exactly. */
#define SF_WIDE_TO_NARROW(name, type, exact, to_double)                            \
    static int name(uint16_t *h, const unsigned char *in, size_t m, int out_kind)  \
    {                                                                              \
        int inexact = 0;                                                           \
        for (size_t j = 0; j < m; j++) {                                           \
            type v;                                                                \
            memcpy(&v, in + j * sizeof v, sizeof v);                               \
            double x = to_double(v);                                               \
            uint64_t bits;                                                         \
            memcpy(&bits, &x, 8);                                                  \
            h[j] = out_kind == SF_OUT_F16 ? sf_double_to_half_bits(bits) : double_to_bf16_bits(x); \
            float w = out_kind == SF_OUT_F16 ? half_to_float(h[j]) : bf16_to_float(h[j]);         \
            inexact |= !exact(v, w);                                               \
        }                                                                          \
        return inexact;                                                            \
    }

SF_WIDE_TO_NARROW(u32_narrow, uint32_t, SF_EXACT_U32, as_double)
SF_WIDE_TO_NARROW(i32_narrow, int32_t, SF_EXACT_I32, as_double)
SF_WIDE_TO_NARROW(u64_narrow, uint64_t, SF_EXACT_U64, u64_to_double_odd)
SF_WIDE_TO_NARROW(i64_narrow, int64_t, SF_EXACT_I64, i64_to_double_odd)
SF_WIDE_TO_NARROW(f64_narrow, double, SF_EXACT_ANY, as_double)

/* Applies the transform to out[0..m) whose first element is element `pos` of the sample. */
SF_INLINE void affine_block(float *out, size_t m, const sf_affine *a, size_t pos)
{
    if (a->period == 1) {
        const float s = a->scale[0], o = a->offset[0];
        for (size_t j = 0; j < m; j++)
            out[j] = out[j] * s + o;
    } else if (a->inner == 1) {
        /* The parameters were tiled by the caller to at least period + SF_BLOCK entries. */
        const float *s = a->scale + pos % a->period, *o = a->offset + pos % a->period;
        for (size_t j = 0; j < m; j++)
            out[j] = out[j] * s[j] + o[j];
    } else {
        size_t j = 0;
        while (j < m) {
            size_t run_pos = pos + j;
            size_t p = (run_pos / a->inner) % a->period;
            size_t left = a->inner - run_pos % a->inner;
            size_t k = left < m - j ? left : m - j;
            const float s = a->scale[p], o = a->offset[p];
            for (size_t t = 0; t < k; t++)
                out[j + t] = out[j + t] * s + o;
            j += k;
        }
    }
}

/* Copies a converted block out; with `stream`, the whole 64-byte cache lines of `dst` by
 * non-temporal stores that bypass the cache, the parts of lines at either end by plain stores
 * (convert_blocks starts its blocks at line boundaries, so only a call's first and last lines are
 * partial). Non-temporal stores that fill a line in two blocks, with a block's conversion between
 * them, made streaming into an output 16 bytes past a line boundary (numpy's own allocations, a
 * caller's `out`) 1.8-2.5x as slow as into an aligned one (benchmarks/RESULTS.md, eighth session). */
SF_INLINE void store_block(float *dst, const float *out, size_t m, int stream)
{
#ifdef SF_HAVE_STREAM_STORES
    if (stream) {
        unsigned char *d = (unsigned char *)dst;
        const unsigned char *s = (const unsigned char *)out;
        size_t bytes = m * 4, j = (size_t)(-(uintptr_t)d & 63);
        if (j > bytes)
            j = bytes;
        memcpy(d, s, j);
        for (; j + 64 <= bytes; j += 64) {
            _mm_stream_ps((float *)(void *)(d + j), _mm_loadu_ps((const float *)(const void *)(s + j)));
            _mm_stream_ps((float *)(void *)(d + j + 16), _mm_loadu_ps((const float *)(const void *)(s + j + 16)));
            _mm_stream_ps((float *)(void *)(d + j + 32), _mm_loadu_ps((const float *)(const void *)(s + j + 32)));
            _mm_stream_ps((float *)(void *)(d + j + 48), _mm_loadu_ps((const float *)(const void *)(s + j + 48)));
        }
        memcpy(d + j, s + j, bytes - j);
        return;
    }
#endif
    (void)stream;
    memcpy(dst, out, m * 4);
}

/* The whole conversion in one function, so that every block kernel is inlined into each clone. */
SF_CLONES static int convert_blocks(int cast, unsigned char *dst, const unsigned char *in, size_t n,
                                    const sf_affine *affine, size_t first, int stream)
{
    int stored = sf_cast_stored(cast), out_kind = sf_cast_out(cast);
    size_t itemsize = sf_cast_itemsize(cast), out_size = sf_cast_out_itemsize(cast);
    int transform = affine && affine->scale;
    int inexact = 0;
    float out[SF_BLOCK];
    uint16_t narrow[SF_BLOCK];
    int direct = out_kind != SF_OUT_F32 && !transform &&
                 (stored == SF_CAST_F64 || stored == SF_CAST_U32 || stored == SF_CAST_I32 ||
                  stored == SF_CAST_U64 || stored == SF_CAST_I64);
    /* Streamed float32 output: a first short block brings dst to a cache-line boundary, so that
     * every later block's non-temporal stores fill whole lines (store_block). */
    size_t lead = stream && out_kind == SF_OUT_F32 ? ((size_t)(-(uintptr_t)dst) & 63) / 4 : 0;
    for (size_t i = 0, m; i < n; i += m) {
        m = i == 0 && lead ? lead : SF_BLOCK;
        if (m > n - i)
            m = n - i;
        const unsigned char *src = in + i * itemsize;
        if (direct) {
            switch (stored) {
            case SF_CAST_F64: f64_narrow(narrow, src, m, out_kind); break;
            case SF_CAST_U32: inexact |= u32_narrow(narrow, src, m, out_kind); break;
            case SF_CAST_I32: inexact |= i32_narrow(narrow, src, m, out_kind); break;
            case SF_CAST_U64: inexact |= u64_narrow(narrow, src, m, out_kind); break;
            default: inexact |= i64_narrow(narrow, src, m, out_kind); break;
            }
            memcpy(dst + i * 2, narrow, m * 2);
            continue;
        }
        int integer = 0;
        switch (stored) {
        case SF_CAST_F16: f16_block(out, src, m); break;
        case SF_CAST_BF16: bf16_block(out, src, m); break;
        case SF_CAST_F32: f32_block(out, src, m); break;
        case SF_CAST_F64: f64_block(out, src, m); break;
        case SF_CAST_U8: integer = 1; u8_block(out, src, m); break;
        case SF_CAST_I8: integer = 1; i8_block(out, src, m); break;
        case SF_CAST_U16: integer = 1; u16_block(out, src, m); break;
        case SF_CAST_I16: integer = 1; i16_block(out, src, m); break;
        case SF_CAST_U32: inexact |= u32_block(out, src, m); break;
        case SF_CAST_I32: inexact |= i32_block(out, src, m); break;
        case SF_CAST_U64: inexact |= u64_block(out, src, m); break;
        case SF_CAST_I64: inexact |= i64_block(out, src, m); break;
        default: return 0;
        }
        if (transform)
            affine_block(out, m, affine, first + i);
        if (out_kind == SF_OUT_F32) {
            store_block((float *)(void *)(dst + i * 4), out, m, stream);
            continue;
        }
        if (out_kind == SF_OUT_F16)
            f32_to_f16_block(narrow, out, m);
        else
            f32_to_bf16_block(narrow, out, m);
        if (integer && !transform)
            inexact |= narrow_inexact(narrow, out, m, out_kind);
        memcpy(dst + i * out_size, narrow, m * out_size);
    }
#ifdef SF_HAVE_STREAM_STORES
    if (stream && out_kind == SF_OUT_F32)
        _mm_sfence(); /* order the non-temporal stores before whatever signals completion */
#endif
    return inexact;
}

int sf_convert(int cast, void *dst, const void *src, size_t n, const sf_affine *affine, size_t first)
{
    return convert_blocks(cast, dst, src, n, affine, first, 0);
}

int sf_convert_stream(int cast, void *dst, const void *src, size_t n, const sf_affine *affine,
                      size_t first)
{
    return convert_blocks(cast, dst, src, n, affine, first, 1);
}
