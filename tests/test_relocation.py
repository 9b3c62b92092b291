"""A store named by a relative path, used from another folder, then copied to S3 (the local copy moved away)
and used from there: every URI it records is absolute, and readers find what it names where it is now."""

import json
import uuid

import pytest

from adaptflow.models import registry
from adaptflow.report.records import RunSummary
from adaptflow.store import storage
from cli.main import main

pytestmark = pytest.mark.slow

FAST = [
    "--set",
    "backbone.image_size=32",
    "--set",
    "extract.num_workers=0",
    "--set",
    "head.max_epochs=30",
    "--set",
    "ingest.workers=2",
    "--method",
    "none",
]


def _last_line(capsys) -> str:
    out = capsys.readouterr().out
    return out.strip().splitlines()[-1]


def _predictions(out: str) -> list[tuple[str, str]]:
    table = storage.read_table(out).to_pandas()
    return sorted(zip(table.image_id, table.prediction, strict=True))


def _recorded_paths(store) -> list[str]:
    """Every string in the store's JSON files that names a path in it."""
    found = []

    def walk(value):
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and "store0" in value:
            found.append(value)

    for path in store.rglob("*.json"):
        walk(json.loads(path.read_text()))
    return found


def test_a_relative_store_works_from_another_folder_and_after_moving_to_s3(
    demo_data, tmp_path, prefect_harness, s3_env, monkeypatch, capsys
):
    here, elsewhere = tmp_path / "here", tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)
    assert (
        main(["run", "--source", demo_data.source_uri, "--target", demo_data.target_uri, "--store", "store0", *FAST])
        == 0
    )
    first = RunSummary.load(storage.join(_last_line(capsys), "summary.json"))
    assert first.run_uri.startswith(f"{here}/store0/runs/")
    recorded = _recorded_paths(here / "store0")
    assert recorded and all(p.startswith(str(here / "store0")) for p in recorded)  # none relative to `here`

    # the same store, named from another folder
    monkeypatch.chdir(elsewhere)
    store = str(here / "store0")
    assert main(["predict", "champion", demo_data.target_uri, "--store", store, "--out", "local.parquet"]) == 0
    expected = _predictions(str(elsewhere / "local.parquet"))
    assert len(expected) == first.datasets["target"].images

    # copied to object storage, the local copy moved away: everything it names is found on S3
    bucket = s3_env.bucket(f"moved-{uuid.uuid4().hex[:8]}")
    s3_store = storage.join(bucket, "store")
    s3_env.filesystem().put(store + "/", s3_store.removeprefix("s3://"), recursive=True)
    (here / "store0").rename(here / "moved")
    assert registry.resolve(s3_store, "champion").model_uri.startswith(s3_store + "/")
    assert main(["predict", "champion", demo_data.target_uri, "--store", s3_store, "--out", "s3.parquet"]) == 0
    assert _predictions(str(elsewhere / "s3.parquet")) == expected
    # a scheduled run against it: the champion's reference images are found in the S3 copy (the shift check
    # reads them, and finds no image of the batch new), and the features it needs are all there already
    assert (
        main(["run", "--source", demo_data.source_uri, "--target", demo_data.target_uri, "--store", s3_store, *FAST])
        == 0
    )
    again = RunSummary.load(storage.join(_last_line(capsys), "summary.json"))
    assert again.shift.n_new == 0 and not again.shift.shift_detected, again.shift
    assert again.extraction.images_extracted == 0

    # and the moved local copy works where it now is
    moved = str(here / "moved")
    assert main(["predict", "champion", demo_data.target_uri, "--store", moved, "--out", "moved.parquet"]) == 0
    assert _predictions(str(elsewhere / "moved.parquet")) == expected
