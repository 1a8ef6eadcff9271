/* io_uring reads of record runs; see uring.h. A ring is taken from a small process-wide cache for
 * one batch read and put back after it (setting one up costs ~100 us on the project's VMs, as much
 * as a disk read), so concurrent readers each use their own ring; it keeps its slots' bounce
 * buffers of direct reads for the next batch (ring_keep_bounce). No request is ever left in
 * flight when sf_read_uring returns: the output buffers are the caller's. */
#define _GNU_SOURCE 1
#define _DEFAULT_SOURCE 1
#include "uring.h"

#include <errno.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"

#if defined(__linux__) && defined(__has_include)
#if __has_include(<linux/io_uring.h>)
#include <linux/io_uring.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>
#if defined(__NR_io_uring_setup) && defined(__NR_io_uring_enter)
#define SF_HAVE_URING 1
#endif
#endif
#endif

/* The pool for reads through the page cache by default: there io_uring from one thread did not
 * match 16 preadv threads on the project's 2-vCPU VM (0.7-0.9x cold at 8 KiB and 147 KiB; fio's
 * own buffered io_uring at depth 64 reached 0.44-0.85 of its best pread configuration). Direct
 * reads through io_uring took 0.41-0.60x the CPU time per 8 KiB sample of buffered pool reads out
 * of core, at 0.98-1.28x the rate (benchmarks/RESULTS.md, fifth and seventh sessions). */
static int read_io_mode = SF_READ_IO_DIRECT_URING;
static size_t runs_read; /* runs read through io_uring so far (sf_uring_runs) */

void sf_set_read_io(int mode) { __atomic_store_n(&read_io_mode, mode, __ATOMIC_RELAXED); }
int sf_read_io(void) { return __atomic_load_n(&read_io_mode, __ATOMIC_RELAXED); }
size_t sf_uring_runs(void) { return __atomic_load_n(&runs_read, __ATOMIC_RELAXED); }

#ifndef SF_HAVE_URING

int sf_uring_compiled(void) { return 0; }
int sf_uring_probe(void) { return ENOSYS; }
int sf_uring_init(void) { return 0; }
int sf_read_uring(record_ctx *ctx, size_t items, sf_error *err)
{
    (void)ctx;
    (void)items;
    (void)err;
    return 1;
}

#else

/* Bytes in flight at most (beyond the first run): 64 runs of up to 1 MiB each would be 64 MiB of
 * requests and scratch space; 16 MiB keeps a disk's bandwidth busy (16 requests of 1 MiB). */
#define SF_URING_INFLIGHT_BYTES ((size_t)16 << 20)

/* Idle rings kept for the next reads; more are set up while more threads read at once and closed
 * after their read. */
#define SF_URING_IDLE_MAX 16

/* Bounce buffers of direct reads (records.h) a ring keeps for its next batch, in bytes at most: as
 * much as a batch keeps in flight, so an idle ring holds no more than a read of it needed at once
 * (64 slots of the aligned span of one 147 KiB record are 9.5 MiB). The slots' buffers past that
 * total (one record of tens of MiB; runs of 1 MiB from the 17th slot on) are freed after a batch. */
#define SF_URING_KEEP_BOUNCE_BYTES SF_URING_INFLIGHT_BYTES

typedef struct sf_ring {
    int fd;
    unsigned entries;
    unsigned *sq_head, *sq_tail, *sq_mask;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    unsigned sqe_tail;          /* our SQ tail: SQEs filled so far (published by ring_enter) */
    void *ring_map, *cq_map;    /* cq_map == ring_map with IORING_FEAT_SINGLE_MMAP */
    size_t ring_bytes, cq_bytes, sqe_bytes;
    struct sf_ring *below;      /* the idle ring under this one */
    /* Slot k's bounce buffer for direct reads, kept from one batch to the next (else a
     * posix_memalign, and the page faults of a fresh buffer, at every batch): NULL or
     * bounce_bytes[k] long, the largest span the slot read; SF_URING_KEEP_BOUNCE_BYTES in all. */
    char *bounce[SF_URING_DEPTH];
    size_t bounce_bytes[SF_URING_DEPTH];
} sf_ring;

