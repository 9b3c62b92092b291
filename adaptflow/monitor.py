"""Scheduled runs: has the target moved away from the champion's data, and is the champion still good
on it? Both answers are label-free; either one sends the run on to retraining.

- the **shift test** compares frozen-backbone embeddings of the new target batch with those of the
  target images the champion was trained with (an MMD permutation test, `adaptflow.shift`);
- the **champion's scores** are its validator scores re-measured on this run's data; its selection
  score falling `monitor.score_drop` below the one it was registered with counts as degradation.

The same `score_model` measures the challenger, so the promotion gate compares two models on one data set.
"""

from __future__ import annotations

import numpy as np
import torch

from adaptflow import registry, storage
from adaptflow.adapt import validators
from adaptflow.adaptation import SelectionManifest, shared_features, validation_sample
from adaptflow.config import Config, MonitorConfig
from adaptflow.errors import DatasetError, StoreError
from adaptflow.features import ExtractionPlan, load_features
from adaptflow.manifests import IngestManifest, Manifest
from adaptflow.models import infer, load_model
from adaptflow.pipeline import read_index
from adaptflow.runs import run_uri
from adaptflow.shift import ShiftTest, domain_classifier_auc, mmd_permutation_test


class Champion(Manifest):
    """The registry's champion and the target images it was trained with (the shift reference)."""

    version: int
    model_uri: str
    run_id: str
    selection_score: float | None  # as registered
    reference_index_uri: str | None  # its run's target index; None if that run's summary is gone


class ModelScores(Manifest):
    """One model's validator scores on one run's data (source validation + target batch)."""

    model_uri: str
    method: str = "head"  # the model card's: what it optimised decides which validators may judge it
    scores: dict[str, float]
    selection_score: float | None  # the policy's validators that may judge it, averaged (`judged_by`)
    target_accuracy: float | None  # with target labels (reporting and the gate only)
    collapsed: bool
    n_target: int


class ShiftManifest(Manifest):
    champion_version: int
    test: ShiftTest | None  # None when the champion's reference images are gone
    domain_auc: float | None
    champion: ModelScores | None  # None when the champion cannot read this run's data (other classes)
    score_drop: float | None  # registered selection score minus today's; positive = worse
    shift_detected: bool
    degraded: bool
    retrain: bool
    reason: str


def find_champion(store: str) -> Champion | None:
    if registry.CHAMPION not in registry.aliases(store):
        return None
    mv = registry.resolve(store, registry.CHAMPION)
    run = run_uri(store, mv.run_id)
    summary_uri = storage.join(run, "summary.json")
    reference = None
    if storage.exists(summary_uri):  # its target index, where it is now (the store may have moved since)
        summary = storage.read_json(summary_uri)
        reference = storage.rebase(summary["datasets"]["target"]["index_uri"], summary["run_uri"], run)
    if reference is not None and not storage.exists(reference):
        reference = None
    return Champion(
        version=mv.version,
        model_uri=mv.model_uri,
        run_id=mv.run_id,
        selection_score=mv.metrics.get("selection_score"),
        reference_index_uri=reference,
    )


def score_model(
    model_uri: str,
    source: IngestManifest,
    target: IngestManifest,
    target_labels: IngestManifest | None,
    features: ExtractionPlan,
    policy: list[str],
    seed: int = 0,
    samples: int = 2000,
) -> ModelScores:
    """Validator scores of a saved model on this run's validation samples (`adaptation.validation_sample`:
    at most `samples` source-validation and target images, the samples every candidate was scored on)."""
    model, card = load_model(model_uri)
    if card.classes != source.classes:
        raise StoreError(
            f"the model at {model_uri} predicts classes {card.classes}, this run's source has {source.classes}"
        )
    src, tgt = read_index(source), read_index(target)
    val = src[src.split == "val"]
    if val.empty:
        val = src[src.split == "train"]
    val, train, tgt_sample = (validation_sample(rows, samples, seed) for rows in (val, src[src.split == "train"], tgt))
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
    return ModelScores(
        model_uri=model_uri,
        method=card.method,
        scores=scores,
        selection_score=registry.selection_score(scores, judged_by(policy, card.method)),
        target_accuracy=accuracy,
        collapsed=validators.is_collapsed(target_logits, len(card.classes)),
        n_target=len(tgt),
    )


