"""A run's folder and its summary.

{store}/runs/{run_id}/ingest/{domain}/   index.parquet, rejects.parquet, manifest.json
{store}/runs/{run_id}/candidates/{name}/ each adaptation candidate (`adaptflow.adaptation`)
{store}/runs/{run_id}/baseline/          the source-only head's predictions and metrics.json
{store}/runs/{run_id}/predictions.parquet
{store}/runs/{run_id}/metrics.json
{store}/runs/{run_id}/report.html
{store}/runs/{run_id}/summary.json       written last: the run's commit
{store}/models/{run_id}/                 the source-only head: weights.safetensors, model.json, curve.json
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

from adaptflow import DEFAULT_STORE, storage  # noqa: F401  (DEFAULT_STORE: re-exported, defined in the package)
from adaptflow.accounting import stage_stats
from adaptflow.adaptation import CandidateManifest, SelectionManifest
from adaptflow.config import Config
from adaptflow.features import ExtractionPlan, ShardResult
from adaptflow.manifests import IngestManifest, Manifest
from adaptflow.pipeline import ModelManifest
from adaptflow.prediction import EvaluationManifest, PredictionManifest
from adaptflow.shards import CompactionManifest


def run_uri(store: str, run_id: str) -> str:
    return storage.join(store, "runs", run_id)


def ingest_uri(run: str, domain: str) -> str:
    return storage.join(run, "ingest", domain)


def model_uri(store: str, run_id: str) -> str:
    return storage.join(store, "models", run_id)


class StageClock:
    """Wall time per named stage: `with clock("extract"): ...`."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = round(self.seconds.get(stage, 0.0) + time.perf_counter() - start, 3)


class RunSummary(Manifest):
    run_id: str
    run_uri: str
    finished_at: str
    status: Literal["trained", "no_shift"] = "trained"  # no_shift: stopped after the shift check
    config: dict
    config_hash: str
    datasets: dict[str, dict]  # domain -> uri, images, rejected, classes, fingerprint, index/rejects URIs
    extraction: dict
    shift: dict | None = None  # the shift check against the champion (ShiftManifest); None without one
    promotion: dict | None = None  # the registry's decision on this run's model (PromotionManifest)
    model_uri: str = ""  # the selected model ("" when no model was trained)
    predictions_uri: str = ""
    metrics_uri: str = ""
    report_uri: str = ""
    metrics: dict = {}  # source_test and (with target labels) target: accuracy, macro_f1, n
    baseline: dict = {}  # the same for the source-only head, and its model URI
    adaptation: dict = {}  # selected candidate, reason, validator scores; every candidate's scores
    timings: dict[str, float]  # stage -> wall seconds
    stages: dict[str, dict] = {}  # stage -> seconds, images, images/s, bytes read/written, orchestration share


def summarize_stages(
    timings: dict[str, float], manifests: dict[str, list[Manifest]], datasets: dict[str, IngestManifest]
) -> dict[str, dict]:
    """Per stage: wall time from the flow's clock; bytes and task time from the `work` record each task
    put on its manifest. Images: files checked (ingest), embedded (extract), source + target images
    trained on (train), predictions written (evaluate)."""
    images = {
        "ingest": sum(m.n_images + m.n_rejected for m in datasets.values()),
        "extract": sum(m.n_rows for m in manifests.get("extract", []) if isinstance(m, ShardResult)),
        "train": sum(m.n_images for d, m in datasets.items() if d in ("source", "target")),
        "evaluate": sum(m.n_predictions for m in manifests.get("evaluate", []) if isinstance(m, PredictionManifest)),
    }
    return {
        stage: stage_stats(timings.get(stage, 0.0), [m.work for m in ms if m.work is not None], images.get(stage))
        for stage, ms in manifests.items()
        if stage in timings
    }


