"""Saved models of every kind, behind one card: save the weights and card, load them back, and format
predictions. Rebuilding a model from its card and running it is `adaptflow.adapt.inference`.

A model folder holds `weights.safetensors` and `model.json` (the card), written last. Loading one that is
missing or damaged (no weights, a card edited or cut short, an unknown backbone or method, weights that do
not fit the card) is a ModelError saying what is wrong, in one line. Kinds:
    head      a Head on cached backbone features (the source-only baseline)
    features  an adaptation Algorithm on cached backbone features (featurizer = identity)
    images    an adaptation Algorithm whose featurizer is the backbone itself, trained end to end
Every predictor has `features(x)` (what validators read) and `predict(x)` (logits).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from adaptflow.config import Config
from adaptflow.errors import ModelError, StoreError
from adaptflow.manifests import SCHEMA_VERSION
from adaptflow.store import storage

Kind = Literal["head", "features", "images"]


class ModelCard(BaseModel):
    """Everything needed to rebuild and trust a saved model, next to its weights."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    schema_version: int = SCHEMA_VERSION
    kind: Kind = "head"
    method: str = "head"  # "head" or an adaptation algorithm's registry key
    hparams: dict = {}
    image_size: int | None = None  # images kind: the input size it was trained at
    classes: list[str]
    config: Config  # the run's settings: backbone and preprocessing are rebuilt from them
    fingerprint: str  # extractor fingerprint of the features it reads (head and features kinds)
    dim: int  # backbone feature dimension
    weights_sha256: str | None = None  # the backbone's pretrained weights file it started from (None: random)
    config_hash: str
    dataset_fingerprint: str
    metrics: dict[str, float]
    # log q(y) / p(y) per class, added to the output layer's bias: the model as trained, corrected to the
    # target's estimated class mix (`adapt.priors.correct`); None: as trained
    prior_correction: list[float] | None = None


def save_model(model_uri: str, model: nn.Module, card: ModelCard) -> None:
    """Weights first, the card last: a model folder without `model.json` is not a model."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    storage.write_bytes(storage.join(model_uri, "weights.safetensors"), save_safetensors(tensors))
    storage.write_json(storage.join(model_uri, "model.json"), card.model_dump(mode="json"))


def load_card(model_uri: str) -> ModelCard:
    card_uri = storage.join(model_uri, "model.json")
    if not storage.exists(card_uri):
        raise ModelError(f"no model at {model_uri} (expected {card_uri})")
    try:
        data = storage.read_json(card_uri)
    except StoreError as e:
        raise ModelError(f"damaged model at {model_uri}: {e}") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if version != SCHEMA_VERSION:
        raise ModelError(
            f"{card_uri} was written by an incompatible adaptflow (schema version {version}, expected {SCHEMA_VERSION})"
        )
    try:
        return ModelCard.model_validate(_migrated(data))
    except ValidationError as e:
        raise ModelError(f"damaged model card {card_uri}: {_problems(e)}") from None


# Settings a card of an earlier release may hold that no longer exist: they only shaped training.
_RETIRED = {"adapt": ("image_epochs",)}


def _migrated(data: dict) -> dict:
    """A card of an earlier release, read as this one's: retired settings dropped."""
    config = data.get("config")
    if not isinstance(config, dict):
        return data
    sections = {
        name: {k: v for k, v in config[name].items() if k not in keys}
        for name, keys in _RETIRED.items()
        if isinstance(config.get(name), dict)
    }
    return {**data, "config": {**config, **sections}}


def _problems(e: ValidationError) -> str:
    """Pydantic's errors on one line: `dim: Field required; config.backbone.name: unknown backbone 'x'; ...`."""
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'card'}: {err['msg'].removeprefix('Value error, ')}"
        for err in e.errors()
    )


def read_weights(model_uri: str) -> dict[str, torch.Tensor]:
    """The tensors of the model at `model_uri` (`weights.safetensors`), as saved; a ModelError if they are
    missing or cannot be read."""
    weights_uri = storage.join(model_uri, "weights.safetensors")
    try:
        blob = storage.read_bytes(weights_uri)
    except FileNotFoundError:
        raise ModelError(f"damaged model at {model_uri}: weights.safetensors is missing") from None
    try:
        return load_safetensors(blob)
    except Exception as e:  # safetensors raises its own SafetensorError (and others) for a damaged header
        raise ModelError(f"damaged model at {model_uri}: weights.safetensors cannot be read ({e})") from None


def unknown_below(card: ModelCard) -> float | None:
    """The confidence below which the model's predictions are UNKNOWN: its run's `adapt.unknown_threshold`
    when the run was open set (`adapt.open_set`), else None."""
    return card.config.adapt.unknown_threshold if card.config.adapt.open_set else None


UNKNOWN = "unknown"  # the prediction of an open-set model (`adapt.open_set`) for an image of no known class


def predictions_table(
    index: pd.DataFrame,
    logits: torch.Tensor,
    classes: list[str],
    probabilities: bool = False,
    unknown_below: float | None = None,
):
    """The predictions contract: uri, image_id, prediction (class name), confidence; with `probabilities`,
    also every class's probability (a list of C float32, in the order of `classes`). With `unknown_below`
    (open set), a prediction whose confidence is below it is UNKNOWN."""
    import pyarrow as pa

    proba = logits.float().softmax(1).numpy() if len(logits) else np.empty((0, len(classes)), np.float32)
    names = [classes[i] for i in proba.argmax(1)]
    if unknown_below is not None:
        names = [UNKNOWN if p < unknown_below else n for n, p in zip(names, proba.max(1), strict=True)]
    columns = {
        "uri": index.uri.tolist(),
        "image_id": index.image_id.tolist(),
        "prediction": names,
        "confidence": proba.max(1).astype(np.float32) if len(proba) else np.empty(0, np.float32),
    }
    if probabilities:
        flat = pa.array(proba.astype(np.float32).reshape(-1))
        columns["probabilities"] = pa.FixedSizeListArray.from_arrays(flat, len(classes))
    return pa.table(columns)
