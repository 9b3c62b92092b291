"""What a candidate trains and is scored on: its rows (cached backbone features, or cached training images
for end-to-end training: `FeatureData`, `ImageData`, each read in bounded memory), the fixed seeded samples
every candidate of a run is scored on, the frozen backbone's features all validators share, and the small
outputs a candidate leaves beside its model (its source-validation predictions, an embedding sample)."""

from __future__ import annotations

import zlib
from dataclasses import replace

import numpy as np
import pandas as pd
import torch
from torch import nn

from adaptflow import state
from adaptflow.adapt.train import Loop, Rows, TensorRows
from adaptflow.config import Config
from adaptflow.data.ingest import read_index
from adaptflow.manifests import (
    CandidateSpec,
    ExtractionPlan,
    IngestManifest,
)
from adaptflow.store import storage
from adaptflow.store.rows import ShardedRows
from adaptflow.store.shards import committed_shards


def validation_sample(rows: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    """At most `n` of `rows`, chosen by a seeded hash of each image's content hash: the same sample for
    every candidate, and an image stays in it as the dataset grows (unless crowded out)."""
    if len(rows) <= n:
        return rows
    key = rows.image_id.map(lambda i: sample_key(i, seed))
    return rows.loc[key.sort_values(kind="stable").index[:n]].sort_index()


def sample_key(image_id: str, seed: int) -> int:
    """An image's place in a seeded sample (this one, the shift test's): a hash of its content hash, so it
    keeps its place as the dataset grows."""
    return zlib.crc32(f"{seed}/{image_id}".encode())


def sample_rows(
    folder: str, image_ids: list[str], column: str, shape: tuple[int, ...], pin: bool = False
) -> ShardedRows:
    """The rows of a fixed sample (`validation_sample`), read once per process while the committed shards
    under `folder` stay the same. Every candidate of a run is scored on the same samples, and a sample of a
    large dataset lies in every shard (2,000 of 100,000 target images touch all 25): read per candidate, each
    one's scoring would read the whole target again. Kept in `state.SAMPLES` (its docstring gives the bound
    and when a copy is stale); a sample larger than its bound is streamed and not kept."""
    shards = committed_shards(folder)
    key, version = (folder, column, tuple(shape), tuple(image_ids)), tuple(s.data_uri for s in shards)
    if (kept := state.SAMPLES.get(key, version)) is not None:
        return kept
    limit = state.SAMPLES.max_size
    rows = ShardedRows(folder, image_ids, column, shape, resident_bytes=limit, pin=pin, shards=shards)
    if rows.resident_bytes:
        state.SAMPLES.put(key, rows, version)
    return rows


def image_rows(
    cache_uri: str | None, df: pd.DataFrame, size: int, data_config: dict | None, num_workers: int, **kw
) -> Rows:
    """`df`'s images as a model of input `size` reads them: from the training-image cache at `cache_uri`
    (`ShardedRows`, `kw` passed on), else decoded here, all at once, with the backbone's `data_config`. The
    one path for training (`ImageData`) and for running a saved model (`adapt.inference.model_rows`)."""
    if cache_uri is not None:
        return ShardedRows(cache_uri, df.image_id.tolist(), "pixels", (3, size, size), **kw)
    from adaptflow.adapt.images import load_images

    return TensorRows(load_images(df.uri.tolist(), data_config, num_workers))


def embedding_rows(features_uri: str, df: pd.DataFrame, dim: int, **kw) -> ShardedRows:
    """`df`'s rows of the feature store at `features_uri` (`ShardedRows`, `kw` passed on)."""
    return ShardedRows(features_uri, df.image_id.tolist(), "embedding", (dim,), **kw)


def shared_features(
    features: ExtractionPlan, train: pd.DataFrame, val: pd.DataFrame, target: pd.DataFrame
) -> dict[str, torch.Tensor]:
    """The frozen backbone's features of the validation samples: the same for every candidate of a run,
    a space no candidate shaped (`validators.iwa`)."""

    def load(rows: pd.DataFrame) -> torch.Tensor:
        sample = sample_rows(features.features_uri, rows.image_id.tolist(), "embedding", (features.dim,))
        return sample.gather(np.arange(len(sample))).float()

    return {"shared_source_train": load(train), "shared_source": load(val), "shared_target": load(target)}


class FeatureData:
    """Cached backbone features from the feature store: identity featurizer, `adapt.train.fit`."""

    def __init__(self, features: ExtractionPlan, device: str):
        self.features, self.device = features, device
        self.featurizer, self.dim, self.image_size = nn.Identity(), features.dim, None

    def rows(self, df: pd.DataFrame, draws: int | None = None) -> Rows:
        """`df`'s rows, read whole only if `draws` (how many the caller reads at most) covers them."""
        return embedding_rows(self.features.features_uri, df, self.dim, draws=draws)

    def sample(self, df: pd.DataFrame) -> Rows:
        """A fixed validation sample's rows (`sample_rows`)."""
        return sample_rows(self.features.features_uri, df.image_id.tolist(), "embedding", (self.dim,))

    def fit(self, algorithm, x, y, xt, loop: Loop):
        """`adapt.train.fit`; the time budget guards end-to-end training only."""
        from adaptflow.adapt.train import fit

        return fit(algorithm, x, y, xt, replace(loop, time_budget_s=None))

    def infer(self, algorithm, rows: Rows):
        from adaptflow.adapt.train import infer

        return infer(algorithm, rows)


class ImageData:
    """End to end: the backbone is the featurizer, images read from the training-image cache (decoded
    here only if a caller planned extraction without it)."""

    def __init__(self, spec: CandidateSpec, cfg: Config, features: ExtractionPlan, device: str):
        from adaptflow.adapt.images import Tuning, image_featurizer

        # a spec without a size (written by hand, or before sizes were planned): the configured one
        size = spec.image_size or cfg.adapt.image_size or cfg.backbone.image_size
        backbone = cfg.backbone.model_copy(update={"image_size": size})
        self.featurizer, self.dim, self.data_config = image_featurizer(backbone)
        self.image_size = int(self.data_config["input_size"][-1])
        cache = features.cache
        self.cache = cache if cache is not None and cache.size == self.image_size else None
        self.device, self.num_workers = device, cfg.extract.num_workers
        self.pin = str(device).startswith("cuda")
        # planned per device (`candidates.plan_candidates`); a spec written before strategies were planned
        # trained with the configured one, then "full"
        strategy = spec.strategy or cfg.adapt.strategy or "full"
        self.tuning = Tuning(strategy=strategy, frozen_fraction=cfg.adapt.frozen_fraction)

    def rows(self, df: pd.DataFrame, draws: int | None = None) -> Rows:
        """`df`'s rows, read whole only if `draws` (how many the caller reads at most) covers them."""
        cache = self.cache.uri if self.cache is not None else None
        return image_rows(cache, df, self.image_size, self.data_config, self.num_workers, pin=self.pin, draws=draws)

    def sample(self, df: pd.DataFrame) -> Rows:
        """A fixed validation sample's rows (`sample_rows`), from the training-image cache when there is one."""
        if self.cache is None:
            return self.rows(df)
        s = self.image_size
        return sample_rows(self.cache.uri, df.image_id.tolist(), "pixels", (3, s, s), pin=self.pin)

    def fit(self, algorithm, x, y, xt, loop: Loop):
        from adaptflow.adapt.images import fit_images

        return fit_images(algorithm, x, y, xt, loop, self.tuning, device=self.device)

    def infer(self, algorithm, rows: Rows):
        from adaptflow.adapt.images import infer_images

        return infer_images(algorithm, rows, device=self.device)


def accuracy_on(
    rows: pd.DataFrame, logits: torch.Tensor, labels: IngestManifest | None, code: dict[str, int]
) -> float | None:
    """Target accuracy of `logits` on `rows` against labels matched by content hash; reporting only."""
    if labels is None:
        return None
    truth = read_index(labels).drop_duplicates("image_id").set_index("image_id").label
    known = rows.image_id.map(truth).map(code)
    mask = known.notna().to_numpy()
    if not mask.any():
        return None
    return float((logits.argmax(1).numpy()[mask] == known[mask].to_numpy(dtype=np.int64)).mean())


def save_outputs(uri: str, val: pd.DataFrame, logits: torch.Tensor, code: dict[str, int]) -> None:
    """Each source-validation image's label, this candidate's prediction and its probabilities: selection
    compares candidates image by image on them (`adapt.selection`), and the class-mix estimate calibrates
    a model on them (`adapt.priors`)."""
    import pyarrow as pa

    proba = logits.float().softmax(1).numpy().astype(np.float32)
    storage.write_table(
        uri,
        pa.table(
            {
                "image_id": val.image_id.tolist(),
                "label": val.label.map(code).to_numpy(dtype=np.int32),
                "prediction": logits.argmax(1).numpy().astype(np.int32),
                "probabilities": pa.FixedSizeListArray.from_arrays(pa.array(proba.reshape(-1)), logits.shape[1]),
            }
        ),
    )


def save_embedding_sample(uri: str, source: torch.Tensor, target: torch.Tensor, seed: int, n: int = 500) -> None:
    """A small seeded sample of the model's own features per domain, for the report's t-SNE."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    parts = []
    for domain, z in (("source", source), ("target", target)):
        idx = np.sort(rng.choice(len(z), size=min(n, len(z)), replace=False))
        parts.append(pd.DataFrame({"domain": domain, "embedding": list(z[idx].float().numpy())}))
    df = pd.concat(parts)
    storage.write_table(uri, pa.table({"domain": df.domain.tolist(), "embedding": [e.tolist() for e in df.embedding]}))
