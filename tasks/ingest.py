from prefect import task

from adaptflow.config import IngestConfig
from adaptflow.data import ingest, labels
from adaptflow.manifests import IngestManifest
from adaptflow.store.layout import ingest_cache_uri
from tasks._retry import IO_TASK
from tasks._work import measured


@task(name="ingest", task_run_name="ingest-{domain}", **IO_TASK)
@measured
def ingest_dataset(
    dataset_uri: str,
    domain: str,
    out_uri: str,
    cfg: IngestConfig,
    seed: int,
    classes: list[str] | None = None,
    labels_for: str | None = None,
    store: str | None = None,
) -> IngestManifest:
    """List, hash and validate every image of one dataset; write its index and rejects. Target labels are
    checked against the source's `classes` and the target's index (`labels_for`). With a `store`, files
    unchanged since the dataset's last ingest keep their checks, from its listing cache there."""
    cache = ingest_cache_uri(store, ingest.cache_key(dataset_uri, domain, cfg)) if store else None
    return ingest.ingest(dataset_uri, domain, out_uri, cfg, seed, classes, labels_for, cache)


@task(name="check-train-labels")
def check_train_labels(
    train_labels: IngestManifest, target: IngestManifest, scoring: IngestManifest | None, out_uri: str
) -> IngestManifest | None:
    """Fail on any target label for training that cannot be used (`data.labels.check_train_labels`); return
    the scoring labels less the images labelled for training, committed under `out_uri` (None: none given)."""
    labels.check_train_labels(train_labels, target)
    return labels.held_out(scoring, train_labels, out_uri) if scoring is not None else None
