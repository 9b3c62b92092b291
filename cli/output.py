"""What the command line writes: the command's result on stdout (`print_json` for scripts), and long work's
progress on stderr."""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
from contextlib import contextmanager

from adaptflow import progress
from adaptflow.errors import AdaptflowError


@contextmanager
def progress_on_stderr(show: bool):
    """Long work's progress on stderr (a live status line on a terminal, plain lines elsewhere), so that
    stdout stays the command's result. stderr is routed through the renderer meanwhile, so Prefect's log
    lines and error messages print above the status line instead of through it."""
    if not show:
        yield
        return
    renderer = progress.TerminalRenderer(sys.stderr)
    stderr, sys.stderr = sys.stderr, renderer.stream
    try:
        with progress.rendering(renderer):
            yield
    finally:
        sys.stderr = stderr


def print_json(obj) -> None:
    """Machine-readable output: one JSON document on one line of stdout."""
    print(json.dumps(obj, sort_keys=True, default=str))


def _subclasses(cls: type) -> list[type]:
    return [cls, *(s for c in cls.__subclasses__() for s in _subclasses(c))]


class UserErrorRecords(logging.Filter):
    """On Prefect's run and engine loggers: a record of a run that one of our user-facing errors ended loses
    its traceback (the message is enough) and is marked, so that the console leaves it out
    (`ConsoleSkipsUserErrors`); the API handler, and so the Prefect UI, keeps it. (A logger's filters see
    only records logged to that logger itself, hence one per logger.)"""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], (AdaptflowError, TimeoutError, KeyboardInterrupt)):
            record.exc_info = None
            record.adaptflow_user_error = True
        elif _user_error_in_text().search(record.getMessage()):  # "Failed('... DatasetError: ...')"
            record.adaptflow_user_error = True
        return True


class ConsoleSkipsUserErrors(logging.Filter):
    """On the console handler: the command prints a user-facing error once, as its last line, so Prefect's
    four or five records of the same error (task failed, subflow failed, flow failed...) stay off the
    terminal."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, "adaptflow_user_error", False)


def skip_user_errors_on_console() -> None:
    """Add `ConsoleSkipsUserErrors` to the root logger's console handlers (Prefect's, once it is imported)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not any(
            isinstance(f, ConsoleSkipsUserErrors) for f in handler.filters
        ):
            handler.addFilter(ConsoleSkipsUserErrors())


@functools.cache
def _user_error_in_text() -> re.Pattern:
    """Our errors' class names as Prefect's state messages quote them: `DatasetError: ...`, `ConfigError(...)`.
    Built at the first record, when every module defining one has been imported."""
    return re.compile(r"\b(?:" + "|".join(sorted({c.__name__ for c in _subclasses(AdaptflowError)})) + r")\b[:(]")
