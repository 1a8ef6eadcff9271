/* CRC32C; see crc32c.h. Kernels, fastest first; sf_crc32c_init picks the best the CPU has
 * (cpuid on x86-64, HWCAP on aarch64), and every one is bit-identical to the table-driven code
 * (tests/test_record_checksums.py runs each kernel the CPU has against an independent reference).
 *
 * The arithmetic: a raw CRC (no inversions) of a message M is M(x) x^32 mod P, bit-reflected. A
 * CRC c of a first part followed by n more bytes whose own CRC (from state 0) is d is
 * c x^(8n) + d mod P, so independent streams over consecutive blocks combine with one "shift"
 * per block: a carry-less multiplication of c by x^(8n - 33) mod P, reduced by one crc32
 * instruction (which multiplies by x^33 on the way: x^32 for the CRC, x^1 because the 63-bit
 * product of two bit-reflected values sits one bit high in a 64-bit word). Shift constants depend
 * only on the length, so they are computed per call in O(log n) multiplications (xshift), off the
 * critical path of the data loop.
 *
 * - "avx2-vpclmulqdq" (x86-64 with SSE4.2, PCLMULQDQ, AVX2 and VPCLMULQDQ): the first ~70% of a
 *   buffer is folded 128 bytes at a time into four 256-bit accumulators by carry-less
 *   multiplication (the method of Intel's "Fast CRC computation using PCLMULQDQ" white paper) while
 *   three crc32 instruction streams run over the rest in the same loop: the two use different
 *   execution units, so they add up. 8 KiB in L1 on the Zen 3 VM of benchmarks/RESULTS.md:
 *   32-35 GB/s, against 21-24 GB/s for three crc32 streams alone and ~11-14 for folding alone.
 * - "sse4.2-pclmul" (SSE4.2 and PCLMULQDQ): three crc32 streams over the three thirds of the
 *   buffer, combined by two carry-less shifts.
 * - "armv8-crc" (aarch64 with HWCAP_CRC32): three streams of the ARMv8 CRC32C instructions over
 *   fixed blocks (1024 and 128 bytes), combined with precomputed tables that shift a CRC over a
 *   block of zeros (Mark Adler's crc32c.c, zlib licence, does the same on x86).
 * - "table": slicing by 8, any CPU.
 *
 * sf_crc32c_copy computes the CRC of the bytes it copies in the same pass (the vector kernel
 * stores the registers it folds), so a checked read touches each byte of a record once. */
#define _GNU_SOURCE 1
#include "crc32c.h"

#include <string.h>

#define POLY 0x82F63B78u

static uint32_t slice_table[8][256]; /* slicing-by-8 tables of the table kernel */

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, 8); /* little-endian hosts only (setup.py) */
    return word;
}

/* x times a bit-reflected residue (bit 31 is x^0, bit 0 is x^31), mod P. */
static inline uint32_t times_x(uint32_t w)
{
    return (w >> 1) ^ (w & 1 ? POLY : 0);
}

static uint32_t crc32c_table(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word = load64(p);
        uint32_t low = (uint32_t)word ^ crc, high = (uint32_t)(word >> 32);
        crc = slice_table[7][low & 0xff] ^ slice_table[6][(low >> 8) & 0xff] ^
              slice_table[5][(low >> 16) & 0xff] ^ slice_table[4][low >> 24] ^
              slice_table[3][high & 0xff] ^ slice_table[2][(high >> 8) & 0xff] ^
              slice_table[1][(high >> 16) & 0xff] ^ slice_table[0][high >> 24];
    }
    for (; n > 0; n--, p++)
        crc = (crc >> 8) ^ slice_table[0][(crc ^ *p) & 0xff];
    return ~crc;
}

static uint32_t crc32c_table_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
    return crc32c_table(crc, dst, n);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SF_CRC_X86 1
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
    uint32_t w = bits == 65 ? POLY : 0x80000000u >> (bits - 33);
    for (; steps > 0; steps--, path >>= 1) {
        w = times_shifted(w, w);
        if (path & 1)
            w = times_x(w);
    }
    return w;
}