def summarize_extraction(
    plan: ExtractionPlan, shards: list[ShardResult], compaction: CompactionManifest | None, wall_seconds: float
) -> dict:
    """`images_per_second` is the stage's: every image embedded over the stage's wall time, planning and
    model loading included; `shard_images_per_second` counts only time inside the shard tasks. The
    orchestration share is the part of the wall time spent in neither planning, shards nor compaction."""
    extracted = sum(s.n_rows for s in shards)
    in_shards = sum(s.seconds for s in shards)
    busy = plan.seconds + in_shards + (compaction.seconds if compaction else 0.0)
    return {
        "fingerprint": plan.fingerprint,
        "features_uri": plan.features_uri,
        "images_requested": plan.n_requested,
        "images_cached": plan.n_cached,
        "images_extracted": extracted,  # embedded and/or decoded into the training-image cache
        "image_cache_uri": plan.cache.uri if plan.cache else None,
        "images_cached_pixels": plan.n_cached_pixels,
        "shards": len(shards),
        "bytes_read": sum(s.bytes_read for s in shards),
        "bytes_written": sum(s.bytes_written for s in shards),
        "shards_compacted": (compaction.shards_before - compaction.shards_after) if compaction else 0,
        "orphans_removed": compaction.orphans_removed if compaction else 0,
        "wall_seconds": round(wall_seconds, 3),
        "plan_seconds": round(plan.seconds, 3),
        "images_per_second": round(extracted / wall_seconds, 1) if extracted and wall_seconds else None,
        "shard_images_per_second": round(extracted / in_shards, 1) if extracted and in_shards else None,
        "orchestration_share": round(max(0.0, 1 - busy / wall_seconds), 4) if wall_seconds else None,
    }


def write_summary(
    run_id: str,
    run: str,
    cfg: Config,
    datasets: dict[str, IngestManifest],
    extraction: dict,
    head: ModelManifest,
    candidates: list[CandidateManifest],
    selection: SelectionManifest,
    predictions: PredictionManifest,
    evaluation: EvaluationManifest,
    baseline: EvaluationManifest,
    report_uri: str,
    timings: dict[str, float],
    stages: dict[str, dict] | None = None,
    shift: Manifest | None = None,
    promotion: Manifest | None = None,
) -> RunSummary:
    chosen = candidates[selection.index] if selection.index >= 0 else None
    summary = RunSummary(
        run_id=run_id,
        run_uri=run,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=cfg.model_dump(mode="json"),
        config_hash=cfg.fingerprint(),
        datasets=_datasets(datasets),
        extraction=extraction,
        model_uri=selection.model_uri,
        predictions_uri=predictions.predictions_uri,
        metrics_uri=evaluation.metrics_uri,
        report_uri=report_uri,
        metrics={
            "source_val_accuracy": chosen.scores["source_val_acc"] if chosen else head.val_accuracy,
            "source_test": evaluation.source_test,
            "target": evaluation.target,
        },
        baseline={
            "model_uri": head.model_uri,
            "source_val_accuracy": head.val_accuracy,
            "source_test": baseline.source_test,
            "target": baseline.target,
        },
        adaptation=_adaptation(selection, candidates),
        timings=timings,
        stages=stages or {},
        shift=_dump(shift),
        promotion=_dump(promotion),
    )
    summary.commit(storage.join(run, "summary.json"))
    return summary


