"""What a Prefect user expects of the flows: time limits from the config, library logs in the run's logs,
credentials for every flow, and a temporary API that starts on a busy machine or says what to do."""

import os
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from adaptflow.errors import ApiUnavailableError, ConfigError
from cli.main import main

ROOT = Path(__file__).resolve().parents[1]
SLOW_EXTRACT = ["--set", "backbone.image_size=128", "--set", "extract.num_workers=0", "--set", "ingest.workers=2"]


def _one_error_line(stderr: str, traceback_free: bool = True) -> str:
    """The `error:` line; exactly one. In-process, Prefect's console handler may still write to the stream
    of an earlier test's capture (a "Logging error" about a closed file): only a subprocess shows stderr as
    a user sees it."""
    assert not traceback_free or "Traceback" not in stderr, stderr[-3000:]
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    return line


def _latest_run(name: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=[name])), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
    return run


@pytest.mark.slow
def test_a_run_past_its_time_limit_stops_as_timed_out(demo_data, tmp_path, prefect_harness, capsys, monkeypatch):
    """A hung nightly run would hold a deployment's concurrency slot: past runtime.flow_timeout_s it ends
    TimedOut (a final state, which frees the slot), and the command says so in one line, with status 3."""
    from adaptflow.extract import features

    def slow_shard(*args, **kwargs):  # each of the 19 shards takes a second: the run cannot finish in 2 s
        time.sleep(1.0)
        return real_shard(*args, **kwargs)

    real_shard = features.extract_shard
    monkeypatch.setattr(features, "extract_shard", slow_shard)
    start = time.monotonic()
    assert (
        main(
            [
                "extract",
                demo_data.source_uri,
                "--store",
                str(tmp_path / "store"),
                *SLOW_EXTRACT,
                "--set",
                "extract.shard_size=8",
                "--set",
                "runtime.flow_timeout_s=2",
            ]
        )
        == 3
    )
    line = _one_error_line(capsys.readouterr().err, traceback_free=False)
    assert line.startswith("error: the run took longer than runtime.flow_timeout_s (2 s);")
    assert line.endswith("committed work is kept, rerun the same command to resume")
    assert time.monotonic() - start < 60  # the extraction alone takes longer than that
    run = _latest_run("extract-stages")
    assert run.state.is_final() and run.state.name == "TimedOut"


@pytest.mark.slow
def test_a_task_past_its_time_limit_fails_the_run_at_once(demo_data, tmp_path):
    """As a user runs it: one line, status 3, and no retry of a task that ran out of time."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "extract",
            demo_data.source_uri,
            "--store",
            str(tmp_path / "store"),
            *SLOW_EXTRACT,
            "--set",
            "backbone.image_size=224",
            "--set",
            "extract.shard_size=150",
            "--set",
            "runtime.task_timeout_s=1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 3, done.stderr[-3000:]
    line = _one_error_line(done.stderr)
    assert line.startswith("error: a task took longer than runtime.task_timeout_s (1 s);")
    assert "TimedOut" in done.stderr and "Retry 1/3" not in done.stderr


def _images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def test_library_warnings_reach_the_task_run_logs_on_the_prefect_api(tmp_path, prefect_harness):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterLevel, LogFilterTimestamp
    from prefect.logging.handlers import APILogHandler

    from flows.extract import backfill

    data = tmp_path / "data"
    _images(data, 3)
    (data / "notes.png").write_bytes(b"not an image")
    since = datetime.now(UTC)
    config = {
        "backbone": {"weights": "random", "image_size": 32},
        "extract": {"num_workers": 0},
        "ingest": {"workers": 2},
    }
    backfill([str(data)], str(tmp_path / "store"), config)
    APILogHandler().flush()  # send what is queued
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(level=LogFilterLevel(ge_=30), timestamp=LogFilterTimestamp(after_=since)))
    (log,) = [lg for lg in logs if lg.name == "adaptflow.data.ingest"]
    assert log.message.startswith(f"{data}: 1 of 4 files rejected (e.g. notes.png: not an image")
    assert log.task_run_id is not None  # in the ingest task's own logs, as the UI shows them


def test_predict_uses_the_credentials_block_its_config_names(tmp_path, prefect_harness):
    from flows.predict import batch_predict

    _images(tmp_path / "images", 1)
    block = f"no-such-block-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConfigError, match=f"runtime.credentials_block: no Secret block named '{block}'"):
        batch_predict(
            "champion",
            str(tmp_path / "images"),
            str(tmp_path / "p.parquet"),
            str(tmp_path / "store"),
            {"runtime": {"credentials_block": block}},
        )


class _FakeServer:
    """Stands in for Prefect's temporary server: records the start-up wait it was given."""

    started_with: list = []

    def start(self, timeout):
        self.started_with.append(timeout)
        raise RuntimeError("Timed out while attempting to connect to ephemeral Prefect API server.")

    def stop(self):
        pass


