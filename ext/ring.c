/* The io_uring rings and their process-wide idle cache; see ring.h. Also the parts of uring.h that
 * are about a ring rather than a batch: sf_uring_compiled, sf_uring_probe, sf_uring_init,
 * sf_uring_free_kept. */
#define _GNU_SOURCE 1
#define _DEFAULT_SOURCE 1
#include "ring.h"

#include <errno.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#ifndef SF_HAVE_URING

int sf_uring_compiled(void) { return 0; }
int sf_uring_probe(void) { return ENOSYS; }
int sf_uring_init(void) { return 0; }
size_t sf_uring_free_kept(void) { return 0; }

#else

#include <sys/mman.h>
#include <unistd.h>

/* Idle rings kept for the next reads; more are set up while more threads read at once and closed
 * after their read. */
#define SF_URING_IDLE_MAX 16

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

/* Frees every bounce buffer ring r keeps, leaving it none (slots and total zeroed); returns the
 * bytes freed. */
static size_t ring_drop_bounce(sf_ring *r)
{
    size_t freed = 0;
    for (size_t k = 0; k < SF_URING_DEPTH; k++) {
        freed += r->bounce_bytes[k];
        free(r->bounce[k]);
        r->bounce[k] = NULL;
        r->bounce_bytes[k] = 0;
    }
    r->bounce_kept = 0;
    return freed;
}

static void ring_free(sf_ring *r)
{
    ring_drop_bounce(r);
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

sf_ring *sf_ring_take(int *error)
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

size_t sf_uring_free_kept(void)
{
    size_t freed = 0;
    pthread_mutex_lock(&rings.lock);
    for (sf_ring *r = rings.idle; r; r = r->below)
        freed += ring_drop_bounce(r);
    pthread_mutex_unlock(&rings.lock);
    return freed;
}

void sf_ring_put(sf_ring *r)
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

int sf_ring_enter(sf_ring *r, int wait)
{
    __atomic_store_n(r->sq_tail, r->sqe_tail, __ATOMIC_RELEASE);
    unsigned pending = r->sqe_tail - __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
    if (pending == 0 && !wait)
        return 0;
    long rc = syscall(__NR_io_uring_enter, r->fd, pending, wait ? 1 : 0, wait ? IORING_ENTER_GETEVENTS : 0,
                      NULL, 0);
    return rc < 0 ? errno : 0;
}

void sf_ring_reuse_bounce(sf_ring *r, size_t k, char **bounce, size_t *bytes)
{
    *bounce = r->bounce[k];
    *bytes = r->bounce_bytes[k];
    r->bounce_kept -= r->bounce_bytes[k];
    r->bounce[k] = NULL;
    r->bounce_bytes[k] = 0;
}

void sf_ring_keep_bounce(sf_ring *r, size_t k, char *bounce, size_t bytes)
{
    if (bytes <= SF_URING_KEEP_BOUNCE_BYTES - r->bounce_kept) {
        r->bounce[k] = bounce;
        r->bounce_bytes[k] = bytes;
        r->bounce_kept += bytes;
    } else {
        free(bounce);
    }
}

int sf_uring_compiled(void) { return 1; }

int sf_uring_probe(void)
{
    int error = 0;
    sf_ring *r = sf_ring_take(&error);
    if (r)
        sf_ring_put(r);
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

#endif
