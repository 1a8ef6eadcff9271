/* Persistent pthread pool; see pool.h. Everything shared is guarded by pool.lock; the work itself
 * runs unlocked.
 *
 * Idle threads wait on a stack, each on a condition variable of its own, and a job wakes the ones
 * that went idle last: after a read from disk has grown the pool to 16 threads, a page-cached
 * batch that needs one helper gets the thread that just worked (its stack and the scheduler's
 * placement still warm), not the one that slept longest, as a shared condition variable would
 * pick. Rotating through 15 idle threads made page-cached 8 KiB batches 15-20% slower
 * (benchmarks/RESULTS.md, 2026-12-06). */
#include "pool.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <string.h>

typedef struct sf_job {
    sf_range_fn fn;
    void *ctx;
    size_t n;             /* items in the job */
    size_t chunk;         /* items per claim */
    size_t next;          /* first unclaimed item */
    size_t max_helpers;   /* pool threads allowed to work on this job at once */
    size_t helpers;       /* pool threads working on it now */
    int queued;           /* still in the queue (has unclaimed items, no failure) */
    int failed;
    sf_error err;         /* first failure */
    pthread_cond_t done;  /* signalled when the last helper leaves */
    struct sf_job *prev, *next_job;
} sf_job;

/* An idle pool thread, on its own stack while it waits. */
typedef struct sf_idle {
    pthread_cond_t wake;
    int woken;                /* set (under pool.lock) by the submitter that popped it */
    struct sf_idle *below;    /* the thread that went idle before this one */
} sf_idle;

static struct {
    pthread_mutex_t lock;
    sf_job *head, *tail;      /* jobs with unclaimed items */
    size_t threads;           /* pool threads alive */
    sf_idle *idle_top;        /* the thread that went idle last, NULL when none is idle */
} pool = {PTHREAD_MUTEX_INITIALIZER, NULL, NULL, 0, NULL};

static void unqueue(sf_job *job)
{
    if (!job->queued)
        return;
    if (job->prev)
        job->prev->next_job = job->next_job;
    else
        pool.head = job->next_job;
    if (job->next_job)
        job->next_job->prev = job->prev;
    else
        pool.tail = job->prev;
    job->prev = job->next_job = NULL;
    job->queued = 0;
}

static void enqueue(sf_job *job)
{
    job->prev = pool.tail;
    job->next_job = NULL;
    if (pool.tail)
        pool.tail->next_job = job;
    else
        pool.head = job;
    pool.tail = job;
    job->queued = 1;
}

/* Claims and runs chunks of `job` until none is left. Called and returns with pool.lock held. */
static void run_chunks(sf_job *job)
{
    while (job->queued) {
        size_t begin = job->next;
        size_t end = job->n - begin > job->chunk ? begin + job->chunk : job->n;
        job->next = end;
        if (end == job->n)
            unqueue(job);
        pthread_mutex_unlock(&pool.lock);

        sf_error local;
        sf_error_clear(&local);
        int rc = job->fn(job->ctx, begin, end, &local);

        pthread_mutex_lock(&pool.lock);
        if (rc != 0 && !job->failed) {
            job->failed = 1;
            job->err = local;
            unqueue(job);
        }
    }
}

static sf_job *pick_job(void)
{
    for (sf_job *job = pool.head; job; job = job->next_job)
        if (job->helpers < job->max_helpers)
            return job;
    return NULL;
}

/* Wakes the thread that went idle last. Called with pool.lock held and pool.idle_top set. */
static void wake_one(void)
{
    sf_idle *top = pool.idle_top;
    pool.idle_top = top->below;
    top->woken = 1;
    pthread_cond_signal(&top->wake);
}

static void *worker_main(void *unused)
{
    (void)unused;
    sf_idle self;
    if (pthread_cond_init(&self.wake, NULL) != 0) {
        /* Cannot wait: leave the pool (submitters work on their own jobs whatever the pool). */
        pthread_mutex_lock(&pool.lock);
        pool.threads--;
        pthread_mutex_unlock(&pool.lock);
        return NULL;
    }
    pthread_mutex_lock(&pool.lock);
    for (;;) {
        sf_job *job = pick_job();
        if (!job) {
            self.woken = 0;
            self.below = pool.idle_top;
            pool.idle_top = &self;
            while (!self.woken)
                pthread_cond_wait(&self.wake, &pool.lock);
            continue;
        }
        job->helpers++;
        run_chunks(job);
        job->helpers--;
        if (job->helpers == 0)
            pthread_cond_signal(&job->done);
    }
    return NULL;
}

