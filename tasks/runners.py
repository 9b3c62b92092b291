"""The task runner is a configuration choice: threads in this process, or Dask through prefect-dask."""

from contextlib import AbstractContextManager, nullcontext

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner

from adaptflow.config import RuntimeConfig


def build_task_runner(runtime: RuntimeConfig) -> TaskRunner:
    """Threads (default); Dask on an existing scheduler (`dask_address`) or a LocalCluster of
    `dask_workers` processes. Dask workers report to the Prefect API in PREFECT_API_URL: start a
    Prefect server first, or every worker starts its own temporary one."""
    if runtime.task_runner == "threads":
        return ThreadPoolTaskRunner(max_workers=runtime.max_workers)
    from prefect_dask import DaskTaskRunner

    if runtime.dask_address:
        return DaskTaskRunner(address=runtime.dask_address)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster",
                          cluster_kwargs={"n_workers": runtime.dask_workers, "threads_per_worker": 1,
                                          "processes": True, "host": "127.0.0.1", "dashboard_address": None})


def gpu_placement(runtime: RuntimeConfig) -> AbstractContextManager:
    """Around `.map` of GPU work: on Dask with `gpu_resource`, the tasks need a worker with GPU=1."""
    if runtime.task_runner == "dask" and runtime.gpu_resource:
        import dask

        return dask.annotate(resources={"GPU": 1})
    return nullcontext()
