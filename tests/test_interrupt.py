"""Ctrl-C as a terminal sends it: SIGINT to the command's whole process group, early, mid-extraction, and
twice. The command prints one line and exits with status 130 within seconds, leaves no process behind (its
temporary Prefect server included), and the same command run again resumes from what was committed."""

import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from commands import extract_command

from adaptflow.store import shards, storage
from cli.interrupt import MESSAGE

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """One Prefect home for the module: its database is created once (first run), not once per test."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(tmp_path_factory.mktemp("prefect"))}


def _committed(store):
    return list(Path(store).glob("features/*/shards/*.json"))


def _start(cmd, env):
    """The command in a process group of its own, as a shell runs a foreground job."""
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _interrupt(proc, times: int = 1) -> tuple[float, str, list[psutil.Process]]:
    """Ctrl-C `times` times to the process group; seconds until it exited, its stderr, and the processes it had."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    start = time.monotonic()
    for i in range(times):
        if i:
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        pytest.fail(f"still running 30 s after Ctrl-C:\n{err[-3000:]}")
    return time.monotonic() - start, err, family


def _assert_stopped_cleanly(seconds: float, err: str, family: list[psutil.Process], returncode: int) -> None:
    assert returncode == 130, err[-3000:]
    assert seconds < 10, f"exited {seconds:.1f} s after Ctrl-C"
    assert err.count(MESSAGE) == 1 and "Traceback" not in err, err[-3000:]
    deadline = time.monotonic() + 10  # the temporary server and any worker stop with the command
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in family):
        assert time.monotonic() < deadline, [p.cmdline() for p in family if p.is_running()]
        time.sleep(0.2)


def _wait_for(condition, proc, what: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"ended before {what}: {proc.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, f"never reached: {what}"
        time.sleep(0.05)


def test_ctrl_c_mid_extraction_stops_at_once_and_the_same_command_resumes(demo_data, tmp_path, env):
    store = str(tmp_path / "store")
    cmd = extract_command(demo_data, store)
    first = _start(cmd, env)
    _wait_for(lambda: len(_committed(store)) >= 2, first, "two committed shards")
    seconds, err, family = _interrupt(first)
    _assert_stopped_cleanly(seconds, err, family, first.returncode)
    interrupted_at = len(_committed(store))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    features_uri = second.stdout.strip().splitlines()[-1]
    ids = [
        i
        for f in shards.committed_files(features_uri)
        for i in storage.read_table(f, columns=["image_id"])["image_id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)) == _valid_images(demo_data)  # one row per valid image, none twice
    assert interrupted_at < len(_committed(store))  # the rerun did the rest, keeping what was committed


def test_ctrl_c_twice_exits_at_once(demo_data, tmp_path, env):
    store = str(tmp_path / "store")
    proc = _start(extract_command(demo_data, store), env)
    _wait_for(lambda: len(_committed(store)) >= 1, proc, "a committed shard")
    seconds, err, family = _interrupt(proc, times=2)
    _assert_stopped_cleanly(seconds, err, family, proc.returncode)
    assert seconds < 3, f"{seconds:.1f} s after the second Ctrl-C"


def test_ctrl_c_while_prefect_starts(demo_data, tmp_path, env):
    store = str(tmp_path / "store")
    proc = _start(extract_command(demo_data, store), env)
    # the temporary server is a child of the command: interrupt as soon as it exists
    _wait_for(lambda: psutil.Process(proc.pid).children(), proc, "the Prefect server starting")
    seconds, err, family = _interrupt(proc)
    _assert_stopped_cleanly(seconds, err, family, proc.returncode)
    assert not _committed(store)


def _valid_images(demo_data) -> int:
    from adaptflow.config import IngestConfig
    from adaptflow.data.ingest import ingest

    return sum(
        ingest(uri, d, f"memory://interrupt-count/{d}", IngestConfig(workers=2)).n_images
        for d, uri in (("source", demo_data.source_uri), ("target", demo_data.target_uri))
    )
