"""The champion on this run's data: the registry's champion and the target images it was trained with
(`find_champion`), and any saved model's label-free validator scores re-measured on this run's images
(`score_model`). Its selection score falling `monitor.score_drop` below the one it was registered with
counts as degradation (`adaptflow.monitor.shift.check_shift`); the same `score_model` measures the challenger,
so the promotion gate (`adaptflow.monitor.gate`) compares two models on one data set."""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch

from adaptflow.adapt import priors, validators
from adaptflow.adapt.inference import infer, load_model
from adaptflow.adapt.samples import shared_features, validation_sample
from adaptflow.data.ingest import read_index
from adaptflow.errors import StoreError
from adaptflow.manifests import (
    Champion,
    ClassMix,
    ExtractionPlan,
    IngestManifest,
    ModelScores,
    RunData,
)
from adaptflow.models import registry
from adaptflow.monitor import memo
from adaptflow.store import storage
from adaptflow.store.layout import run_uri


def find_champion(store: str) -> Champion | None:
    if registry.CHAMPION not in registry.aliases(store):
        return None
    mv = registry.resolve(store, registry.CHAMPION)
    run = run_uri(store, mv.run_id)
    summary_uri = storage.join(run, "summary.json")
    reference = fingerprint = labels = None
    if storage.exists(summary_uri):  # its target index, where it is now (the store may have moved since)
        summary = storage.read_json(summary_uri)
        reference = storage.rebase(summary["datasets"]["target"]["index_uri"], summary["run_uri"], run)
        fingerprint = summary["datasets"]["target"].get("fingerprint")
        labels = summary["datasets"].get("target_train_labels", {}).get("fingerprint")
    if reference is not None and not storage.exists(reference):
        reference = fingerprint = None
    return Champion(
        version=mv.version,
        model_uri=mv.model_uri,
        run_id=mv.run_id,
        selection_score=mv.metrics.get("selection_score"),
        reference_index_uri=reference,
        reference_fingerprint=fingerprint,
        labels_fingerprint=labels,
    )


def score_model(
    model_uri: str,
    data: RunData,
    policy: list[str],
    seed: int = 0,
    samples: int = 2000,
    keep_in: str | None = None,
) -> ModelScores:
    """Validator scores of a saved model on this run's validation samples (`adapt.samples.validation_sample`:
    at most `samples` source-validation and target images, the samples every candidate was scored on).
    `keep_in`: a store whose monitor keeps them, for the nights this model is champion (`score_champion`)."""
    return _measured(model_uri, data, _draw(data, samples, seed), policy, seed, samples, keep_in)


def _measured(
    model_uri: str, data: RunData, drawn: _Drawn, policy: list[str], seed: int, samples: int, keep_in: str | None
) -> ModelScores:
    source, target, features = data.source, data.target, data.features
    scores = _score(model_uri, data, drawn, policy, seed)
    if keep_in:
        key = _scores_key(model_uri, features, policy, seed, samples)
        memo.keep_scores(keep_in, key, scores, drawn.source_ids, drawn.target.image_id.tolist())
        memo.keep_seen(
            keep_in, _seen_key(key, source, target), scores.model_copy(update={"target_accuracy": None, "reused": 1.0})
        )
        # what `reference_mix` measures once this run's target is a champion's reference
        key = _mix_key(model_uri, target.index_uri, features, seed, samples)
        memo.keep_reference_mix(keep_in, key, (scores.predicted_mix, scores.n_scored))
    return scores


def score_champion(
    store: str,
    champion: Champion,
    data: RunData,
    policy: list[str],
    seed: int = 0,
    samples: int = 2000,
    reuse: float = 0.95,
) -> ModelScores:
    """`score_model` of the champion, or the scores an earlier run measured (`memo.scores`) when this run's
    samples are nearly the ones they were measured on: the same source samples and at least `reuse` of the
    target sample (a night's new images are tested directly by the shift test). With target labels it
    always measures (the accuracy is this run's)."""
    source, target = data.source, data.target
    if data.target_labels is not None:
        return _measured(champion.model_uri, data, _draw(data, samples, seed), policy, seed, samples, store)
    key = _scores_key(champion.model_uri, data.features, policy, seed, samples)
    seen = memo.seen(store, _seen_key(key, source, target))  # these very datasets: their indexes stay unread
    if seen is not None and (seen.reused or 1.0) >= reuse:
        return seen
    drawn = _draw(data, samples, seed)
    kept = memo.scores(store, key, drawn.source_ids, drawn.target.image_id.tolist(), reuse)
    if kept is None:  # measured, and kept (`_measured`)
        return _measured(champion.model_uri, data, drawn, policy, seed, samples, store)
    scores = kept.model_copy(update={"n_target": drawn.n_target})
    memo.keep_seen(store, _seen_key(key, source, target), scores)
    return scores


def _scores_key(model_uri: str, features: ExtractionPlan, policy: list[str], seed: int, samples: int) -> str:
    return memo.key(model_uri, features.fingerprint, sorted(policy), seed, samples)


