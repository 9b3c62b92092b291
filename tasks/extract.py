from prefect import task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from adaptflow import features, progress
from adaptflow.config import BackboneConfig, ExtractConfig, RuntimeConfig
from adaptflow.features import CompactionManifest, ExtractionPlan, ShardManifest, ShardPlan
from tasks._retry import IO_TASK
from tasks._work import measured
from tasks.runners import gpu_placement, limited


@task(name="plan-extraction", **IO_TASK)
@measured
def plan_extraction(index_uris: list[str], store_uri: str, backbone: BackboneConfig, shard_size: int) -> ExtractionPlan:
    """Cut the images that lack committed features for this extractor into shards."""
    return features.plan_extraction(index_uris, store_uri, backbone, shard_size)


@task(name="extract-shard", **IO_TASK)
@measured
def extract_shard(plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig) -> ShardManifest:
    """Embed one shard's images and commit it to the feature store."""
    with progress.task(f"extract images {plan.offset}-{plan.offset + plan.length}", plan.length, "images"):
        return features.extract_shard(plan, backbone, extract)


@task(name="compact-features", **IO_TASK)
@measured
def compact_features(features_uri: str, extract: ExtractConfig) -> CompactionManifest:
    """Merge the small shards incremental runs leave behind, and delete dead attempts' files."""
    return features.compact_shards(features_uri, extract.shard_size, extract.compact_min_shards)


def extract_all(plan: ExtractionPlan, backbone: BackboneConfig, extract: ExtractConfig,
                runtime: RuntimeConfig) -> list[ShardManifest]:
    """Map `extract_shard` over the plan (on GPU workers when configured), with a progress bar on the
    Prefect UI; call it from a flow. Returns the shard manifests in plan order."""
    if not plan.shards:
        return []
    progress = create_progress_artifact(0.0, key="adaptflow-extraction",
                                        description=f"{sum(s.length for s in plan.shards)} images to embed")
    (extract_one,) = limited(runtime, extract_shard)
    with gpu_placement(runtime):
        futures = extract_one.map(plan.shards, unmapped(backbone), unmapped(extract))
    done: dict[str, ShardManifest] = {}
    for future in as_completed(futures):
        shard = future.result()
        done[shard.shard_key] = shard
        update_progress_artifact(progress, 100.0 * len(done) / len(futures))
    return [done[s.shard_key] for s in plan.shards]
