"""Where everything lives in a store: every URI below is derived from the store's root, never recorded apart.

{store}/runs/{run_id}/ingest/{domain}/   index.parquet, rejects.parquet, manifest.json
{store}/ingest-cache/{key}/             each dataset's listing cache (`adaptflow.data.listing_cache`), keyed by
                                         what its files' checks depend on (`ingest.cache_key`): the next
                                         ingest opens only new and changed files
{store}/training/{key}/{name}/          each adaptation candidate (`adaptflow.adapt.candidates`), keyed by
                                         everything its training reads (`training_uri`): the same command
                                         after an interruption resumes each from its last checkpoint
{store}/runs/{run_id}/baseline/          the source-only head's predictions and metrics.json
{store}/runs/{run_id}/predictions.parquet
{store}/runs/{run_id}/metrics.json
{store}/runs/{run_id}/report.html
{store}/runs/{run_id}/summary.json       written last: the run's commit
{store}/models/{run_id}/                 the source-only head: weights.safetensors, model.json, curve.json
{store}/features/{backbone}-{fp}/        the feature store (`adaptflow.extract.features`)
{store}/images/{S}px-{fp}/               the training-image cache (`adaptflow.extract.image_cache`)
{store}/registry/                        versions, aliases, events and exports (`adaptflow.models.registry`)
{store}/history.html                     every committed run (`adaptflow.report.history`)
"""

from __future__ import annotations

import re
import secrets
from datetime import UTC, datetime

from adaptflow.store import storage


def new_run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def run_uri(store: str, run_id: str) -> str:
    return storage.join(store, "runs", run_id)


def ingest_uri(run: str, domain: str) -> str:
    return storage.join(run, "ingest", domain)


def ingest_cache_uri(store: str, key: str) -> str:
    """Where the listing cache of ingest key `key` (`adaptflow.data.ingest.cache_key`) lives."""
    return storage.join(store, "ingest-cache", key)


def model_uri(store: str, run_id: str) -> str:
    return storage.join(store, "models", run_id)


def training_uri(store: str, key: str) -> str:
    """Where the adaptation candidates of training `key` (`adaptflow.adapt.plan.training_key`) live."""
    return storage.join(store, "training", key)


def features_uri_for(store_uri: str, backbone: str, fingerprint: str) -> str:
    """The features folder of one extractor: its backbone's name, made a safe single path component
    (`tv:resnet18`, `hf-hub:org/model`), and its fingerprint, which tells apart names that read alike."""
    return storage.join(store_uri, "features", f"{re.sub(r'[^A-Za-z0-9._-]+', '_', backbone)}-{fingerprint}")


def registry_uri(store: str) -> str:
    return storage.join(store, "registry")


def version_uri(store: str, version: int) -> str:
    return storage.join(registry_uri(store), "versions", f"{version:06d}.json")


def exports_uri(store: str) -> str:
    return storage.join(registry_uri(store), "exports")


def labels_uri(store: str) -> str:
    """The labels people gave in the loop (`label.store`): one table, every label ever given."""
    return storage.join(store, "labels", "labels.parquet")
