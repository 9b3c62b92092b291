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


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def bound_allocators() -> None:
    """Set once per process that runs tasks, before they allocate: what the allocators keep stays bounded.
    - Arrow allocates through malloc (`ARROW_DEFAULT_MEMORY_POOL=system`, set by `adaptflow`'s `__init__`
      before pyarrow loads), not mimalloc, whose release reaches only the calling thread's heap: with mimalloc,
      `adaptflow predict` of 20,000 images kept 57 MB more in its arena than of 2,000 images, where malloc's
      `release_memory` trims it.
    - At most 2 malloc arenas (M_ARENA_MAX): glibc gives each new thread its own, up to 8 per core, and
      each keeps the high-water mark of the tasks its thread ran until trimmed."""
    if _LIBC is not None:
        _LIBC.mallopt(_M_ARENA_MAX, 2)


_M_ARENA_MAX = -8  # glibc's malloc.h
_LIBC = _glibc()
_MALLOC_TRIM = _LIBC.malloc_trim if _LIBC is not None else None
bound_allocators()
