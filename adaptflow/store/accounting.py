"""Where a stage's time and bytes go. Each task body runs inside `measure()`; the storage layer counts
the bytes it moves for the meters of its thread; the run summary adds the records up per stage.

Bytes read in other processes (DataLoader workers) are invisible to this process's meters: code that
reads through workers reports them with `count(read=...)` from what the workers return.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from pydantic import BaseModel, ConfigDict

_local = threading.local()
_lock = threading.Lock()
T = TypeVar("T")


class Work(BaseModel):
    """One task body: when it started (epoch seconds), how long it ran, the bytes it moved."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    started_at: float
    seconds: float
    bytes_read: int = 0
    bytes_written: int = 0


def merge(works: list[Work]) -> Work:
    """One record for work done in pieces (a candidate trained over several rungs): the first start, the
    summed seconds and bytes."""
    return Work(
        started_at=min(w.started_at for w in works),
        seconds=sum(w.seconds for w in works),
        bytes_read=sum(w.bytes_read for w in works),
        bytes_written=sum(w.bytes_written for w in works),
    )


class Meter:
    def __init__(self) -> None:
        self.started_at = time.time()
        self._start = time.perf_counter()
        self.bytes_read = 0
        self.bytes_written = 0

    def done(self) -> Work:
        return Work(
            started_at=self.started_at,
            seconds=time.perf_counter() - self._start,
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
        )


@contextmanager
def measure() -> Iterator[Meter]:
    """Meter the block: wall time, and bytes the storage layer moves on this thread meanwhile."""
    meter = Meter()
    stack = _meters()
    stack.append(meter)
    try:
        yield meter
    finally:
        stack.remove(meter)


def count(read: int = 0, written: int = 0) -> None:
    with _lock:  # a meter may be fed from several threads (see `carry`)
        for meter in _meters():
            meter.bytes_read += read
            meter.bytes_written += written


def carry(fn: Callable[..., T]) -> Callable[..., T]:
    """`fn` for a pool thread, feeding the calling thread's meters and running in a copy of its context
    (so that, say, a log record from the pool knows which run it belongs to): `pool.map(carry(check), items)`."""
    meters = list(_meters())
    context = contextvars.copy_context()

    def run(*args, **kwargs) -> T:
        stack = _meters()
        stack.extend(meters)
        try:
            return context.copy().run(fn, *args, **kwargs)  # a copy each: one context enters one thread at a time
        finally:
            del stack[len(stack) - len(meters) :]

    return run


def metering() -> bool:
    """Whether anything on this thread is measuring (skip costly size lookups otherwise)."""
    return bool(_meters())


def _meters() -> list[Meter]:
    if not hasattr(_local, "meters"):
        _local.meters = []
    return _local.meters


def stage_stats(wall_seconds: float, works: list[Work], images: int | None) -> dict:
    """A stage's wall time, images/s, bytes, and orchestration share: the part of the wall time when no
    task body was running (the union of the task intervals, so parallel tasks are not counted twice)."""
    busy, end = 0.0, float("-inf")
    for w in sorted(works, key=lambda w: w.started_at):
        start, stop = max(w.started_at, end), w.started_at + w.seconds
        if stop > start:
            busy += stop - start
        end = max(end, stop)
    return {
        "seconds": round(wall_seconds, 3),
        "images": images,
        "images_per_second": round(images / wall_seconds, 1) if images and wall_seconds else None,
        "bytes_read": sum(w.bytes_read for w in works),
        "bytes_written": sum(w.bytes_written for w in works),
        "task_seconds": round(busy, 3),
        "orchestration_share": round(max(0.0, 1 - busy / wall_seconds), 4) if wall_seconds else None,
    }
