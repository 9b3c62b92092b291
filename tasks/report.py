from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from adaptflow.config import Config
from adaptflow.manifests import (
    CandidateManifest,
    CompactionManifest,
    EvaluationManifest,
    ExtractionPlan,
    IngestManifest,
    ModelManifest,
    ModelScores,
    PredictionManifest,
    PromotionManifest,
    ReportManifest,
    RunData,
    SelectionManifest,
    ShardResult,
    ShiftManifest,
)
from adaptflow.report import run_page, tables
from adaptflow.report import summary as run_summary
from adaptflow.report.history import write_history
from adaptflow.report.records import RunSummary
from adaptflow.store.storage import browser_url
from tasks._work import measured


@task(name="write-report")
@measured
def write_report(
    run_uri: str,
    data: RunData,
    candidates: list[CandidateManifest],
    selection: SelectionManifest,
    evaluation: EvaluationManifest,
    baseline: EvaluationManifest,
) -> ReportManifest:
    """The run's self-contained HTML report: candidates, selection, metrics, domain gap, plots."""
    return run_page.write_run_report(run_uri, data, candidates, selection, evaluation, baseline)


@task(name="write-summary")
def write_summary(
    run_id: str,
    run_uri: str,
    cfg: Config,
    datasets: dict[str, IngestManifest],
    plan: ExtractionPlan,
    shards: list[ShardResult],
    compaction: CompactionManifest,
    head: ModelManifest,
    candidates: list[CandidateManifest],
    selection: SelectionManifest,
    predictions: list[PredictionManifest],
    evaluation: EvaluationManifest,
    baseline: EvaluationManifest,
    report: ReportManifest,
    timings: dict[str, float],
    shift: ShiftManifest | None = None,
    champion: ModelScores | None = None,
    challenger: ModelScores | None = None,
    promotion: PromotionManifest | None = None,
) -> RunSummary:
    """Commit the run: summary.json is written last. `predictions`: the selected model's (target, then
    source test), then the head's;
    `champion`, `challenger`: the two models the gate compared, scored on this run's data."""
    extraction = run_summary.summarize_extraction(plan, shards, compaction, timings.get("extract", 0.0))
    stages = run_summary.summarize_stages(
        timings,
        {
            "ingest": list(datasets.values()),
            "extract": [plan, *shards, compaction],
            "monitor": [m for m in (champion, shift) if m is not None],
            "train": [head, *candidates, selection],
            "evaluate": [*predictions, evaluation, baseline, report],
            "promote": [m for m in (challenger, promotion) if m is not None],
        },
        datasets,
    )
    return run_summary.write_summary(
        run_id,
        run_uri,
        cfg,
        datasets,
        extraction,
        head,
        candidates,
        selection,
        predictions[0],
        evaluation,
        baseline,
        report.report_uri,
        timings,
        stages,
        shift,
        promotion,
    )


@task(name="write-no-shift-summary")
def write_no_shift_summary(
    run_id: str,
    run_uri: str,
    cfg: Config,
    datasets: dict[str, IngestManifest],
    plan: ExtractionPlan,
    shards: list[ShardResult],
    compaction: CompactionManifest,
    shift: ShiftManifest,
    champion: ModelScores | None,
    timings: dict[str, float],
) -> RunSummary:
    """Commit a run that found no shift: it stops here, cheaply."""
    extraction = run_summary.summarize_extraction(plan, shards, compaction, timings.get("extract", 0.0))
    stages = run_summary.summarize_stages(
        timings,
        {
            "ingest": list(datasets.values()),
            "extract": [plan, *shards, compaction],
            "monitor": [m for m in (champion, shift) if m is not None],
        },
        datasets,
    )
    return run_summary.write_no_shift_summary(run_id, run_uri, cfg, datasets, extraction, shift, timings, stages)


@task(name="publish-run")
def publish_run(summary: RunSummary, store: str) -> str:
    """Put the run on the Prefect UI: metrics, shift check, promotion decision, stages, report; rebuild the
    store's history page. Returns the history page's URI."""
    if summary.status != "no_shift":
        create_table_artifact(
            key="adaptflow-metrics", table=tables.metrics_rows(summary), description=f"adaptflow run {summary.run_id}"
        )
    if summary.adaptation.candidates:
        create_table_artifact(
            key="adaptflow-candidates",
            table=tables.candidate_rows(summary),
            description="adaptation candidates and their label-free scores",
        )
    if summary.shift:
        create_table_artifact(
            key="adaptflow-shift",
            table=[tables.shift_row(summary)],
            description="the new target batch against the champion's data",
        )
    if summary.promotion:
        create_table_artifact(
            key="adaptflow-promotion",
            table=[tables.promotion_row(summary)],
            description="the registry's decision on this run's model",
        )
    create_table_artifact(
        key="adaptflow-stages",
        table=tables.stage_rows(summary),
        description="per stage: wall time, images/s, bytes read and written, orchestration share",
    )
    create_markdown_artifact(
        key="adaptflow-summary", markdown=tables.render_markdown(summary), description=f"adaptflow run {summary.run_id}"
    )
    expires_s = summary.config.links.expiry_s  # S3: presigned HTTPS links, not s3:// strings
    if summary.report_uri:
        create_link_artifact(
            key="adaptflow-report",
            link=browser_url(summary.report_uri, expires_s),
            description="self-contained HTML report",
        )
    history = write_history(store)
    create_link_artifact(
        key="adaptflow-history",
        link=browser_url(history, expires_s),
        description="every run of this store: target metrics, shift, images over time",
    )
    return history
