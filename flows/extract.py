from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from adaptflow.config import validate_config
from adaptflow.pipeline import new_run_id
from adaptflow.runs import DEFAULT_STORE, ingest_uri
from adaptflow.storage import join
from tasks.credentials import use_credentials
from tasks.extract import compact_features, extract_all, plan_extraction
from tasks.ingest import ingest_dataset


@flow(name="extract", task_runner=ThreadPoolTaskRunner(max_workers=2))
def backfill(images: list[str], store: str = DEFAULT_STORE, config: dict | None = None) -> str:
    """Embed every valid image of the datasets `images` into the feature store ahead of the runs that
    will need them; returns the features URI. Images the store already holds are not embedded again."""
    cfg = validate_config(config or {})
    use_credentials(cfg.runtime.credentials_block)
    work = join(store, "backfills", new_run_id())

    # 1. ingest: validate and index every dataset, in parallel
    futures = [ingest_dataset.submit(uri, "backfill", ingest_uri(work, str(i)), cfg.ingest, cfg.seed)
               for i, uri in enumerate(images)]
    datasets = [f.result() for f in futures]

    # 2-3. preprocess + extract: embed only images the feature store lacks, shard by shard (on GPU
    # workers when runtime.gpu_resource says so); merge small shards
    plan = plan_extraction([d.index_uri for d in datasets], store, cfg.backbone, cfg.extract.shard_size)
    extract_all(plan, cfg.backbone, cfg.extract, cfg.runtime)
    compact_features(plan.features_uri, cfg.extract)
    return plan.features_uri
