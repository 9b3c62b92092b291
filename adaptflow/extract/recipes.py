"""What an extractor's features are called and how they are made, remembered in the store, so that a run
with nothing to embed (a quiet night) neither builds the backbone nor reads its weights.

A recipe is what planning needs of an extractor: its `fingerprint` (which names the feature folder), its
width, the input transform it declares and its weights' hash. `recipe(cfg, store)` looks it up under
`{store}/features/recipes/{key}.json`, where the key hashes everything a build depends on: the backbone
config, the weights file's URI, size and modification time (the stamp `build_extractor`'s own cache
trusts), the feature version and the versions of the libraries that define the models and transforms.
Any change of those is another key, so a build; a record missing or unreadable is a build too. Embedding
always builds the extractor, and refuses a plan whose fingerprint is not the one it built
(`features._embed_shard`).
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata

from pydantic import BaseModel, ConfigDict, ValidationError

from adaptflow.config import BackboneConfig
from adaptflow.errors import StoreError, StoreUnavailableError
from adaptflow.store import storage

_LIBRARIES = ("torch", "torchvision", "timm")


class Recipe(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    fingerprint: str
    dim: int
    data_config: dict
    weights_sha256: str | None


def recipe(cfg: BackboneConfig, store_uri: str) -> Recipe:
    """`cfg`'s recipe: the store's record of an earlier build with the same inputs, else a build (recorded)."""
    from adaptflow.extract.backbones import build_extractor

    uri = storage.join(store_uri, "features", "recipes", f"{recipe_key(cfg)}.json")
    try:
        return Recipe.model_validate(storage.read_json(uri))
    except StoreUnavailableError:
        raise
    except (StoreError, ValidationError):
        pass  # none yet, or a damaged one: built, and written
    ex = build_extractor(cfg)
    data_config = json.loads(json.dumps(ex.data_config))  # as the record keeps it: tuples are lists
    found = Recipe(fingerprint=ex.fingerprint, dim=ex.dim, data_config=data_config, weights_sha256=ex.weights_sha256)
    storage.write_json(uri, found.model_dump(mode="json"))
    return found


def recipe_key(cfg: BackboneConfig) -> str:
    """A hash of everything a build of `cfg` depends on; costs a stat of the weights file, not a read."""
    from adaptflow.extract.backbones import FEATURE_VERSION, weights_uri
    from adaptflow.extract.weights import file_stamp

    weights = weights_uri(cfg)
    inputs = {
        "backbone": cfg.model_dump(mode="json"),
        "weights": weights,
        "stamp": list(file_stamp(weights)) if weights else None,
        "feature_version": FEATURE_VERSION,
        "libraries": {name: _version(name) for name in _LIBRARIES},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
