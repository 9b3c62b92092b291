from prefect import task

from adaptflow import features
from adaptflow.config import BackboneConfig, ExtractConfig
from adaptflow.features import ExtractionPlan, ShardManifest, ShardPlan
from tasks._retry import IO_TASK


@task(name="plan-extraction", **IO_TASK)
def plan_extraction(index_uris: list[str], store_uri: str, backbone: BackboneConfig, shard_size: int) -> ExtractionPlan:
    """Cut the images that lack committed features for this extractor into shards."""
    return features.plan_extraction(index_uris, store_uri, backbone, shard_size)


@task(name="extract-shard", **IO_TASK)
def extract_shard(plan: ShardPlan, backbone: BackboneConfig, extract: ExtractConfig) -> ShardManifest:
    """Embed one shard's images and commit it to the feature store."""
    return features.extract_shard(plan, backbone, extract)