/* Starts pool threads until there are `wanted`. A failure to start one is not an error: the
 * submitter does the work itself. Called with pool.lock held. */
static void grow_pool(size_t wanted)
{
    if (wanted > SF_POOL_MAX_THREADS)
        wanted = SF_POOL_MAX_THREADS;
    if (pool.threads >= wanted)
        return;

    pthread_attr_t attr;
    if (pthread_attr_init(&attr) != 0)
        return;
    int ok = pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED) == 0 &&
             pthread_attr_setstacksize(&attr, 256 * 1024) == 0;
    /* Threads inherit the signal mask: block signals so the asynchronous ones (SIGINT) reach Python's
     * main thread and reads in workers are never interrupted. */
    sigset_t all, old;
    /* Except the synchronous faults: a blocked SIGBUS kills the process instead of reaching the
     * handler that guards copies from a map (reader.c). */
    ok = ok && sigfillset(&all) == 0 && sigdelset(&all, SIGBUS) == 0 && sigdelset(&all, SIGSEGV) == 0 &&
         sigdelset(&all, SIGFPE) == 0 && sigdelset(&all, SIGILL) == 0;
    if (ok && pthread_sigmask(SIG_BLOCK, &all, &old) == 0) {
        while (pool.threads < wanted) {
            pthread_t tid;
            if (pthread_create(&tid, &attr, worker_main, NULL) != 0)
                break;
            pool.threads++;
        }
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    pthread_attr_destroy(&attr);
}

int sf_parallel_for(size_t n, size_t chunk, size_t max_threads, sf_range_fn fn, void *ctx,
                    sf_error *err)
{
    sf_error_clear(err);
    if (n == 0)
        return 0;
    if (chunk == 0)
        chunk = 1;
    size_t chunks = n / chunk + (n % chunk != 0);
    size_t helpers = max_threads > 1 ? max_threads - 1 : 0;
    if (helpers > chunks - 1)
        helpers = chunks - 1;
    if (helpers == 0)
        return fn(ctx, 0, n, err);

    sf_job job;
    memset(&job, 0, sizeof job);
    job.fn = fn;
    job.ctx = ctx;
    job.n = n;
    job.chunk = chunk;
    job.max_helpers = helpers;
    sf_error_clear(&job.err);
    if (pthread_cond_init(&job.done, NULL) != 0)
        return fn(ctx, 0, n, err);

    pthread_mutex_lock(&pool.lock);
    grow_pool(helpers);
    enqueue(&job);
    for (size_t woken = 0; woken < helpers && pool.idle_top; woken++)
        wake_one();
    run_chunks(&job);
    while (job.helpers > 0)
        pthread_cond_wait(&job.done, &pool.lock);
    unqueue(&job);
    pthread_mutex_unlock(&pool.lock);
    pthread_cond_destroy(&job.done);

    if (job.failed) {
        *err = job.err;
        return -1;
    }
    return 0;
}

size_t sf_pool_size(void)
{
    pthread_mutex_lock(&pool.lock);
    size_t n = pool.threads;
    pthread_mutex_unlock(&pool.lock);
    return n;
}

/* fork(): hold the lock across it so the child gets a consistent copy, then give the child an
 * empty pool. Its threads and the jobs of other threads did not survive the fork; new threads
 * start on the child's first parallel read. */
static void before_fork(void) { pthread_mutex_lock(&pool.lock); }
static void after_fork_parent(void) { pthread_mutex_unlock(&pool.lock); }
static void after_fork_child(void)
{
    /* The parent's threads (and the idle stack on their stacks) do not exist here. */
    pool.head = pool.tail = NULL;
    pool.threads = 0;
    pool.idle_top = NULL;
    pthread_mutex_unlock(&pool.lock);
}

int sf_pool_init(void)
{
    static int installed = 0;
    if (installed)
        return 0;
    int rc = pthread_atfork(before_fork, after_fork_parent, after_fork_child);
    if (rc == 0)
        installed = 1;
    return rc;
}
