/* CRC32C; see crc32c.h. The hardware path follows Mark Adler's crc32c.c (zlib licence): three
 * streams of crc32 instructions over three consecutive blocks run in parallel (the instruction's
 * latency is 3 cycles, its throughput 1 per cycle), and the three partial CRCs are combined by
 * shifting the first over the others' lengths with precomputed "append zeros" tables. */
#include "crc32c.h"

#include <string.h>

#define POLY 0x82F63B78u

static uint32_t slice_table[8][256];  /* slicing-by-8 tables of the portable code */

/* Interleaved block lengths of the hardware path, longest first, and the tables that shift a CRC
 * over that many zero bytes (4 x 256 entries, one per byte of the CRC). Each level runs while three
 * of its blocks remain, so that little is left for the single stream at the end: an 8 KiB record
 * is 2 x 3 blocks of 1 KiB, 5 x 3 of 128 bytes and 128 bytes alone. 8 KiB buffers in L1 on the
 * 2-vCPU AMD EPYC VM of benchmarks/RESULTS.md: 6.6-6.8 GB/s, against 5.8-6.1 with levels 8192/256
 * only and about 3.6 for one stream. */
static const size_t block_bytes[] = {8192, 1024, 128};
#define LEVELS (sizeof block_bytes / sizeof block_bytes[0])
static uint32_t shift_tables[LEVELS][4][256];

static uint32_t gf2_times(const uint32_t *mat, uint32_t vec)
{
    uint32_t sum = 0;
    for (; vec; vec >>= 1, mat++)
        if (vec & 1)
            sum ^= *mat;
    return sum;
}

static void gf2_square(uint32_t *square, const uint32_t *mat)
{
    for (int n = 0; n < 32; n++)
        square[n] = gf2_times(mat, mat[n]);
}

/* The operator (32 x 32 bits) that appends `bytes` zero bytes (a power of two) to a CRC. */
static void zeros_operator(uint32_t *even, size_t bytes)
{
    uint32_t odd[32];
    odd[0] = POLY; /* one zero bit */
    for (int n = 1; n < 32; n++)
        odd[n] = 1u << (n - 1);
    gf2_square(even, odd); /* two bits */
    gf2_square(odd, even); /* four bits */
    for (;;) {             /* eight bits (one byte), then each square doubles it */
        gf2_square(even, odd);
        bytes >>= 1;
        if (bytes == 0) {
            return;
        }
        gf2_square(odd, even);
        bytes >>= 1;
        if (bytes == 0) {
            memcpy(even, odd, sizeof odd);
            return;
        }
    }
}

static void shift_table(uint32_t table[4][256], size_t bytes)
{
    uint32_t op[32];
    zeros_operator(op, bytes);
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 0; k < 4; k++)
            table[k][n] = gf2_times(op, n << (8 * k));
}

static uint32_t shift(uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^
           table[3][crc >> 24];
}

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
    for (size_t level = 0; level < LEVELS; level++)
        shift_table(shift_tables[level], block_bytes[level]);
}

uint32_t sf_crc32c_portable(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word;
        memcpy(&word, p, 8); /* little-endian hosts only (setup.py) */
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

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SF_HAVE_SSE42_PATH 1
#include <nmmintrin.h>

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, 8);
    return word;
}

/* Three streams over blocks [0, block), [block, 2 block), [2 block, 3 block) of p, as long as
 * 3 * block bytes remain; returns the CRC state (not inverted) after them. */
__attribute__((target("sse4.2"))) static uint64_t three_streams(uint64_t crc0, const unsigned char **pp,
                                                                size_t *np, size_t block,
                                                                uint32_t table[4][256])
{
    const unsigned char *p = *pp;
    size_t n = *np;
    while (n >= 3 * block) {
        uint64_t crc1 = 0, crc2 = 0;
        const unsigned char *end = p + block;
        do {
            crc0 = _mm_crc32_u64(crc0, load64(p));
            crc1 = _mm_crc32_u64(crc1, load64(p + block));
            crc2 = _mm_crc32_u64(crc2, load64(p + 2 * block));
            p += 8;
        } while (p < end);
        crc0 = shift(table, (uint32_t)crc0) ^ (uint32_t)crc1;
        crc0 = shift(table, (uint32_t)crc0) ^ (uint32_t)crc2;
        p += 2 * block;
        n -= 3 * block;
    }
    *pp = p;
    *np = n;
    return crc0;
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_sse42(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    uint64_t state = ~crc;
    for (; n > 0 && ((uintptr_t)p & 7) != 0; n--, p++)
        state = _mm_crc32_u8((uint32_t)state, *p);
    for (size_t level = 0; level < LEVELS; level++)
        state = three_streams(state, &p, &n, block_bytes[level], shift_tables[level]);
    for (; n >= 8; n -= 8, p += 8)
        state = _mm_crc32_u64(state, load64(p));
    for (; n > 0; n--, p++)
        state = _mm_crc32_u8((uint32_t)state, *p);
    return ~(uint32_t)state;
}
#endif

static int hardware_allowed = 1;

int sf_crc32c_hardware(void)
{
#ifdef SF_HAVE_SSE42_PATH
    static int cached = -1;
    if (cached < 0)
        cached = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    return cached && hardware_allowed;
#else
    return 0;
#endif
}

void sf_crc32c_allow_hardware(int allowed)
{
    hardware_allowed = allowed != 0;
}

uint32_t sf_crc32c(uint32_t crc, const void *data, size_t n)
{
#ifdef SF_HAVE_SSE42_PATH
    if (sf_crc32c_hardware())
        return crc32c_sse42(crc, data, n);
#endif
    return sf_crc32c_portable(crc, data, n);
}

void sf_crc32c_records(const void *data, size_t record_bytes, size_t count, uint32_t *out)
{
    const unsigned char *p = data;
    for (size_t r = 0; r < count; r++)
        out[r] = sf_crc32c(0, p + r * record_bytes, record_bytes);
}
