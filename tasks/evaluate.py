from prefect import task

from adaptflow import pipeline, progress
from adaptflow.features import ExtractionPlan
from adaptflow.manifests import IngestManifest
from adaptflow.pipeline import EvaluationManifest, PredictionManifest
from tasks._retry import IO_TASK
from tasks._work import measured


@task(name="predict", **IO_TASK)
@measured
def predict(model_uri: str, images: IngestManifest, features: ExtractionPlan | None, out_uri: str) -> PredictionManifest:
    """Write the model's prediction for every valid image."""
    with progress.task(f"predict {images.domain}", images.n_images, "images"):
        return pipeline.predict(model_uri, images, features, out_uri)


@task(name="evaluate")
@measured
def evaluate(model_uri: str, source: IngestManifest, predictions: PredictionManifest,
             target_labels: IngestManifest | None, features: ExtractionPlan | None, metrics_uri: str) -> EvaluationManifest:
    """Score the source test split and, when labels were given for scoring, the target predictions."""
    return pipeline.evaluate(model_uri, source, predictions, target_labels, features, metrics_uri)
