/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the per-record checksum of the format
 * (docs/format.md). Same conventions as zlib.crc32: start with 0, pass the previous result to
 * continue over more bytes: sf_crc32c(sf_crc32c(0, a, n), b, m) == CRC of a followed by b.
 * crc32c(b"123456789") == 0xE3069283. */
#ifndef SF_CRC32C_H
#define SF_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Builds the tables and picks the fastest kernel the CPU has (crc32c.c lists them); call once
 * (module import) before any other function here. */
void sf_crc32c_init(void);

/* The CRC with the selected kernel. Thread-safe. */
uint32_t sf_crc32c(uint32_t crc, const void *data, size_t n);

/* Copies n bytes from src to dst (not overlapping) and returns sf_crc32c(crc, src, n), in one pass
 * over the bytes where the kernel can. */
uint32_t sf_crc32c_copy(uint32_t crc, void *dst, const void *src, size_t n);

/* The table-driven code (slicing by 8), whatever the CPU. */
uint32_t sf_crc32c_portable(uint32_t crc, const void *data, size_t n);

/* out[r] = CRC32C of record r of `count` records of `record_bytes` bytes at data. */
void sf_crc32c_records(const void *data, size_t record_bytes, size_t count, uint32_t *out);

/* The selected kernel's name; the k-th kernel this CPU can run (fastest first, "table" last), or
 * NULL past the last. */
const char *sf_crc32c_kernel(void);
const char *sf_crc32c_kernel_name(size_t k);

/* Selects the kernel of that name (for tests and benchmarks; not while other threads compute
 * checksums). Returns 0, or -1 when this CPU cannot run it. */
int sf_crc32c_use(const char *name);

#endif
