from prefect import flow

from adaptflow import DEFAULT_STORE
from adaptflow.config import Config
from adaptflow.names import check_names
from adaptflow.store.layout import ingest_uri, new_run_id
from adaptflow.store.storage import absolute, join
from tasks.credentials import use_credentials
from tasks.extract import compact_features, extract_all, plan_extraction, record_coverage
from tasks.ingest import ingest_dataset
from tasks.logs import forward_library_logs
from tasks.runners import configured, limited


@flow(name="extract")
def backfill(images: list[str], store: str = DEFAULT_STORE, config: Config | None = None) -> str:
    """Embed every valid image of the datasets `images` into the feature store ahead of the runs that
    will need them; returns the features URI. Images the store already holds are not embedded again.
    The stages run on the task runner, and within the time limits, that `config.runtime` names."""
    cfg = check_names(config if config is not None else Config())
    forward_library_logs()
    use_credentials(cfg.runtime.credentials_block)
    return configured(backfill_stages, cfg.runtime)([absolute(uri) for uri in images], absolute(store), cfg)


@flow(name="extract-stages")
def backfill_stages(images: list[str], store: str, cfg: Config) -> str:
    work = join(store, "backfills", new_run_id())
    (ingest,) = limited(cfg.runtime, ingest_dataset)  # failing as TimedOut past runtime.task_timeout_s

    # 1. ingest: validate and index every dataset, in parallel (files unchanged since the last run keep their checks)
    futures = [
        ingest.submit(uri, "backfill", ingest_uri(work, str(i)), cfg.ingest, cfg.seed, store=store)
        for i, uri in enumerate(images)
    ]
    datasets = [f.result() for f in futures]

    # 2-3. preprocess + extract: embed only images the feature store lacks, shard by shard (on GPU
    # workers when runtime.gpu_resource says so); merge small shards
    index_keys = [d.fingerprint for d in datasets]
    plan = plan_extraction(
        [d.index_uri for d in datasets], store, cfg.backbone, cfg.extract.shard_size, index_keys=index_keys
    )
    extract_all(plan, cfg.backbone, cfg.extract, cfg.runtime)
    record_coverage(plan, store, [compact_features(plan.features_uri, cfg.extract)])
    return plan.features_uri
