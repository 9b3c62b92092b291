"""The same retrain flow on Dask: a real LocalCluster with two worker processes, via prefect-dask."""

import pytest

from adaptflow import storage
from adaptflow.runs import RunSummary
from flows.retrain import retrain
from tasks.runners import build_task_runner

pytestmark = pytest.mark.slow


def test_retrain_runs_on_a_dask_local_cluster(demo_data, fast_config, tmp_path, prefect_harness, monkeypatch):
    import prefect.settings

    # Worker processes must report to the harness's server, not start temporary servers of their own.
    monkeypatch.setenv("PREFECT_API_URL", prefect.settings.PREFECT_API_URL.value())
    cfg = fast_config.model_copy(update={
        "runtime": fast_config.runtime.model_copy(update={"task_runner": "dask", "dask_workers": 2}),
        "adapt": fast_config.adapt.model_copy(update={"method": "coral", "image_methods": []}),
    })
    runner = build_task_runner(cfg.runtime)
    assert type(runner).__name__ == "DaskTaskRunner"
    store = str(tmp_path / "store")
    run = retrain.with_options(task_runner=runner)(demo_data.source_uri, demo_data.target_uri,
                                                   demo_data.target_labels_uri, store, cfg.model_dump(mode="json"))
    summary = RunSummary.load(storage.join(run, "summary.json"))
    assert summary.extraction["images_extracted"] == summary.extraction["images_requested"] > 0
    assert summary.extraction["shards"] >= 2  # the map really fanned out
    assert storage.read_table(summary.predictions_uri).num_rows == summary.datasets["target"]["images"]
