/* io_uring reads of record runs; see uring.h. A batch read takes a ring (ring.h) for its duration
 * and puts it back after it; the ring keeps its slots' bounce buffers of direct reads for the next
 * batch (keep_bounce). No request is ever left in flight when sf_read_uring returns: the output
 * buffers are the caller's. */
#define _GNU_SOURCE 1
#define _DEFAULT_SOURCE 1
#include "uring.h"

#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "io.h"
#include "ring.h"

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

int sf_read_uring(record_ctx *ctx, size_t items, sf_error *err)
{
    (void)ctx;
    (void)items;
    (void)err;
    return 1;
}

#else

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

/* Hands the slots' bounce buffers back to ring r, nothing in flight: it keeps those of the first
 * slots (a batch takes slot 0 first) up to SF_URING_KEEP_BOUNCE_BYTES in all and frees the others
 * (sf_ring_keep_bounce). */
static void keep_bounce(sf_ring *r, uring_slot *slots, size_t depth)
{
    for (size_t k = 0; k < depth; k++) {
        sf_run_buffers *buf = &slots[k].buf;
        sf_ring_keep_bounce(r, k, buf->bounce, buf->bounce_bytes);
        buf->bounce = NULL;
        buf->bounce_bytes = 0;
    }
}

int sf_read_uring(record_ctx *ctx, size_t items, sf_error *err)
{
    int error = 0;
    sf_ring *r = sf_ring_take(&error);
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
        /* The slot's bounce buffer from earlier batches (keep_bounce), if any. */
        sf_ring_reuse_bounce(r, k, &slots[k].buf.bounce, &slots[k].buf.bounce_bytes);
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
        int e = sf_ring_enter(r, !ready);
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
        keep_bounce(r, slots, depth);
    sf_ring_put(r);
    __atomic_add_fetch(&runs_read, runs, __ATOMIC_RELAXED);
    free(slots);
    free(free_slots);
    free(discard);
    if (rc == SF_ERR_NOMEM)
        return sf_out_of_memory(err, SF_FILE_RECORDS);
    return rc == SF_OK ? 0 : -1;
}

#endif
