"""Every task body is metered: its manifest comes back with a `work` record (start, seconds, bytes).
The library's logs of the body go to the task run's logs, in whichever process runs it (a Dask worker too)."""

import functools

from adaptflow.store.accounting import measure
from tasks.logs import forward_library_logs


def measured(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        forward_library_logs()
        with measure() as meter:
            manifest = fn(*args, **kwargs)
        return None if manifest is None else manifest.model_copy(update={"work": meter.done()})

    return wrapper
