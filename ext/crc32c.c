/* CRC32C; see crc32c.h. Kernels, fastest first (x86-64 ones in crc32c_x86.c, aarch64 in crc32c_arm.c); sf_crc32c_init picks the best the CPU has
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
#include "crc32c.h"

#include <string.h>

#include "crc32c_kernels.h"

static uint32_t slice_table[8][256]; /* slicing-by-8 tables of the table kernel */

static uint32_t crc32c_table(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    crc = ~crc;
    for (; n >= 8; n -= 8, p += 8) {
        uint64_t word = sf_load64(p);
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
    {"avx2-vpclmulqdq", sf_crc32c_wide, sf_crc32c_wide_copy, 0},
    {"sse4.2-pclmul", sf_crc32c_sse42, sf_crc32c_sse42_copy, 0},
#endif
#ifdef SF_CRC_ARM
    {"armv8-crc", sf_crc32c_arm, sf_crc32c_arm_copy, 0},
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
            crc = crc & 1 ? (crc >> 1) ^ SF_CRC_POLY : crc >> 1;
        slice_table[0][n] = crc;
    }
    for (uint32_t n = 0; n < 256; n++)
        for (int k = 1; k < 8; k++)
            slice_table[k][n] = (slice_table[k - 1][n] >> 8) ^ slice_table[0][slice_table[k - 1][n] & 0xff];
#ifdef SF_CRC_X86
    sf_crc32c_x86_init(&kernels[1].available, &kernels[0].available);
#endif
#ifdef SF_CRC_ARM
    kernels[0].available = sf_crc32c_arm_init();
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
