from prefect import task, unmapped
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.futures import as_completed

from adaptflow import progress
from adaptflow.config import BackboneConfig, ExtractConfig, RuntimeConfig
from adaptflow.extract import features
from adaptflow.extract.image_cache import image_cache
from adaptflow.manifests import CompactionManifest, ExtractionPlan, ShardPlan, ShardResult
from adaptflow.store import shards
from tasks._retry import IO_TASK
from tasks._work import measured
from tasks.runners import gpu_placement, limited


@task(name="plan-extraction", **IO_TASK)
@measured
def plan_extraction(
    index_uris: list[str],
    store_uri: str,
    backbone: BackboneConfig,
    shard_size: int,
    cache_size: int | None = None,
    embed: bool = True,
    index_keys: list[str] | None = None,
) -> ExtractionPlan:
    """Cut the images that lack committed features for this extractor (if `embed`), or cached training
    images at `cache_size` (if given), into shards; datasets (`index_keys`) the store is on record as
    holding whole are planned from a listing."""
    cache = image_cache(store_uri, backbone, cache_size) if cache_size else None
    return features.plan_extraction(
        index_uris, store_uri, backbone, shard_size, cache=cache, features=embed, index_keys=index_keys
    )


@task(name="extract-shard", task_run_name="extract-{plan.shard_key}", **IO_TASK)
@measured
def extract_shard(plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig) -> ShardResult:
    """Embed and/or cache one shard's images (each decoded once) and commit them to the store."""
    with progress.task(f"extract images {plan.offset}-{plan.offset + plan.length}", plan.length, "images"):
        return features.extract_shard(plan, backbone, extract)


@task(name="compact-features", **IO_TASK)
@measured
def compact_features(folder: str, extract: ExtractConfig) -> CompactionManifest:
    """Merge the small shards incremental runs leave behind in a feature folder or an image cache, and
    delete dead attempts' files."""
    return shards.compact_shards(folder, extract.shard_size, extract.compact_min_shards)


@task(name="record-coverage", **IO_TASK)
def record_coverage(plan: ExtractionPlan, store_uri: str, compactions: list[CompactionManifest]) -> None:
    """Once the plan's shards are committed and compacted, record that the store holds its datasets whole
    (nothing to do when it embedded nothing and compaction moved no shard: planning recorded it)."""
    if plan.shards or any(c.shards_before != c.shards_after for c in compactions):
        features.record_coverage(plan, store_uri)


def extract_all(
    plan: ExtractionPlan, backbone: BackboneConfig, extract: ExtractConfig, runtime: RuntimeConfig
) -> list[ShardResult]:
    """Map `extract_shard` over the plan (on GPU workers when configured), with a progress bar on the
    Prefect UI; call it from a flow. Returns the shard manifests in plan order."""
    if not plan.shards:
        return []
    progress = create_progress_artifact(
        0.0, key="adaptflow-extraction", description=f"{sum(s.length for s in plan.shards)} images to embed or cache"
    )
    (extract_one,) = limited(runtime, extract_shard)
    with gpu_placement(runtime):
        futures = extract_one.map(plan.shards, unmapped(backbone), unmapped(extract))
    done: dict[str, ShardResult] = {}
    for future in as_completed(futures):
        shard = future.result()
        done[shard.shard_key] = shard
        update_progress_artifact(progress, 100.0 * len(done) / len(futures))
    return [done[s.shard_key] for s in plan.shards]
