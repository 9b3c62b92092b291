"""The source-only baseline of every run: a head (`adapt.heads`) fitted on the cached features of the source
training images, early-stopped on source validation, and saved as a model with its card and training curve."""

from __future__ import annotations

import time

from adaptflow.adapt.heads import train_head
from adaptflow.config import Config
from adaptflow.data.ingest import read_index
from adaptflow.errors import DatasetError
from adaptflow.extract.features import load_features
from adaptflow.manifests import ExtractionPlan, IngestManifest, ModelManifest
from adaptflow.models.card import ModelCard, save_model
from adaptflow.store import storage


def fit_head(source: IngestManifest, features: ExtractionPlan, cfg: Config, model_uri: str) -> ModelManifest:
    """Train the head on source train features, early-stopped on source val; save it to `model_uri`."""
    start = time.perf_counter()
    index = read_index(source)
    classes = source.classes
    if len(classes) < 2:
        raise DatasetError(f"the source dataset {source.dataset_uri} needs at least 2 classes, found {classes}")
    train, val = index[index.split == "train"], index[index.split == "val"]
    if val.empty:  # tiny datasets: stop early on the training rows rather than not at all
        val = train
    code = {c: i for i, c in enumerate(classes)}
    x_train = load_features(features.features_uri, train.image_id.tolist())
    x_val = load_features(features.features_uri, val.image_id.tolist())
    head, curve = train_head(
        x_train,
        train.label.map(code).to_numpy(),
        x_val,
        val.label.map(code).to_numpy(),
        len(classes),
        cfg.head,
        cfg.seed,
    )
    val_acc = max(c["val_acc"] for c in curve)
    card = ModelCard(
        classes=classes,
        config=cfg,
        fingerprint=features.fingerprint,
        dim=features.dim,
        weights_sha256=features.weights_sha256,
        config_hash=cfg.fingerprint(),
        dataset_fingerprint=source.fingerprint,
        metrics={"source_val_accuracy": val_acc},
    )
    save_model(model_uri, head, card)
    storage.write_json(storage.join(model_uri, "curve.json"), curve)
    return ModelManifest(
        model_uri=model_uri,
        classes=classes,
        fingerprint=features.fingerprint,
        val_accuracy=val_acc,
        epochs=len(curve),
        seconds=time.perf_counter() - start,
    )