@pytest.mark.parametrize(("env", "expected"), [(None, 120), ("7", 7)])
def test_the_temporary_server_waits_long_enough_unless_told_otherwise(env, expected, monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from cli import prefect_api

    if env is not None:
        monkeypatch.setenv("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", env)
    monkeypatch.setattr(prefect_api, "_detached_server", _FakeServer)
    monkeypatch.setattr(prefect_api, "_migrate_fresh_database", lambda settings: None)
    monkeypatch.setattr(prefect_api, "_running_server", lambda: None)
    _FakeServer.started_with = []
    with (
        temporary_settings(restore_defaults={PREFECT_API_URL}),
        pytest.raises(ApiUnavailableError) as e,
        prefect_api.prefect_api(),
    ):
        pass
    assert _FakeServer.started_with == [expected]
    assert str(e.value).startswith(f"Prefect's temporary API server did not start within {expected} s; ")
    assert "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS" in str(e.value) and "PREFECT_API_URL" in str(e.value)


@pytest.mark.slow
def test_a_fresh_prefect_home_on_a_machine_too_busy_to_start_the_server(demo_data, tmp_path):
    """Its database is created first, with no time limit; the server then gets the start-up wait (1 s here,
    too short for anything), and when it does not come up the command says what to do, with status 3."""
    import psutil

    home = tmp_path / "fresh-prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "extract", demo_data.target_uri, "--store", str(tmp_path / "store")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    children: set[int] = set()
    while proc.poll() is None:  # whatever it starts must be gone when it is
        try:
            children |= {p.pid for p in psutil.Process(proc.pid).children(recursive=True)}
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 3, err[-3000:]
    assert "preparing Prefect's database (first run on this PREFECT_HOME)" in err
    line = _one_error_line(err)
    assert line.startswith("error: Prefect's temporary API server did not start within 1 s; ")
    assert "PREFECT_API_URL" in line
    import sqlite3

    with sqlite3.connect(home / "prefect.db") as db:  # migrated, once: the next start has nothing to create
        assert db.execute("select count(*) from alembic_version").fetchone()[0] == 1
    time.sleep(1)
    assert not [pid for pid in children if psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie"]


def test_a_prefect_api_url_that_does_not_answer_is_one_line_with_status_3(demo_data, tmp_path):
    import socket

    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/api"
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "extract", demo_data.target_uri, "--store", str(tmp_path / "store")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_API_URL": url},
    )
    assert done.returncode == 3
    line = _one_error_line(done.stderr)
    assert line.startswith(f"error: the Prefect API at {url} (PREFECT_API_URL) does not answer (")


_LAST_LOG_SCRIPT = """
from cli.prefect_api import configure_environment, prefect_api
configure_environment()
from prefect import flow, get_run_logger

@flow
def last_words():
    get_run_logger().info("the run's last log line")

with prefect_api():
    last_words()
"""


@pytest.mark.slow
def test_a_runs_last_logs_reach_the_temporary_server_before_it_stops(tmp_path):
    """Logs wait in a batch for up to 2 s before they are sent: the temporary server stays until they are in.
    Stopped first, it lost them, with "Error logging to API" on stderr (and, measured, up to a minute of
    the client's retries before the command exited)."""
    import sqlite3

    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1", "PREFECT_LOGGING_LEVEL": "INFO"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run(
        [sys.executable, "-c", _LAST_LOG_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error logging to API" not in done.stderr, done.stderr[-3000:]
    with sqlite3.connect(home / "prefect.db") as db:
        messages = {m for (m,) in db.execute("select message from log")}
    assert "the run's last log line" in messages
    assert any(m.startswith("Finished in state Completed") for m in messages), sorted(messages)


@pytest.mark.parametrize("flow", ["flows.retrain:retrain", "flows.extract:backfill", "flows.predict:batch_predict"])
def test_a_deployments_config_parameter_is_a_form_in_the_ui(flow):
    """The UI draws a run's parameter form from the flow's schema: `config` is the Config model, every section
    and setting with its type, default and description, not a raw JSON object."""
    import importlib

    from prefect.utilities.callables import parameter_schema

    module, name = flow.split(":")
    schema = parameter_schema(getattr(importlib.import_module(module), name)).model_dump()
    assert {"$ref": "#/definitions/Config"} in schema["properties"]["config"]["anyOf"]
    sections = schema["definitions"]["Config"]["properties"]
    assert {"ingest", "backbone", "extract", "adapt", "monitor", "promotion", "runtime"} <= set(sections)
    budget = schema["definitions"]["AdaptConfig"]["properties"]["budget"]
    assert budget["default"] == "default" and budget["description"]


@pytest.mark.slow
def test_an_input_error_found_inside_the_flow_is_said_once(demo_data, tmp_path):
    """Prefect logs a failed run four or five times (task, subflow, flow, each state); the terminal shows the
    error once, as the command's last line, while the Prefect UI keeps its records."""
    labels = tmp_path / "labels.csv"
    labels.write_text("uri,label\nnope1.png,0\nnope2.png,1\n")
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "DO_NOT_TRACK": "1"}
    cmd = [sys.executable, "-m", "cli.main", "run", "--source", demo_data.source_uri, "--target", demo_data.target_uri]
    cmd += ["--target-labels", str(labels), "--store", str(tmp_path / "store")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("no valid images under") == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.rstrip().splitlines()[-1].startswith(f"error: no valid images under {labels}")