/* One stream of crc32 instructions over n bytes (copied to dst when dst != NULL), from state s. */
__attribute__((target(X86_BASE))) static inline uint64_t one_stream(uint64_t s, unsigned char *dst,
                                                                    const unsigned char *p, size_t n)
{
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word = load64(p);
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
            uint64_t w0 = load64(p), w1 = load64(p + block), w2 = load64(p + 2 * block);
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

__attribute__((target(X86_BASE))) static uint32_t crc32c_sse42(uint32_t crc, const void *data, size_t n)
{
    return ~(uint32_t)three_streams(~crc, NULL, data, n);
}

__attribute__((target(X86_BASE))) static uint32_t crc32c_sse42_copy(uint32_t crc, void *dst,
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
                uint64_t w0 = load64(q + at), w1 = load64(q + stream + at), w2 = load64(q + 2 * stream + at);
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

__attribute__((target(X86_WIDE))) static uint32_t crc32c_wide(uint32_t crc, const void *data, size_t n)
{
    return wide(crc, NULL, data, n);
}

__attribute__((target(X86_WIDE))) static uint32_t crc32c_wide_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    return wide(crc, dst, src, n);
}

/* The fold constants in the layout of the carry-less multiplications: the shift constant of
 * bits + 64 bits for the lane's low half (its first 8 bytes), of `bits` bits for the high half. */
static void x86_init(void)
{
    static const unsigned bits[4] = {128, 256, 512, 1024};
    for (int level = 0; level < 4; level++) {
        uint32_t w = 0x80000000u; /* x^0: the shift constant of 33 bits */
        for (unsigned m = 33; m < bits[level] + 64; m++) {
            if (m == bits[level])
                fold_constants[level][1] = w;
            w = times_x(w);
        }
        fold_constants[level][0] = w;
    }
}
#endif /* x86-64 */

#if defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SF_CRC_ARM 1
#include <arm_acle.h>
#include <sys/auxv.h>
#ifndef HWCAP_CRC32
#define HWCAP_CRC32 (1 << 7)
#endif

/* Interleaved block lengths, longest first, and the tables that shift a CRC over that many zero
 * bytes (4 x 256 entries, one per byte of the CRC). Each level runs while three of its blocks
 * remain. */
static const size_t arm_block_bytes[] = {1024, 128};
#define ARM_LEVELS (sizeof arm_block_bytes / sizeof arm_block_bytes[0])
static uint32_t arm_shift_tables[ARM_LEVELS][4][256];

/* The tables: the residue of each bit of a CRC shifted over the block, then each byte value's
 * residue as the sum of its bits' (the shift is linear). */
static void arm_init(void)
{
    for (size_t level = 0; level < ARM_LEVELS; level++) {
        uint32_t bit[32];
        for (int b = 0; b < 32; b++) {
            uint32_t r = 1u << b;
            for (size_t k = 0; k < 8 * arm_block_bytes[level]; k++)
                r = times_x(r);
            bit[b] = r;
        }
        for (int k = 0; k < 4; k++)
            for (uint32_t n = 0; n < 256; n++) {
                uint32_t sum = 0;
                for (int b = 0; b < 8; b++)
                    if (n & (1u << b))
                        sum ^= bit[8 * k + b];
                arm_shift_tables[level][k][n] = sum;
            }
    }
}

static inline uint32_t arm_shift(uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

__attribute__((target("+crc"))) static uint32_t crc32c_arm(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    uint32_t s = ~crc;
    for (size_t level = 0; level < ARM_LEVELS; level++) {
        size_t block = arm_block_bytes[level];
        while (n >= 3 * block) {
            uint32_t s1 = 0, s2 = 0;
            const unsigned char *end = p + block;
            do {
                s = __crc32cd(s, load64(p));
                s1 = __crc32cd(s1, load64(p + block));
                s2 = __crc32cd(s2, load64(p + 2 * block));
                p += 8;
            } while (p < end);
            s = arm_shift(arm_shift_tables[level], s) ^ s1;
            s = arm_shift(arm_shift_tables[level], s) ^ s2;
            p += 2 * block;
            n -= 3 * block;
        }
    }
    for (; n >= 8; n -= 8, p += 8)
        s = __crc32cd(s, load64(p));
    for (; n > 0; n--, p++)
        s = __crc32cb(s, *p);
    return ~s;
}

static uint32_t crc32c_arm_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
    return crc32c_arm(crc, dst, n);
}
#endif /* aarch64 */

typedef uint32_t (*crc_fn)(uint32_t, const void *, size_t);
typedef uint32_t (*copy_fn)(uint32_t, void *, const void *, size_t);

typedef struct kernel {
    const char *name;
    crc_fn crc;
    copy_fn copy;
    int available; /* set by sf_crc32c_init */
} kernel;

static kernel kernels[] = {
#ifdef SF_CRC_X86
    {"avx2-vpclmulqdq", crc32c_wide, crc32c_wide_copy, 0},
    {"sse4.2-pclmul", crc32c_sse42, crc32c_sse42_copy, 0},
#endif
#ifdef SF_CRC_ARM
    {"armv8-crc", crc32c_arm, crc32c_arm_copy, 0},
#endif
    {"table", crc32c_table, crc32c_table_copy, 1},
};
#define KERNELS (sizeof kernels / sizeof kernels[0])

static const kernel *selected = &kernels[KERNELS - 1];

void sf_crc32c_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t crc = n;
        for (int k = 0; k < 8; k++)
            crc = crc & 1 ? (crc >> 1) ^ POLY : crc >> 1;
        slice_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            slice_table[k][n] = (slice_table[k - 1][n] >> 8) ^ slice_table[0][slice_table[k - 1][n] & 0xff];
#ifdef SF_CRC_X86
    x86_init();
    __builtin_cpu_init();
    int base = __builtin_cpu_supports("sse4.2") && __builtin_cpu_supports("pclmul");
    kernels[1].available = base;
    kernels[0].available = base && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
#endif
#ifdef SF_CRC_ARM
    arm_init();
    kernels[0].available = (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
#endif
    for (size_t k = 0; k < KERNELS; k++)
        if (kernels[k].available) {
            selected = &kernels[k];
            break;
        }
}

const char *sf_crc32c_kernel_name(size_t k)
{
    for (size_t i = 0; i < KERNELS; i++)
        if (kernels[i].available && k-- == 0)
            return kernels[i].name;
    return NULL;
}

const char *sf_crc32c_kernel(void)
{
    return selected->name;
}

int sf_crc32c_use(const char *name)
{
    for (size_t i = 0; i < KERNELS; i++)
        if (kernels[i].available && strcmp(kernels[i].name, name) == 0) {
            selected = &kernels[i];
            return 0;
        }
    return -1;
}

uint32_t sf_crc32c(uint32_t crc, const void *data, size_t n)
{
    return selected->crc(crc, data, n);
}

uint32_t sf_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    return selected->copy(crc, dst, src, n);
}

uint32_t sf_crc32c_portable(uint32_t crc, const void *data, size_t n)
{
    return crc32c_table(crc, data, n);
}

void sf_crc32c_records(const void *data, size_t record_bytes, size_t count, uint32_t *out)
{
    const unsigned char *p = data;
    for (size_t r = 0; r < count; r++)
        out[r] = sf_crc32c(0, p + r * record_bytes, record_bytes);
}
