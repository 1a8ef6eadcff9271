/* The io_uring rings the batch read of uring.c runs on (internal to the core; uring.h says what a
 * caller of the io_uring path sees).
 *
 * A ring has SF_URING_DEPTH entries (fewer where the kernel gives fewer: sf_ring.entries). It is
 * taken from a small process-wide cache for one batch read and put back after it (setting one up
 * costs ~100 us on the project's VMs, as much as a disk read), so concurrent readers each use their
 * own ring. A ring also keeps the bounce buffers of direct reads (records.h) of its slots from one
 * batch to the next. After fork, a child has no idle ring: it sets up its own.
 *
 * SF_HAVE_URING is defined here, and only here, when the build has the io_uring path (Linux, with
 * <linux/io_uring.h> and the system call numbers); without it there is no sf_ring, and ring.c and
 * uring.c define only the fallbacks of uring.h (no ring, the thread pool reads). */
#ifndef SF_RING_H
#define SF_RING_H

#include <stddef.h>

#include "uring.h"

#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sys/syscall.h>
#if defined(__NR_io_uring_setup) && defined(__NR_io_uring_enter)
#define SF_HAVE_URING 1
#endif
#endif
#endif

#ifdef SF_HAVE_URING

/* Bounce buffers of direct reads (records.h) a ring keeps for its next batch, in bytes at most: as
 * much as a batch keeps in flight, so an idle ring holds no more than a read of it needed at once
 * (64 slots of the aligned span of one 147 KiB record are 9.5 MiB). The slots' buffers past that
 * total (one record of tens of MiB; runs of 1 MiB from the 17th slot on) are freed after a batch. */
#define SF_URING_KEEP_BOUNCE_BYTES SF_URING_INFLIGHT_BYTES

/* One ring: its queues as mapped from the kernel, and the bounce buffers it keeps. The user of a
 * ring (the one thread that took it) fills SQEs at sqes[sqe_tail & *sq_mask], advances sqe_tail and
 * publishes them with sf_ring_enter; it reaps CQEs from cqes[*cq_head & *cq_mask] up to *cq_tail
 * (loaded with acquire) and stores the new head with release. */
typedef struct sf_ring {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned sqe_tail;          /* our SQ tail: SQEs filled so far (published by sf_ring_enter) */
    void *ring_map, *cq_map;    /* cq_map == ring_map with IORING_FEAT_SINGLE_MMAP */
    size_t ring_bytes, cq_bytes, sqe_bytes;
    struct sf_ring *below;      /* the idle ring under this one */
    /* Slot k's bounce buffer for direct reads, kept from one batch to the next (else a
     * posix_memalign, and the page faults of a fresh buffer, at every batch): NULL or
     * bounce_bytes[k] long, the largest span the slot read; bounce_kept (at most
     * SF_URING_KEEP_BOUNCE_BYTES) in all. */
    char *bounce[SF_URING_DEPTH];
    size_t bounce_bytes[SF_URING_DEPTH];
    size_t bounce_kept;
} sf_ring;

/* An idle ring or a new one, for the calling thread alone until sf_ring_put; NULL with *error set
 * (an errno value) when none can be had. EPERM, ENOSYS and EINVAL from io_uring_setup say that
 * io_uring cannot be used here: remembered, never asked again (every later call fails with it). */
sf_ring *sf_ring_take(int *error);

/* Gives ring r back, nothing in flight: to the idle cache, or freed (with the bounce buffers it
 * keeps) when the cache is full. */
void sf_ring_put(sf_ring *r);

/* Submits the queued SQEs and, with wait, waits for one completion. Returns 0 or errno; EINTR
 * (a signal for this thread: Python's handler only sets a flag), EAGAIN and EBUSY are for the
 * caller to retry. What the kernel did not take stays queued for the next call. */
int sf_ring_enter(sf_ring *r, int wait);

/* Hands the caller the bounce buffer ring r keeps for slot k (NULL and 0 when it keeps none):
 * the ring keeps it no longer; the caller gives it back with sf_ring_keep_bounce or frees it. */
void sf_ring_reuse_bounce(sf_ring *r, size_t k, char **bounce, size_t *bytes);

/* Gives ring r `bounce` (NULL, or `bytes` long) as slot k's buffer for its next batch, the ring
 * keeping none for slot k: kept while the buffers the ring keeps stay within
 * SF_URING_KEEP_BOUNCE_BYTES in all, else freed (so those given first are kept). */
void sf_ring_keep_bounce(sf_ring *r, size_t k, char *bounce, size_t bytes);

#endif

#endif
