from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from adaptflow import runs
from adaptflow.config import Config
from adaptflow.features import ExtractionPlan, ShardManifest
from adaptflow.manifests import IngestManifest
from adaptflow.pipeline import EvaluationManifest, ModelManifest, PredictionManifest
from adaptflow.runs import RunSummary


@task(name="write-summary")
def write_summary(run_id: str, run_uri: str, cfg: Config, datasets: dict[str, IngestManifest], plan: ExtractionPlan,
                  shards: list[ShardManifest], model: ModelManifest, predictions: PredictionManifest,
                  evaluation: EvaluationManifest, timings: dict[str, float]) -> RunSummary:
    """Commit the run: summary.json is written last."""
    extraction = runs.summarize_extraction(plan, shards, timings.get("extract", 0.0))
    return runs.write_summary(run_id, run_uri, cfg, datasets, extraction, model, predictions, evaluation, timings)


@task(name="publish-run")
def publish_run(summary: RunSummary) -> None:
    """Put the run's metrics and a summary on the Prefect UI."""
    create_table_artifact(key="adaptflow-metrics", table=runs.metrics_rows(summary),
                          description=f"adaptflow run {summary.run_id}")
    create_markdown_artifact(key="adaptflow-summary", markdown=runs.render_markdown(summary),
                             description=f"adaptflow run {summary.run_id}")
