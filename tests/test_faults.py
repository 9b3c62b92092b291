"""Faults a production run meets: the process killed mid-extraction, then the same command run again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from commands import extract_command
from synthetic import save_untrained_images_model

from adaptflow.store import shards, storage

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _committed_manifests(store):
    return list(Path(store).glob("features/*/shards/*.json"))


def test_sigkill_during_extraction_then_the_same_command_resumes_with_one_row_per_image(demo_data, tmp_path):
    store = str(tmp_path / "store")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = extract_command(demo_data, store)
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while len(_committed_manifests(store)) < 2:  # mid-extraction: some shards committed, most not
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "extraction never started"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the whole process group, as a lost machine would
        first.wait()
    killed_at = len(_committed_manifests(store))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    features_uri = second.stdout.strip().splitlines()[-1]

    ids = [
        i
        for f in shards.committed_files(features_uri)
        for i in storage.read_table(f, columns=["image_id"])["image_id"].to_pylist()
    ]
    assert len(ids) == len(set(ids)) == _valid_images(demo_data)  # exactly one row per valid image
    assert killed_at < len(_committed_manifests(store))  # the re-run did the rest, keeping what was committed


def _valid_images(demo_data) -> int:
    return sum(
        _valid_images_of(uri, d) for d, uri in (("source", demo_data.source_uri), ("target", demo_data.target_uri))
    )


def test_sigkill_during_prediction_then_the_same_command_keeps_the_committed_parts(demo_data, fast_config, tmp_path):
    """`adaptflow predict` with an end-to-end model, one task per 8 images: killed once parts are committed,
    the same command predicts only the rest, and the merged file has one row per valid image."""
    cfg = fast_config.model_copy(update={"extract": fast_config.extract.model_copy(update={"shard_size": 8})})
    # untrained: what is predicted does not matter here
    model = save_untrained_images_model(str(tmp_path / "model"), cfg, demo_data.classes, 32)
    store, out = str(tmp_path / "store"), tmp_path / "predictions.parquet"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREFECT_HOME": str(tmp_path / "prefect")}
    cmd = [
        sys.executable,
        "-m",
        "cli.main",
        "predict",
        model,
        demo_data.target_uri,
        "--out",
        str(out),
        "--store",
        store,
    ]
    parts = Path(f"{out}.parts")
    first = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 300
        while len(list(parts.glob("*.json"))) < 2:
            assert first.poll() is None, first.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "prediction never started"
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    assert not out.exists()
    kept = list(parts.glob("*.json"))

    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    ids = storage.read_table(str(out), columns=["image_id"])["image_id"].to_pylist()
    n = _valid_images_of(demo_data.target_uri, "target")
    assert len(ids) == len(set(ids)) == n
    # one part per 8 images: the rerun predicted only those the killed run had not committed (then merged
    # all of them and removed the parts)
    assert f"{len(kept)} of {-(-n // 8)} parts were committed by an earlier attempt" in second.stderr
    assert not list(parts.glob("*.parquet"))


def _valid_images_of(uri: str, domain: str) -> int:
    """Valid images under `uri`, as ingest counts them."""
    from adaptflow.config import IngestConfig
    from adaptflow.data.ingest import ingest

    return ingest(uri, domain, f"memory://faults-count-{domain}", IngestConfig(workers=2)).n_images