static struct {
    pthread_mutex_t lock;
    sf_ring *idle;
    size_t idle_count;
    int unavailable;            /* errno of a setup that says io_uring cannot be used here, or 0 */
} rings = {PTHREAD_MUTEX_INITIALIZER, NULL, 0, 0};

/* Unmaps ring r's queues and closes its descriptor; no memory is freed (ring_free does that). */
static void ring_close(sf_ring *r)
{
    if (r->sqes)
        munmap(r->sqes, r->sqe_bytes);
    if (r->cq_map && r->cq_map != r->ring_map)
        munmap(r->cq_map, r->cq_bytes);
    if (r->ring_map)
        munmap(r->ring_map, r->ring_bytes);
    if (r->fd >= 0)
        close(r->fd);
}

static void ring_free(sf_ring *r)
{
    for (size_t k = 0; k < SF_URING_DEPTH; k++)
        free(r->bounce[k]);
    ring_close(r);
    free(r);
}

static void *map_ring(int fd, size_t bytes, off_t what)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, what);
    return p == MAP_FAILED ? NULL : p;
}

/* A new ring, or NULL with *error set (errno of the call that failed). */
static sf_ring *ring_setup(int *error)
{
    sf_ring *r = calloc(1, sizeof *r);
    if (!r) {
        *error = ENOMEM;
        return NULL;
    }
    struct io_uring_params p;
    memset(&p, 0, sizeof p);
    r->fd = (int)syscall(__NR_io_uring_setup, SF_URING_DEPTH, &p);
    if (r->fd < 0) {
        *error = errno;
        free(r);
        return NULL;
    }
    r->entries = p.sq_entries;
    r->ring_bytes = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    r->cq_bytes = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    int single = (p.features & IORING_FEAT_SINGLE_MMAP) != 0;
    if (single && r->cq_bytes > r->ring_bytes)
        r->ring_bytes = r->cq_bytes;
    r->sqe_bytes = p.sq_entries * sizeof(struct io_uring_sqe);
    r->ring_map = map_ring(r->fd, r->ring_bytes, IORING_OFF_SQ_RING);
    r->cq_map = !r->ring_map ? NULL : single ? r->ring_map : map_ring(r->fd, r->cq_bytes, IORING_OFF_CQ_RING);
    r->sqes = map_ring(r->fd, r->sqe_bytes, IORING_OFF_SQES);
    if (!r->ring_map || !r->cq_map || !r->sqes) {
        *error = errno ? errno : ENOMEM;
        ring_free(r);
        return NULL;
    }
    char *sq = r->ring_map, *cq = r->cq_map;
    r->sq_head = (unsigned *)(sq + p.sq_off.head);
    r->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    r->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    unsigned *array = (unsigned *)(sq + p.sq_off.array);
    for (unsigned i = 0; i < p.sq_entries; i++)
        array[i] = i; /* SQE i in slot i, always */
    r->cq_head = (unsigned *)(cq + p.cq_off.head);
    r->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    r->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    r->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    r->sqe_tail = *r->sq_tail;
    return r;
}

/* An idle ring or a new one; NULL with *error set when none can be had. EPERM, ENOSYS and EINVAL
 * from io_uring_setup say that io_uring cannot be used here: remembered, never asked again. */
static sf_ring *ring_take(int *error)
{
    pthread_mutex_lock(&rings.lock);
    sf_ring *r = rings.idle;
    if (r) {
        rings.idle = r->below;
        rings.idle_count--;
    }
    *error = rings.unavailable;
    pthread_mutex_unlock(&rings.lock);
    if (r || *error)
        return r;
    r = ring_setup(error);
    if (!r && (*error == EPERM || *error == ENOSYS || *error == EINVAL)) {
        pthread_mutex_lock(&rings.lock);
        rings.unavailable = *error;
        pthread_mutex_unlock(&rings.lock);
    }
    return r;
}

