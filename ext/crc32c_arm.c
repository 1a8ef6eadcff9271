/* The aarch64 CRC32C kernel "armv8-crc" (crc32c.c lists them all), used where HWCAP_CRC32 says
 * the CPU has the CRC32 instructions. */
#define _GNU_SOURCE 1
#include "crc32c_kernels.h"

#ifdef SF_CRC_ARM
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
int sf_crc32c_arm_init(void)
{
    for (size_t level = 0; level < ARM_LEVELS; level++) {
        uint32_t bit[32];
        for (int b = 0; b < 32; b++) {
            uint32_t r = 1u << b;
            for (size_t k = 0; k < 8 * arm_block_bytes[level]; k++)
                r = sf_times_x(r);
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
    return (getauxval(AT_HWCAP) & HWCAP_CRC32) != 0;
}

static inline uint32_t arm_shift(uint32_t table[4][256], uint32_t crc)
{
    return table[0][crc & 0xff] ^ table[1][(crc >> 8) & 0xff] ^ table[2][(crc >> 16) & 0xff] ^ table[3][crc >> 24];
}

__attribute__((target("+crc"))) uint32_t sf_crc32c_arm(uint32_t crc, const void *data, size_t n)
{
    const unsigned char *p = data;
    uint32_t s = ~crc;
    for (size_t level = 0; level < ARM_LEVELS; level++) {
        size_t block = arm_block_bytes[level];
        while (n >= 3 * block) {
            uint32_t s1 = 0, s2 = 0;
            const unsigned char *end = p + block;
            do {
                s = __crc32cd(s, sf_load64(p));
                s1 = __crc32cd(s1, sf_load64(p + block));
                s2 = __crc32cd(s2, sf_load64(p + 2 * block));
                p += 8;
            } while (p < end);
            s = arm_shift(arm_shift_tables[level], s) ^ s1;
            s = arm_shift(arm_shift_tables[level], s) ^ s2;
            p += 2 * block;
            n -= 3 * block;
        }
    }
    for (; n >= 8; n -= 8, p += 8)
        s = __crc32cd(s, sf_load64(p));
    for (; n > 0; n--, p++)
        s = __crc32cb(s, *p);
    return ~s;
}

uint32_t sf_crc32c_arm_copy(uint32_t crc, void *dst, const void *src, size_t n)
{
    memcpy(dst, src, n);
    return sf_crc32c_arm(crc, dst, n);
}
#endif /* aarch64 */