def _adaptation(selection: SelectionManifest, candidates: list[CandidateManifest]) -> dict:
    """The selection, how confident it is, and every candidate; with target labels (scoring only), the
    oracle pick and the regret: oracle accuracy minus the selected candidate's."""
    chosen = candidates[selection.index] if selection.index >= 0 else None
    oracle = candidates[selection.oracle_index] if selection.oracle_index is not None else None
    reference = candidates[selection.reference_index] if selection.reference_index is not None else None
    selected_acc = chosen.target_accuracy if chosen else None
    ranks = selection.ranks or [None] * len(candidates)
    return {
        "selected": selection.name,
        "method": chosen.spec.method if chosen else "head",
        "mode": chosen.spec.mode if chosen else "features",
        "reason": selection.reason,
        "policy": selection.policy,
        "scores": chosen.scores if chosen else {},
        "confident": selection.confident,
        "confidence": selection.confidence,
        "reference": reference.spec.name if reference else None,
        "oracle": oracle.spec.name if oracle else None,
        "oracle_target_accuracy": oracle.target_accuracy if oracle else None,
        "selected_target_accuracy": selected_acc,
        "regret": (oracle.target_accuracy - selected_acc) if oracle and selected_acc is not None else None,
        "candidates": [
            {
                "name": c.spec.name,
                "method": c.spec.method,
                "mode": c.spec.mode,
                "scores": c.scores,
                "collapsed": c.collapsed,
                "rank": rank,
                "source_test_accuracy": c.source_test_accuracy,
                "target_accuracy": c.target_accuracy,
                "steps": c.steps,
                "total_steps": c.total_steps,
                "stopped_at_rung": c.stopped_at_rung,
                "seconds": round(c.seconds, 2),
                "model_uri": c.model_uri,
            }
            for c, rank in zip(candidates, ranks, strict=True)
        ],
    }


def write_no_shift_summary(
    run_id: str,
    run: str,
    cfg: Config,
    datasets: dict[str, IngestManifest],
    extraction: dict,
    shift: Manifest,
    timings: dict[str, float],
    stages: dict[str, dict],
) -> RunSummary:
    """Commit a run that stopped after the shift check: what arrived, how it was tested, nothing trained."""
    summary = RunSummary(
        run_id=run_id,
        run_uri=run,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        status="no_shift",
        config=cfg.model_dump(mode="json"),
        config_hash=cfg.fingerprint(),
        datasets=_datasets(datasets),
        extraction=extraction,
        shift=_dump(shift),
        timings=timings,
        stages=stages,
    )
    summary.commit(storage.join(run, "summary.json"))
    return summary


def _dump(m: Manifest | None) -> dict | None:
    return None if m is None else m.model_dump(mode="json", exclude={"work", "schema_version"})


def _datasets(datasets: dict[str, IngestManifest]) -> dict[str, dict]:
    return {
        d: {
            "uri": m.dataset_uri,
            "images": m.n_images,
            "rejected": m.n_rejected,
            "classes": m.classes,
            "fingerprint": m.fingerprint,
            "index_uri": m.index_uri,
            "rejects_uri": m.rejects_uri,
        }
        for d, m in datasets.items()
    }


def metrics_rows(summary: RunSummary) -> list[dict]:
    """One row per (model, scored split), for tables (Prefect artifact, command-line output)."""
    if summary.status == "no_shift":
        return []
    selected = summary.adaptation["selected"]
    rows = []
    for model, m in (("source-only head", summary.baseline), (selected, summary.metrics)):
        for split, key in (("source test", "source_test"), ("target", "target")):
            if m.get(key):
                rows.append({"model": model, "split": split, **{k: m[key][k] for k in ("accuracy", "macro_f1", "n")}})
        if selected == "head":
            break
    return rows


def headline(summary: RunSummary) -> list[str]:
    """What happened, in a line or three: the shift check, the selection, the promotion decision."""
    lines = []
    if summary.shift:
        lines.append(f"shift check against champion v{summary.shift['champion_version']}: {summary.shift['reason']}")
    if summary.status == "no_shift":
        lines.append("no retraining: the champion stays")
        return lines
    a = summary.adaptation
    lines.append(f"selected: {a['selected']} ({a['reason']})")
    if a.get("confident") is False:
        lines.append(f"low confidence: {a['confidence']}")
    stopped = [c for c in a.get("candidates", []) if c.get("stopped_at_rung") is not None]
    if stopped:
        lines.append(
            "successive halving stopped "
            + ", ".join(f"{c['name']} at step {c['steps']} of {c['total_steps']}" for c in stopped)
        )
    if a.get("regret") is not None:
        lines.append(
            f"target labels (scoring only): selected {a['selected_target_accuracy']:.3f}, oracle "
            f"{a['oracle']} {a['oracle_target_accuracy']:.3f}, regret {a['regret']:.3f}"
        )
    if summary.promotion:
        p = summary.promotion
        verdict = "promoted to champion" if p["promoted"] else "kept as challenger"
        lines.append(f"registered as v{p['version']}, {verdict}: {p['reason']}")
        if p.get("stand_in_version") is not None:
            lines.append(
                f"the source-only reference {a.get('reference')} was registered as "
                f"v{p['stand_in_version']} and promoted to champion in its place"
            )
    return lines


