/* Conversion kernels; see cast.h. Each call works through the elements in blocks: a block of
 * stored bytes is copied to a local buffer, converted into a local float block (simple loops the
 * compiler vectorizes), transformed, and copied out. That keeps the in-place rule trivially true and
 * lets every loop run on non-aliasing local arrays. */
#include "cast.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SF_HAVE_F16C_PATH 1
#endif



size_t sf_cast_itemsize(int cast)
{
    static const size_t sizes[SF_CAST_COUNT] = {0, 2, 2, 4, 8, 1, 1, 2, 2, 4, 4, 8, 8};
    return cast >= 0 && cast < SF_CAST_COUNT ? sizes[cast] : 0;
}

static void f16_block_soft(float *out, const uint16_t *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint32_t bits = sf_half_to_float_bits(in[j]);
        memcpy(&out[j], &bits, 4);
    }
}

#ifdef SF_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) static void f16_block_f16c(float *out, const uint16_t *in,
                                                               size_t m)
{
    size_t j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(in + j)));
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
            f16_block_soft(out + j, in + j, 8); /* the instruction quiets signalling NaNs */
        else
            _mm256_storeu_ps(out + j, v);
    }
    f16_block_soft(out + j, in + j, m - j);
}

static int have_f16c(void)
{
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("f16c") && __builtin_cpu_supports("avx");
    }
    return cached;
}
#endif

int sf_cast_has_f16c(void)
{
#ifdef SF_HAVE_F16C_PATH
    return have_f16c();
#else
    return 0;
#endif
}

#define SF_INT_BLOCK(name, type)                                         \
    static void name(float *out, const void *in_bytes, size_t m)         \
    {                                                                    \
        type in[SF_BLOCK];                                               \
        memcpy(in, in_bytes, m * sizeof(type));                          \
        for (size_t j = 0; j < m; j++)                                   \
            out[j] = (float)in[j];                                       \
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

static void f32_block(float *out, const void *in_bytes, size_t m) { memcpy(out, in_bytes, m * 4); }

static void bf16_block(float *out, const void *in_bytes, size_t m)
{
    uint16_t in[SF_BLOCK];
    uint32_t bits[SF_BLOCK];
    memcpy(in, in_bytes, m * 2);
    for (size_t j = 0; j < m; j++)
        bits[j] = (uint32_t)in[j] << 16;
    memcpy(out, bits, m * 4);
}

static void f16_block(float *out, const void *in_bytes, size_t m)
{
    uint16_t in[SF_BLOCK];
    memcpy(in, in_bytes, m * 2);
#ifdef SF_HAVE_F16C_PATH
    if (have_f16c()) {
        f16_block_f16c(out, in, m);
        return;
    }
#endif
    f16_block_soft(out, in, m);
}

typedef void (*block_fn)(float *out, const void *in, size_t m);

static block_fn block_fn_for(int cast)
{
    switch (cast) {
    case SF_CAST_F16: return f16_block;
    case SF_CAST_BF16: return bf16_block;
    case SF_CAST_F32: return f32_block;
    case SF_CAST_F64: return f64_block;
    case SF_CAST_U8: return u8_block;
    case SF_CAST_I8: return i8_block;
    case SF_CAST_U16: return u16_block;
    case SF_CAST_I16: return i16_block;
    case SF_CAST_U32: return u32_block;
    case SF_CAST_I32: return i32_block;
    case SF_CAST_U64: return u64_block;
    case SF_CAST_I64: return i64_block;
    default: return NULL;
    }
}

/* Applies the transform to out[0..m) whose first element is element `pos` of the sample. */
static void affine_block(float *out, size_t m, const sf_affine *a, size_t pos)
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

void sf_convert(int cast, float *dst, const void *src, size_t n, const sf_affine *affine,
                size_t first)
{
    block_fn convert = block_fn_for(cast);
    size_t itemsize = sf_cast_itemsize(cast);
    if (!convert)
        return;
    const unsigned char *in = src;
    unsigned char *out_bytes = (unsigned char *)dst;
    float out[SF_BLOCK];
    for (size_t i = 0; i < n; i += SF_BLOCK) {
        size_t m = n - i < SF_BLOCK ? n - i : SF_BLOCK;
        convert(out, in + i * itemsize, m);
        if (affine && affine->scale)
            affine_block(out, m, affine, first + i);
        memcpy(out_bytes + i * 4, out, m * 4);
    }
}
