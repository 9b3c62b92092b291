"""Ctrl-C for a command: the first stops the run, the second ends the process at once.

The first SIGINT prints one line and raises KeyboardInterrupt in the main thread, where the flow waits on
its tasks: Prefect stops scheduling new ones and marks the runs crashed, and the command exits with
status 130. Shards, ingest indexes and runs are committed by writing their manifest last, so what was
committed stands and a rerun of the same command resumes from it; what was in flight is simply redone.
Tasks already running on worker threads cannot be interrupted, so the process does not wait for them:
a second Ctrl-C, or `GRACE_S` seconds after the first, ends it where it stands.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

MESSAGE = "interrupted; committed work is kept, rerun the same command to resume"
EXIT_STATUS = 130  # 128 + SIGINT, what shells report for a command stopped by Ctrl-C
GRACE_S = 3.0  # Prefect's crash report takes well under a second; in-flight tasks are not waited for
_announced = False  # the line is printed once, whichever path reports the interruption first


@contextmanager
def interruptible(before_exit: Callable[[], None]) -> Iterator[None]:
    """Handle SIGINT as above while the block runs; `before_exit` runs before a hard exit (it must be quick).
    Outside the main thread (no signals there) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    interrupts = 0
    owner = os.getpid()

    def on_sigint(signum, frame) -> None:
        nonlocal interrupts
        if os.getpid() != owner:  # a forked child (a DataLoader worker) got the terminal's Ctrl-C too: it
            raise KeyboardInterrupt  # stops quietly, and the command alone reports and times the exit
        interrupts += 1
        if interrupts > 1:
            exit_now(before_exit)
        announce()
        timer = threading.Timer(GRACE_S, exit_now, args=(before_exit,))
        timer.daemon = True
        timer.start()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def announce() -> None:
    """Print the interruption line, once per process."""
    global _announced
    if not _announced:
        _announced = True
        print(MESSAGE, file=sys.stderr, flush=True)


def exit_now(before_exit: Callable[[], None]) -> None:
    """End the process with status 130 without waiting for worker threads (os._exit: nothing else runs)."""
    try:
        before_exit()
    finally:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed or broken stream must not keep the process alive
                stream.flush()
        os._exit(EXIT_STATUS)
