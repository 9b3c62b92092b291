"""A store written by an earlier release still reads: its run summary, ingest manifests, feature shards,
registry and champion, its history, and predictions with its model.

`fixtures/store_f6ff59f/` was written by adaptflow at commit f6ff59f (before the library was grouped by
stage) under /tmp/fx/store, from `make_demo_data(..., image_size=32, seed=0, max_per_domain=30)`:

    adaptflow run --source data/source --target data/target --target-labels data/target_labels.csv \
        --store /tmp/fx/store --method none --set backbone.image_size=32 --set extract.num_workers=0 \
        --set head.max_epochs=20 --set ingest.workers=2

Every URI it records is under /tmp/fx/store: readers find what it names where the copy is now.
"""

import shutil
from pathlib import Path

import pytest

from adaptflow.adapt.inference import load_model
from adaptflow.data.demo import make_demo_data
from adaptflow.data.ingest import read_index
from adaptflow.extract.features import load_features
from adaptflow.manifests import IngestManifest
from adaptflow.models import registry
from adaptflow.report.history import read_summaries, rows_from_summaries
from adaptflow.report.records import RunSummary
from adaptflow.report.tables import render_table
from adaptflow.store import storage
from cli.main import main

FIXTURE = Path(__file__).parent / "fixtures" / "store_f6ff59f"
WRITTEN_AT = "/tmp/fx/store"


@pytest.fixture
def store(tmp_path) -> str:
    """A copy, so nothing a test does changes the fixture."""
    copy = tmp_path / "store"
    shutil.copytree(FIXTURE, copy)
    return str(copy)


def _run(store: str) -> str:
    (run,) = [e["name"] for e in storage.ls(storage.join(store, "runs")) if e.get("type") == "directory"]
    return run


def test_an_old_store_reads_its_summary_manifests_features_and_registry(store):
    run = _run(store)
    summary = RunSummary.load(storage.join(run, "summary.json"))
    assert summary.status == "trained" and summary.adaptation.method == "head"
    assert summary.datasets["target"].images == 30 and summary.datasets["target"].rejected == 2

    manifests = {
        d: IngestManifest.load(storage.join(run, "ingest", d, "manifest.json"))
        for d in ("source", "target", "target_labels")
    }
    assert manifests["source"].classes == [str(c) for c in range(10)]
    index = {}
    for domain, m in manifests.items():
        moved = m.model_copy(update={"index_uri": storage.rebase(m.index_uri, WRITTEN_AT, store)})
        index[domain] = read_index(moved)
        assert len(index[domain]) == m.n_images

    features_uri = storage.rebase(summary.extraction.features_uri, WRITTEN_AT, store)
    ids = index["source"].image_id.tolist() + index["target"].image_id.tolist()
    assert load_features(features_uri, ids).shape == (60, 1280)

    champion = registry.resolve(store, "champion")
    assert champion.version == 1 and champion.model_uri.startswith(store + "/")
    assert registry.aliases(store) == {"champion": 1}
    model, card = load_model(champion.model_uri)
    assert card.classes == manifests["source"].classes and card.fingerprint == summary.extraction.fingerprint

    (row,) = rows_from_summaries(read_summaries(store))
    assert row.run_id == summary.run_id
    table = render_table(summary)  # the typed summary renders as the terminal shows it
    assert "source-only head        target            0.067" in table and "target_labels         30         0" in table


@pytest.mark.slow
def test_an_old_store_predicts_with_its_champion(store, tmp_path, prefect_harness):
    data = make_demo_data(str(tmp_path / "data"), image_size=32, seed=0, max_per_domain=30)
    out = str(tmp_path / "predictions.parquet")
    assert main(["predict", "champion", data.target_uri, "--store", store, "--out", out, "--quiet"]) == 0
    new = storage.read_table(out).to_pandas().set_index("image_id").prediction
    old = storage.read_table(storage.join(_run(store), "predictions.parquet")).to_pandas()
    old = old.set_index("image_id").prediction
    assert len(new) == 30 and new.sort_index().equals(old.sort_index())