static void ring_put(sf_ring *r)
{
    pthread_mutex_lock(&rings.lock);
    if (rings.idle_count < SF_URING_IDLE_MAX) {
        r->below = rings.idle;
        rings.idle = r;
        rings.idle_count++;
        r = NULL;
    }
    pthread_mutex_unlock(&rings.lock);
    if (r)
        ring_free(r);
}

int sf_uring_compiled(void) { return 1; }

int sf_uring_probe(void)
{
    int error = 0;
    sf_ring *r = ring_take(&error);
    if (r)
        ring_put(r);
    return r ? 0 : error;
}

/* fork(): the child gets no idle ring (the parent's rings are the parent's), and tries setup anew.
 * It closes its descriptors of the parent's idle rings and unmaps their queues, but frees no
 * memory: a fork handler runs before the child may safely call the allocator (another thread of
 * the parent may have held an allocator lock at the fork; glibc's malloc takes its locks across
 * fork, AddressSanitizer's allocator only since LLVM 18, not GCC 12's libasan), and the rings and
 * their bounce buffers are the parent's pages, shared copy-on-write, costing the child nothing it
 * does not write. A ring another thread of the parent was using at the fork is not the child's
 * either (its fd and buffers stay in the child, unused). */
static void before_fork(void) { pthread_mutex_lock(&rings.lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&rings.lock); }
static void after_fork_child(void)
{
    sf_ring *r = rings.idle;
    rings.idle = NULL;
    rings.idle_count = 0;
    pthread_mutex_unlock(&rings.lock);
    while (r) {
        sf_ring *below = r->below;
        ring_close(r);
        r = below;
    }
}

int sf_uring_init(void)
{
    static int installed = 0;
    if (installed)
        return 0;
    int rc = pthread_atfork(before_fork, after_fork_parent, after_fork_child);
    if (rc == 0)
        installed = 1;
    return rc;
}

/* One run of records in flight (or a free slot). */
typedef struct uring_slot {
    size_t item, stop, shard; /* items [item, stop) of shard `shard` */
    off_t at;                 /* the run's first byte in the file */
    size_t total, done;       /* bytes of the run, bytes read so far */
    struct iovec *iov;        /* the iovecs still to fill (advanced past a short read) */
    size_t count;
    sf_run_buffers buf;
    /* A direct read (records.h): the aligned span [start, start + span) into buf.bounce, `lead`
     * bytes before the run; done counts span bytes then, and the run is in once lead + total are. */
    int direct;
    off_t start;
    size_t span, lead;
    struct iovec direct_iov;  /* what is left of the span */
} uring_slot;

/* Queues the read of what is left of slot k; the ring has room (one SQE per slot at most). */
static void queue_read(sf_ring *r, const record_ctx *ctx, uring_slot *slot, size_t k)
{
    struct io_uring_sqe *sqe = &r->sqes[r->sqe_tail & *r->sq_mask];
    memset(sqe, 0, sizeof *sqe);
    sqe->opcode = IORING_OP_READV;
    if (slot->direct) {
        slot->direct_iov.iov_base = slot->buf.bounce + slot->done;
        slot->direct_iov.iov_len = slot->span - slot->done;
        sqe->fd = sf_direct_fd(ctx->shards, slot->shard);
        sqe->off = (uint64_t)(slot->start + (off_t)slot->done);
        sqe->addr = (uint64_t)(uintptr_t)&slot->direct_iov;
        sqe->len = 1;
    } else {
        sqe->fd = ctx->shards->fds[slot->shard];
        sqe->off = (uint64_t)(slot->at + (off_t)slot->done);
        sqe->addr = (uint64_t)(uintptr_t)slot->iov;
        sqe->len = (unsigned)(slot->count > IOV_MAX ? IOV_MAX : slot->count);
    }
    sqe->user_data = k;
    r->sqe_tail++;
}

