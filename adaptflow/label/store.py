"""The labels people gave, kept in the store: one table keyed by image (content hash), with who gave each
label and when, so that every later run on the store trains with every label ever given.

Every run reads them back for the target it has (`labels_for_run`); labels given on the command line
(`--target-train-labels`) join them in the table (`keep_given`) and win where both label one image. A label
of an image no longer in the target stays in the table, unused, and an image that moved is found by its
content where it is now."""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime

import pandas as pd
import pyarrow as pa

from adaptflow.data.ingest import read_index
from adaptflow.manifests import IngestManifest
from adaptflow.report.records import RunSummary
from adaptflow.store import storage
from adaptflow.store.layout import labels_uri

COLUMNS = ["image_id", "uri", "label", "who", "given_at"]


def stored_labels(store: str) -> pd.DataFrame:
    """Every label given in the loop on `store` (COLUMNS); empty if none."""
    uri = labels_uri(store)
    if not storage.exists(uri):
        return pd.DataFrame(columns=COLUMNS)
    return storage.read_table(uri).to_pandas()[COLUMNS]


def record_labels(store: str, rows: pd.DataFrame, who: str) -> int:
    """Add `rows` (image_id, uri, label) given by `who` to the store's table, replacing earlier labels of
    the same images; returns how many labels the table holds."""
    given = rows[["image_id", "uri", "label"]].assign(who=who, given_at=datetime.now(UTC).isoformat(timespec="seconds"))
    before = stored_labels(store)
    table = pd.concat([before[~before.image_id.isin(given.image_id)], given], ignore_index=True)
    table = table.sort_values("image_id").reset_index(drop=True)
    storage.write_table(labels_uri(store), pa.Table.from_pandas(table[COLUMNS].astype(str), preserve_index=False))
    return len(table)


def keep_given(store: str, labels: IngestManifest, who: str) -> int:
    """Keep the labels of an ingested labels dataset (`--target-train-labels`, checked) in the store, so
    that later runs train with them too; returns how many were new or changed (those already kept as they
    are keep their who and when)."""
    rows = read_index(labels)[["image_id", "uri", "label"]].drop_duplicates("image_id")
    before = stored_labels(store).set_index("image_id").label
    fresh = rows[rows.image_id.map(before) != rows.label]
    if not fresh.empty:
        record_labels(store, fresh, who)
    return len(fresh)


def labels_for_run(store: str, target: IngestManifest, out_uri: str) -> str | None:
    """A `uri,label` CSV at `out_uri` of the store's labels of images in `target`, at their uris there;
    None when the store has none for this target."""
    stored = stored_labels(store)
    index = read_index(target).drop_duplicates("image_id").set_index("image_id").uri
    stored = stored[stored.image_id.isin(index.index)]
    if stored.empty:
        return None
    rows = pd.DataFrame({"uri": index.loc[stored.image_id].to_numpy(), "label": stored.label.to_numpy()})
    storage.write_bytes(out_uri, rows.to_csv(index=False).encode())
    return out_uri


def labelled_already(summary: RunSummary) -> set[str]:
    """The uris of the target images of the run `summary` describes that have a label to train with: those
    its `--target-train-labels` named, and those its store holds (`stored_labels`), at their uris in the
    run's target. What a person should not be asked again."""
    store = posixpath.dirname(posixpath.dirname(summary.run_uri.rstrip("/")))  # {store}/runs/{run_id}
    target = storage.read_table(summary.datasets["target"].index_uri, columns=["image_id", "uri"]).to_pandas()
    ids = set(stored_labels(store).image_id)
    if (given := summary.datasets.get("target_train_labels")) is not None:
        ids |= set(storage.read_table(given.index_uri, columns=["image_id"])["image_id"].to_pylist())
    return set(target.uri[target.image_id.isin(ids)])


def answered(asked: dict[str, str], answers: dict[str, str], classes: list[str]) -> tuple[pd.DataFrame, list[str]]:
    """The labels a person gave for the `asked` images (image id -> uri) as (image_id, uri, label) rows, and
    why each other answer was not taken: an image not asked about, or a class the source does not have.
    Blank answers are images the person skipped."""
    known = set(classes)
    taken, refused = [], []
    for image_id, label in answers.items():
        label = (label or "").strip()
        if not label:
            continue
        if image_id not in asked:
            refused.append(f"{image_id}: not one of the images asked about")
        elif label not in known:
            refused.append(f"{image_id}: unknown class {label!r} (known: {', '.join(sorted(known))})")
        else:
            taken.append({"image_id": image_id, "uri": asked[image_id], "label": label})
    return pd.DataFrame(taken, columns=["image_id", "uri", "label"]), refused
