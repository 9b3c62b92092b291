"""Each task's body through `.fn()`: the wrappers pass manifests through and return manifests."""

import os
import subprocess
import sys

import pytest
from prefect.states import Failed

from adaptflow.errors import DatasetError
from adaptflow.manifests import (
    CandidateManifest,
    EvaluationManifest,
    ExtractionPlan,
    IngestManifest,
    ModelManifest,
    PredictionManifest,
    RunData,
    SelectionManifest,
    ShardResult,
)
from adaptflow.report.records import RunSummary
from adaptflow.report.summary import StageClock
from adaptflow.store import storage
from tasks._retry import retry_unless_user_error
from tasks.adapt import plan_candidates, select_model, train_candidate
from tasks.extract import compact_features, extract_shard, plan_extraction
from tasks.ingest import ingest_dataset
from tasks.predict import evaluate, merge_predictions, plan_prediction, predict_shard
from tasks.report import publish_run, write_report, write_summary
from tasks.train import fit_head


@pytest.mark.filterwarnings("ignore:Artifact creation outside of a flow or task run:FutureWarning")
def test_every_task_in_stage_order(demo_data, fast_config, memory_uri, prefect_harness):
    cfg, run = fast_config, f"{memory_uri}/runs/r1"
    clock = StageClock()
    with clock("ingest"):
        datasets = {
            d: ingest_dataset.fn(uri, d, f"{run}/ingest/{d}", cfg.ingest, cfg.seed)
            for d, uri in [
                ("source", demo_data.source_uri),
                ("target", demo_data.target_uri),
                ("target_labels", demo_data.target_labels_uri),
            ]
        }
    assert all(isinstance(m, IngestManifest) for m in datasets.values())
    assert datasets["target"].n_rejected == 2

    with clock("extract"):
        plan = plan_extraction.fn(
            [datasets["source"].index_uri, datasets["target"].index_uri],
            memory_uri,
            cfg.backbone,
            cfg.extract.shard_size,
        )
        shards = [extract_shard.fn(s, cfg.backbone, cfg.extract) for s in plan.shards]
        compaction = compact_features.fn(plan.features_uri, cfg.extract)
    assert isinstance(plan, ExtractionPlan) and all(isinstance(s, ShardResult) for s in shards)
    assert compaction.shards_after == len(shards)  # fewer small shards than compact_min_shards
    # every task's manifest carries its work record: time, and the bytes its body moved
    assert all(s.work.seconds > 0 and s.work.bytes_written > s.bytes_written for s in shards)
    assert datasets["source"].work.bytes_read >= datasets["source"].bytes_read > 0

    head = fit_head.fn(datasets["source"], plan, cfg, f"{memory_uri}/models/r1")
    assert isinstance(head, ModelManifest) and head.classes == demo_data.classes

    specs = plan_candidates.fn(cfg, datasets["source"])
    assert [s.name for s in specs] == ["source_only-features", "dann-features", "dann-images"]
    data = RunData(
        source=datasets["source"], target=datasets["target"], target_labels=datasets["target_labels"], features=plan
    )
    candidates = [train_candidate.fn(s, data, cfg, f"{run}/candidates") for s in specs[1:]]
    assert all(isinstance(c, CandidateManifest) for c in candidates)
    selection = select_model.fn(head, candidates, cfg)
    assert isinstance(selection, SelectionManifest) and selection.index in (0, 1)

    def predict(images, out, split=None):
        to_do = plan_prediction.fn(selection.model_uri, images, plan, out, 4, split)
        assert len(to_do.shards) > 1  # several parts, merged into one file
        return merge_predictions.fn(to_do, [predict_shard.fn(s, plan, "cpu") for s in to_do.shards])

    preds = predict(datasets["target"], f"{run}/predictions.parquet")
    test = predict(datasets["source"], f"{run}/source_test.parquet", split="test")
    assert isinstance(preds, PredictionManifest) and preds.n_predictions == datasets["target"].n_images
    evaluation = evaluate.fn(
        datasets["source"], test, preds, datasets["target_labels"], head.classes, f"{run}/metrics.json"
    )
    assert isinstance(evaluation, EvaluationManifest) and evaluation.target.n == datasets["target"].n_images

    report = write_report.fn(run, data, candidates, selection, evaluation, evaluation)
    assert storage.read_bytes(report.report_uri).startswith(b"<!DOCTYPE html>")
    summary = write_summary.fn(
        "r1",
        run,
        cfg,
        datasets,
        plan,
        shards,
        compaction,
        head,
        candidates,
        selection,
        [preds, test],
        evaluation,
        evaluation,
        report,
        clock.seconds,
    )
    assert isinstance(summary, RunSummary)
    assert set(summary.stages) == {"ingest", "extract"}  # the stages this test timed
    assert summary.stages["extract"].images == sum(s.n_rows for s in shards)
    assert summary.stages["ingest"].bytes_read >= sum(d.bytes_read for d in datasets.values())
    assert RunSummary.load(f"{run}/summary.json") == summary
    history = publish_run.fn(summary, memory_uri)
    assert storage.read_bytes(history).startswith(b"<!DOCTYPE html>")


