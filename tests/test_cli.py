"""The command line as a user meets it: help, clear errors, and the run contract."""

import os
import subprocess
import sys

import pytest

from adaptflow import storage
from cli.main import main


def _adaptflow(*args, cwd):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=600)


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["predict"]])
def test_help_is_useful_everywhere(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: adaptflow" in out and "--store" in out or command == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "--source", "/nonexistent/src", "--target", "/nonexistent/tgt"], "error: dataset not found: /nonexistent/src"),
        (["run", "--source", ".", "--target", ".", "--set", "backbone.name=nope"], "unknown backbone 'nope'; valid backbones: "),
        (["run", "--source", ".", "--target", ".", "--config", "/nonexistent.yaml"], "error: config file not found"),
        (["predict", "/nonexistent/model", "/nonexistent/images", "--out", "x"], "error: dataset not found"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_backbones_lists_the_registry(capsys):
    assert main(["backbones"]) == 0
    assert "efficientnet_lite0" in capsys.readouterr().out.split()


@pytest.mark.slow
def test_run_prints_table_then_run_uri_and_bad_data_fails_cleanly(demo_data, tmp_path):
    store = str(tmp_path / "store")
    fast = ["--set", "backbone.image_size=32", "--set", "head.max_epochs=20", "--set", "extract.num_workers=0",
            "--set", "adapt.feature_steps=100", "--set", "adapt.image_epochs=1", "--set", "adapt.image_size=32"]
    done = _adaptflow("run", "--source", demo_data.source_uri, "--target", demo_data.target_uri,
                      "--target-labels", demo_data.target_labels_uri, "--store", store, "--method", "dann", *fast,
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    run = lines[-1]
    assert storage.exists(storage.join(run, "summary.json")) and storage.exists(storage.join(run, "predictions.parquet"))
    assert "extraction:" in done.stdout and "report:" in done.stdout
    summary = storage.read_json(storage.join(run, "summary.json"))
    assert summary["adaptation"]["method"] == "dann"
    assert [c["name"] for c in summary["adaptation"]["candidates"]] == ["dann-features", "dann-images"]

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not really a jpeg")
    failed = _adaptflow("run", "--source", demo_data.source_uri, "--target", str(broken), "--store", store, *fast,
                        cwd=tmp_path)
    assert failed.returncode == 2
    assert f"error: no valid images under {broken}" in failed.stderr
    assert "Traceback" not in failed.stderr


def _registry(store: str, scores: list[float]) -> None:
    from adaptflow import registry

    lineage = registry.Lineage(dataset_snapshot="d", extractor_fingerprint="f", config_hash="c", code_version="0.1.0")
    for i, score in enumerate(scores):
        mv = registry.register(store, storage.join(store, "models", f"run{i}"), f"run{i}", lineage,
                               {"selection_score": score, "source_val_accuracy": 0.9, "target_accuracy": None,
                                "source_test_accuracy": 0.8}, "dann-features")
        registry.gate(store, mv.version, None, margin=0.01)


def test_models_list_promote_and_rollback(tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["models", "list", "--store", store]) == 0
    assert "no models registered in" in capsys.readouterr().out
    _registry(store, [0.5, 0.4])  # v1 champion, v2 challenger

    assert main(["models", "list", "--store", store]) == 0
    header, v1, v2 = capsys.readouterr().out.strip().splitlines()
    assert header.split()[:3] == ["version", "aliases", "created"] and "run id" in header
    assert v1.split()[:2] == ["v1", "champion"] and "0.500" in v1 and v1.endswith("run0")
    assert v2.split()[:2] == ["v2", "challenger"] and "dann-features" in v2

    assert main(["models", "promote", "challenger", "--store", store, "--reason", "looks better"]) == 0
    assert capsys.readouterr().out.strip() == "champion: v1 -> v2 (looks better)"
    assert main(["models", "rollback", "--store", store]) == 0
    assert capsys.readouterr().out.strip() == "champion: v2 -> v1 (rollback)"
    assert main(["models", "rollback", "--store", store]) == 2
    assert "error: nothing to roll back to" in capsys.readouterr().err
    assert main(["models", "promote", "v9", "--store", store]) == 2
    assert "error: no model version 9" in capsys.readouterr().err


def test_predict_resolves_registry_names_in_the_store(tmp_path, memory_uri, capsys):
    from adaptflow.registry import model_uri_for

    def resolve_model(model, store):
        return model_uri_for(store, model)

    _registry(memory_uri, [0.5, 0.6])
    assert resolve_model("champion", memory_uri) == storage.join(memory_uri, "models", "run1")
    assert resolve_model("v1", memory_uri) == resolve_model("1", memory_uri) == storage.join(memory_uri, "models", "run0")
    assert resolve_model(str(tmp_path / "some_model"), memory_uri) == str(tmp_path / "some_model")
    empty = str(tmp_path / "empty")
    assert main(["predict", "champion", str(tmp_path), "--out", "x", "--store", empty]) == 2
    assert "error: no models registered in" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["models"], ["models", "list"], ["models", "promote"], ["models", "rollback"]])
def test_models_help(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "usage: adaptflow models" in capsys.readouterr().out
