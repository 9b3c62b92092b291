"""Domain adaptation in a run: plan candidates, train each, and select one without target labels.

A candidate is (method, mode, hyperparameters, seed). Mode `features` adapts a small bottleneck and
classifier on cached backbone features (seconds on a CPU); mode `images` trains through the backbone
(the large gains; minutes on a CPU at small image sizes). Each candidate's folder holds the model
(`weights.safetensors`, `model.json`), its target predictions, and `candidate.json`, written last.

Target labels, when given, are used only to report each candidate's target accuracy next to the
label-free scores; selection never reads them.
"""

from __future__ import annotations

import math
import threading
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from adaptflow import storage
from adaptflow.adapt import domain_gap, selection, validators
from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.hparams import candidate_hparams
from adaptflow.config import Config
from adaptflow.errors import DatasetError
from adaptflow.evaluate import classification_metrics
from adaptflow.features import ExtractionPlan, load_features
from adaptflow.manifests import IngestManifest, Manifest
from adaptflow.models import ModelCard, infer_features, predictions_table, save_model
from adaptflow.pipeline import ModelManifest, read_index, score_predictions

# End to end on a CPU: the baseline and the two strongest in benchmarks/adaptation.py on the demo shift.
CPU_IMAGE_METHODS = ["source_only", "dann", "cdan"]
CPU_IMAGE_SIZE = 64
CPU_IMAGE_BUDGET_S = 600.0  # per end-to-end candidate on a CPU when adapt.time_budget_s is unset
# End-to-end candidates take the whole device: two at once on 2 cores (or one GPU) only slow each other.
_IMAGE_TRAINING = threading.Lock()


class CandidateSpec(Manifest):
    name: str
    method: str
    mode: str  # "features" | "images"
    hparams: dict
    seed: int


class CandidateManifest(Manifest):
    spec: CandidateSpec
    model_uri: str
    predictions_uri: str
    outputs_uri: str | None = None  # per-image predictions on source validation (`_save_outputs`); None: older runs
    embedding_uri: str  # a small sample of the model's own features per domain, for the report
    scores: dict[str, float]  # label-free validators, higher is better
    collapsed: bool
    source_test_accuracy: float
    target_accuracy: float | None  # reporting only: needs target labels
    domain_gap: dict[str, float]  # proxy A-distance and MMD of the model's own features
    curve: list[dict]
    steps: int
    seconds: float


class SelectionManifest(Manifest):
    index: int  # into the candidates; -1: the source-only head
    name: str
    reason: str
    policy: list[str]
    model_uri: str
    oracle_index: int | None  # best target accuracy, when target labels were given
    confident: bool = True  # see adapt.selection: False when the evidence against the pick is not nil
    confidence: str = ""  # why (not), in words
    reference_index: int | None = None  # the source-only candidate a cautious run falls back to
    reference_model_uri: str | None = None
    ranks: list[float | None] = []  # each candidate's mean percentile rank (1 best); None: not ranked


def plan_candidates(cfg: Config, cuda: bool) -> list[CandidateSpec]:
    """methods x modes x hyperparameter draws x seeds. `method: auto` trains `adapt.methods` on features
    and `adapt.image_methods` end to end (by default sized to the hardware); a named method trains
    that one in both modes; `none` trains nothing (the source-only head stands alone)."""
    a = cfg.adapt
    if a.method == "none":
        return []
    if a.method == "auto":
        feature_methods = a.methods
        image_methods = a.image_methods if a.image_methods is not None else (a.methods if cuda else CPU_IMAGE_METHODS)
    else:
        feature_methods = image_methods = [a.method]
    specs = []
    for mode, methods in (("features", feature_methods), ("images", image_methods)):
        for method in methods:
            for draw in range(a.hparam_draws + 1):
                hp = candidate_hparams(method, mode, draw)
                hp.update({k: v for k, v in a.hparams.items() if k in hp})  # knobs this method has
                for seed in a.seeds:
                    name = f"{method}-{mode}" + (f"-h{draw}" if draw else "") + (f"-s{seed}" if len(a.seeds) > 1 else "")
                    specs.append(CandidateSpec(name=name, method=method, mode=mode, hparams=hp, seed=seed))
    return specs