def test_user_errors_are_not_retried_but_io_errors_are():
    from prefect.task_engine import TaskRunTimeoutError

    from adaptflow.errors import ModelError, StoreError, StoreUnavailableError

    assert not retry_unless_user_error(None, None, Failed(data=DatasetError("dataset not found: x")))
    assert not retry_unless_user_error(None, None, Failed(data=StoreError("cannot write x: permission denied")))
    assert not retry_unless_user_error(None, None, Failed(data=ModelError("damaged model at m: ...")))
    assert not retry_unless_user_error(None, None, Failed(data=TaskRunTimeoutError("Scope timed out")))
    assert retry_unless_user_error(None, None, Failed(data=OSError("connection reset")))
    # a store unreachable after storage's own patience is a StoreError, and transient: worth another try
    assert retry_unless_user_error(None, None, Failed(data=StoreUnavailableError("store unreachable: s3://b")))


def test_prefect_retries_a_store_that_was_unreachable_and_not_a_bad_one(
    memory_uri, fast_config, demo_data, prefect_harness, monkeypatch
):
    """The ingest task itself, run by Prefect: an unreachable store is retried (and the run goes on once it is
    back); a store that refuses the write fails at once, after one try."""
    from prefect import flow

    import tasks.ingest
    from adaptflow.errors import StoreError, StoreUnavailableError

    real, calls = tasks.ingest.ingest.ingest, []

    def flaky(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 1:
            raise StoreUnavailableError("store unreachable: s3://b/store (gave up after 60 s)")
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.ingest.ingest, "ingest", flaky)
    monkeypatch.setattr(ingest_dataset, "retry_delay_seconds", [0.1])

    @flow
    def one_ingest(uri: str, out: str):
        return ingest_dataset(uri, "target", out, fast_config.ingest, 0)

    assert one_ingest(demo_data.target_uri, f"{memory_uri}/a").n_images > 0 and len(calls) == 2

    def refused(*args, **kwargs):
        calls.append(args[0])
        raise StoreError("cannot write s3://b/store/x: access denied")

    calls.clear()
    monkeypatch.setattr(tasks.ingest.ingest, "ingest", refused)
    with pytest.raises(StoreError, match="access denied"):
        one_ingest(demo_data.target_uri, f"{memory_uri}/b")
    assert len(calls) == 1


def test_ingest_task_raises_the_user_message(memory_uri, fast_config):
    with pytest.raises(DatasetError, match="dataset not found"):
        ingest_dataset.fn(f"{memory_uri}/missing", "source", f"{memory_uri}/out", fast_config.ingest, 0)


@pytest.mark.parametrize("entry", ["adaptflow", "cli", "flows", "tasks", "cli.main", "flows.predict"])
def test_arrow_allocates_through_malloc_in_every_entry(entry):
    """Arrow's pool is chosen when pyarrow loads: each entry sets it to malloc first, which the tasks' memory
    release trims (mimalloc kept what ingest's reader threads freed: more with every image predicted). A
    user's own choice in the environment stands."""
    code = f"import {entry}, pyarrow as pa; print(pa.default_memory_pool().backend_name)"
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "system"
    chosen = subprocess.run(
        [sys.executable, "-c", code],
        env={**env, "ARROW_DEFAULT_MEMORY_POOL": "mimalloc"},
        capture_output=True,
        text=True,
    )
    assert chosen.stdout.strip() == "mimalloc"
