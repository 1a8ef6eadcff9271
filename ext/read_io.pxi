# How the records a read does not find in the page cache are read (included by _core.pyx): the
# thread pool of preadv (the default) or io_uring (ext/uring.h), chosen process-wide.

BUILD_INFO["io_uring"] = bool(sf_uring_compiled())
URING_DEPTH = SF_URING_DEPTH
_READ_IO_MODES = {"auto": SF_READ_IO_AUTO, "pool": SF_READ_IO_POOL, "uring": SF_READ_IO_URING,
                  "direct-uring": SF_READ_IO_DIRECT_URING}
_uring_fork_rc = sf_uring_init()
if _uring_fork_rc != 0:
    raise OSError(_uring_fork_rc, "pthread_atfork failed: the io_uring reader could not be made fork-safe")


def uring_error():
    """0 when reads can go through io_uring in this process, else the errno value that
    io_uring_setup gave (EPERM: forbidden, e.g. by a container's seccomp policy; ENOSYS: not in
    this kernel, or not in this build)."""
    cdef int rc
    with nogil:
        rc = sf_uring_probe()
    return rc


def uring_runs():
    """Runs of adjacent records (one request each) read through io_uring so far in this process."""
    return sf_uring_runs()


def read_io():
    """How the records a read does not find in the page cache are read, process-wide:
    ``"direct-uring"``, ``"auto"``, ``"pool"`` or ``"uring"`` (:func:`set_read_io`)."""
    mode = sf_read_io()
    return next(name for name, value in _READ_IO_MODES.items() if value == mode)


def set_read_io(str mode):
    """Chooses how the records a read does not find in the page cache are read, in every thread of
    this process, and returns the previous choice: ``"direct-uring"`` (the default), through
    io_uring where the dataset reads records with O_DIRECT (``open(..., direct_io=...)``) and
    io_uring can be set up here, else on the pool; ``"pool"``, on the thread pool of blocking
    preadv; ``"auto"``, through io_uring where it can be set up here, else on the pool;
    ``"uring"``, io_uring, and reads without a memory map or checksums skip their
    page-cache pass, so every record goes through io_uring (raises OSError where io_uring cannot be
    used). For tests and benchmarks; the environment variable ``SHARDFEED_READ_IO`` sets it at
    import."""
    if mode not in _READ_IO_MODES:
        raise ValueError(f"read I/O must be one of {sorted(_READ_IO_MODES)}, got {mode!r}")
    cdef int rc
    if mode == "uring":
        rc = uring_error()
        if rc != 0:
            raise OSError(rc, f"io_uring cannot be used here: io_uring_setup failed: {os.strerror(rc)}")
    before = read_io()
    sf_set_read_io(_READ_IO_MODES[mode])
    return before


set_read_io(os.environ.get("SHARDFEED_READ_IO") or "direct-uring")
