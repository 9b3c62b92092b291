from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact, create_table_artifact

from adaptflow.data.labels import merged
from adaptflow.label import store as labels
from adaptflow.label.suggest import suggest, write_ask
from adaptflow.manifests import IngestManifest, LabelRequest
from adaptflow.report.records import RunSummary
from adaptflow.store.storage import join


@task(name="stored-labels")
def stored_labels_for(store: str, target: IngestManifest, out_uri: str) -> str | None:
    """A CSV of the labels people gave on `store` for images of `target` (None: none)."""
    return labels.labels_for_run(store, target, out_uri)


@task(name="every-label")
def every_label(given: IngestManifest | None, stored: IngestManifest | None, out_uri: str) -> IngestManifest | None:
    """The target labels the run trains with: those `given` on the command line and those `stored` for the
    target's other images, the command line's winning where both label one image (None: neither)."""
    if given is None or stored is None:
        return given or stored
    return merged(given, stored, out_uri)


@task(name="keep-labels")
def keep_labels(store: str, given: IngestManifest) -> int:
    """Keep labels given on the command line, once checked, in the store, so that later runs train with
    them too; returns how many were new or changed."""
    return labels.keep_given(store, given, "command line")


@task(name="suggest-labels")
def suggest_labels(run: str, n: int, expires_s: int | None) -> LabelRequest:
    """The `n` target images of the finished `run` most worth a person's labels, none labelled already,
    written as an ask file and a contact sheet under the run and put on the Prefect UI."""
    summary = RunSummary.load(join(run, "summary.json"))
    rows = suggest(summary, n, labelled=labels.labelled_already(summary))
    classes = summary.datasets["source"].classes
    ask = join(run, "ask", "ask.csv")
    sheet = write_ask(rows, ask, classes, expires_s)
    create_table_artifact(
        key="adaptflow-ask",
        table=[
            {"image id": r.image_id, "uri": r.uri, "model's guess": r.prediction, "confidence": round(r.confidence, 3)}
            for r in rows.itertuples()
        ],
        description=f"target images worth labelling; give each its class ({', '.join(classes)})",
    )
    create_link_artifact(key="adaptflow-ask-sheet", link=sheet, description="the images to label, as thumbnails")
    return LabelRequest(
        ask_uri=ask, sheet_uri=sheet, images=dict(zip(rows.image_id, rows.uri, strict=True)), classes=classes
    )


@task(name="record-labels")
def record_answers(store: str, request: LabelRequest, answers: dict[str, str], who: str) -> int:
    """Keep the labels a person gave for `request` in the store; returns how many were taken. Answers that
    cannot be taken (an image not asked about, an unknown class) are logged with their reason."""
    taken, refused = labels.answered(request.images, answers, request.classes)
    for reason in refused:
        get_run_logger().warning("label not taken: %s", reason)
    if not taken.empty:
        labels.record_labels(store, taken, who)
    return len(taken)