def train_candidate(spec: CandidateSpec, source: IngestManifest, target: IngestManifest,
                    target_labels: IngestManifest | None, features: ExtractionPlan, cfg: Config,
                    out_uri: str, device: str = "cpu") -> CandidateManifest:
    start = time.perf_counter()
    classes = source.classes
    code = {c: i for i, c in enumerate(classes)}
    src, tgt = read_index(source), read_index(target)
    train, val, test = (src[src.split == s] for s in ("train", "val", "test"))
    if val.empty:
        val = train
    if train.empty:
        raise DatasetError(f"the source dataset {source.dataset_uri} has no training images")
    y_train = torch.tensor(train.label.map(code).to_numpy(), dtype=torch.long)
    torch.manual_seed(spec.seed)

    data = _IMAGES if spec.mode == "images" else _FEATURES
    featurizer, dim, load_rows, image_size = data.prepare(cfg, features)
    loaded: dict[tuple, torch.Tensor] = {}

    def load(rows: pd.DataFrame) -> torch.Tensor:
        """Each split is read (features) or decoded (images) once, though training and scoring both use it."""
        key = tuple(rows.image_id)
        if key not in loaded:
            loaded[key] = load_rows(rows)
        return loaded[key]

    batch = int(spec.hparams.get("batch_size", 32))
    steps = (cfg.adapt.feature_steps if spec.mode == "features"
             else max(1, math.ceil(cfg.adapt.image_epochs * len(train) / batch)))
    algorithm = get_algorithm(spec.method)(featurizer, dim, len(classes), spec.hparams, max_steps=steps)
    x_train, x_target = load(train), load(tgt)
    curve = data.fit(algorithm, x_train, y_train, x_target, steps, batch, spec.seed, cfg, device)

    out = {name: data.infer(algorithm, load(rows), device) for name, rows in
           (("val", val), ("train", train), ("test", test), ("target", tgt))}
    shared = shared_features(features, train, val, tgt, cfg.seed)
    inputs = validators.ValidationInputs(
        source_logits=out["val"][0], source_labels=torch.tensor(val.label.map(code).to_numpy()),
        source_features=out["val"][1], target_logits=out["target"][0], target_features=out["target"][1],
        source_train_features=out["train"][1], seed=spec.seed, **shared)
    scores = {k: float(v) for k, v in validators.score(inputs).items()}
    collapsed = validators.is_collapsed(out["target"][0], len(classes))

    card = ModelCard(kind=spec.mode, method=spec.method, hparams=spec.hparams, image_size=image_size,
                     classes=classes, config=cfg, fingerprint=features.fingerprint, dim=dim,
                     config_hash=cfg.fingerprint(), dataset_fingerprint=source.fingerprint,
                     metrics={"source_val_accuracy": scores["source_val_acc"]})
    model_uri = storage.join(out_uri, "model")
    save_model(model_uri, algorithm, card)
    predictions_uri = storage.join(out_uri, "predictions.parquet")
    storage.write_table(predictions_uri, predictions_table(tgt, out["target"][0], classes))
    test_acc = classification_metrics(test.label.map(code).to_numpy(), out["test"][0].argmax(1).numpy(),
                                      classes)["accuracy"] if len(test) else float("nan")
    target_acc = (score_predictions(predictions_uri, target_labels, classes)["accuracy"]
                  if target_labels is not None else None)
    gap = {"proxy_a_distance": domain_gap.proxy_a_distance(out["train"][1], out["target"][1], seed=spec.seed),
           "mmd": domain_gap.mmd_distance(out["train"][1], out["target"][1], seed=spec.seed)}
    embedding_uri = storage.join(out_uri, "embedding_sample.parquet")
    _save_embedding_sample(embedding_uri, out["train"][1], out["target"][1], spec.seed)
    outputs_uri = storage.join(out_uri, "outputs.parquet")
    _save_outputs(outputs_uri, val, out["val"][0], code)

    manifest = CandidateManifest(spec=spec, model_uri=model_uri, predictions_uri=predictions_uri,
                                 outputs_uri=outputs_uri, embedding_uri=embedding_uri, scores=scores,
                                 collapsed=collapsed, source_test_accuracy=test_acc, target_accuracy=target_acc,
                                 domain_gap=gap, curve=curve, steps=steps, seconds=time.perf_counter() - start)
    manifest.commit(storage.join(out_uri, "candidate.json"))
    return manifest


def select_model(head: ModelManifest, candidates: list[CandidateManifest], policy: list[str]) -> SelectionManifest:
    """The label-free pick among the candidates (`adapt.selection.select`: no candidate judged by what it
    optimised, never a collapsed one, never one less accurate on source validation than the source-only
    reference), how confident it is, and, for the report only, the oracle pick. With no candidates
    (`adapt.method: none`) the source-only head is the model."""
    if not candidates:
        return SelectionManifest(index=-1, name="head", reason="adaptation off (adapt.method: none)",
                                 policy=list(policy), model_uri=head.model_uri, oracle_index=None,
                                 confidence="no adaptation: the source-only head")
    pool = selection_candidates(candidates)
    pick = selection.select(pool, policy)
    known = [i for i, c in enumerate(candidates) if c.target_accuracy is not None]
    oracle = max(known, key=lambda i: candidates[i].target_accuracy) if known else None
    chosen = candidates[pick.index]
    return SelectionManifest(index=pick.index, name=chosen.spec.name, reason=pick.reason, policy=list(policy),
                             model_uri=chosen.model_uri, oracle_index=oracle, confident=pick.confident,
                             confidence=pick.confidence, reference_index=pick.reference, ranks=pick.scores,
                             reference_model_uri=None if pick.reference is None else candidates[pick.reference].model_uri)


