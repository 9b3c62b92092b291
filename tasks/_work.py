"""Every task body is metered: its manifest comes back with a `work` record (start, seconds, bytes).
The library's logs of the body go to the task run's logs, in whichever process runs it (a Dask worker too).
And what the body freed goes back to the system when it ends (`release_memory`)."""

import ctypes
import functools

import pyarrow as pa

from adaptflow.store.accounting import measure
from tasks.logs import forward_library_logs


def measured(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        forward_library_logs()
        try:
            with measure() as meter:
                manifest = fn(*args, **kwargs)
        finally:
            release_memory()
        return None if manifest is None else manifest.model_copy(update={"work": meter.done()})

    return wrapper


def release_memory() -> None:
    """Hand the memory freed in this process back to the system. The allocators keep what is freed for
    reuse: Arrow's pool, and glibc's malloc in an arena per thread (everything below a threshold that rises
    to the largest block freed, up to 32 MiB), so without this a process's RSS stays at the high-water mark
    of each task before, in each thread that ran one: ingest's and planning's per-image objects, a shard's
    pixels, a batch's activations. A process of many tasks then grew with the images, not the shard."""
    pa.default_memory_pool().release_unused()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim():
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        return None


_MALLOC_TRIM = _malloc_trim()
