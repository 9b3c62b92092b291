"""Which target images are worth a person's labels, chosen from a finished run: BADGE (Ash et al. 2020).

Each image i of the pool gets a gradient embedding g_i = (p_i - e_yhat_i) (x) h_i: p_i the selected model's
class probabilities (C,), yhat_i its prediction, h_i the image's backbone features from the store, seeded
Gaussian-projected to at most `PROJECTED` dimensions. g_i is the gradient of a last layer's loss on h_i had
yhat_i been the label: its norm grows with the model's doubt, its direction with what the image looks like.
k-means++ seeding over the g_i (`sklearn.cluster.kmeans_plusplus`) then picks k images that are both
uncertain and unlike each other, where the k most uncertain images would often be k of one confusion.

The pool is the target images the selected candidate scored (a seeded sample, `adapt.validation_samples`:
2,000 by default), less every image already labelled. The same run, k and seed give the same images.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import posixpath

import numpy as np
import pandas as pd

from adaptflow.errors import AdaptflowError, DatasetError
from adaptflow.extract.features import load_features
from adaptflow.manifests import CandidateManifest
from adaptflow.report.records import RunSummary
from adaptflow.store import storage

PROJECTED = 128  # backbone features wider than this are projected: C x 128 values an image, whatever the backbone
THUMBNAIL = 128  # pixels, the longer side, in the contact sheet


def badge(proba: np.ndarray, features: np.ndarray, k: int, seed: int = 0) -> list[int]:
    """The indices of `k` rows chosen by k-means++ seeding over gradient embeddings (module docstring):
    `proba` (N, C) class probabilities, `features` (N, D). All rows when k >= N; sorted."""
    from sklearn.cluster import kmeans_plusplus

    n = len(proba)
    if k >= n:
        return list(range(n))
    rng = np.random.default_rng(seed)
    h = np.asarray(features, np.float64)
    if h.shape[1] > PROJECTED:
        h = h @ rng.normal(0.0, 1.0 / np.sqrt(PROJECTED), (h.shape[1], PROJECTED))
    residual = np.asarray(proba, np.float64).copy()
    residual[np.arange(n), residual.argmax(1)] -= 1.0
    g = (residual[:, :, None] * h[:, None, :]).reshape(n, -1)
    if not np.any(g):  # every image predicted with certainty: no doubt to go by, only the look
        g = h
    _, chosen = kmeans_plusplus(g, k, random_state=int(rng.integers(2**31 - 1)))
    return sorted(int(i) for i in chosen)


def suggest(summary: RunSummary, k: int, seed: int = 0, labelled: set[str] = frozenset()) -> pd.DataFrame:
    """`k` target images of the run `summary` describes worth labelling, none of the uris in `labelled`: a
    frame of uri, image_id, prediction and confidence, in the order chosen (`badge`)."""
    run_uri = summary.run_uri
    chosen = next((c for c in summary.adaptation.candidates if c.name == summary.adaptation.selected), None)
    if chosen is None:
        raise AdaptflowError(
            f"run {run_uri} kept the source-only head (adapt.method: none), whose outputs were not kept per "
            "class: suggest from a run that adapted"
        )
    candidate = CandidateManifest.load(storage.join(posixpath.dirname(chosen.model_uri), "candidate.json"))
    scored = storage.read_table(candidate.predictions_uri).to_pandas()
    if "probabilities" not in scored:
        raise AdaptflowError(f"run {run_uri} was written before candidates kept their probabilities: run it again")
    pool = scored[~scored.uri.isin(labelled)].sort_values("image_id").reset_index(drop=True)
    if pool.empty:
        raise DatasetError(f"every target image run {run_uri} scored is labelled already: nothing to suggest")
    features = load_features(summary.extraction.features_uri, pool.image_id.tolist())
    picked = badge(np.stack(pool.probabilities.to_numpy()), features, k, seed)
    return pool.iloc[picked][["uri", "image_id", "prediction", "confidence"]].reset_index(drop=True)


def read_labelled(uri: str) -> set[str]:
    """The image uris a labels CSV (a `uri` column, as `--target-labels` takes) names."""
    try:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise DatasetError(f"labels file {uri} is not a readable CSV: {str(e).splitlines()[0]}") from None
    if "uri" not in table:
        raise DatasetError(f"labels file {uri} has no 'uri' column (columns: {', '.join(table.columns)})")
    return set(table.uri.dropna())


def write_ask(rows: pd.DataFrame, out_uri: str, classes: list[str], expires_s: int | None = None) -> str:
    """Write `rows` as `out_uri` (a CSV of uri and an empty label, for a person to fill in) and, beside it,
    a contact sheet (the same name ending in .html: each image's thumbnail, link, the model's guess); the
    sheet's URI is returned."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["uri", "label"])
    writer.writerows([uri, ""] for uri in rows.uri)
    storage.write_bytes(out_uri, buffer.getvalue().encode())
    sheet_uri = posixpath.splitext(out_uri)[0] + ".html"
    storage.write_bytes(sheet_uri, _sheet(rows, classes, expires_s).encode())
    return sheet_uri


def _sheet(rows: pd.DataFrame, classes: list[str], expires_s: int | None) -> str:
    cells = []
    for r in rows.itertuples():
        link = html.escape(storage.browser_url(r.uri, expires_s))
        cells.append(
            f'<figure><a href="{link}"><img alt="" src="{_thumbnail(r.uri)}"></a><figcaption>'
            f"{html.escape(posixpath.basename(r.uri))}<br>model: {html.escape(str(r.prediction))} "
            f"({r.confidence:.2f})</figcaption></figure>"
        )
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>images to label</title><style>'
        "body{font-family:sans-serif}figure{display:inline-block;margin:6px;width:150px;font-size:12px;"
        "vertical-align:top}img{max-width:128px;max-height:128px}</style></head><body>"
        f"<h1>{len(rows)} images to label</h1><p>Classes: {html.escape(', '.join(classes))}. Fill in the "
        "label column of the CSV beside this page.</p>" + "".join(cells) + "</body></html>\n"
    )


def _thumbnail(uri: str) -> str:
    """A data: URL of a small JPEG of the image at `uri`; an empty one for a file that no longer decodes."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            out = io.BytesIO()
            image.save(out, format="JPEG", quality=85)
    except (UnidentifiedImageError, OSError, ValueError):
        return ""
    return "data:image/jpeg;base64," + base64.b64encode(out.getvalue()).decode()
