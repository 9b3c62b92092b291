"""A saved model rebuilt and run: its architecture from the card (`build_model`), its weights loaded
(`load_model`), the rows it reads for indexed images (`model_rows`: the training-image cache, the feature
store, or images decoded on the spot) and its outputs for them (`infer`). `adaptflow.models.card` stores
and loads the card and weights; this module is where the code that trains a model also runs it again."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from adaptflow.adapt.samples import embedding_rows, image_rows
from adaptflow.errors import AdaptflowError, ModelError, StoreError
from adaptflow.extract.backbones import backbone_spec
from adaptflow.manifests import ExtractionPlan
from adaptflow.models.card import ModelCard, load_card, read_weights


def build_model(card: ModelCard) -> nn.Module:
    """An untrained model of the card's architecture (images kind: backbone with its pretrained weights).
    Every kind reads its inputs through the card's backbone, so an unknown one fails here, for a head too."""
    backbone_spec(card.config.backbone.name)
    if card.kind == "head":
        from adaptflow.adapt.heads import Head

        h = card.config.head
        return Head(card.dim, len(card.classes), h.kind, h.hidden_dim, h.dropout)
    from adaptflow.adapt.algorithms import get_algorithm

    featurizer, dim = nn.Identity(), card.dim
    if card.kind == "images":
        from adaptflow.adapt.images import image_featurizer

        featurizer, dim, _ = image_featurizer(card.config.backbone.model_copy(update={"image_size": card.image_size}))
    return get_algorithm(card.method)(featurizer, dim, len(card.classes), card.hparams, max_steps=1)


def load_model(model_uri: str) -> tuple[nn.Module, ModelCard]:
    """The model saved at `model_uri`, in eval mode, and its card; a ModelError in one line for a folder
    that is not a model, is damaged, or cannot be rebuilt."""
    card = load_card(model_uri)
    state = read_weights(model_uri)
    try:
        model = build_model(card)
    except ModelError:
        raise
    except AdaptflowError as e:  # an unknown method, a backbone without weights: said of this model
        raise ModelError(f"cannot rebuild the model at {model_uri}: {e}") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # torch lists every mismatch on lines of their own: the first says enough
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise ModelError(
            f"damaged model at {model_uri}: its weights do not fit model.json (classes, dim or "
            f"method changed?): {first}"
        ) from None
    return model.eval(), card


def rows_folder(card: ModelCard, features: ExtractionPlan | None) -> str | None:
    """The sharded store `card`'s model reads its rows from: the training-image cache at its size (images
    kind), its extractor's features (head and features kinds); None: images decoded on the spot."""
    if card.kind == "images":
        cache = features.cache if features is not None else None
        return cache.uri if cache is not None and cache.size == card.image_size else None
    if features is None or features.fingerprint != card.fingerprint:
        got = features.fingerprint if features else None
        raise StoreError(
            f"this {card.kind} model reads features {card.fingerprint}, got {got}: its backbone "
            "weights or preprocessing changed"
        )
    return features.features_uri


def model_rows(card: ModelCard, index: pd.DataFrame, features: ExtractionPlan | None, device: str = "cpu"):
    """The rows `card`'s model reads for the images of `index`, in its row order, for one pass in bounded
    memory (streamed from the store, never held whole): cached training images at the model's size (images
    kind) or its extractor's features. Images not in a cache are decoded here, all at once: plan extraction
    with the cache for anything large."""
    folder = rows_folder(card, features)
    if card.kind != "images":
        return embedding_rows(folder, index, card.dim, resident_bytes=0)
    s, data_config = card.image_size, None
    if folder is None:
        from adaptflow.adapt.images import image_featurizer

        _, _, data_config = image_featurizer(card.config.backbone.model_copy(update={"image_size": s}))
    workers, pin = card.config.extract.num_workers, str(device).startswith("cuda")
    return image_rows(folder, index, s, data_config, workers, resident_bytes=0, pin=pin)


def infer(
    model: nn.Module, card: ModelCard, index: pd.DataFrame, features: ExtractionPlan | None, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, C), model features (N, d)) for the images of `index`, in its row order, on the CPU."""
    rows = model_rows(card, index, features, device)
    if card.kind == "images":
        from adaptflow.adapt.images import infer_images

        return infer_images(model, rows, device=device)
    from adaptflow.adapt.train import infer as infer_rows

    return infer_rows(model.to(device), rows)