/* Bytes of the run slot k holds so far. */
static size_t run_bytes_done(const uring_slot *slot)
{
    if (!slot->direct)
        return slot->done;
    size_t in = slot->done > slot->lead ? slot->done - slot->lead : 0;
    return in < slot->total ? in : slot->total;
}

/* Submits the queued SQEs and, with wait, waits for one completion. Returns 0 or errno; EINTR
 * (a signal for this thread: Python's handler only sets a flag), EAGAIN and EBUSY are for the
 * caller to retry. What the kernel did not take stays queued for the next call. */
static int ring_enter(sf_ring *r, int wait)
{
    __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE);
    unsigned pending = r->sqe_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (pending == 0 && !wait)
        return 0;
    long rc = syscall(__NR_io_uring_enter, r->fd, pending, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0,
                      NULL, 0);
    return rc < 0 ? errno : 0;
}

/* Moves slot k's iovecs past `got` bytes read (as sf_preadv_full does). */
static void advance(uring_slot *slot, size_t got)
{
    slot->done += got;
    while (slot->count > 0 && got >= slot->iov->iov_len) {
        got -= slot->iov->iov_len;
        slot->iov++;
        slot->count--;
    }
    if (got > 0) {
        slot->iov->iov_base = (char *)slot->iov->iov_base + got;
        slot->iov->iov_len -= got;
    }
}

/* Hands the slots' bounce buffers back to ring r, nothing in flight: those of the first slots (a
 * batch takes slot 0 first) up to SF_URING_KEEP_BOUNCE_BYTES in all; it frees the others. */
static void ring_keep_bounce(sf_ring *r, uring_slot *slots, size_t depth)
{
    size_t kept = 0;
    for (size_t k = 0; k < depth; k++) {
        sf_run_buffers *buf = &slots[k].buf;
        if (buf->bounce_bytes <= SF_URING_KEEP_BOUNCE_BYTES - kept) {
            r->bounce[k] = buf->bounce;
            r->bounce_bytes[k] = buf->bounce_bytes;
            kept += buf->bounce_bytes;
        } else {
            free(buf->bounce);
        }
        buf->bounce = NULL;
        buf->bounce_bytes = 0;
    }
}

