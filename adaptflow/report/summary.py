"""A run's summary, `{store}/runs/{run_id}/summary.json` (`adaptflow.store.layout`): what the run read, trained,
picked and promoted, and where its time went. Written last, it is the run's commit."""

from __future__ import annotations

import time
from contextlib import contextmanager
from datetime import UTC, datetime

from adaptflow.config import Config
from adaptflow.manifests import (
    CandidateManifest,
    CompactionManifest,
    EvaluationManifest,
    ExtractionPlan,
    IngestManifest,
    Manifest,
    ModelManifest,
    PredictionManifest,
    PromotionManifest,
    SelectionManifest,
    ShardResult,
    ShiftManifest,
)
from adaptflow.report.records import (
    AdaptationSummary,
    BaselineMetrics,
    CandidateSummary,
    DatasetSummary,
    ExtractionSummary,
    ModelMetrics,
    RunSummary,
    StageStats,
)
from adaptflow.store import storage
from adaptflow.store.accounting import stage_stats


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


def summarize_stages(
    timings: dict[str, float], manifests: dict[str, list[Manifest]], datasets: dict[str, IngestManifest]
) -> dict[str, StageStats]:
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
        stage: StageStats(
            **stage_stats(timings.get(stage, 0.0), [m.work for m in ms if m.work is not None], images.get(stage))
        )
        for stage, ms in manifests.items()
        if stage in timings
    }


def summarize_extraction(
    plan: ExtractionPlan, shards: list[ShardResult], compaction: CompactionManifest | None, wall_seconds: float
) -> ExtractionSummary:
    """`images_per_second` is the stage's: every image embedded over the stage's wall time, planning and
    model loading included; `shard_images_per_second` counts only time inside the shard tasks. The
    orchestration share is the part of the wall time spent in neither planning, shards nor compaction."""
    extracted = sum(s.n_rows for s in shards)
    in_shards = sum(s.seconds for s in shards)
    busy = plan.seconds + in_shards + (compaction.seconds if compaction else 0.0)
    return ExtractionSummary(
        fingerprint=plan.fingerprint,
        features_uri=plan.features_uri,
        images_requested=plan.n_requested,
        images_cached=plan.n_cached,
        images_extracted=extracted,  # embedded and/or decoded into the training-image cache
        image_cache_uri=plan.cache.uri if plan.cache else None,
        images_cached_pixels=plan.n_cached_pixels,
        shards=len(shards),
        bytes_read=sum(s.bytes_read for s in shards),
        bytes_written=sum(s.bytes_written for s in shards),
        shards_compacted=(compaction.shards_before - compaction.shards_after) if compaction else 0,
        orphans_removed=compaction.orphans_removed if compaction else 0,
        wall_seconds=round(wall_seconds, 3),
        plan_seconds=round(plan.seconds, 3),
        images_per_second=round(extracted / wall_seconds, 1) if extracted and wall_seconds else None,
        shard_images_per_second=round(extracted / in_shards, 1) if extracted and in_shards else None,
        orchestration_share=round(max(0.0, 1 - busy / wall_seconds), 4) if wall_seconds else None,
    )


# Sixteen parameters, on purpose: the summary is the run's table of contents, one record per stage, each
# named where the flow passes it (a record grouping them would only rename the same list).
def write_summary(
    run_id: str,
    run: str,
    cfg: Config,
    datasets: dict[str, IngestManifest],
    extraction: ExtractionSummary,
    head: ModelManifest,
    candidates: list[CandidateManifest],
    selection: SelectionManifest,
    predictions: PredictionManifest,
    evaluation: EvaluationManifest,
    baseline: EvaluationManifest,
    report_uri: str,
    timings: dict[str, float],
    stages: dict[str, StageStats] | None = None,
    shift: ShiftManifest | None = None,
    promotion: PromotionManifest | None = None,
) -> RunSummary:
    chosen = candidates[selection.index] if selection.index >= 0 else None
    summary = RunSummary(
        run_id=run_id,
        run_uri=run,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        config=cfg,
        config_hash=cfg.fingerprint(),
        datasets=_datasets(datasets),
        extraction=extraction,
        model_uri=selection.model_uri,
        predictions_uri=predictions.predictions_uri,
        metrics_uri=evaluation.metrics_uri,
        report_uri=report_uri,
        metrics=ModelMetrics(
            source_val_accuracy=chosen.scores["source_val_acc"] if chosen else head.val_accuracy,
            source_test=evaluation.source_test,
            target=evaluation.target,
        ),
        baseline=BaselineMetrics(
            model_uri=head.model_uri,
            source_val_accuracy=head.val_accuracy,
            source_test=baseline.source_test,
            target=baseline.target,
        ),
        adaptation=_adaptation(selection, candidates),
        timings=timings,
        stages=stages or {},
        shift=_dump(shift),
        promotion=_dump(promotion),
    )
    summary.commit(storage.join(run, "summary.json"))
    return summary


