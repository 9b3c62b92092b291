from prefect import flow

from adaptflow.models import load_card
from adaptflow.pipeline import new_run_id
from adaptflow.registry import model_uri_for
from adaptflow.runs import DEFAULT_STORE, ingest_uri
from adaptflow.storage import join
from tasks.evaluate import predict
from tasks.extract import extract_all, plan_extraction
from tasks.ingest import ingest_dataset


@flow(name="predict")
def batch_predict(model_uri: str, images: str, out: str, store: str = DEFAULT_STORE) -> str:
    """Predict a class for every valid image under `images` with a saved model — a model folder, or a name
    in the store's registry (`champion`, `challenger`, `v3`); returns `out`."""
    model_uri = model_uri_for(store, model_uri)
    card = load_card(model_uri)
    cfg = card.config
    work = join(store, "predictions", new_run_id())

    # 1. ingest the images to predict
    dataset = ingest_dataset(images, "predict", ingest_uri(work, "predict"), cfg.ingest, cfg.seed)
    # 2-3. models on cached features: embed the images with the model's own extractor, reusing the store
    plan = None
    if card.kind != "images":
        plan = plan_extraction([dataset.index_uri], store, cfg.backbone, cfg.extract.shard_size)
        extract_all(plan, cfg.backbone, cfg.extract, cfg.runtime)
    # 4. apply the model
    predict(model_uri, dataset, plan, out)
    return out
