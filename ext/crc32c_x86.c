/* The x86-64 CRC32C kernels (crc32c.c lists them all): "avx2-vpclmulqdq" and "sse4.2-pclmul".
 * Compiled for the baseline x86-64 with target attributes per function; used only after cpuid
 * said the CPU has the instructions (sf_crc32c_x86_init). */
#include "crc32c_kernels.h"

#ifdef SF_CRC_X86
#include <immintrin.h>

#define X86_BASE "sse4.2,pclmul"
#define X86_WIDE "sse4.2,pclmul,avx,avx2,vpclmulqdq"


/* a * b * x^33 mod P for bit-reflected residues: the carry-less product reduced by crc32. With
 * a = x^(m-33) mod P ("the shift constant of m bits") it is b shifted over m bits. */
__attribute__((target(X86_BASE))) static inline uint32_t times_shifted(uint32_t a, uint32_t b)
{
    __m128i product = _mm_clmulepi64_si128(_mm_cvtsi32_si128((int)a), _mm_cvtsi32_si128((int)b), 0);
    return (uint32_t)_mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(product));
}

/* The shift constant of `bits` >= 33 bits, x^(bits - 33) mod P: squarings (doubling the exponent)
 * and multiplications by x, from an exponent in [33, 65] whose residue is one bit. */
__attribute__((target(X86_BASE))) static uint32_t xshift(uint64_t bits)
{
    uint64_t path = 0;
    int steps = 0;
    for (; bits > 65; steps++, bits >>= 1)
        path = path << 1 | (bits & 1);
    uint32_t w = bits == 65 ? SF_CRC_POLY : 0x80000000u >> (bits - 33);
    for (; steps > 0; steps--, path >>= 1) {
        w = times_shifted(w, w);
        if (path & 1)
            w = sf_times_x(w);
    }
    return w;
}

/* One stream of crc32 instructions over n bytes (copied to dst when dst != NULL), from state s. */
__attribute__((target(X86_BASE))) static inline uint64_t one_stream(uint64_t s, unsigned char *dst,
                                                                    const unsigned char *p, size_t n)
{
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word = sf_load64(p);
        if (dst) {
            memcpy(dst, &word, 8);
            dst += 8;
        }
        s = _mm_crc32_u64(s, word);
    }
    for (; n > 0; n--, p++) {
        if (dst)
            *dst++ = *p;
        s = _mm_crc32_u8((uint32_t)s, *p);
    }
    return s;
}

/* Three streams over the thirds [0, b), [b, 2b), [2b, 3b) of p, b = n / 24 * 8, the rest by one
 * stream; state s in, state out. */
__attribute__((target(X86_BASE), always_inline)) static inline uint64_t three_streams(
    uint64_t s, unsigned char *dst, const unsigned char *p, size_t n)
{
    if (n >= 384) {
        size_t block = n / 24 * 8;
        uint32_t shift = xshift(8 * (uint64_t)block);
        const unsigned char *end = p + block;
        uint64_t s1 = 0, s2 = 0;
        do {
            uint64_t w0 = sf_load64(p), w1 = sf_load64(p + block), w2 = sf_load64(p + 2 * block);
            if (dst) {
                memcpy(dst, &w0, 8);
                memcpy(dst + block, &w1, 8);
                memcpy(dst + 2 * block, &w2, 8);
                dst += 8;
            }
            s = _mm_crc32_u64(s, w0);
            s1 = _mm_crc32_u64(s1, w1);
            s2 = _mm_crc32_u64(s2, w2);
            p += 8;
        } while (p < end);
        s = times_shifted((uint32_t)s, shift) ^ (uint32_t)s1;
        s = times_shifted((uint32_t)s, shift) ^ (uint32_t)s2;
        p += 2 * block;
        if (dst)
            dst += 2 * block;
        n -= 3 * block;
    }
    return one_stream(s, dst, p, n);
}

__attribute__((target(X86_BASE))) uint32_t sf_crc32c_sse42(uint32_t crc, const void *data, size_t n)
{
    return ~(uint32_t)three_streams(~crc, NULL, data, n);
}

__attribute__((target(X86_BASE))) uint32_t sf_crc32c_sse42_copy(uint32_t crc, void *dst,
                                                                     const void *src, size_t n)
{
    return ~(uint32_t)three_streams(~crc, dst, src, n);
}

/* Folding constants: a 128-bit lane (A, B) of 64-bit halves, `bits` before the lane it is folded
 * onto, becomes A * x^(bits+64) + B * x^bits, each a 64 x 32-bit carry-less product. */
static uint64_t fold_constants[4][2]; /* over 128, 256, 512 and 1024 bits */

__attribute__((target(X86_WIDE))) static inline __m128i fold128(__m128i x, __m128i k, __m128i onto)
{
    return _mm_xor_si128(_mm_xor_si128(_mm_clmulepi64_si128(x, k, 0x00), _mm_clmulepi64_si128(x, k, 0x11)), onto);
}

__attribute__((target(X86_WIDE))) static inline __m256i fold256(__m256i x, __m256i k, __m256i onto)
{
    return _mm256_xor_si256(
        _mm256_xor_si256(_mm256_clmulepi64_epi128(x, k, 0x00), _mm256_clmulepi64_epi128(x, k, 0x11)), onto);
}

__attribute__((target(X86_WIDE))) static inline __m128i lane_constants(int level)
{
    return _mm_set_epi64x((long long)fold_constants[level][1], (long long)fold_constants[level][0]);
}

/* The CRC state after the 128 bytes held in four accumulators (eight lanes in order), folded
 * onto the last lane and reduced by two crc32 instructions. */
