"""Progress of long work (ingest, extraction shards, each candidate's training steps, prediction), for
whoever is watching: the library reports it, a renderer shows it.

The library opens a `task(label, total, unit)` around a long piece of work and calls `advance(n)` or
`update(done, total)` inside its loops. With no renderer installed, the default for a library user, a
deployment's worker or a test, both cost one context-variable lookup. The command line installs a
`TerminalRenderer` on stderr (stdout stays the command's result: a run's last line is its folder), and
`--quiet` installs none. Prefect runs tasks on threads: each thread has its own current task (a
context variable), and the renderer is shared and locked.
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol, TextIO


class Bar:
    """One piece of work in progress: `done` of `total` (None: unknown) `unit`s since `started`."""

    def __init__(self, label: str, total: int | None, unit: str, renderer: Renderer):
        self.label, self.total, self.unit = label, total, unit
        self.done = 0
        self.started = time.monotonic()
        self._first: tuple[float, int] | None = None  # (time, done) at the first progress: the rate's origin
        self._renderer = renderer

    def advance(self, n: int = 1) -> None:
        self.done += n
        self._origin()
        self._renderer.changed(self)

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        self._origin()
        self._renderer.changed(self)

    def _origin(self) -> None:
        """At the first progress, remember when and how far: the rate counts from there, so loading data or a
        model before the first unit, or units an earlier attempt did (a resumed candidate), do not skew it."""
        if self._first is None:
            self._first = (time.monotonic(), self.done)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def describe(self, finished: bool = False) -> str:
        """`extract shard 1/2: 512/824 images (62%, 3.1 s, ~2.0 s left)`; no time left once `finished` (a
        candidate successive halving ends at a rung finishes short of its total)."""
        seconds = self.elapsed()
        if self.total:
            share = f", {100 * self.done / self.total:.0f}%"
            left = ""
            if self._first is not None and self.done < self.total and not finished:
                at, origin = self._first
                rate = (self.done - origin) / max(time.monotonic() - at, 1e-9)
                left = f", ~{_duration((self.total - self.done) / rate)} left" if self.done > origin else ""
            return f"{self.label}: {self.done}/{self.total} {self.unit} ({_duration(seconds)}{share}{left})"
        if not self.done and not self.unit:  # a task that counts nothing: `export ... (24 s)`, not `: 0`
            return f"{self.label} ({_duration(seconds)})"
        return f"{self.label}: {self.done} {self.unit} ({_duration(seconds)})"


class Renderer(Protocol):
    def started(self, bar: Bar) -> None: ...
    def changed(self, bar: Bar) -> None: ...
    def finished(self, bar: Bar, ok: bool) -> None: ...


_renderer: Renderer | None = None
_current: ContextVar[Bar | None] = ContextVar("adaptflow_progress", default=None)


@contextmanager
def task(label: str, total: int | None = None, unit: str = "") -> Iterator[Bar | None]:
    """Report the block as one piece of work; `advance`/`update` in it (and in threads started with
    `accounting.carry`) move its bar. Yields the bar, or None when nobody is watching."""
    renderer = _renderer
    if renderer is None:
        yield None
        return
    bar = Bar(label, total, unit, renderer)
    token = _current.set(bar)
    renderer.started(bar)
    ok = False
    try:
        yield bar
        ok = True
    finally:
        _current.reset(token)
        renderer.finished(bar, ok)


def advance(n: int = 1, unit: str | None = None) -> None:
    """`n` more units done in the current task; nothing when there is none. With `unit`, only a task counting
    that unit moves: inference inside a training task (scoring the candidate) is not counted as steps."""
    bar = _current.get()
    if bar is not None and (unit is None or unit == bar.unit):
        bar.advance(n)


def update(done: int, total: int | None = None) -> None:
    """`done` units (of `total`) done in the current task; nothing when there is none."""
    bar = _current.get()
    if bar is not None:
        bar.update(done, total)


@contextmanager
def rendering(renderer: Renderer | None) -> Iterator[None]:
    """Show progress with `renderer` (None: show nothing) for the duration, in every thread."""
    global _renderer
    before, _renderer = _renderer, renderer
    try:
        yield
    finally:
        _renderer = before


class TerminalRenderer:
    """Progress on a text stream. On a terminal, one status line at the bottom lists the work in flight and
    is redrawn in place (other output goes above it: see `stream`); elsewhere (a log file, CI), plain lines:
    one when a task ends, and one every `every_s` seconds for a task still running. Either way, each
    finished task leaves one line: `done: train dann-images: 120/120 steps (1 min 2 s, 100%)`."""

    def __init__(self, stream: TextIO, tty: bool | None = None, every_s: float = 15.0, redraw_s: float = 0.1):
        self.out = stream
        self.tty = stream.isatty() if tty is None else tty
        self.every_s, self.redraw_s = every_s, redraw_s
        self._lock = threading.RLock()
        self._active: list[Bar] = []
        self._last_line: dict[int, float] = {}  # line mode: when each bar last printed
        self._last_draw = 0.0
        self._shown = False  # a status line is on screen

    @property
    def stream(self) -> TextIO:
        """A stream that writes through `self.out` without tearing the status line (for stderr)."""
        return _AboveStatus(self)

    def started(self, bar: Bar) -> None:
        with self._lock:
            self._active.append(bar)
            self._last_line[id(bar)] = bar.started
            self._draw(force=True)

    def changed(self, bar: Bar) -> None:
        now = time.monotonic()
        if self.tty:
            if now - self._last_draw >= self.redraw_s:
                with self._lock:
                    self._draw()
        elif now - self._last_line.get(id(bar), now) >= self.every_s:
            with self._lock:
                self._last_line[id(bar)] = now
                self.write_line(bar.describe())

    def finished(self, bar: Bar, ok: bool) -> None:
        with self._lock:
            if bar in self._active:
                self._active.remove(bar)
            self._last_line.pop(id(bar), None)
            self.write_line(f"{'done' if ok else 'stopped'}: {bar.describe(finished=True)}")

    def write_line(self, text: str) -> None:
        with self._lock:
            self.write(text + "\n")

    def write(self, text: str) -> None:
        """Write `text` above the status line, then redraw the status line once a line is complete."""
        with self._lock:
            self._clear()
            self.out.write(text)
            if text.endswith("\n"):
                self._draw(force=True)
            self.out.flush()

    def _clear(self) -> None:
        if self._shown:
            self.out.write("\r\x1b[K")
            self._shown = False

    def _draw(self, force: bool = False) -> None:
        if not self.tty or not (force or time.monotonic() - self._last_draw >= self.redraw_s):
            return
        self._last_draw = time.monotonic()
        self._clear()
        if self._active:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            status = " | ".join(b.describe() for b in self._active)
            self.out.write(status if len(status) <= width else status[: width - 3] + "...")
            self._shown = True
        self.out.flush()


class _AboveStatus:
    """A file-like view of the renderer's stream: writes land above the status line."""

    def __init__(self, renderer: TerminalRenderer):
        self._renderer = renderer

    def write(self, text: str) -> int:
        self._renderer.write(text)
        return len(text)

    def __getattr__(self, name: str):  # isatty, fileno, encoding, flush, ...: the real stream's
        return getattr(self._renderer.out, name)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60} min"
