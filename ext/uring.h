/* io_uring reads of the records that go to disk (internal to the core; reader.c picks the path).
 *
 * The blocking pass of a record batch (the records the page-cache pass found missing, or all of
 * them) is read by one thread through an io_uring of SF_URING_DEPTH entries: one READV per run of
 * adjacent records (sf_collect_run), up to SF_URING_DEPTH runs (and about 16 MiB) in flight, each
 * run converted as soon as its bytes are in. The kernel's interface is called directly (<linux/io_uring.h> and
 * syscall(2)): no liburing, so nothing beyond the kernel headers is needed to build, and a build
 * without them (or not on Linux) has only the thread pool. Where io_uring_setup fails at run time
 * (ENOSYS: an old kernel; EPERM: a seccomp policy or kernel.io_uring_disabled, as in many
 * containers), the thread pool reads instead, the same records with the same results and errors.
 * uring.c reads the batch; ring.c (ring.h) holds the rings it reads on, and defines sf_uring_compiled,
 * sf_uring_probe, sf_uring_init and sf_uring_free_kept. */
#ifndef SF_URING_H
#define SF_URING_H

#include <stddef.h>

#include "records.h"

/* Requests in flight per batch read: fio's best queue depth for 8 KiB random reads on the project's
 * VMs, and where io_uring matched 64 preadv threads (issue 18). */
#define SF_URING_DEPTH 64

/* Bytes in flight at most (beyond the first run): 64 runs of up to 1 MiB each would be 64 MiB of
 * requests and scratch space; 16 MiB keeps a disk's bandwidth busy (16 requests of 1 MiB). */
#define SF_URING_INFLIGHT_BYTES ((size_t)16 << 20)

/* How the blocking pass of a record batch reads (sf_set_read_io), process-wide:
 * SF_READ_IO_AUTO  io_uring when it can be set up here, else the thread pool;
 * SF_READ_IO_POOL  always the thread pool of blocking preadv;
 * SF_READ_IO_URING as AUTO, and the preadv route (no memory map, no checksums) skips its
 *                  page-cache pass: every record goes through io_uring (for tests and benchmarks);
 * SF_READ_IO_DIRECT_URING (the default) io_uring for direct reads (records.h) where it can be set
 *                  up, the thread pool for reads through the page cache (see uring.c). */
enum { SF_READ_IO_AUTO = 0, SF_READ_IO_POOL = 1, SF_READ_IO_URING = 2, SF_READ_IO_DIRECT_URING = 3 };

void sf_set_read_io(int mode);
int sf_read_io(void);

/* Runs of records read through io_uring so far in this process (for tests: a read that should
 * have gone through io_uring did). */
size_t sf_uring_runs(void);

/* 1 when this build has the io_uring path, 0 when it has only the thread pool. */
int sf_uring_compiled(void);

/* 0 when io_uring can be used here (a ring is set up and kept for the next read if none was
 * idle), else the errno value of io_uring_setup (ENOSYS where the build has no io_uring path). */
int sf_uring_probe(void);

/* Reads items [0, items) of ctx (ctx->rows, as sf_read_blocking) through io_uring. Returns 0; -1
 * with *err filled (the first failure; every request in flight completed first); or 1 when no ring
 * could be had (io_uring unavailable, or its setup failed for now): nothing was read, the caller
 * reads with the pool. */
int sf_read_uring(record_ctx *ctx, size_t items, sf_error *err);

/* Frees the bounce buffers that idle rings keep for their next direct reads (rings in use keep
 * theirs); returns the bytes freed (0 without the io_uring path). The next read of such a ring
 * allocates them anew. For free_batch_memory(). */
size_t sf_uring_free_kept(void);

/* Installs the fork handler (a child drops the parent's idle rings). Call once at module import.
 * Returns 0 or an errno value. */
int sf_uring_init(void);

#endif
