"""MLflow mirrors adaptflow: runs with params, metrics, nested candidates and artifacts; the registered model
and the champion/challenger aliases as adaptflow's registry has them. A local SQLite store, no server."""

import logging
import socket
from pathlib import Path

import pytest

from adaptflow.config import TrackingConfig
from adaptflow.models import registry
from adaptflow.report import tracking
from adaptflow.report.records import RunSummary
from adaptflow.store import storage
from cli.main import main


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow puts a SQLite store's artifacts under ./mlruns
    monkeypatch.delenv(tracking.ENV, raising=False)
    return f"sqlite:///{tmp_path}/mlflow.db"


def _client(uri):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.mark.slow
def test_runs_and_the_registry_are_mirrored_to_mlflow(
    demo_data_40, fast_config, tmp_path, prefect_harness, mlflow_uri, monkeypatch, capsys
):
    demo_data = demo_data_40
    from flows.retrain import retrain

    store = str(tmp_path / "store")
    settings = {**fast_config.model_dump(mode="json"), "tracking": {"mlflow_uri": mlflow_uri}}
    first = RunSummary.load(
        storage.join(
            retrain(demo_data.source_uri, demo_data.target_uri, demo_data.target_labels_uri, store, settings),
            "summary.json",
        )
    )
    # a shifted batch, head only: retrained and gated, so the registry has a second version
    head_only = {**settings, "adapt": {**settings["adapt"], "method": "none"}}
    second = RunSummary.load(
        storage.join(retrain(demo_data.source_uri, demo_data.source_uri, None, store, head_only), "summary.json")
    )
    assert first.promotion.version == 1 and second.promotion.version == 2

    client = _client(mlflow_uri)
    experiment = client.get_experiment_by_name("adaptflow")
    runs = {
        r.data.tags["adaptflow.run_id"]: r
        for r in client.search_runs([experiment.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    }
    assert set(runs) == {first.run_id, second.run_id}
    run = runs[first.run_id]
    assert run.info.status == "FINISHED" and run.info.run_name == first.run_id
    # params: the config, flattened
    assert run.data.params["adapt.method"] == "auto" and run.data.params["backbone.image_size"] == "64"
    assert run.data.params["adapt.methods"] == "['source_only', 'dann']"
    # metrics: the selected model's, the baseline's, and the selected candidate's validators
    assert run.data.metrics["target.accuracy"] == pytest.approx(first.metrics.target.accuracy)
    assert run.data.metrics["baseline.source_test.accuracy"] == pytest.approx(first.baseline.source_test.accuracy)
    assert run.data.metrics["selected.im"] == pytest.approx(first.adaptation.scores["im"])
    assert run.data.metrics["promoted"] == 1.0
    # each candidate a nested run with its scores
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert sorted(c.info.run_name for c in children) == sorted(c.name for c in first.adaptation.candidates)
    for child in children:
        candidate = next(c for c in first.adaptation.candidates if c.name == child.info.run_name)
        assert child.data.metrics["score.bnm"] == pytest.approx(candidate.scores["bnm"])
        assert child.data.tags["adaptflow.selected"] == str(candidate.name == first.adaptation.selected).lower()
    # the report and the summary as artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {
        "summary.json",
        "metrics.json",
        "report.html",
        "model",
    }
    # the registered model as an MLflow pyfunc, the adaptflow model (weights and card) inside
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} >= {"model/MLmodel", "model/artifacts"}
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model/artifacts/adaptflow_model")} == {
        "model/artifacts/adaptflow_model/weights.safetensors",
        "model/artifacts/adaptflow_model/model.json",
    }

    # the registered models and aliases: exactly adaptflow's
    versions = {mv.tags["adaptflow.version"]: mv for mv in client.search_model_versions("name = 'adaptflow'")}
    assert set(versions) == {"1", "2"}
    assert versions["1"].run_id == run.info.run_id and versions["2"].run_id == runs[second.run_id].info.run_id
    adaptflow_aliases = registry.aliases(store)
    mirrored = {
        a: int(client.get_model_version_by_alias("adaptflow", a).tags["adaptflow.version"])
        for a in client.get_registered_model("adaptflow").aliases
    }
    assert mirrored == adaptflow_aliases and "champion" in mirrored
    # and MLflow serves the champion: what `adaptflow predict` predicts, from image bytes or URIs
    import mlflow
    import pandas as pd

    mlflow.set_registry_uri(mlflow_uri)
    served = mlflow.pyfunc.load_model("models:/adaptflow@champion")
    images = sorted(Path(demo_data.target_uri).iterdir())[:6]
    by_bytes = served.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    by_uri = served.predict(pd.DataFrame({"uri": [str(p) for p in images]}))
    assert list(by_bytes.prediction) == list(by_uri.prediction) and len(by_bytes) == 6
    assert set(by_bytes.prediction) <= set(demo_data.classes)  # the same module `models export` checks
    assert all(len(p) == len(demo_data.classes) and abs(sum(p) - 1) < 1e-4 for p in by_bytes.probabilities)
    with capsys.disabled():  # for the record, with -s
        print(
            f"\nMLflow runs: {sorted(runs)}; adaptflow aliases {adaptflow_aliases}; MLflow aliases "
            f"{dict(client.get_registered_model('adaptflow').aliases)} (MLflow version numbers)"
        )

    # a promotion by hand is mirrored too (MLFLOW_TRACKING_URI names the store for the command line)
    monkeypatch.setenv(tracking.ENV, mlflow_uri)
    other = 1 if adaptflow_aliases["champion"] == 2 else 2
    assert main(["models", "promote", str(other), "--store", store]) == 0
    assert f"MLflow aliases mirrored: champion -> v{other}" in capsys.readouterr().out
    assert client.get_model_version_by_alias("adaptflow", "champion").tags["adaptflow.version"] == str(other)
    assert main(["models", "rollback", "--store", store]) == 0
    back = registry.aliases(store)["champion"]
    assert client.get_model_version_by_alias("adaptflow", "champion").tags["adaptflow.version"] == str(back)


