/* I/O and threading helpers; see io.h. */
#define _GNU_SOURCE 1 /* preadv2, RWF_NOWAIT, sched_getaffinity */
#define _DEFAULT_SOURCE 1
#define _DARWIN_C_SOURCE 1
#include "io.h"

#include <errno.h>
#include <unistd.h>
#if defined(__linux__)
#include <sched.h>
#endif

int sf_preadv_full(int fd, struct iovec *iov, int count, off_t offset, size_t *done_bytes)
{
    *done_bytes = 0;
    while (count > 0) {
        ssize_t got = preadv(fd, iov, count > IOV_MAX ? IOV_MAX : count, offset);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return SF_ERR_IO;
        }
        if (got == 0)
            return SF_ERR_EOF;
        offset += got;
        *done_bytes += (size_t)got;
        size_t left = (size_t)got;
        while (count > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            count--;
        }
        if (left > 0) {
            iov->iov_base = (char *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return SF_OK;
}

int sf_pread_direct(int fd, char *bounce, size_t bytes, off_t start, size_t need, size_t *done_bytes)
{
    *done_bytes = 0;
    while (*done_bytes < need) {
        ssize_t got = pread(fd, bounce + *done_bytes, bytes - *done_bytes, start + (off_t)*done_bytes);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            return SF_ERR_IO;
        }
        if (got == 0)
            return SF_ERR_EOF;
        *done_bytes += (size_t)got;
    }
    return SF_OK;
}

#ifdef SF_HAVE_NOWAIT
int sf_preadv_cached(int fd, const struct iovec *iov, size_t count, off_t offset, size_t total)
{
    if (count > IOV_MAX)
        return 0;
    ssize_t got = preadv2(fd, iov, (int)count, offset, RWF_NOWAIT);
    return got >= 0 && (size_t)got == total;
}
#endif

void sf_set_error(sf_error *err, int kind, int file_kind, size_t shard, int64_t offset,
                      int64_t sample)
{
    err->kind = kind;
    err->err_no = kind == SF_ERR_IO ? errno : 0;
    err->file_kind = file_kind;
    err->shard = (int64_t)shard;
    err->offset = offset;
    err->sample = sample;
}

int sf_out_of_memory(sf_error *err, int file_kind)
{
    sf_set_error(err, SF_ERR_NOMEM, file_kind, 0, -1, -1);
    err->shard = -1;
    return -1;
}

size_t sf_pick_chunk(size_t n, size_t threads, size_t min_items)
{
    size_t parts = threads > 1 ? threads * 4 : 1;
    size_t chunk = n / parts + (n % parts != 0);
    if (chunk < min_items)
        chunk = min_items;
    return chunk ? chunk : 1;
}

size_t sf_cpu_count(void)
{
#if defined(__linux__)
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return (size_t)CPU_COUNT(&set);
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (size_t)n : 1;
}
