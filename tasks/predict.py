from prefect import task, unmapped
from prefect.futures import as_completed

from adaptflow import progress
from adaptflow.config import ExtractConfig, RuntimeConfig
from adaptflow.evaluate import predict as prediction  # the library's; `predict` below is the task
from adaptflow.extract.devices import resolve_device
from adaptflow.manifests import (
    EvaluationManifest,
    ExtractionPlan,
    IngestManifest,
    PredictionManifest,
    PredictionPart,
    PredictionPlan,
    PredictShard,
)
from adaptflow.store import accounting
from tasks._retry import IO_TASK
from tasks._work import measured
from tasks.runners import gpu_placement, limited


@task(name="plan-prediction", **IO_TASK)
@measured
def plan_prediction(
    model_uri: str,
    images: IngestManifest,
    features: ExtractionPlan | None,
    out_uri: str,
    shard_size: int,
    split: str | None = None,
) -> PredictionPlan:
    """Cut the images to predict (one split's, if given) into shards, in the order the store holds them."""
    return prediction.plan_prediction(model_uri, images, features, out_uri, shard_size, split)


@task(name="predict-shard", **IO_TASK)
@measured
def predict_shard(shard: PredictShard, features: ExtractionPlan | None, device: str) -> PredictionPart:
    """Predict one shard's images and commit them; a committed part is kept."""
    label = f"predict {shard.domain}{' ' + shard.split if shard.split else ''} images {shard.rows[0]}-{shard.rows[1]}"
    with progress.task(label, shard.rows[1] - shard.rows[0], "images"):
        return prediction.predict_shard(shard, features, str(resolve_device(device)))


@task(name="merge-predictions", **IO_TASK)
@measured
def merge_predictions(plan: PredictionPlan, parts: list[PredictionPart]) -> PredictionManifest:
    """One predictions file from the committed parts."""
    return prediction.merge_predictions(plan, parts)


@task(name="evaluate")
@measured
def evaluate(
    source: IngestManifest,
    test: PredictionManifest,
    target: PredictionManifest,
    target_labels: IngestManifest | None,
    classes: list[str],
    metrics_uri: str,
) -> EvaluationManifest:
    """Score the source test split and, when labels were given for scoring, the target predictions."""
    return prediction.evaluate(source, test, target, target_labels, classes, metrics_uri)


def predict(
    model_uri: str,
    images: IngestManifest,
    features: ExtractionPlan | None,
    out_uri: str,
    extract: ExtractConfig,
    runtime: RuntimeConfig,
    split: str | None = None,
) -> PredictionManifest:
    """Predict every valid image of `images` (one split's, if given) into `out_uri`: one task per shard of
    `extract.shard_size` images, on GPU workers when configured, then the parts merged; call it from a
    flow. A rerun finds the parts a killed one committed."""
    plan = plan_prediction(model_uri, images, features, out_uri, extract.shard_size, split)
    (one,) = limited(runtime, predict_shard)
    with gpu_placement(runtime):
        futures = one.map(plan.shards, unmapped(features), unmapped(extract.device))
    parts = [f.result() for f in as_completed(futures)] if plan.shards else []
    merged = merge_predictions(plan, parts)
    works = [plan.work] + [p.work for p in parts] + [merged.work]
    return merged.model_copy(update={"work": accounting.merge(works)})
