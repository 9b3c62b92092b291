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
