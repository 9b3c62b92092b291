from prefect import task

from adaptflow import pipeline, progress
from adaptflow.config import Config
from adaptflow.features import ExtractionPlan
from adaptflow.manifests import IngestManifest
from adaptflow.pipeline import ModelManifest
from tasks._work import measured


@task(name="fit-head")
@measured
def fit_head(source: IngestManifest, features: ExtractionPlan, cfg: Config, model_uri: str) -> ModelManifest:
    """Train the classifier head on cached source features; save it to the store."""
    with progress.task("train source-only head", unit="epochs"):
        return pipeline.fit_head(source, features, cfg, model_uri)
