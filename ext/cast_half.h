/* The 16-bit floats of the cast kernels (float16, bfloat16), for cast.c only: its block kernels
 * inline these static functions (one translation unit, so each target clone of convert_blocks gets
 * them inlined as before). float16 <-> float32 on the F16C vector path where the CPU has it (picked
 * at run time; sf_cast_allow_f16c switches it off for tests) or in portable code, bfloat16 by bit
 * shifts, and the one-rounding helpers that take a double or a 64-bit integer to a 16-bit float.
 * The in-place contract and the rounding rules are cast.h's. */
#ifndef SF_CAST_HALF_H
#define SF_CAST_HALF_H

#include <stdint.h>
#include <string.h>

#include "cast.h"

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define SF_HAVE_F16C_PATH 1
#endif

#define SF_INLINE static inline __attribute__((always_inline))

/* Stored 16-bit floats -> the local float block (the block kernels' contract, cast.c). */
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

/* Scalar 16-bit floats -> float, and float or double -> 16-bit bits, rounding to nearest even. */
static inline float half_to_float(uint16_t h)
{
    uint32_t bits = sf_half_to_float_bits(h);
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t b)
{
    uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* Double -> bfloat16 bits in one rounding: to float32 rounding to odd (an inexact result gets its
 * last bit set, so the next rounding cannot see a false tie), then to nearest even. */
static inline uint16_t double_to_bf16_bits(double x)
{
    float f = (float)x;
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (f == f && (double)f != x) {
        if ((f < 0 ? -(double)f : (double)f) > (x < 0 ? -x : x))
            bits -= 1; /* toward zero (from infinity: the largest float) */
        bits |= 1;
    }
    return sf_float_to_bf16_bits(bits);
}

static void f32_to_f16_soft(uint16_t *h, const float *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint32_t bits;
        memcpy(&bits, &in[j], 4);
        h[j] = sf_float_to_half_bits(bits);
    }
}

#ifdef SF_HAVE_F16C_PATH
__attribute__((target("avx,f16c"))) static void f32_to_f16_f16c(uint16_t *h, const float *in, size_t m)
{
    size_t j = 0;
    for (; j + 8 <= m; j += 8) {
        __m256 v = _mm256_loadu_ps(in + j);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)))
            f32_to_f16_soft(h + j, in + j, 8); /* the instruction quiets NaNs */
        else
            _mm_storeu_si128((__m128i *)(h + j), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    f32_to_f16_soft(h + j, in + j, m - j);
}
#endif

SF_INLINE void f32_to_f16_block(uint16_t *h, const float *in, size_t m)
{
#ifdef SF_HAVE_F16C_PATH
    if (have_f16c()) {
        f32_to_f16_f16c(h, in, m);
        return;
    }
#endif
    f32_to_f16_soft(h, in, m);
}

SF_INLINE void f32_to_bf16_block(uint16_t *h, const float *in, size_t m)
{
    for (size_t j = 0; j < m; j++) {
        uint32_t bits;
        memcpy(&bits, &in[j], 4);
        h[j] = sf_float_to_bf16_bits(bits);
    }
}

/* A 64-bit integer as a double rounded to odd (inexact: toward zero, last bit set), so the
 * bfloat16 rounding that follows is one rounding of the integer itself, as in ml_dtypes. */
static inline double i64_to_double_odd(int64_t v)
{
    double x = (double)v;
    int above = x >= 0x1p63 || (int64_t)x > v; /* x >= -2^63 always: v rounded */
    int below = x < 0x1p63 && (int64_t)x < v;
    if (above || below) {
        uint64_t bits;
        memcpy(&bits, &x, 8);
        if (v >= 0 ? above : below)
            bits -= 1;
        bits |= 1;
        memcpy(&x, &bits, 8);
    }
    return x;
}

static inline double u64_to_double_odd(uint64_t v)
{
    double x = (double)v;
    int above = x >= 0x1p64 || (uint64_t)x > v;
    if (above || (uint64_t)x < v) {
        uint64_t bits;
        memcpy(&bits, &x, 8);
        bits -= (uint64_t)above;
        bits |= 1;
        memcpy(&x, &bits, 8);
    }
    return x;
}

#endif