def render_markdown(summary: RunSummary) -> str:
    ex = summary.extraction
    lines = [f"# adaptflow run `{summary.run_id}`", ""] + [f"- {line}" for line in headline(summary)]
    if summary.status != "no_shift":
        lines += ["", "| model | split | accuracy | macro-F1 | n |", "|---|---|---|---|---|"]
        lines += [
            f"| {r['model']} | {r['split']} | {fmt(r['accuracy'])} | {fmt(r['macro_f1'])} | {r['n']} |"
            for r in metrics_rows(summary)
        ]
    lines += ["", "| dataset | images | rejected |", "|---|---|---|"]
    lines += [f"| {d} | {v['images']} | {v['rejected']} |" for d, v in summary.datasets.items()]
    lines += [
        "",
        f"Extraction: {ex['images_extracted']} images embedded, {ex['images_cached']} reused from the "
        f"feature store, {ex['images_per_second'] or '-'} images/s.",
        "",
        "| stage | seconds | images | images/s | MB read | MB written | orchestration |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {stage} | {st['seconds']:.1f} | {st['images'] or ''} | {st['images_per_second'] or ''} | "
        f"{st['bytes_read'] / 1e6:.1f} | {st['bytes_written'] / 1e6:.1f} | {_pct(st['orchestration_share'])} |"
        for stage, st in _stages(summary).items()
    ]
    if summary.status != "no_shift":
        lines += [
            "",
            f"Model: `{summary.model_uri}`  ",
            f"Predictions: `{summary.predictions_uri}`  ",
            f"Report: `{summary.report_uri}`",
        ]
    return "\n".join(lines)


def fmt(x: float | None, spec: str = ".3f", missing: str = "") -> str:
    """A number for a text table; `missing` stands for None."""
    return missing if x is None else format(x, spec)


def _short(validator: str) -> str:
    """A column title for a validator: `source_val_acc` is long."""
    return {"source_val_acc": "src val"}.get(validator, validator)


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


_STAGE_ORDER = ("ingest", "extract", "monitor", "train", "evaluate", "promote")


def _stages(summary: RunSummary) -> dict[str, dict]:
    """Per-stage statistics in pipeline order (JSON keeps keys sorted); summaries written before they
    existed have wall times only."""
    empty = {
        "images": None,
        "images_per_second": None,
        "bytes_read": 0,
        "bytes_written": 0,
        "orchestration_share": None,
    }
    stages = summary.stages or {stage: {**empty, "seconds": sec} for stage, sec in summary.timings.items()}
    rank = {stage: i for i, stage in enumerate(_STAGE_ORDER)}
    return dict(sorted(stages.items(), key=lambda kv: rank.get(kv[0], len(rank))))