__attribute__((target(X86_WIDE))) static inline uint32_t reduce_lanes(__m256i a, __m256i b, __m256i c, __m256i d)
{
    __m128i k128 = lane_constants(0), k256 = lane_constants(1), k512 = lane_constants(2);
    __m128i x0 = fold128(_mm256_castsi256_si128(a), k128, _mm256_extracti128_si256(a, 1));
    __m128i x2 = fold128(_mm256_castsi256_si128(b), k128, _mm256_extracti128_si256(b, 1));
    __m128i x4 = fold128(_mm256_castsi256_si128(c), k128, _mm256_extracti128_si256(c, 1));
    __m128i x6 = fold128(_mm256_castsi256_si128(d), k128, _mm256_extracti128_si256(d, 1));
    x0 = fold128(fold128(x0, k256, x2), k512, fold128(x4, k256, x6));
    uint64_t s = _mm_crc32_u64(0, (uint64_t)_mm_cvtsi128_si64(x0));
    return (uint32_t)_mm_crc32_u64(s, (uint64_t)_mm_extract_epi64(x0, 1));
}

#define WIDE_STREAM_BYTES 24 /* per stream per iteration, next to 128 folded bytes */

__attribute__((target(X86_WIDE))) static inline __m256i load256(const unsigned char *p, unsigned char *dst)
{
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    if (dst)
        _mm256_storeu_si256((__m256i *)dst, v);
    return v;
}

/* From 512 bytes on: `iters` x 128 bytes folded, then three streams of iters x 24 bytes, in one
 * loop; the folded part's CRC and the streams' combine with one shift constant. Then the rest
 * (under 176 bytes) by three_streams. */
__attribute__((target(X86_WIDE), always_inline)) static inline uint32_t wide(uint32_t crc, unsigned char *dst,
                                                                             const unsigned char *p, size_t n)
{
    uint64_t s = ~crc;
    if (n >= 512) {
        size_t iters = n / (128 + 3 * WIDE_STREAM_BYTES), stream = WIDE_STREAM_BYTES * iters;
        uint32_t shift = xshift(8 * (uint64_t)stream);
        const unsigned char *q = p + 128 * iters;
        unsigned char *qdst = dst ? dst + 128 * iters : NULL;
        __m256i k1024 = _mm256_broadcastsi128_si256(lane_constants(3));
        __m256i a = load256(p, dst), b = load256(p + 32, dst ? dst + 32 : NULL),
                c = load256(p + 64, dst ? dst + 64 : NULL), d = load256(p + 96, dst ? dst + 96 : NULL);
        a = _mm256_xor_si256(a, _mm256_zextsi128_si256(_mm_cvtsi32_si128((int)(uint32_t)s)));
        uint64_t s0 = 0, s1 = 0, s2 = 0;
        for (size_t i = 0;;) {
            for (size_t at = 0; at < WIDE_STREAM_BYTES; at += 8) {
                uint64_t w0 = sf_load64(q + at), w1 = sf_load64(q + stream + at), w2 = sf_load64(q + 2 * stream + at);
                if (qdst) {
                    memcpy(qdst + at, &w0, 8);
                    memcpy(qdst + stream + at, &w1, 8);
                    memcpy(qdst + 2 * stream + at, &w2, 8);
                }
                s0 = _mm_crc32_u64(s0, w0);
                s1 = _mm_crc32_u64(s1, w1);
                s2 = _mm_crc32_u64(s2, w2);
            }
            q += WIDE_STREAM_BYTES;
            if (qdst)
                qdst += WIDE_STREAM_BYTES;
            if (++i == iters)
                break;
            p += 128;
            if (dst)
                dst += 128;
            a = fold256(a, k1024, load256(p, dst));
            b = fold256(b, k1024, load256(p + 32, dst ? dst + 32 : NULL));
            c = fold256(c, k1024, load256(p + 64, dst ? dst + 64 : NULL));
            d = fold256(d, k1024, load256(p + 96, dst ? dst + 96 : NULL));
        }
        s = reduce_lanes(a, b, c, d);
        s = times_shifted((uint32_t)s, shift) ^ (uint32_t)s0;
        s = times_shifted((uint32_t)s, shift) ^ (uint32_t)s1;
        s = times_shifted((uint32_t)s, shift) ^ (uint32_t)s2;
        p = q + 2 * stream;
        if (dst)
            dst = qdst + 2 * stream;
        n -= (128 + 3 * WIDE_STREAM_BYTES) * iters;
    }
    return ~(uint32_t)three_streams(s, dst, p, n);
}

__attribute__((target(X86_WIDE))) uint32_t sf_crc32c_wide(uint32_t crc, const void *data, size_t n)
{
    return wide(crc, NULL, data, n);
}

__attribute__((target(X86_WIDE))) uint32_t sf_crc32c_wide_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    return wide(crc, dst, src, n);
}

/* The fold constants in the layout of the carry-less multiplications: the shift constant of
 * bits + 64 bits for the lane's low half (its first 8 bytes), of `bits` bits for the high half. */
void sf_crc32c_x86_init(int *base, int *wide)
{
    static const unsigned bits[4] = {128, 256, 512, 1024};
    for (int level = 0; level < 4; level++) {
        uint32_t w = 0x80000000u; /* x^0: the shift constant of 33 bits */
        for (unsigned m = 33; m < bits[level] + 64; m++) {
            if (m == bits[level])
                fold_constants[level][1] = w;
            w = sf_times_x(w);
        }
        fold_constants[level][0] = w;
    }
    __builtin_cpu_init();
    *base = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul");
    *wide = *base && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
}
#endif /* x86-64 */