def _summary(store: str, run_id: str, version: int | None, model_uri: str) -> dict:
    return {
        "run_id": run_id,
        "run_uri": storage.join(store, "runs", run_id),
        "status": "trained",
        "config_hash": "c",
        "config": {"adapt": {"method": "dann"}, "runtime": {"credentials_block": "aws"}},
        "model_uri": model_uri,
        "metrics": {"source_test": {"accuracy": 0.5}},
        "promotion": {"version": version, "reason": "no champion yet"} if version else None,
        "adaptation": {"selected": "dann-features", "candidates": []},
    }


def _registered_model(store: str, run_id: str) -> tuple[int, str]:
    from test_models_card import _saved_head

    model_uri = storage.join(store, "models", run_id)
    _saved_head(model_uri)
    lineage = registry.Lineage(dataset_snapshot="d", extractor_fingerprint="f", config_hash="c", code_version="t")
    mv = registry.register(
        store,
        model_uri,
        run_id,
        lineage,
        {"selection_score": 0.5, "source_val_accuracy": 0.5, "target_accuracy": None, "source_test_accuracy": None},
        "dann-features",
    )
    return mv.version, model_uri


def test_an_alias_whose_version_mlflow_lacks_is_removed_not_left_stale(tmp_path, mlflow_uri):
    store = str(tmp_path / "store")
    cfg = TrackingConfig(mlflow_uri=mlflow_uri)
    v1, m1 = _registered_model(store, "run1")
    registry.gate(store, v1, None, 0.01)
    tracking.log_run(_summary(store, "run1", v1, m1), store, cfg)
    assert tracking.sync_aliases(store, cfg) == {"champion": "1"}
    # v2 registered while tracking was off: adaptflow makes it champion, MLflow has no twin for it
    v2, _ = _registered_model(store, "run2")
    registry.promote(store, v2)
    assert tracking.sync_aliases(store, cfg) == {}
    assert "champion" not in _client(mlflow_uri).get_registered_model("adaptflow").aliases


def test_tracking_logs_no_credentials_and_is_off_without_a_uri(tmp_path, mlflow_uri, monkeypatch):
    store = str(tmp_path / "store")
    assert tracking.log_run(_summary(store, "r", None, ""), store, TrackingConfig()).status == "off"
    monkeypatch.setenv(tracking.ENV, mlflow_uri)  # the environment variable turns it on
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "env-secret-never-logged")
    summary = _summary(store, "r", None, "")
    summary["config"]["backbone"] = {"weights": "https://AKIAEXAMPLE:very-secret@host/w.safetensors"}
    logged = tracking.log_run(summary, store, TrackingConfig())
    assert logged.status == "logged" and logged.model_version is None and logged.tracking_uri == mlflow_uri
    run = _client(mlflow_uri).get_run(logged.run_id)
    text = str(run.data.params) + str(run.data.tags)
    assert "very-secret" not in text and "AKIAEXAMPLE" not in text and "env-secret" not in text
    assert run.data.params["backbone.weights"] == "https://***@host/w.safetensors"
    assert run.data.params["runtime.credentials_block"] == "aws"  # a block's name, never its values
    assert tracking.redact("https://user:tok@host/x and s3://b/k") == "https://***@host/x and s3://b/k"


def test_an_unreachable_tracking_server_warns_and_the_task_returns(tmp_path, prefect_harness, caplog, capfd):
    from tasks.track import track_run

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    written = next((Path(__file__).parent / "fixtures" / "store_f6ff59f" / "runs").glob("*/summary.json"))
    summary = RunSummary.load(str(written)).model_copy(update={"run_id": "r", "run_uri": str(tmp_path / "runs" / "r")})
    caplog.set_level(logging.WARNING)
    assert track_run(summary, str(tmp_path), TrackingConfig(mlflow_uri=f"http://127.0.0.1:{port}")) is None
    logs = caplog.text + capfd.readouterr().err  # Prefect's console handler writes the task's logs to stderr
    assert (
        "MLflow tracking failed, the run itself is complete: ConnectionError: the MLflow tracking server "
        f"http://127.0.0.1:{port} does not answer" in logs
    )