def _seen_key(scores_key: str, source: IngestManifest, target: IngestManifest) -> str:
    """Scores under `scores_key` on these two datasets (their fingerprints: image ids, labels, splits)."""
    return memo.key(scores_key, source.fingerprint, target.fingerprint)


def _mix_key(model_uri: str, index_uri: str, features: ExtractionPlan, seed: int, samples: int) -> str:
    return memo.key(model_uri, index_uri, features.fingerprint, seed, samples)


class _Drawn(NamedTuple):
    val: pd.DataFrame
    train: pd.DataFrame
    target: pd.DataFrame
    n_target: int

    @property
    def source_ids(self) -> list[str]:
        return [*self.val.image_id, "/", *self.train.image_id]


def _draw(data: RunData, samples: int, seed: int) -> _Drawn:
    """This run's validation samples: source validation (source train when there is none), source train and
    target, each at most `samples` (`validation_sample`)."""
    src, tgt = read_index(data.source), read_index(data.target)
    val = src[src.split == "val"]
    if val.empty:
        val = src[src.split == "train"]
    val, train, tgt_sample = (validation_sample(rows, samples, seed) for rows in (val, src[src.split == "train"], tgt))
    return _Drawn(val, train, tgt_sample, len(tgt))


def _score(model_uri: str, data: RunData, drawn: _Drawn, policy: list[str], seed: int) -> ModelScores:
    source, target_labels, features = data.source, data.target_labels, data.features
    model, card = load_model(model_uri)
    if card.classes != source.classes:
        raise StoreError(
            f"the model at {model_uri} predicts classes {card.classes}, this run's source has {source.classes}"
        )
    val, train, tgt_sample = drawn.val, drawn.train, drawn.target
    code = {c: i for i, c in enumerate(card.classes)}
    source_logits, source_features = infer(model, card, val, features)
    target_logits, target_features = infer(model, card, tgt_sample, features)
    inputs = validators.ValidationInputs(
        source_logits=source_logits,
        source_labels=torch.tensor(val.label.map(code).to_numpy()),
        source_features=source_features,
        target_logits=target_logits,
        target_features=target_features,
        seed=seed,
        **shared_features(features, train, val, tgt_sample),
    )
    # the policy's validators, and source_val_acc, which the registry records as source_val_accuracy
    scores = validators.score(inputs, sorted({"source_val_acc", *policy}))
    accuracy = None
    if target_labels is not None:
        truth = read_index(target_labels).drop_duplicates("image_id").set_index("image_id").label
        labels = tgt_sample.image_id.map(truth)
        known = labels.isin(code).to_numpy()
        if known.any():
            predicted = target_logits.argmax(1).numpy()[known]
            accuracy = float((predicted == labels[known].map(code).to_numpy()).mean())
    labels = torch.tensor(val.label.map(code).to_numpy())
    estimate = priors.estimate(source_logits, labels, target_logits, len(card.classes), seed=seed)
    mix = ClassMix(classes=card.classes, model=card.method, **estimate._asdict())
    return ModelScores(
        model_uri=model_uri,
        method=card.method,
        scores=scores,
        selection_score=registry.selection_score(scores, judged_by(policy, card.method)),
        target_accuracy=accuracy,
        collapsed=validators.is_collapsed(target_logits, len(card.classes), mix),
        n_target=drawn.n_target,
        predicted_mix=priors.shares(target_logits.argmax(1).numpy(), len(card.classes)),
        n_scored=len(tgt_sample),
        class_mix=mix,
    )


def reference_mix(
    champion: Champion, features: ExtractionPlan, seed: int = 0, samples: int = 2000, store: str | None = None
) -> tuple[list[float], int] | None:
    """The champion's predicted class shares on (a seeded sample of at most `samples` of) the target images
    it was trained with, and how many it predicted: what a class-mix change on a new batch is measured
    against. None when those images are gone. With `store`, measured once per champion and kept there."""
    if champion.reference_index_uri is None or not storage.exists(champion.reference_index_uri):
        return None
    key = _mix_key(champion.model_uri, champion.reference_index_uri, features, seed, samples)
    kept = memo.reference_mix(store, key) if store else None
    if kept is not None:
        return kept
    model, card = load_model(champion.model_uri)
    rows = validation_sample(storage.read_table(champion.reference_index_uri).to_pandas(), samples, seed)
    logits, _ = infer(model, card, rows, features)
    found = priors.shares(logits.argmax(1).numpy(), len(card.classes)), len(rows)
    if store:
        memo.keep_reference_mix(store, key, found)
    return found


def judged_by(policy: list[str], *methods: str) -> list[str]:
    """The policy's validators that none of `methods` optimised (`Algorithm.objectives`; a head none)."""
    from adaptflow.adapt.algorithms import ALGORITHMS

    optimised = set().union(*(ALGORITHMS[m].objectives for m in methods if m in ALGORITHMS))
    return [v for v in policy if v not in optimised]
