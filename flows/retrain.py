from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from adaptflow.config import validate_config
from adaptflow.pipeline import new_run_id
from adaptflow.runs import DEFAULT_STORE, StageClock, ingest_uri, model_uri, run_uri
from adaptflow.storage import join
from tasks.evaluate import evaluate, predict
from tasks.extract import extract_shard, plan_extraction
from tasks.ingest import ingest_dataset
from tasks.report import publish_run, write_summary
from tasks.train import fit_head


@flow(name="retrain", task_runner=ThreadPoolTaskRunner(max_workers=2))
def retrain(source: str, target: str, target_labels: str | None = None, store: str = DEFAULT_STORE,
            config: dict | None = None) -> str:
    """Train a classifier on labeled `source` images for unlabeled `target` images; returns the run URI."""
    cfg = validate_config(config or {})
    run_id = new_run_id()
    run = run_uri(store, run_id)
    clock = StageClock()
    inputs = {"source": source, "target": target, "target_labels": target_labels}

    # 1. ingest: validate and index every image, in parallel per dataset
    with clock("ingest"):
        futures = {domain: ingest_dataset.submit(uri, domain, ingest_uri(run, domain), cfg.ingest, cfg.seed)
                   for domain, uri in inputs.items() if uri}
        datasets = {domain: f.result() for domain, f in futures.items()}

    # 2-3. preprocess + extract: embed only images the feature store lacks, shard by shard
    with clock("extract"):
        plan = plan_extraction([datasets["source"].index_uri, datasets["target"].index_uri], store,
                               cfg.backbone, cfg.extract.shard_size)
        shards = extract_shard.map(plan.shards, unmapped(cfg.backbone), unmapped(cfg.extract)).result()

    # 4. fine-tune: a head on cached source features, early-stopped on source validation
    with clock("train"):
        model = fit_head(datasets["source"], plan, cfg, model_uri(store, run_id))

    # 5. evaluate: predictions for every target image; metrics on source test and labeled target
    with clock("evaluate"):
        predictions = predict(model.model_uri, datasets["target"], plan, join(run, "predictions.parquet"))
        evaluation = evaluate(model.model_uri, datasets["source"], predictions, datasets.get("target_labels"),
                              plan, join(run, "metrics.json"))

    summary = write_summary(run_id, run, cfg, datasets, plan, shards, model, predictions, evaluation, clock.seconds)
    publish_run(summary)
    return run
