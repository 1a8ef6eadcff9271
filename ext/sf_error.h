/* Status of a native batch read: filled by the worker that failed first. */
#ifndef SF_ERROR_H
#define SF_ERROR_H

#include <stdint.h>

enum sf_error_kind {
    SF_OK = 0,
    SF_ERR_IO = 1,      /* a system call failed; err_no holds errno */
    SF_ERR_EOF = 2,     /* the file ended before the record did (truncated after open) */
    SF_ERR_NOMEM = 3,   /* malloc failed */
    SF_ERR_CHECKSUM = 4, /* a record does not match its stored CRC32C (checked reads) */
    SF_ERR_CODEC = 5,    /* a compressed field's codec library cannot be used (codec.h) */
    SF_ERR_CORRUPT = 6,  /* compressed bytes that do not decode; detail: the codec's message */
    SF_ERR_SIZE = 7,     /* compressed bytes that decode to another size than the field's (found) */
    SF_ERR_DICTIONARY = 8 /* a frame that names another dictionary than its shard's (found: the frame's id) */
};

enum sf_file_kind { SF_FILE_RECORDS = 0, SF_FILE_HEAP = 1 };

typedef struct sf_error {
    int kind;           /* enum sf_error_kind */
    int err_no;         /* errno for SF_ERR_IO */
    int file_kind;      /* enum sf_file_kind */
    int64_t shard;      /* shard number, -1 when not tied to a shard */
    int64_t offset;     /* byte offset in the shard file */
    int64_t sample;     /* global sample index being read */
    const char *detail; /* SF_ERR_CODEC, SF_ERR_CORRUPT: a static message, or NULL */
    int64_t found;      /* SF_ERR_SIZE: the decoded size where known, else -1; SF_ERR_DICTIONARY: the frame's id */
} sf_error;

static inline void sf_error_clear(sf_error *err)
{
    err->kind = SF_OK;
    err->err_no = 0;
    err->file_kind = SF_FILE_RECORDS;
    err->shard = -1;
    err->offset = -1;
    err->sample = -1;
    err->detail = 0;
    err->found = -1;
}

#endif
