"""Progress: silent unless a renderer is installed; plain lines off a terminal, a status line on one."""

import io
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from adaptflow import progress
from adaptflow.store import accounting


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_without_a_renderer_nothing_is_shown_or_kept():
    with progress.task("ingest source", 3, "files") as bar:
        progress.advance()
        progress.update(2, 3)
    assert bar is None


def test_off_a_terminal_each_task_ends_in_one_line_and_long_ones_report_on_the_way():
    out = io.StringIO()
    renderer = progress.TerminalRenderer(out, every_s=0)  # StringIO is no terminal: line mode
    with progress.rendering(renderer):
        with progress.task("train dann-features", unit="steps"):
            for step in range(1, 5):
                progress.update(step, 4)
        with pytest.raises(KeyError), progress.task("extract images 0-10", 10, "images"):
            progress.advance(4)
            raise KeyError("boom")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("train dann-features: 1/4 steps (") and "25%" in lines[0]
    # the time to the first step (loading data, a model) is not a rate: the estimate starts at the second
    assert "left" not in lines[0] and lines[1].startswith("train dann-features: 2/4 steps") and "left" in lines[1]
    (done,) = [line for line in lines if line.startswith("done: ")]
    assert done.startswith("done: train dann-features: 4/4 steps (") and "100%" in done
    assert lines[-1].startswith("stopped: extract images 0-10: 4/10 images (")
    assert "\r" not in out.getvalue()  # no terminal control in a log file
    with progress.task("after", 1):  # the renderer is gone again
        progress.advance()
    assert out.getvalue().splitlines() == lines


def test_a_task_that_ends_short_of_its_total_estimates_no_time_left():
    out = io.StringIO()
    renderer = progress.TerminalRenderer(out, every_s=0)
    # successive halving stops the candidate at a rung: its task ends at 100 of 300 steps
    with progress.rendering(renderer), progress.task("train dann-images", 300, "steps"):
        for step in (1, 50, 100):
            progress.update(step)
    lines = out.getvalue().splitlines()
    assert "left" in lines[-2]  # on the way
    assert lines[-1].startswith("done: train dann-images: 100/300 steps (") and "left" not in lines[-1]


def test_a_unit_names_the_tasks_an_advance_counts_for():
    out = io.StringIO()
    with progress.rendering(progress.TerminalRenderer(out, every_s=3600)):
        with progress.task("train dann-features", unit="steps"):
            progress.update(100, 100)
            progress.advance(150, "images")  # scoring the trained candidate: not training steps
        with progress.task("predict target", 150, "images"):
            progress.advance(150, "images")
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == [
        "done: train dann-features: 100/100 steps",
        "done: predict target: 150/150 images",
    ]


def test_threads_report_to_their_own_task_and_pool_threads_to_their_callers():
    out = io.StringIO()
    with progress.rendering(progress.TerminalRenderer(out, every_s=3600)):

        def ingest(domain: str, n: int) -> None:
            with progress.task(f"ingest {domain}", n, "files"), ThreadPoolExecutor(4) as pool:
                list(pool.map(accounting.carry(lambda _: progress.advance()), range(n)))

        workers = [threading.Thread(target=ingest, args=(d, n)) for d, n in (("source", 40), ("target", 25))]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    done = sorted(line.split(" (")[0] for line in out.getvalue().splitlines())
    assert done == ["done: ingest source: 40/40 files", "done: ingest target: 25/25 files"]


def test_on_a_terminal_a_status_line_is_redrawn_and_other_output_goes_above_it():
    term = _Terminal()
    renderer = progress.TerminalRenderer(term, redraw_s=0)
    stderr = renderer.stream
    assert stderr.isatty()  # what Prefect's console handler asks before colouring
    with progress.rendering(renderer), progress.task("train dann-images", 120, "steps"):
        progress.update(60, 120)
        shown = term.getvalue()
        assert shown.endswith("train dann-images: 60/120 steps (" + shown.rsplit("(", 1)[1])
        stderr.write("12:00:01 | INFO | Task run 'ingest' - Finished\n")
    text = term.getvalue()
    log_at = text.index("12:00:01")
    assert text[:log_at].endswith("\r\x1b[K")  # the status line was wiped before the log line...
    assert "train dann-images: 60/120" in text[log_at:]  # ...and drawn again under it
    assert text.rstrip().splitlines()[-1].lstrip("\r\x1b[K").startswith("done: train dann-images: 60/120 steps")


def test_a_task_that_counts_nothing_says_only_how_long_it_took():
    out = io.StringIO()
    with progress.rendering(progress.TerminalRenderer(out, every_s=0)), progress.task("export champion to onnx"):
        pass
    (line,) = out.getvalue().splitlines()
    assert line.startswith("done: export champion to onnx (") and ": 0" not in line
