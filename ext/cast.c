/* Conversion kernels; see cast.h. Each call works through the elements in blocks: a block of
 * stored bytes is converted into a local float block (simple loops the compiler vectorizes),
 * transformed, and copied out. Reading a whole block before storing any of it keeps the in-place
 * rule true, and the transform runs on a local array that aliases nothing. */
#include "cast.h"

#include <stdint.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SF_HAVE_F16C_PATH 1
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
#define SF_INLINE static inline __attribute__((always_inline))


size_t sf_cast_itemsize(int cast)
{
    static const size_t sizes[SF_CAST_COUNT] = {0, 2, 2, 4, 8, 1, 1, 2, 2, 4, 4, 8, 8};
    return cast >= 0 && cast < SF_CAST_COUNT ? sizes[cast] : 0;
}

/* Block kernels: convert m <= SF_BLOCK stored elements at `in` (any alignment: every element is
 * loaded with a fixed-size memcpy, which compiles to a plain unaligned load) into the local float
 * block `out`. The caller stores `out` only after the whole block was read, which is what makes
 * the in-place layout safe. */
static void f16_block_soft(float *out, const unsigned char *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint16_t h;
        memcpy(&h, in + 2 * j, 2);
        uint32_t bits = sf_half_to_float_bits(h);
        memcpy(&out[j], &bits, 4);
    }
}

#ifdef SF_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) static void f16_block_f16c(float *out, const unsigned char *in,
                                                               size_t m)
{
    size_t j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + 2 * j)));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
            f16_block_soft(out + j, in + 2 * j, 8); /* the instruction quiets signalling NaNs */
        else
            _mm256_storeu_ps(out + j, v);
    }
    f16_block_soft(out + j, in + 2 * j, m - j);
}

static int f16c_allowed = 1; /* tests switch the vector path off to check the portable one */

static int have_f16c(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    }
    return cached && f16c_allowed;
}
#endif

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

#define SF_INT_BLOCK(name, type)                                         \
    SF_INLINE void name(float *out, const unsigned char *in, size_t m)   \
    {                                                                    \
        for (size_t j = 0; j < m; j++) {                                 \
            type v;                                                      \
            memcpy(&v, in + j * sizeof v, sizeof v);                     \
            out[j] = (float)v;                                           \
        }                                                                \
    }

SF_INT_BLOCK(u8_block, uint8_t)
SF_INT_BLOCK(i8_block, int8_t)
SF_INT_BLOCK(u16_block, uint16_t)
SF_INT_BLOCK(i16_block, int16_t)
SF_INT_BLOCK(u32_block, uint32_t)
SF_INT_BLOCK(i32_block, int32_t)
SF_INT_BLOCK(u64_block, uint64_t)
SF_INT_BLOCK(i64_block, int64_t)
SF_INT_BLOCK(f64_block, double)

/* Bit copies (never through a float register, so NaN payloads stay as they are). */
SF_INLINE void f32_block(float *out, const unsigned char *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint32_t bits;
        memcpy(&bits, in + 4 * j, 4);
        memcpy(&out[j], &bits, 4);
    }
}

SF_INLINE void bf16_block(float *out, const unsigned char *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint16_t h;
        memcpy(&h, in + 2 * j, 2);
        uint32_t bits = (uint32_t)h << 16;
        memcpy(&out[j], &bits, 4);
    }
}

SF_INLINE void f16_block(float *out, const unsigned char *in, size_t m)
{
#ifdef SF_HAVE_F16C_PATH
    if (have_f16c()) {
        f16_block_f16c(out, in, m);
        return;
    }
#endif
    f16_block_soft(out, in, m);
}

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

/* Copies a converted block out; with `stream`, by non-temporal stores that bypass the cache. */
SF_INLINE void store_block(float *dst, const float *out, size_t m, int stream)
{
#ifdef SF_HAVE_STREAM_STORES
    if (stream) {
        size_t j = 0;
        for (; j < m && ((uintptr_t)(dst + j) & 15) != 0; j++)
            memcpy(dst + j, out + j, 4);
        for (; j + 4 <= m; j += 4)
            _mm_stream_ps(dst + j, _mm_loadu_ps(out + j));
        memcpy(dst + j, out + j, (m - j) * 4);
        return;
    }
#endif
    (void)stream;
    memcpy(dst, out, m * 4);
}

/* The whole conversion in one function, so that every block kernel is inlined into each clone. */
SF_CLONES static void convert_blocks(int cast, float *dst, const unsigned char *in, size_t n,
                                     const sf_affine *affine, size_t first, int stream)
{
    size_t itemsize = sf_cast_itemsize(cast);
    int transform = affine && affine->scale;
    float out[SF_BLOCK];
    for (size_t i = 0; i < n; i += SF_BLOCK) {
        size_t m = n - i < SF_BLOCK ? n - i : SF_BLOCK;
        const unsigned char *src = in + i * itemsize;
        switch (cast) {
        case SF_CAST_F16: f16_block(out, src, m); break;
        case SF_CAST_BF16: bf16_block(out, src, m); break;
        case SF_CAST_F32: f32_block(out, src, m); break;
        case SF_CAST_F64: f64_block(out, src, m); break;
        case SF_CAST_U8: u8_block(out, src, m); break;
        case SF_CAST_I8: i8_block(out, src, m); break;
        case SF_CAST_U16: u16_block(out, src, m); break;
        case SF_CAST_I16: i16_block(out, src, m); break;
        case SF_CAST_U32: u32_block(out, src, m); break;
        case SF_CAST_I32: i32_block(out, src, m); break;
        case SF_CAST_U64: u64_block(out, src, m); break;
        case SF_CAST_I64: i64_block(out, src, m); break;
        default: return;
        }
        if (transform)
            affine_block(out, m, affine, first + i);
        store_block(dst + i, out, m, stream);
    }
#ifdef SF_HAVE_STREAM_STORES
    if (stream)
        _mm_sfence(); /* order the non-temporal stores before whatever signals completion */
#endif
}

void sf_convert(int cast, float *dst, const void *src, size_t n, const sf_affine *affine,
                size_t first)
{
    convert_blocks(cast, dst, src, n, affine, first, 0);
}

void sf_convert_stream(int cast, float *dst, const void *src, size_t n, const sf_affine *affine,
                       size_t first)
{
    convert_blocks(cast, dst, src, n, affine, first, 1);
}
