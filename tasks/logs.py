"""adaptflow's own logs (storage retries, ingest rejections, ...) in the Prefect UI, beside the run's.

The library logs through the standard `logging` module under the `adaptflow` logger and never imports
Prefect; here Prefect's API log handler is attached to that logger, as PREFECT_LOGGING_EXTRA_LOGGERS=adaptflow
would do, except that a record logged outside any flow or task run (the command line's own checks, a test)
stays on the console instead of warning that it has no run to go to.
"""

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_LOGGING_EXTRA_LOGGERS

LIBRARY_LOGGER = "adaptflow"


class _RunLogHandler(APILogHandler):
    def emit(self, record: logging.LogRecord) -> None:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            return
        super().emit(record)


class _NoThreadTimeoutNotice(logging.Filter):
    """Prefect warns on every task run with a timeout on a worker thread that the timeout cannot interrupt
    a blocking call: true, documented with `runtime.task_timeout_s`, and noise once per task."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (isinstance(record.msg, str) and record.msg.startswith("Timeout of %s seconds configured"))


def forward_library_logs() -> None:
    """Attach the handler and the filter in this process, once; call it where runs start (flows, task bodies:
    a Dask worker is another process)."""
    library = logging.getLogger(LIBRARY_LOGGER)
    extra = PREFECT_LOGGING_EXTRA_LOGGERS.value()  # a user who names it there already has Prefect's own handler
    if LIBRARY_LOGGER not in extra and not any(isinstance(h, _RunLogHandler) for h in library.handlers):
        library.addHandler(_RunLogHandler())
    tasks = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoThreadTimeoutNotice) for f in tasks.filters):
        tasks.addFilter(_NoThreadTimeoutNotice())
