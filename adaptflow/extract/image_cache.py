"""The training-image cache: every image decoded, resized and centre-cropped once at a training size and
kept as uint8 in the store, so end-to-end candidates, prediction and scoring read pixels instead of
decoding files again, in any process and any later run.

    {store}/images/{S}px-{fingerprint}/cache.json   what the fingerprint stands for
    {store}/images/{S}px-{fingerprint}/shards/      as in `adaptflow.store.shards`: image_id, ..., pixels (3*S*S uint8)

The fingerprint hashes the geometric transform alone (input size, interpolation, crop): pixels do not
depend on a backbone's weights or normalisation, so backbones that resize alike share one cache.
Extraction fills it (`extract.features.plan_extraction(..., cache=...)`) in the same pass that embeds.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from adaptflow.config import BackboneConfig
from adaptflow.manifests import ImageCache
from adaptflow.store import storage
from adaptflow.store.shards import load_rows

CACHE_VERSION = 1  # bump when the same geometry would give other pixels
GEOMETRY_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode")


def image_cache(store_uri: str, backbone: BackboneConfig, size: int | None) -> ImageCache:
    """The cache of `backbone`'s preprocessing at `size` (None: the backbone's own input size)."""
    from adaptflow.extract.recipes import recipe

    data_config = recipe(backbone.model_copy(update={"image_size": size}), store_uri).data_config
    geometry = {k: data_config[k] for k in GEOMETRY_KEYS if k in data_config}
    geometry["input_size"] = list(geometry["input_size"])
    fingerprint = hashlib.sha256(
        json.dumps({**geometry, "cache_version": CACHE_VERSION}, sort_keys=True).encode()
    ).hexdigest()[:16]
    s = int(geometry["input_size"][-1])
    uri = storage.join(store_uri, "images", f"{s}px-{fingerprint}")
    described = storage.join(uri, "cache.json")
    if not storage.exists(described):
        storage.write_json(
            described, {"fingerprint": fingerprint, "size": s, "geometry": geometry, "cache_version": CACHE_VERSION}
        )
    return ImageCache(uri=uri, fingerprint=fingerprint, size=s, geometry=geometry)


def load_pixels(cache: ImageCache, image_ids: list[str]) -> torch.Tensor:
    """(N, 3, S, S) uint8 in the order of `image_ids`. Holds them all: for a bounded set (a validation
    sample, a batch); stream anything larger with `adaptflow.store.rows.ShardedRows`."""
    s = cache.size
    flat = load_rows(cache.uri, image_ids, "pixels", what="cached training images")
    return torch.from_numpy(np.array(flat)).view(len(image_ids), 3, s, s)
