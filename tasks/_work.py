"""Every task body is metered: its manifest comes back with a `work` record (start, seconds, bytes)."""

import functools

from adaptflow.accounting import measure


def measured(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with measure() as meter:
            manifest = fn(*args, **kwargs)
        return None if manifest is None else manifest.model_copy(update={"work": meter.done()})

    return wrapper