int sf_read_uring(record_ctx *ctx, size_t items, sf_error *err)
{
    int error = 0;
    sf_ring *r = ring_take(&error);
    if (!r)
        return 1;
    size_t depth = r->entries < SF_URING_DEPTH ? r->entries : SF_URING_DEPTH;
    uring_slot *slots = calloc(depth, sizeof *slots);
    size_t *free_slots = malloc(depth * sizeof *free_slots);
    char *discard = ctx->discard_bytes ? malloc(ctx->discard_bytes) : NULL;
    int rc = SF_OK;
    if (!slots || !free_slots || (ctx->discard_bytes && !discard))
        rc = SF_ERR_NOMEM;
    size_t n_free = 0, inflight = 0, next = 0, runs = 0, inflight_bytes = 0;
    int slots_made = slots && free_slots;
    for (size_t k = 0; slots_made && k < depth; k++) {
        slots[k].buf.discard = discard;
        slots[k].buf.bounce = r->bounce[k]; /* the slot's from earlier batches (ring_keep_bounce) */
        slots[k].buf.bounce_bytes = r->bounce_bytes[k];
        r->bounce[k] = NULL;
        r->bounce_bytes[k] = 0;
        free_slots[n_free++] = depth - 1 - k;
    }
    while ((rc == SF_OK && next < items) || inflight > 0) {
        /* Fill every free slot with the next run. */
        while (rc == SF_OK && next < items && n_free > 0 &&
               (inflight == 0 || inflight_bytes < SF_URING_INFLIGHT_BYTES)) {
            size_t k = free_slots[--n_free];
            uring_slot *slot = &slots[k];
            slot->item = next;
            slot->stop = sf_collect_run(ctx, next, items, &slot->shard);
            next = slot->stop;
            if (sf_fit_run(ctx, &slot->buf, slot->stop - slot->item) != 0) {
                rc = SF_ERR_NOMEM;
                free_slots[n_free++] = k;
                break;
            }
            slot->count = sf_run_iovecs(ctx, slot->item, slot->stop, slot->shard, &slot->buf, &slot->at, &slot->total);
            slot->iov = slot->buf.iov;
            slot->done = 0;
            slot->direct = 0;
            if (slot->count > 0 && sf_direct_fd(ctx->shards, slot->shard) >= 0) {
                sf_direct_span(slot->at, slot->total, &slot->start, &slot->span);
                slot->lead = (size_t)(slot->at - slot->start);
                slot->direct = sf_fit_bounce(&slot->buf, slot->span) == 0; /* else through the page cache */
            }
            if (slot->count == 0) { /* no bytes requested (zero-size fields only) */
                sf_convert_run(ctx, slot->item, slot->stop, &slot->buf);
                free_slots[n_free++] = k;
                continue;
            }
            queue_read(r, ctx, slot, k);
            inflight++;
            inflight_bytes += slot->total;
        }
        if (inflight == 0)
            break;
        unsigned head = *r->cq_head;
        int ready = head != __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        int e = ring_enter(r, !ready);
        if (e == EAGAIN || e == EBUSY || e == ENOMEM) {
            sched_yield();
        } else if (e != 0 && e != EINTR) {
            /* Cannot happen with a valid ring. Requests in flight write into the caller's buffers:
             * returning before they complete would hand out memory the kernel still writes. */
            abort();
        }
        /* Reap every completion there is. */
        unsigned tail = __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            const struct io_uring_cqe *cqe = &r->cqes[head & *r->cq_mask];
            size_t k = (size_t)cqe->user_data;
            int res = cqe->res;
            uring_slot *slot = &slots[k];
            inflight--;
            inflight_bytes -= slot->total;
            int requeue = 0;
            size_t need = slot->direct ? slot->lead + slot->total : slot->total;
            if (res < 0 && (res == -EINTR || res == -EAGAIN)) {
                requeue = 1;
            } else if (res == -EINVAL && slot->direct) {
                slot->direct = 0; /* the file refuses direct reads of this span: through the page cache */
                slot->done = 0;
                requeue = 1;
            } else if (res < 0 || (res == 0 && slot->done < need)) {
                if (rc == SF_OK) {
                    errno = -res;
                    rc = res < 0 ? SF_ERR_IO : SF_ERR_EOF;
                    sf_run_failed(ctx, slot->item, slot->shard, slot->at, run_bytes_done(slot), rc, err);
                }
            } else {
                if (slot->direct)
                    slot->done += (size_t)res;
                else
                    advance(slot, (size_t)res);
                if (slot->done < need)
                    requeue = 1; /* a short read: the rest from where it stopped */
                else if (rc == SF_OK) {
                    if (slot->direct)
                        sf_scatter(slot->buf.bounce + slot->lead, slot->buf.iov, slot->count, slot->buf.discard);
                    sf_convert_run(ctx, slot->item, slot->stop, &slot->buf);
                    runs++;
                }
            }
            if (requeue && rc == SF_OK) {
                queue_read(r, ctx, slot, k);
                inflight++;
                inflight_bytes += slot->total;
            } else {
                free_slots[n_free++] = k;
            }
        }
        __atomic_store_n(r->cq_head, head, __ATOMIC_RELEASE);
    }
    for (size_t k = 0; slots && k < depth; k++) {
        free(slots[k].buf.iov);
        free(slots[k].buf.scratch);
    }
    if (slots_made)
        ring_keep_bounce(r, slots, depth);
    ring_put(r);
    __atomic_add_fetch(&runs_read, runs, __ATOMIC_RELAXED);
    free(slots);
    free(free_slots);
    free(discard);
    if (rc == SF_ERR_NOMEM)
        return sf_out_of_memory(err, SF_FILE_RECORDS);
    return rc == SF_OK ? 0 : -1;
}

#endif