def render_table(summary: RunSummary) -> str:
    """A plain-text report for the terminal: accuracy, images processed, time per stage."""
    ex = summary.extraction
    a = summary.adaptation
    lines = [f"adaptflow run {summary.run_id}", *headline(summary)]
    if metrics_rows(summary):
        lines += ["", f"{'model':<24}{'split':<13}{'accuracy':>10}{'macro-F1':>10}{'n':>7}"]
        lines += [
            f"{r['model']:<24}{r['split']:<13}{fmt(r['accuracy']):>10}{fmt(r['macro_f1']):>10}{r['n']:>7}"
            for r in metrics_rows(summary)
        ]
    if a.get("candidates"):
        known = any(c["target_accuracy"] is not None for c in a["candidates"])
        policy = [v for v in a.get("policy", []) if all(v in c["scores"] for c in a["candidates"])]
        lines += [
            "",
            f"{'candidate':<24}"
            + "".join(f"{_short(v):>9}" for v in policy)
            + f"{'rank':>7}"
            + f"{'collapsed':>11}"
            + (f"{'target*':>9}" if known else "")
            + f"{'seconds':>9}",
        ]
        lines += [
            f"{c['name']:<24}"
            + "".join(f"{c['scores'][v]:>9.3f}" for v in policy)
            + f"{fmt(c.get('rank'), '.2f'):>7}{'yes' if c['collapsed'] else 'no':>11}"
            + (f"{fmt(c['target_accuracy']):>9}" if known else "")
            + f"{c['seconds']:>9.1f}"
            for c in a["candidates"]
        ]
        if known:
            lines.append(f"* target labels used for scoring only; oracle pick: {a['oracle']}")
    lines += ["", f"{'dataset':<14}{'images':>10}{'rejected':>10}"]
    lines += [f"{d:<14}{v['images']:>10}{v['rejected']:>10}" for d, v in summary.datasets.items()]
    lines += [
        "",
        f"extraction: {ex['images_extracted']} embedded, {ex['images_cached']} reused, "
        f"{ex['images_per_second'] or '-'} images/s",
        "",
        f"{'stage':<14}{'seconds':>10}{'images/s':>10}{'MB read':>10}{'MB written':>12}{'orchestration':>15}",
    ]
    lines += [
        f"{stage:<14}{st['seconds']:>10.1f}{st['images_per_second'] or '':>10}{st['bytes_read'] / 1e6:>10.1f}"
        f"{st['bytes_written'] / 1e6:>12.1f}{_pct(st['orchestration_share']):>15}"
        for stage, st in _stages(summary).items()
    ]
    if summary.report_uri:
        lines += ["", f"report: {summary.report_uri}"]
    return "\n".join(lines)


def shift_row(summary: RunSummary) -> dict:
    sh = summary.shift or {}
    test = sh.get("test") or {}
    champion = sh.get("champion") or {}
    return {
        "champion": f"v{sh.get('champion_version')}",
        "mmd2": test.get("statistic"),
        "p_value": test.get("p_value"),
        "alpha": test.get("alpha"),
        "domain_auc": sh.get("domain_auc"),
        "shift_detected": sh.get("shift_detected"),
        "champion_selection_score": champion.get("selection_score"),
        "score_drop": sh.get("score_drop"),
        "degraded": sh.get("degraded"),
        "retrain": sh.get("retrain"),
        "reason": sh.get("reason"),
    }


def promotion_row(summary: RunSummary) -> dict:
    p = summary.promotion or {}
    c = p.get("compared") or {}
    return {
        "version": f"v{p.get('version')}",
        "promoted": p.get("promoted"),
        "metric": c.get("metric"),
        "challenger": c.get("challenger"),
        "champion": c.get("champion"),
        "margin": c.get("margin"),
        "champion_before": p.get("champion_version"),
        "champion_after": p.get("champion_after"),
        "reason": p.get("reason"),
    }


def stage_rows(summary: RunSummary) -> list[dict]:
    return [{"stage": stage, **st} for stage, st in _stages(summary).items()]


def candidate_rows(summary: RunSummary) -> list[dict]:
    return [
        {
            "candidate": c["name"],
            "selected": c["name"] == summary.adaptation["selected"],
            **{k: round(v, 4) for k, v in c["scores"].items()},
            "rank": c.get("rank"),
            "collapsed": c["collapsed"],
            "target_accuracy (labels, scoring only)": c["target_accuracy"],
            "seconds": c["seconds"],
        }
        for c in summary.adaptation.get("candidates", [])
    ]


def as_link(uri: str) -> str:
    """A clickable form of a store URI: local paths become file:// URLs."""
    return uri if "://" in uri else "file://" + os.path.abspath(uri)
