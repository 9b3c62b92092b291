"""What the command line writes: the command's result on stdout (`print_json` for scripts), and long work's
progress on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager

from adaptflow import progress


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
