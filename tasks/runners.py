"""The task runner and the time limits are configuration choices (`runtime`), for a run from the command
line and for a deployment's run alike: threads in this process or Dask through prefect-dask, and timeouts
for the flow and its long tasks."""

from contextlib import AbstractContextManager, nullcontext
from typing import TypeVar

from prefect import Flow, Task
from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from adaptflow.config import RuntimeConfig
from adaptflow.errors import ConfigError

T = TypeVar("T", bound=Task)


def build_task_runner(runtime: RuntimeConfig) -> TaskRunner:
    """Threads (default); Dask on an existing scheduler (`dask_address`) or a LocalCluster of
    `dask_workers` processes. Dask workers report to the Prefect API in PREFECT_API_URL: start a
    Prefect server first, or every worker starts its own temporary one."""
    if runtime.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=runtime.max_workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise ConfigError("runtime.task_runner=dask needs the dask extra: pip install 'adaptflow[dask]'") from None

    if runtime.dask_address:
        return DaskTaskRunner(address=runtime.dask_address)
    # Extraction decodes images in DataLoader worker processes, and a daemonic process may not start
    # children: the LocalCluster's workers (whose nannies take this process's Dask config) run undaemonic.
    # Workers of an existing scheduler need the same (`distributed.worker.daemon: false`, infra/README.md).
    import dask

    dask.config.set({"distributed.worker.daemon": False})
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": runtime.dask_workers,
            "threads_per_worker": 1,
            "processes": True,
            "host": "127.0.0.1",
            "dashboard_address": None,
        },
    )


def configured(flow: Flow, runtime: RuntimeConfig) -> Flow:
    """`flow` on the configured task runner, failing as TimedOut past `runtime.flow_timeout_s`. A flow's
    runner and timeout are fixed when it starts, and a deployment's run gets its config only as a
    parameter: so each entry flow runs its stages as this subflow."""
    return flow.with_options(task_runner=build_task_runner(runtime), timeout_seconds=runtime.flow_timeout_s)


def limited(runtime: RuntimeConfig, *tasks: T) -> tuple[T, ...]:
    """The `tasks`, each failing as TimedOut past `runtime.task_timeout_s` (for the long ones: ingest,
    extraction, training, scoring)."""
    return tuple(task.with_options(timeout_seconds=runtime.task_timeout_s) for task in tasks)


def gpu_placement(runtime: RuntimeConfig) -> AbstractContextManager:
    """Around `.map` of GPU work: on Dask with `gpu_resource`, the tasks need a worker with GPU=1."""
    if runtime.task_runner == "dask" and runtime.gpu_resource:
        import dask

        return dask.annotate(resources={"GPU": 1})
    return nullcontext()