def selection_candidates(candidates: list[CandidateManifest]) -> list[selection.Candidate]:
    """What `adapt.selection.select` needs of each candidate: its scores, its algorithm's objectives, and
    whether it got each source-validation image right."""
    return [selection.Candidate(name=c.spec.name, scores=c.scores, collapsed=c.collapsed,
                                objectives=get_algorithm(c.spec.method).objectives,
                                source_only=c.spec.method == "source_only", val_correct=_val_correct(c))
            for c in candidates]


def shared_features(features: ExtractionPlan, train: pd.DataFrame, val: pd.DataFrame, target: pd.DataFrame,
                    seed: int, sample: int = 2000) -> dict[str, torch.Tensor]:
    """The frozen backbone's features of the source-validation images, and of seeded samples of at most
    `sample` source-training and target images: the same for every candidate of a run (`validators.iwa`)."""
    def rows(df: pd.DataFrame, n: int | None) -> list[str]:
        ids = df.image_id if n is None or len(df) <= n else df.image_id.sample(n, random_state=seed)
        return ids.tolist()

    load = lambda ids: torch.from_numpy(load_features(features.features_uri, ids)).float()  # noqa: E731
    return {"shared_source_train": load(rows(train, sample)), "shared_source": load(rows(val, None)),
            "shared_target": load(rows(target, sample))}


def _save_outputs(uri: str, val: pd.DataFrame, logits: torch.Tensor, code: dict[str, int]) -> None:
    """Each source-validation image's label and this candidate's prediction: selection compares candidates
    image by image on them (`adapt.selection`)."""
    import pyarrow as pa

    storage.write_table(uri, pa.table({"image_id": val.image_id.tolist(),
                                       "label": val.label.map(code).to_numpy(dtype=np.int32),
                                       "prediction": logits.argmax(1).numpy().astype(np.int32)}))


def _val_correct(c: CandidateManifest) -> np.ndarray | None:
    """(Ns,) bool in image_id order, or None for a candidate written before outputs were kept."""
    if c.outputs_uri is None or not storage.exists(c.outputs_uri):
        return None
    t = storage.read_table(c.outputs_uri).to_pandas().sort_values("image_id")
    return (t.label.to_numpy() == t.prediction.to_numpy())


def _save_embedding_sample(uri: str, source: torch.Tensor, target: torch.Tensor, seed: int,
                           n: int = 500) -> None:
    """A small seeded sample of the model's own features per domain, for the report's t-SNE."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    parts = []
    for domain, z in (("source", source), ("target", target)):
        idx = np.sort(rng.choice(len(z), size=min(n, len(z)), replace=False))
        parts.append(pd.DataFrame({"domain": domain, "embedding": list(z[idx].float().numpy())}))
    df = pd.concat(parts)
    storage.write_table(uri, pa.table({"domain": df.domain.tolist(), "embedding": [e.tolist() for e in df.embedding]}))


class _Features:
    """Cached backbone features: identity featurizer, in-memory tensors, `adapt.train.fit`."""

    @staticmethod
    def prepare(cfg: Config, features: ExtractionPlan):
        def load(rows: pd.DataFrame) -> torch.Tensor:
            return torch.from_numpy(load_features(features.features_uri, rows.image_id.tolist()))

        return nn.Identity(), features.dim, load, None

    @staticmethod
    def fit(algorithm, x, y, xt, steps, batch, seed, cfg, device):
        from adaptflow.adapt.train import fit

        return fit(algorithm.to(device), x, y, xt, steps=steps, batch_size=batch, seed=seed)

    @staticmethod
    def infer(algorithm, x, device):
        return infer_features(algorithm.cpu(), x)


class _Images:
    """End to end: the backbone is the featurizer, images decoded once into uint8 tensors."""

    @staticmethod
    def prepare(cfg: Config, features: ExtractionPlan):
        from adaptflow.adapt.images import image_featurizer, load_images

        size = cfg.adapt.image_size or (None if torch.cuda.is_available() else CPU_IMAGE_SIZE)
        featurizer, dim, data_config = image_featurizer(cfg.backbone.model_copy(update={"image_size": size}))

        def load(rows: pd.DataFrame) -> torch.Tensor:
            return load_images(rows.uri.tolist(), data_config, cfg.extract.num_workers)

        return featurizer, dim, load, data_config["input_size"][-1]

    @staticmethod
    def fit(algorithm, x, y, xt, steps, batch, seed, cfg, device):
        from adaptflow.adapt.images import fit_images

        with _IMAGE_TRAINING:
            return fit_images(algorithm.to(device), x, y, xt, steps=steps, batch_size=batch, seed=seed,
                              device=device, strategy=cfg.adapt.strategy, time_budget_s=_image_budget(cfg, device))

    @staticmethod
    def infer(algorithm, x, device):
        from adaptflow.adapt.images import infer_images

        return infer_images(algorithm, x, device=device)


def _image_budget(cfg: Config, device: str) -> float | None:
    if cfg.adapt.time_budget_s is not None:
        return cfg.adapt.time_budget_s
    return None if device.startswith("cuda") else CPU_IMAGE_BUDGET_S


_FEATURES, _IMAGES = _Features(), _Images()
