"""Choosing the model with a few target labels (`--target-train-labels`).

Label-free selection is the weak spot of unsupervised adaptation; a few dozen labelled target images are
direct evidence. `by_labels` keeps what they can tell and no more: each finished candidate is scored on the
labelled images (the same images for all, none used in training), and a candidate significantly less
accurate there than the most accurate one (an exact one-sided McNemar test, as selection tests source
validation) is out. Among those left, within the labels' noise of the best, the label-free rules choose
(`selection.select`'s ranks): fifty labels rarely separate two good models, and where they do not, the
label-free evidence still counts. Collapse is not judged here: where labels say a model predicting mostly
one class is right, the target has mostly that class.

The labels are split once (`split_labels`, `adapt.labels_trained`): a share every candidate trains on (a
supervised loss on labelled target rows mixed into its source batches, `LABELLED_SHARE` of them), and the
rest, which judges the candidates; no image does both."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from adaptflow.adapt.inference import infer, load_model
from adaptflow.adapt.samples import sample_key
from adaptflow.adapt.selection import Candidate, Selection, less_accurate, preference
from adaptflow.data.ingest import read_index
from adaptflow.data.labels import narrowed
from adaptflow.manifests import CandidateManifest, ExtractionPlan, IngestManifest
from adaptflow.store import storage

MIN_LABELS = 10  # fewer labelled images than this cannot tell candidates apart: label-free rules alone
# The share of a candidate's supervised rows drawn from the labelled target images it trains on: a few dozen
# images among thousands of source ones would otherwise be a rounding error of its loss; a quarter keeps the
# source's classes in view (Saito et al.'s MME trains on equal labelled source and target batches).
LABELLED_SHARE = 0.25


def split_labels(
    labels: IngestManifest, share: float, seed: int, out_uri: str
) -> tuple[IngestManifest | None, IngestManifest | None]:
    """(the labels the candidates train on, those that judge them), committed under `out_uri/fit` and
    `out_uri/judge`: `share` of each class's labelled images, rounded down, chosen by a seeded hash of their
    content (the same images for the same labels); None for a part with no image."""
    index = read_index(labels)
    order = index.assign(_key=index.image_id.map(lambda i: sample_key(i, seed))).sort_values(["label", "_key"])
    size = order.groupby("label").image_id.transform("size")
    fit = set(order.image_id[order.groupby("label").cumcount() < np.floor(share * size)])
    parts = {"fit": index[index.image_id.isin(fit)], "judge": index[~index.image_id.isin(fit)]}
    out = {k: narrowed(labels, rows, storage.join(out_uri, k)) if len(rows) else None for k, rows in parts.items()}
    return out["fit"], out["judge"]


def with_labelled(train: pd.DataFrame, labelled: pd.DataFrame | None) -> pd.DataFrame:
    """The rows a candidate's supervised loss draws from: the source's training rows and the `labelled`
    target rows it trains on (image_id, uri, label), each at least once, repeated until they make at least
    `LABELLED_SHARE` of them."""
    if labelled is None or labelled.empty:
        return train
    repeat = max(1, math.ceil(LABELLED_SHARE * len(train) / ((1 - LABELLED_SHARE) * len(labelled))))
    extra = pd.concat([labelled[["image_id", "uri", "label"]]] * repeat, ignore_index=True)
    return pd.concat([train, extra], ignore_index=True)


def labelled_outcomes(
    candidates: Sequence[CandidateManifest], labels: pd.DataFrame, features: ExtractionPlan
) -> list[np.ndarray]:
    """Each candidate's right (True) or wrong on the labelled images `labels` (image_id, uri, label), in
    their order: its model, loaded from the store, run on their rows in the feature store or the
    training-image cache."""
    outcomes = []
    for c in candidates:
        model, card = load_model(c.model_uri)
        logits, _ = infer(model, card, labels, features)
        predicted = np.array(card.classes, dtype=object)[logits.argmax(1).numpy()]
        outcomes.append(predicted == labels.label.to_numpy(dtype=object))
    return outcomes


def by_labels(label_free: Selection, candidates: Sequence[Candidate], outcomes: Sequence[np.ndarray]) -> Selection:
    """`label_free`, the pick `selection.select` made among `candidates`, revised by their `outcomes` on
    the labelled target images: kept when it is within the labels' noise of the most accurate candidate,
    else the candidate the label-free rules rank first among those that are. Confident when the pick is not
    significantly less accurate on the labelled images than the source-only reference."""
    n = len(outcomes[0]) if outcomes else 0
    if n < MIN_LABELS:
        note = f"; {n} labelled target images, fewer than {MIN_LABELS}: not used to choose"
        return label_free._replace(reason=label_free.reason + note)
    paired = [replace(c, val_correct=o) for c, o in zip(candidates, outcomes, strict=True)]
    accuracy = [float(o.mean()) for o in outcomes]
    best = max(range(len(paired)), key=lambda i: (accuracy[i], -i))
    near = sorted(within_noise(outcomes))
    if label_free.index in near:
        pick = label_free.index
        reason = (
            f"label-free pick kept: within the noise of the best on {n} labelled target images "
            f"({accuracy[pick]:.3f}, best {candidates[best].name} {accuracy[best]:.3f}); {label_free.reason}"
        )
    else:
        pick = min(near, key=lambda i: preference(candidates[i], label_free.scores[i], i))
        reason = (
            f"chosen by {n} labelled target images: {accuracy[pick]:.3f} against the label-free pick "
            f"{candidates[label_free.index].name}'s {accuracy[label_free.index]:.3f}, significantly lower; "
            f"{len(near)} candidate(s) within the labels' noise of the best, ranked by the label-free rules"
        )
    low, high = interval(outcomes[pick])
    ref = label_free.reference
    if ref is None or ref == pick:
        return label_free._replace(
            index=pick,
            reason=reason,
            confident=ref is not None,
            confidence=f"{accuracy[pick]:.3f} on {n} labelled target images (95% interval {low:.3f}-{high:.3f})"
            + ("; it is the source-only reference" if ref is not None else "; no source-only reference"),
        )
    worse, p = less_accurate(paired[pick], paired[ref])
    said = (
        f"{accuracy[pick]:.3f} on {n} labelled target images (95% interval {low:.3f}-{high:.3f}) against "
        f"source-only {candidates[ref].name}'s {accuracy[ref]:.3f}"
    )
    return label_free._replace(
        index=pick,
        reason=reason,
        confident=not worse,
        confidence=said + (f", significantly lower (p = {p:.3f})" if worse else ""),
    )


def within_noise(outcomes: Sequence[np.ndarray]) -> set[int]:
    """The indices of the candidates not significantly less accurate on the labelled images than the most
    accurate one (an exact one-sided McNemar test on the same images, `selection.less_accurate`)."""
    correct = [Candidate(str(i), {}, False, val_correct=o) for i, o in enumerate(outcomes)]
    best = max(range(len(correct)), key=lambda i: (float(outcomes[i].mean()), -i))
    return {i for i, c in enumerate(correct) if not less_accurate(c, correct[best])[0]}


def interval(outcome: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The Wilson interval of the accuracy behind `outcome` (right/wrong per image)."""
    ci = binomtest(int(outcome.sum()), len(outcome)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)
