"""The same retrain flow on Dask: a real LocalCluster with two worker processes, via prefect-dask — chosen by
the config alone, as a deployment's run gets it (a parameter), not by the caller's `with_options`."""

import itertools

import pytest

from adaptflow.report.records import RunSummary
from adaptflow.store import storage
from flows.retrain import retrain
from tasks.runners import build_task_runner

pytestmark = pytest.mark.slow


def test_retrain_runs_on_the_dask_cluster_its_config_names(
    demo_data, fast_config, tmp_path, prefect_harness, monkeypatch
):
    import prefect.settings
    from distributed import Client, LocalCluster, get_task_stream

    # Worker processes must report to the harness's server, not start temporary servers of their own.
    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1", dashboard_address=None
        ) as cluster,
        Client(cluster) as client,
    ):
        cfg = fast_config.model_copy(
            update={
                "runtime": fast_config.runtime.model_copy(
                    update={"task_runner": "dask", "dask_address": cluster.scheduler_address}
                ),
                # two end-to-end candidates, no halving: both trained at once, one per worker
                "adapt": fast_config.adapt.model_copy(
                    update={"methods": ["coral"], "image_methods": ["source_only", "dann"], "halving": 0}
                ),
            }
        )
        assert type(build_task_runner(cfg.runtime)).__name__ == "DaskTaskRunner"
        store = str(tmp_path / "store")
        with get_task_stream(client) as stream:
            run = retrain(
                demo_data.source_uri,
                demo_data.target_uri,
                demo_data.target_labels_uri,
                store,
                cfg.model_dump(mode="json"),
            )
        workers = {task["worker"] for task in stream.data}
    summary = RunSummary.load(storage.join(run, "summary.json"))
    assert summary.extraction.images_extracted == summary.extraction.images_requested > 0
    assert summary.extraction.shards >= 2  # the map really fanned out ...
    assert len(stream.data) >= summary.extraction.shards and len(workers) == 2  # ... onto this cluster
    assert storage.read_table(summary.predictions_uri).num_rows == summary.datasets["target"].images
    # the candidates are tasks of their own, each on its own worker process, at the same time
    trains = [t for t in stream.data if str(t["key"]).startswith("train_candidate")]
    spans = [(t["worker"], *_compute_span(t)) for t in trains]
    assert len(trains) == 3 and len({w for w, _, _ in spans}) == 2, spans
    assert any(w1 != w2 and a0 < b1 and b0 < a1 for (w1, a0, a1), (w2, b0, b1) in itertools.combinations(spans, 2)), (
        f"no two candidates trained at once on different workers: {spans}"
    )
    assert {c.name for c in summary.adaptation.candidates} == {
        "coral-features",
        "source_only-images",
        "dann-images",
    }


def _compute_span(task: dict) -> tuple[float, float]:
    """(start, stop) of a task-stream record's compute."""
    compute = [s for s in task["startstops"] if s["action"] == "compute"]
    return min(s["start"] for s in compute), max(s["stop"] for s in compute)


def _child_exit_code() -> int:
    """Start a process and wait for it, as extraction's DataLoader starts its decoding workers."""
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=int)
    child.start()
    child.join()
    return child.exitcode


def test_a_task_on_the_local_cluster_may_start_processes(prefect_harness, monkeypatch):
    """A daemonic Dask worker may not start children; extraction's decoding workers are children. The
    LocalCluster `runtime.task_runner: dask` starts has workers that may."""
    import prefect.settings
    from prefect import flow, task

    from adaptflow.config import RuntimeConfig

    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())
    runner = build_task_runner(RuntimeConfig(task_runner="dask", dask_workers=1))

    @flow(task_runner=runner)
    def starts_a_child() -> int:
        return task(_child_exit_code).submit().result()

    assert starts_a_child() == 0
