/* CRC32C (Castagnoli, reflected polynomial 0x82F63B78), the per-record checksum of the format
 * (docs/format.md). Same conventions as zlib.crc32: start with 0, pass the previous result to
 * continue over more bytes: sf_crc32c(sf_crc32c(0, a, n), b, m) == CRC of a followed by b.
 * crc32c(b"123456789") == 0xE3069283. */
#ifndef SF_CRC32C_H
#define SF_CRC32C_H

#include <stddef.h>
#include <stdint.h>

/* Builds the tables; call once (module import) before any other function here. */
void sf_crc32c_init(void);

/* The CPU's crc32 instruction (SSE4.2 on x86-64, detected at run time) where there is one, three
 * interleaved streams on long buffers; the table-driven code elsewhere. Thread-safe. */
uint32_t sf_crc32c(uint32_t crc, const void *data, size_t n);

/* The table-driven code (slicing by 8), whatever the CPU: the reference the tests compare with. */
uint32_t sf_crc32c_portable(uint32_t crc, const void *data, size_t n);

/* out[r] = CRC32C of record r of `count` records of `record_bytes` bytes at data. */
void sf_crc32c_records(const void *data, size_t record_bytes, size_t count, uint32_t *out);

/* 1 when sf_crc32c uses the CPU's instruction. allowed == 0 makes it use the portable code (for
 * tests; not while other threads compute checksums). */
int sf_crc32c_hardware(void);
void sf_crc32c_allow_hardware(int allowed);

#endif