def _adaptation(selection: SelectionManifest, candidates: list[CandidateManifest]) -> AdaptationSummary:
    """The selection, how confident it is, and every candidate; with target labels (scoring only), the
    oracle pick and the regret: oracle accuracy minus the selected candidate's."""
    chosen = candidates[selection.index] if selection.index >= 0 else None
    oracle = candidates[selection.oracle_index] if selection.oracle_index is not None else None
    reference = candidates[selection.reference_index] if selection.reference_index is not None else None
    selected_acc = chosen.target_accuracy if chosen else None
    ranks = selection.ranks or [None] * len(candidates)
    labelled = selection.labelled_accuracy or [None] * len(candidates)
    return AdaptationSummary(
        selected=selection.name,
        method=chosen.spec.method if chosen else "head",
        mode=chosen.spec.mode if chosen else "features",
        reason=selection.reason,
        policy=selection.policy,
        scores=chosen.scores if chosen else {},
        confident=selection.confident,
        confidence=selection.confidence,
        reference=reference.spec.name if reference else None,
        oracle=oracle.spec.name if oracle else None,
        oracle_target_accuracy=oracle.target_accuracy if oracle else None,
        selected_target_accuracy=selected_acc,
        regret=(oracle.target_accuracy - selected_acc) if oracle and selected_acc is not None else None,
        class_mix=selection.class_mix.model_copy(update={"work": None}) if selection.class_mix else None,
        prior_corrected=selection.prior_correction is not None,
        labelled=selection.n_labelled,
        labelled_trained=max((c.labelled_trained for c in candidates), default=0),
        candidates=[
            CandidateSummary(
                name=c.spec.name,
                method=c.spec.method,
                mode=c.spec.mode,
                scores=c.scores,
                collapsed=c.collapsed,
                rank=rank,
                source_test_accuracy=c.source_test_accuracy,
                target_accuracy=c.target_accuracy,
                labelled_accuracy=on_labels,
                steps=c.steps,
                total_steps=c.total_steps,
                stopped_at_rung=c.stopped_at_rung,
                seconds=round(c.seconds, 2),
                model_uri=c.model_uri,
            )
            for c, rank, on_labels in zip(candidates, ranks, labelled, strict=True)
        ],
    )


def write_no_shift_summary(
    run_id: str,
    run: str,
    cfg: Config,
    datasets: dict[str, IngestManifest],
    extraction: ExtractionSummary,
    shift: ShiftManifest,
    timings: dict[str, float],
    stages: dict[str, StageStats],
) -> RunSummary:
    """Commit a run that stopped after the shift check: what arrived, how it was tested, nothing trained."""
    summary = RunSummary(
        run_id=run_id,
        run_uri=run,
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        status="no_shift",
        config=cfg,
        config_hash=cfg.fingerprint(),
        datasets=_datasets(datasets),
        extraction=extraction,
        shift=_dump(shift),
        timings=timings,
        stages=stages,
    )
    summary.commit(storage.join(run, "summary.json"))
    return summary


def _dump(m: ShiftManifest | PromotionManifest | None):
    """A task's manifest as the summary keeps it: without the task's work record (the stages have it)."""
    return None if m is None else m.model_copy(update={"work": None})


def _datasets(datasets: dict[str, IngestManifest]) -> dict[str, DatasetSummary]:
    return {
        d: DatasetSummary(
            uri=m.dataset_uri,
            images=m.n_images,
            rejected=m.n_rejected,
            classes=m.classes,
            fingerprint=m.fingerprint,
            index_uri=m.index_uri,
            rejects_uri=m.rejects_uri,
            files_read=m.n_read,
            files_reused=m.n_reused,
        )
        for d, m in datasets.items()
    }
