/* What the CRC32C kernels share (internal to the core): see crc32c.c for the list and the
 * arithmetic. Each kernel has the signature of sf_crc32c, and a _copy twin with that of
 * sf_crc32c_copy. */
#ifndef SF_CRC32C_KERNELS_H
#define SF_CRC32C_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define SF_CRC_POLY 0x82F63B78u

static inline uint64_t sf_load64(const unsigned char *p)
{
    uint64_t word;
    memcpy(&word, p, 8); /* little-endian hosts only (setup.py) */
    return word;
}

/* x times a bit-reflected residue (bit 31 is x^0, bit 0 is x^31), mod P. */
static inline uint32_t sf_times_x(uint32_t w)
{
    return (w >> 1) ^ (w & 1 ? SF_CRC_POLY : 0);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SF_CRC_X86 1
/* crc32c_x86.c. Builds the folding constants; *base: the CPU has SSE4.2 and PCLMULQDQ (the
 * "sse4.2-pclmul" kernel); *wide: also AVX2 and VPCLMULQDQ ("avx2-vpclmulqdq"). */
void sf_crc32c_x86_init(int *base, int *wide);
uint32_t sf_crc32c_sse42(uint32_t crc, const void *data, size_t n);
uint32_t sf_crc32c_sse42_copy(uint32_t crc, void *dst, const void *src, size_t n);
uint32_t sf_crc32c_wide(uint32_t crc, const void *data, size_t n);
uint32_t sf_crc32c_wide_copy(uint32_t crc, void *dst, const void *src, size_t n);
#endif

#if defined(__aarch64__) && defined(__linux__) && (defined(__GNUC__) || defined(__clang__))
#define SF_CRC_ARM 1
/* crc32c_arm.c. Builds the shift tables; returns whether HWCAP_CRC32 says the CPU has the CRC32
 * instructions ("armv8-crc"). */
int sf_crc32c_arm_init(void);
uint32_t sf_crc32c_arm(uint32_t crc, const void *data, size_t n);
uint32_t sf_crc32c_arm_copy(uint32_t crc, void *dst, const void *src, size_t n);
#endif

#endif
