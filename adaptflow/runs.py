"""A run's folder and its summary.

    {store}/runs/{run_id}/ingest/{domain}/   index.parquet, rejects.parquet, manifest.json
    {store}/runs/{run_id}/predictions.parquet
    {store}/runs/{run_id}/metrics.json
    {store}/runs/{run_id}/summary.json       written last: the run's commit
    {store}/models/{run_id}/                 head.safetensors, model.json, curve.json
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import UTC, datetime

from adaptflow import storage
from adaptflow.config import Config
from adaptflow.features import ExtractionPlan, ShardManifest
from adaptflow.manifests import IngestManifest, Manifest
from adaptflow.pipeline import EvaluationManifest, ModelManifest, PredictionManifest

DEFAULT_STORE = "adaptflow-store"


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
    config: dict
    config_hash: str
    datasets: dict[str, dict]  # domain -> uri, images, rejected, classes, fingerprint, index/rejects URIs
    extraction: dict
    model_uri: str
    predictions_uri: str
    metrics_uri: str
    metrics: dict  # source_test and (with target labels) target: accuracy, macro_f1, n
    timings: dict[str, float]  # stage -> wall seconds


def summarize_extraction(plan: ExtractionPlan, shards: list[ShardManifest], wall_seconds: float) -> dict:
    """`images_per_second` is the stage's: every image embedded over the stage's wall time, planning and
    model loading included; `shard_images_per_second` counts only time inside the shard tasks. The
    orchestration share is the part of the wall time spent in neither planning nor shards."""
    extracted = sum(s.n_rows for s in shards)
    in_shards = sum(s.seconds for s in shards)
    busy = plan.seconds + in_shards
    return {
        "fingerprint": plan.fingerprint,
        "features_uri": plan.features_uri,
        "images_requested": plan.n_requested,
        "images_cached": plan.n_cached,
        "images_extracted": extracted,
        "shards": len(shards),
        "bytes_written": sum(s.bytes_written for s in shards),
        "wall_seconds": round(wall_seconds, 3),
        "plan_seconds": round(plan.seconds, 3),
        "images_per_second": round(extracted / wall_seconds, 1) if extracted and wall_seconds else None,
        "shard_images_per_second": round(extracted / in_shards, 1) if extracted and in_shards else None,
        "orchestration_share": round(max(0.0, 1 - busy / wall_seconds), 4) if wall_seconds else None,
    }


def write_summary(run_id: str, run: str, cfg: Config, datasets: dict[str, IngestManifest], extraction: dict,
                  model: ModelManifest, predictions: PredictionManifest, evaluation: EvaluationManifest,
                  timings: dict[str, float]) -> RunSummary:
    summary = RunSummary(
        run_id=run_id, run_uri=run, finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=cfg.model_dump(mode="json"), config_hash=cfg.fingerprint(),
        datasets={d: {"uri": m.dataset_uri, "images": m.n_images, "rejected": m.n_rejected, "classes": m.classes,
                      "fingerprint": m.fingerprint, "index_uri": m.index_uri, "rejects_uri": m.rejects_uri}
                  for d, m in datasets.items()},
        extraction=extraction, model_uri=model.model_uri, predictions_uri=predictions.predictions_uri,
        metrics_uri=evaluation.metrics_uri,
        metrics={"source_val_accuracy": model.val_accuracy, "source_test": evaluation.source_test,
                 "target": evaluation.target},
        timings=timings,
    )
    summary.commit(storage.join(run, "summary.json"))
    return summary


def metrics_rows(summary: RunSummary) -> list[dict]:
    """One row per scored split, for tables (Prefect artifact, command-line output)."""
    rows = [{"split": "source val", "accuracy": summary.metrics["source_val_accuracy"], "macro_f1": None, "n": None}]
    for name, key in (("source test", "source_test"), ("target", "target")):
        m = summary.metrics.get(key)
        if m:
            rows.append({"split": name, **{k: m[k] for k in ("accuracy", "macro_f1", "n")}})
    return rows


def render_markdown(summary: RunSummary) -> str:
    ex = summary.extraction
    lines = [f"# adaptflow run `{summary.run_id}`", "", "| split | accuracy | macro-F1 | n |", "|---|---|---|---|"]
    lines += [f"| {r['split']} | {_fmt(r['accuracy'])} | {_fmt(r['macro_f1'])} | {r['n'] or ''} |"
              for r in metrics_rows(summary)]
    lines += ["", "| dataset | images | rejected |", "|---|---|---|"]
    lines += [f"| {d} | {v['images']} | {v['rejected']} |" for d, v in summary.datasets.items()]
    lines += ["", f"Extraction: {ex['images_extracted']} images embedded, {ex['images_cached']} reused from the "
              f"feature store, {ex['images_per_second'] or '-'} images/s.", "",
              "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {sec:.1f} |" for stage, sec in summary.timings.items()]
    lines += ["", f"Model: `{summary.model_uri}`  ", f"Predictions: `{summary.predictions_uri}`"]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "" if x is None else f"{x:.3f}"


def render_table(summary: RunSummary) -> str:
    """A plain-text report for the terminal: accuracy, images processed, time per stage."""
    ex = summary.extraction
    lines = [f"adaptflow run {summary.run_id}", "", f"{'split':<14}{'accuracy':>10}{'macro-F1':>10}{'n':>8}"]
    lines += [f"{r['split']:<14}{_fmt(r['accuracy']):>10}{_fmt(r['macro_f1']):>10}{r['n'] or '':>8}"
              for r in metrics_rows(summary)]
    lines += ["", f"{'dataset':<14}{'images':>10}{'rejected':>10}"]
    lines += [f"{d:<14}{v['images']:>10}{v['rejected']:>10}" for d, v in summary.datasets.items()]
    lines += ["", f"extraction: {ex['images_extracted']} embedded, {ex['images_cached']} reused, "
                  f"{ex['images_per_second'] or '-'} images/s", "", f"{'stage':<14}{'seconds':>10}"]
    lines += [f"{stage:<14}{sec:>10.1f}" for stage, sec in summary.timings.items()]
    return "\n".join(lines)
