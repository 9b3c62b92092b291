from prefect import flow

from adaptflow import DEFAULT_STORE
from adaptflow.config import Config, IngestConfig, RuntimeConfig
from adaptflow.models.card import load_card
from adaptflow.models.registry import model_uri_for
from adaptflow.names import check_names
from adaptflow.store.layout import ingest_uri, new_run_id
from adaptflow.store.storage import absolute, join
from tasks.credentials import use_credentials
from tasks.extract import extract_all, plan_extraction
from tasks.ingest import ingest_dataset
from tasks.logs import forward_library_logs
from tasks.predict import predict
from tasks.runners import configured, limited


@flow(name="predict")
def batch_predict(
    model_uri: str, images: str, out: str, store: str = DEFAULT_STORE, config: Config | None = None
) -> str:
    """Predict a class for every valid image under `images` with a saved model — a model folder, or a name
    in the store's registry (`champion`, `challenger`, `v3`); returns `out`. `config` is this run's own:
    its `runtime` (credentials block, task runner, time limits) and when ingestion reads a file again
    (`ingest.rehash`, `ingest.full_check_days`) apply; ingestion's checks, backbone and preprocessing are
    the model's, from its card."""
    cfg = check_names(config if config is not None else Config())
    forward_library_logs()
    use_credentials(cfg.runtime.credentials_block)
    return configured(predict_stages, cfg.runtime)(
        model_uri, absolute(images), out, absolute(store), cfg.runtime, cfg.ingest
    )


@flow(name="predict-stages")
def predict_stages(
    model_uri: str, images: str, out: str, store: str, runtime: RuntimeConfig, rereading: IngestConfig
) -> str:
    model_uri = model_uri_for(store, model_uri)
    card = load_card(model_uri)
    cfg = card.config
    work = join(store, "predictions", new_run_id())
    (ingest,) = limited(runtime, ingest_dataset)  # failing as TimedOut past task_timeout_s

    # 1. ingest the images to predict by the model's checks, reading files again as this run says
    checks = cfg.ingest.model_copy(update=rereading.model_dump(include={"rehash", "full_check_days"}))
    dataset = ingest(images, "predict", ingest_uri(work, "predict"), checks, cfg.seed, store=store)
    # 2-3. models on cached features: embed the images with the model's own extractor; end-to-end models:
    # decode each image once into the training-image cache at the model's size; both reused from the store
    images_kind = card.kind == "images"
    plan = plan_extraction(
        [dataset.index_uri],
        store,
        cfg.backbone,
        cfg.extract.shard_size,
        cache_size=card.image_size if images_kind else None,
        embed=not images_kind,
    )
    extract_all(plan, cfg.backbone, cfg.extract, runtime)
    # 4. apply the model, shard by shard; a rerun after a kill finds the shards already predicted
    predict(model_uri, dataset, plan, out, cfg.extract, runtime)
    return out
