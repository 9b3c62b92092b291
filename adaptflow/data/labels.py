"""Target labels a run may use (`--target-train-labels`), kept apart from those that only score it
(`--target-labels`).

Labels a person gave for training are checked strictly: a row that cannot be used (an unknown class, an
unreadable file, a path outside the manifest's folder, a duplicate, an image that is not one of the
target's) fails the run with one error naming the rows, where scoring labels only record a rejection. A
label someone took the time to give is not dropped quietly. Every target metric the run reports is then
computed without the images labelled for training (`held_out`): a model is never scored on the labels
that chose it."""

from __future__ import annotations

import pandas as pd
import pyarrow as pa

from adaptflow.data.ingest import index_fingerprint, read_index
from adaptflow.errors import DatasetError
from adaptflow.manifests import IngestManifest
from adaptflow.store import storage

SHOWN = 3  # rows an error names, of however many are wrong


def check_train_labels(labels: IngestManifest, target: IngestManifest) -> IngestManifest:
    """`labels` if every row of its dataset is a usable label of one of `target`'s images; else a
    DatasetError that counts the bad rows and names the first few with their reasons."""
    rejects = storage.read_table(labels.rejects_uri).to_pandas()
    problems = [f"{r.uri}: {r.reason}" for r in rejects.itertuples()]
    index = read_index(labels)
    in_target = set(storage.read_table(target.index_uri, columns=["image_id"])["image_id"].to_pylist())
    problems += [f"{r.uri}: not one of the target's images" for r in index.itertuples() if r.image_id not in in_target]
    if problems:
        shown = "; ".join(problems[:SHOWN]) + ("; ..." if len(problems) > SHOWN else "")
        raise DatasetError(
            f"{len(problems)} of the training labels in {labels.dataset_uri} cannot be used ({shown}): fix or "
            "remove those rows (labels for training are matched to the target's images by content)"
        )
    return labels


def held_out(scoring: IngestManifest, used: IngestManifest, out_uri: str) -> IngestManifest:
    """The scoring labels `scoring` less every image labelled for training in `used`, committed under
    `out_uri` (index, then manifest last). An error if nothing is left to score on."""
    index = read_index(scoring)
    taken = set(read_index(used).image_id)
    kept = index[~index.image_id.isin(taken)].reset_index(drop=True)
    if kept.empty:
        raise DatasetError(
            f"every image labelled in {scoring.dataset_uri} is also labelled for training in {used.dataset_uri}: "
            "nothing is left to score the run on; give scoring labels for other images, or none"
        )
    return narrowed(scoring, kept, out_uri)


def merged(given: IngestManifest, stored: IngestManifest, out_uri: str) -> IngestManifest:
    """The labels `given` to this run and those `stored` for other images, one row per image (`given`'s
    label where both have one: the newer word), committed under `out_uri`."""
    first = read_index(given)
    rest = read_index(stored)
    rows = pd.concat([first, rest[~rest.image_id.isin(first.image_id)]], ignore_index=True)
    return narrowed(given, rows, out_uri)


def narrowed(labels: IngestManifest, rows, out_uri: str) -> IngestManifest:
    """`labels` narrowed to `rows` of its index: the index, then the manifest last."""
    rows = rows.reset_index(drop=True)
    index_uri = storage.join(out_uri, "index.parquet")
    written = storage.write_table(index_uri, pa.Table.from_pandas(rows, preserve_index=False))
    manifest = labels.model_copy(
        update={
            "index_uri": index_uri,
            "n_images": len(rows),
            "classes": sorted(set(rows.label.dropna())),
            "fingerprint": index_fingerprint(rows.to_dict("records")),
            "bytes_written": written,
        }
    )
    manifest.commit(storage.join(out_uri, "manifest.json"))
    return manifest
