"""The command line as a user meets it: help, clear errors, and the run contract."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from adaptflow.store import storage
from cli.main import main

ROOT = Path(__file__).resolve().parents[1]


def _adaptflow(*args, cwd, env=None):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=600
    )


def _one_error_line(stderr: str) -> str:
    """The command's `error:` line; there must be exactly one, and no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return line


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["predict"]])
def test_help_is_useful_everywhere(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "usage: adaptflow" in out and "--store" in out or command == []


@pytest.mark.parametrize(
    "command",
    [["run", "--source", "s", "--target", "t"], ["demo"], ["extract", "x"], ["predict", "m", "x", "--out", "o"]],
)
def test_rehash_reads_every_file_again_in_every_command_that_ingests(command):
    """`--rehash` is `ingest.rehash=true`, and wins over a --set; without it, unchanged files keep their checks."""
    from adaptflow.config import load_config
    from cli.main import _overrides, _parser

    def rehash(*flags: str) -> bool:
        return load_config(None, _overrides(_parser().parse_args([*command, *flags]))).ingest.rehash

    assert rehash("--rehash", "--set", "ingest.rehash=false") and not rehash()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["run", "--source", "/nonexistent/src", "--target", "/nonexistent/tgt"],
            "error: dataset not found: /nonexistent/src",
        ),
        (
            ["run", "--source", ".", "--target", ".", "--set", "backbone.name=nope"],
            "unknown backbone 'nope'; valid backbones: ",
        ),
        (["run", "--source", ".", "--target", ".", "--config", "/nonexistent.yaml"], "error: config file not found"),
        (  # before Prefect starts, once: not after the flow began, twice
            ["extract", ".", "--set", "backbone.weights=/nonexistent/w.safetensors"],
            "error: backbone 'efficientnet_lite0': weights file not found: /nonexistent/w.safetensors.",
        ),
        (["predict", "/nonexistent/model", "/nonexistent/images", "--out", "x"], "error: dataset not found"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("error:") == 1 and "Prefect" not in err


def test_backbones_lists_the_registry_and_how_to_name_any_model(capsys):
    assert main(["backbones"]) == 0
    out = capsys.readouterr().out
    assert "efficientnet_lite0" in out.split() and "tv:NAME" in out and "backbone.download=true" in out


@pytest.mark.slow
def test_a_run_takes_any_timm_model_by_name(demo_data, tmp_path):
    """Random weights: what is tested is that a model named as timm names it goes through every stage, end to
    end too (torchvision's `tv:NAME` builds in tests/test_extract_backbones.py; a run with
    tv:mobilenet_v3_small found the report's crash on features that are all the same)."""
    backbone = "test_vit"
    settings = [f"backbone.name={backbone}", "backbone.weights=random", "backbone.image_size=32"]
    settings += ["head.max_epochs=5", "extract.num_workers=0", "adapt.feature_steps=20", "adapt.image_steps=2"]
    done = _adaptflow(
        "run",
        "--source",
        demo_data.source_uri,
        "--target",
        demo_data.target_uri,
        "--store",
        str(tmp_path / "store"),
        "--method",
        "dann",
        *[arg for s in settings for arg in ("--set", s)],
        "--set",
        "adapt.image_size=32",
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = storage.read_json(storage.join(done.stdout.strip().splitlines()[-1], "summary.json"))
    assert [c["name"] for c in summary["adaptation"]["candidates"]] == ["dann-features", "dann-images"]
    assert summary["config"]["backbone"]["name"] == backbone


@pytest.mark.slow
def test_run_prints_table_then_run_uri_and_bad_data_fails_cleanly(demo_data, tmp_path):
    store = str(tmp_path / "store")
    fast = [
        "--set",
        "backbone.image_size=32",
        "--set",
        "head.max_epochs=20",
        "--set",
        "extract.num_workers=0",
        "--set",
        "adapt.feature_steps=100",
        "--set",
        "adapt.image_steps=4",
        "--set",
        "adapt.image_size=32",
    ]
    # twelve of the labelled target images may be used to choose the model; they then score nothing
    scoring = pd.read_csv(demo_data.target_labels_uri)
    folder = os.path.dirname(demo_data.target_labels_uri)
    given = scoring.head(12).assign(uri=lambda d: [os.path.join(folder, u) for u in d.uri])
    given.to_csv(tmp_path / "given.csv", index=False)
    done = _adaptflow(
        "run",
        "--source",
        demo_data.source_uri,
        "--target",
        demo_data.target_uri,
        "--target-labels",
        demo_data.target_labels_uri,
        "--target-train-labels",
        str(tmp_path / "given.csv"),
        "--store",
        store,
        "--method",
        "dann",
        *fast,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    run = lines[-1]
    summary = storage.read_json(storage.join(run, "summary.json"))
    labelled = summary["adaptation"]
    judged, trained = labelled["labelled"], labelled["labelled_trained"]  # split within each class, by content
    assert judged + trained == 12 and judged > 0
    assert f"target labels for training: {trained} trained every candidate, {judged} judged them" in done.stdout
    assert all(c["labelled_accuracy"] is not None for c in labelled["candidates"])
    scored = summary["datasets"]["target_labels"]["images"]
    assert scored == summary["metrics"]["target"]["n"] == len(scoring) - 12  # the twelve score nothing
    assert storage.exists(storage.join(run, "summary.json")) and storage.exists(
        storage.join(run, "predictions.parquet")
    )
    assert "extraction:" in done.stdout and "report:" in done.stdout
    assert summary["adaptation"]["method"] == "dann"
    assert [c["name"] for c in summary["adaptation"]["candidates"]] == ["dann-features", "dann-images"]
    from adaptflow.label.store import stored_labels

    kept = stored_labels(store)  # kept for later runs, as labels given in the Prefect UI are
    assert len(kept) == 12 and set(kept.who) == {"command line"}
    # progress went to stderr, one line per finished step (no terminal here), stdout untouched by it
    for step in (
        "ingest source: ",
        "ingest target: ",
        "extract images 0-",
        "train source-only head: ",
        "train dann-features: 100/100 steps",
        "train dann-images: ",
        "predict target images 0-",
        "predict source test images 0-",
    ):
        assert f"\ndone: {step}" in "\n" + done.stderr, step  # a line of its own, the first one or not
    assert "done: " not in done.stdout and "\r" not in done.stderr

    # the same batch again (head only: cheap), quiet and as JSON: one JSON object on stdout, the run's summary,
    # and nothing but warnings on stderr
    again = _adaptflow(
        "run",
        "--source",
        demo_data.source_uri,
        "--target",
        demo_data.target_uri,
        "--store",
        store,
        "--method",
        "none",
        "--quiet",
        "--json",
        *fast,
        cwd=tmp_path,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    (line,) = again.stdout.strip().splitlines()
    quiet = json.loads(line)
    assert quiet == storage.read_json(storage.join(quiet["run_uri"], "summary.json"))
    # the first run's pick stayed challenger (v1: at 4 steps its candidates collapse, a low-confidence pick);
    # this run's head is v2 and, with no champion yet, became champion
    assert quiet["run_uri"].startswith(store) and quiet["status"] == "trained"
    assert quiet["datasets"]["target_train_labels"]["images"] == 12  # the store's: given to the run before
    assert (quiet["promotion"]["version"], quiet["promotion"]["promoted"]) == (2, True)
    assert "done: " not in again.stderr and "| INFO " not in again.stderr

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.jpg").write_bytes(b"not really a jpeg")
    failed = _adaptflow(
        "run", "--source", demo_data.source_uri, "--target", str(broken), "--store", store, *fast, cwd=tmp_path
    )
    assert failed.returncode == 2
    assert f"error: no valid images under {broken}" in failed.stderr
    assert "Traceback" not in failed.stderr

    # a label for training that cannot be used is one clear error, before any training
    given.assign(label=["not-a-digit"] + list(given.label[1:])).to_csv(tmp_path / "typo.csv", index=False)
    typo = _adaptflow(
        "run",
        *("--source", demo_data.source_uri, "--target", demo_data.target_uri),
        *("--target-train-labels", str(tmp_path / "typo.csv"), "--store", store),
        *fast,
        cwd=tmp_path,
    )
    assert typo.returncode == 2 and "unknown label 'not-a-digit'" in _one_error_line(typo.stderr)


def _registry(store: str, scores: list[float]) -> None:
    from adaptflow.models import registry

    lineage = registry.Lineage(dataset_snapshot="d", extractor_fingerprint="f", config_hash="c", code_version="0.1.0")
    for i, score in enumerate(scores):
        mv = registry.register(
            store,
            storage.join(store, "models", f"run{i}"),
            f"run{i}",
            lineage,
            {
                "selection_score": score,
                "source_val_accuracy": 0.9,
                "target_accuracy": None,
                "source_test_accuracy": 0.8,
            },
            "dann-features",
        )
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
    from adaptflow.models.registry import model_uri_for

    def resolve_model(model, store):
        return model_uri_for(store, model)

    _registry(memory_uri, [0.5, 0.6])
    assert resolve_model("champion", memory_uri) == storage.join(memory_uri, "models", "run1")
    assert (
        resolve_model("v1", memory_uri) == resolve_model("1", memory_uri) == storage.join(memory_uri, "models", "run0")
    )
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


def test_help_answers_at_once_without_loading_the_heavy_libraries():
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cli.main", "--help"], capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - start
    assert done.returncode == 0 and "usage: adaptflow" in done.stdout and "--version" in done.stdout
    assert seconds < 1.0, f"adaptflow --help took {seconds:.2f} s"
    probe = (
        "import sys; from cli.main import main\ntry: main(['run', '--help'])\nexcept SystemExit: pass\n"
        "print(sorted(m for m in ('torch', 'prefect', 'pyarrow', 'fsspec', 'pydantic') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert loaded.stdout.strip().splitlines()[-1] == "[]"


def test_version_prints_the_version_and_the_git_commit():
    import adaptflow

    done = subprocess.run([sys.executable, "-m", "cli.main", "--version"], capture_output=True, text=True, cwd=ROOT)
    commit = subprocess.run(
        ["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    assert done.returncode == 0
    assert done.stdout.strip() == f"adaptflow {adaptflow.__version__} (git commit {commit})"


@pytest.mark.parametrize("case", ["plain file", "read-only folder", "unknown scheme"])
def test_a_bad_store_is_one_error_line_within_seconds(case, demo_data, tmp_path):
    from test_store_storage import _read_only, _writable_again

    (tmp_path / "plain").write_text("x")
    (tmp_path / "ro").mkdir()
    store = {
        "plain file": str(tmp_path / "plain"),
        "read-only folder": str(tmp_path / "ro" / "store"),
        "unknown scheme": "foo://x",
    }[case]
    if case == "read-only folder":
        _read_only(tmp_path / "ro")
    try:
        start = time.monotonic()
        done = _adaptflow("extract", demo_data.target_uri, "--store", store, cwd=tmp_path)
        seconds = time.monotonic() - start
    finally:
        _writable_again(tmp_path / "ro")
    assert done.returncode == 2
    assert store in _one_error_line(done.stderr)
    assert seconds < 3, f"{seconds:.1f} s"  # no Prefect server, no retries: measured 0.6 s


def test_a_store_unreachable_after_the_patience_exits_3_not_2(s3_env, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_MAX_ATTEMPTS": "1", storage.PATIENCE_ENV: "1"}
    done = _adaptflow("models", "list", "--store", "s3://bucket/store", cwd=tmp_path, env=env)
    assert done.returncode == 3
    assert _one_error_line(done.stderr).startswith("error: store unreachable: s3://bucket/store/registry")


def test_predict_with_a_damaged_model_is_one_line_before_prefect_starts(demo_data, tmp_path, capsys):
    from test_models_card import _saved_head

    model = str(tmp_path / "model")
    _saved_head(model)
    (tmp_path / "model" / "weights.safetensors").unlink()
    start = time.monotonic()
    assert (
        main(
            [
                "predict",
                model,
                demo_data.target_uri,
                "--out",
                str(tmp_path / "p.parquet"),
                "--store",
                str(tmp_path / "store"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert _one_error_line(err) == f"error: damaged model at {model}: weights.safetensors is missing"
    assert time.monotonic() - start < 10  # measured 1 s: no retries
    assert not (tmp_path / "store" / "predictions").exists()  # the flow never started


@pytest.mark.parametrize(
    "error, says",
    [
        ("FlowRunTimeoutError", "the run took longer than runtime.flow_timeout_s (2 s);"),
        ("TaskRunTimeoutError", "a task took longer than runtime.task_timeout_s (60 s);"),
    ],
)
def test_a_timeout_names_the_limit_set_never_none(error, says):
    import argparse

    from cli.main import _timed_out

    kind, limit = ("Flow", "2.0") if error.startswith("Flow") else ("Task", "60")
    timeout = type(error, (TimeoutError,), {})
    assert _timed_out(timeout(f"{kind} run exceeded timeout of {limit} second(s)")).startswith(says)
    # an outer flow re-raising a subflow's timeout has no limit of its own: the command's config names it
    args = argparse.Namespace(config=None, set=["runtime.flow_timeout_s=2", "runtime.task_timeout_s=60"])
    outer = _timed_out(timeout(f"{kind} run exceeded timeout of None second(s)"), args)
    assert outer.startswith(says) and "None" not in outer
    assert outer.endswith("committed work is kept, rerun the same command to resume")
