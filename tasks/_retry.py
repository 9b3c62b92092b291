"""Retry policy shared by the tasks: transient faults are retried with backoff, input errors are not."""

from prefect.tasks import exponential_backoff

from adaptflow.errors import is_transient

IO_RETRIES = 3
IO_RETRY_DELAYS = exponential_backoff(backoff_factor=2)  # 2 s, 4 s, 8 s


def retry_unless_user_error(task, task_run, state) -> bool:
    """Retrying cannot fix a missing dataset or a bad config (an input error fails at once), nor a task
    that ran out of time; a store unreachable after storage's own patience may be back next time."""
    return is_transient(state.result(raise_on_failure=False))


IO_TASK = {
    "retries": IO_RETRIES,
    "retry_delay_seconds": IO_RETRY_DELAYS,
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_unless_user_error,
}
