"""Gather a run's results into the dict `adaptflow.report.html` renders as one self-contained HTML page."""

from __future__ import annotations

import numpy as np

from adaptflow.adapt import domain_gap, priors
from adaptflow.data.ingest import read_index
from adaptflow.extract.features import load_features
from adaptflow.manifests import (
    CandidateManifest,
    EvaluationManifest,
    ExtractionPlan,
    IngestManifest,
    ReportManifest,
    RunData,
    SelectionManifest,
)
from adaptflow.report.html import embed_2d, write_report
from adaptflow.report.tables import fmt
from adaptflow.store import storage

_GAP_SAMPLE = 2000  # images per domain for the before-adaptation gap: PAD and MMD need no more


def write_run_report(
    run_uri: str,
    data: RunData,
    candidates: list[CandidateManifest],
    selection: SelectionManifest,
    evaluation: EvaluationManifest,
    baseline: EvaluationManifest,
    seed: int = 0,
) -> ReportManifest:
    """Write `{run}/report.html`."""
    source, target, features = data.source, data.target, data.features
    before_s, before_t = _frozen_sample(source, features, seed), _frozen_sample(target, features, seed)
    gap = {
        "before": {
            "proxy_a_distance": domain_gap.proxy_a_distance(before_s, before_t, seed=seed),
            "mmd": domain_gap.mmd_distance(before_s, before_t, seed=seed),
        }
    }
    embeddings = {"before": embed_2d(before_s, before_t, seed=seed)}
    if selection.index >= 0:
        chosen = candidates[selection.index]
        gap["after"] = chosen.domain_gap
        after = storage.read_table(chosen.embedding_uri).to_pandas()
        z = {d: np.stack(after[after.domain == d].embedding.to_numpy()) for d in ("source", "target")}
        embeddings["after"] = embed_2d(z["source"], z["target"], seed=seed)
    metrics = storage.read_json(evaluation.metrics_uri)
    report = {
        "run_id": run_uri.rstrip("/").rsplit("/", 1)[-1],
        "summary": {
            "source images": source.n_images,
            "target images": target.n_images,
            "rejected": source.n_rejected + target.n_rejected,
            "classes": len(source.classes),
            "selected model": selection.name,
            "source-only head, target accuracy": _target_accuracy(baseline),
            "selected model, target accuracy": _target_accuracy(evaluation),
        },
        "candidates": [
            {
                "name": c.spec.name,
                "method": c.spec.method,
                "mode": c.spec.mode,
                "hparams": c.spec.hparams,
                "scores": c.scores,
                "collapsed": c.collapsed,
                "target_accuracy": c.target_accuracy,
                "steps": c.steps,
                "total_steps": c.total_steps,
                "stopped_at_rung": c.stopped_at_rung,
                "seconds": c.seconds,
            }
            for c in candidates
        ],
        "selection": {
            "index": selection.index,
            "reason": selection.reason,
            "policy": selection.policy,
            "oracle_index": selection.oracle_index,
            "ranks": selection.ranks,
            "confident": selection.confident,
            "confidence": selection.confidence,
            "reference_index": selection.reference_index,
        },
        "metrics": {"source_test": metrics["source_test"], "target": metrics.get("target")},
        "class_mix": _class_mix(selection, metrics.get("target")),
        "domain_gap": gap,
        "embeddings": embeddings,
        "curves": {c.spec.name: c.curve for c in candidates},
    }
    uri = storage.join(run_uri, "report.html")
    write_report(uri, report)
    return ReportManifest(report_uri=uri)


def _class_mix(selection: SelectionManifest, target_metrics: dict | None) -> dict | None:
    """The estimate for the page, with the true shares when target labels were given (scoring only)."""
    mix = selection.class_mix
    if mix is None:
        return None
    true = None
    if target_metrics and target_metrics.get("n"):
        support = [target_metrics["per_class"].get(c, {}).get("support", 0) for c in mix.classes]
        true = [s / max(sum(support), 1) for s in support]
    return {**mix.model_dump(exclude={"work", "schema_version"}), "true": true, "label_shift": priors.label_shift(mix)}


def _frozen_sample(dataset: IngestManifest, features: ExtractionPlan, seed: int) -> np.ndarray:
    ids = read_index(dataset).image_id
    ids = ids.sample(min(len(ids), _GAP_SAMPLE), random_state=seed).tolist()
    return load_features(features.features_uri, ids)


def _target_accuracy(evaluation: EvaluationManifest) -> str:
    return fmt(evaluation.target.accuracy if evaluation.target else None, missing="n/a (no target labels)")
