from prefect import task

from adaptflow import progress
from adaptflow.adapt import baseline
from adaptflow.config import Config
from adaptflow.manifests import ExtractionPlan, IngestManifest, ModelManifest
from tasks._work import measured


@task(name="fit-head")
@measured
def fit_head(source: IngestManifest, features: ExtractionPlan, cfg: Config, model_uri: str) -> ModelManifest:
    """Train the classifier head on cached source features; save it to the store."""
    with progress.task("train source-only head", unit="epochs"):
        return baseline.fit_head(source, features, cfg, model_uri)