def check_shift(
    champion: Champion,
    target: IngestManifest,
    features: ExtractionPlan,
    scores: ModelScores | None,
    cfg: MonitorConfig,
    seed: int = 0,
) -> ShiftManifest:
    """Test the target batch against the champion's reference images, and the champion's score drop."""
    test = auc = None
    untested = None  # why there is no test, when there is none
    if champion.reference_index_uri is None:
        untested = f"the champion's reference images (run {champion.run_id}) are gone: retraining"
    else:
        reference_ids = storage.read_table(champion.reference_index_uri, columns=["image_id"])["image_id"].to_pylist()
        batch_ids = read_index(target).image_id.tolist()
        ref = _normalised(load_features(features.features_uri, reference_ids))
        new = _normalised(load_features(features.features_uri, batch_ids))
        try:
            test = mmd_permutation_test(ref, new, cfg.permutations, seed, cfg.max_samples, cfg.alpha)
            auc = domain_classifier_auc(ref, new, seed, cfg.max_samples)
        except DatasetError as e:  # e.g. a batch of 3 images: too few to test; the champion's scores decide
            untested = f"no shift test ({e})"
    drop = None
    if scores is not None and champion.selection_score is not None:
        drop = champion.selection_score - scores.selection_score
    shifted = test is not None and test.detected
    degraded = scores is None or (drop is not None and drop > cfg.score_drop) or scores.collapsed
    reasons = []
    if untested:
        reasons.append(untested)
    else:
        reasons.append(
            f"MMD² {test.statistic:.4f}, p = {test.p_value:.3f} "
            f"{'<' if shifted else '>='} {cfg.alpha} (domain AUC {auc:.2f})"
        )
    if scores is None:
        reasons.append("the champion cannot score this data (its classes differ)")
    elif drop is not None:
        reasons.append(
            f"champion selection score {scores.selection_score:.3f} vs {champion.selection_score:.3f} at "
            f"registration (drop {drop:+.3f}, limit {cfg.score_drop})"
        )
    if scores is not None and scores.collapsed:
        reasons.append("the champion's target predictions collapsed")
    retrain = champion.reference_index_uri is None or shifted or degraded
    verdict = "shift detected" if shifted else ("champion degraded" if degraded else "no shift")
    return ShiftManifest(
        champion_version=champion.version,
        test=test,
        domain_auc=auc,
        champion=scores,
        score_drop=drop,
        shift_detected=shifted,
        degraded=degraded,
        retrain=retrain,
        reason=f"{verdict}: " + "; ".join(reasons),
    )


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: the test compares directions of embeddings, not their norms."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def judged_by(policy: list[str], *methods: str) -> list[str]:
    """The policy's validators that none of `methods` optimised (`Algorithm.objectives`; a head none)."""
    from adaptflow.adapt.algorithms import ALGORITHMS

    optimised = set().union(*(ALGORITHMS[m].objectives for m in methods if m in ALGORITHMS))
    return [v for v in policy if v not in optimised]


class PromotionManifest(Manifest):
    """The selected model registered as `version`, and what the gate decided for it. A low-confidence pick
    with no champion to keep leaves the champion to the source-only `stand_in_version`."""

    version: int
    promoted: bool
    reason: str
    champion_version: int | None  # before the decision
    champion_after: int | None
    compared: dict
    stand_in_version: int | None = None


def register_and_gate(
    store: str,
    run_id: str,
    selection: SelectionManifest,
    datasets: dict[str, IngestManifest],
    features: ExtractionPlan,
    cfg: Config,
    challenger: ModelScores,
    champion: ModelScores | None,
    source_test_accuracy: float | None,
) -> PromotionManifest:
    """Register the run's selected model, then let the gate compare it with the champion re-scored on the
    same data (`champion`; None: the champion's stored metrics, or no champion at all), on the validators
    that neither optimised. A pick selection is not confident about never replaces a champion
    (`promotion.allow_low_confidence` lifts this); with no champion yet, the source-only reference is
    registered and promoted in its place."""
    lineage = registry.Lineage(
        dataset_snapshot=registry.dataset_snapshot({d: m.fingerprint for d, m in datasets.items()}),
        extractor_fingerprint=features.fingerprint,
        config_hash=cfg.fingerprint(),
        code_version=registry.code_version(),
    )
    policy, margin = cfg.adapt.policy, cfg.promotion.margin
    version = registry.register(
        store, challenger.model_uri, run_id, lineage, _metrics(challenger, source_test_accuracy), challenger.method
    )
    held = (
        None if selection.confident or cfg.promotion.allow_low_confidence else f"low confidence: {selection.confidence}"
    )
    rescored = ours = None
    if champion is not None:
        common = judged_by(policy, challenger.method, champion.method)
        rescored, ours = _metrics(champion, None, common), _metrics(challenger, source_test_accuracy, common)
    decision = registry.gate(store, version.version, rescored, margin, challenger_metrics=ours, hold=held)
    stand_in = None
    if held and decision.champion_version is None and selection.reference_model_uri:
        reference = score_model(
            selection.reference_model_uri,
            datasets["source"],
            datasets["target"],
            datasets.get("target_labels"),
            features,
            policy,
            cfg.seed,
            cfg.adapt.validation_samples,
        )
        stand_in = registry.register(
            store, reference.model_uri, run_id, lineage, _metrics(reference, None), reference.method
        ).version
        registry.gate(store, stand_in, None, margin)  # no champion: promoted
    return PromotionManifest(
        version=version.version,
        promoted=decision.promoted,
        reason=decision.reason,
        champion_version=decision.champion_version,
        champion_after=registry.aliases(store).get(registry.CHAMPION),
        compared=decision.compared,
        stand_in_version=stand_in,
    )


def _metrics(
    s: ModelScores, source_test_accuracy: float | None, over: list[str] | None = None
) -> dict[str, float | None]:
    """Registry metrics; `over`: the selection score over these validators instead of the model's own."""
    score = s.selection_score if over is None else registry.selection_score(s.scores, over)
    return {
        "selection_score": score,
        "source_val_accuracy": s.scores["source_val_acc"],
        "target_accuracy": s.target_accuracy,
        "source_test_accuracy": source_test_accuracy,
    }
