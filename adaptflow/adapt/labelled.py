"""Choosing the model with a few target labels (`--target-train-labels`).

Label-free selection is the weak spot of unsupervised adaptation; a few dozen labelled target images are
direct evidence. `by_labels` keeps what they can tell and no more: each finished candidate is scored on the
labelled images (the same images for all, none used in training), and a candidate significantly less
accurate there than the most accurate one (an exact one-sided McNemar test, as selection tests source
validation) is out. Among those left, within the labels' noise of the best, the label-free rules choose
(`selection.select`'s ranks): fifty labels rarely separate two good models, and where they do not, the
label-free evidence still counts. Collapse is not judged here: where labels say a model predicting mostly
one class is right, the target has mostly that class."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pandas as pd
from scipy.stats import binomtest

from adaptflow.adapt.selection import Candidate, Selection, less_accurate, preference
from adaptflow.manifests import CandidateManifest, ExtractionPlan
from adaptflow.models.card import infer, load_model

MIN_LABELS = 10  # fewer labelled images than this cannot tell candidates apart: label-free rules alone


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
    near = [i for i in range(len(paired)) if not less_accurate(paired[i], paired[best])[0]]
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


def interval(outcome: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The Wilson interval of the accuracy behind `outcome` (right/wrong per image)."""
    ci = binomtest(int(outcome.sum()), len(outcome)).proportion_ci(level, method="wilson")
    return float(ci.low), float(ci.high)
