"""The target's class mix, estimated without target labels, and what a run does with it.

Label shift: the target's class shares q(y) differ from the source's p(y) while each class looks the
same, p_t(x | y) = p_s(x | y). Then a source model's posteriors carry over once re-weighted,

    p_t(y | x) = p_s(y | x) q(y) / p(y) / Z(x)                                             (`adjust`)

and q can be estimated from unlabelled target predictions alone:

- `em` (Saerens, Latinne & Decaestecker 2002): alternate the re-weighted posteriors and their mean, the
  maximum-likelihood q for a calibrated model; calibrated first by bias-corrected temperature scaling
  on source validation (`calibrate`; Alexandari, Kundaje & Shrikumar 2020 found BCTS + EM the most
  accurate estimator);
- `bbse` (Lipton, Wang & Smola 2018): solve C w = mu, where C[i, j] = P_s(pred = i, y = j) on source
  validation and mu[i] = P_t(pred = i), then q = w * p.

`estimate` gives either with a bootstrap confidence interval over the target images. When the images
change too (a new camera: covariate shift), a source model's mistakes on the target look like a class mix
of their own, so the estimate is evidence, not truth: `label_shift` calls it a shift only when it is both
significant (a class's interval excludes its source share) and large (total variation `MIN_SHIFT`).

Example, a 3-class source model on a target where class 0 is 80% of the images::

    >>> mix = estimate(val_logits, val_labels, target_logits, num_classes=3, seed=0)
    >>> mix.estimate, mix.low, mix.high        # e.g. [0.79, 0.11, 0.10], [0.75, ...], [0.83, ...]
"""

from __future__ import annotations

import math
from typing import NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adaptflow.errors import lookup

LEVEL = 0.90  # two-sided level of the bootstrap interval
BOOTSTRAPS = 200
# A label shift is a difference the run acts on (class-weighted alignment, the collapse rule, the safety
# net): significant, and at least this much total variation (half the L1 distance) from the source's mix.
# A 10-class source model's mistakes under a pure change of appearance moved the estimate by about 0.1-0.2
# on benchmarks/shifts.py; a class twice as common as in the source (10% -> 20%) moves it by 0.1.
MIN_SHIFT = 0.2
FLOOR = 1e-3  # the smallest share a class keeps in a correction: an estimate of 0 is not proof of absence


class Mix(Protocol):
    """What the functions below read of an estimate: `Estimate`, or the `manifests.ClassMix` a run records."""

    source: list[float]
    estimate: list[float]
    low: list[float]
    high: list[float]


class Estimate(NamedTuple):
    """The target's class shares as `estimate` gives them, beside the source's, per class."""

    source: list[float]  # the shares the estimating model trained on
    estimate: list[float]
    low: list[float]  # the bootstrap interval at `level`
    high: list[float]
    method: str
    level: float
    n_target: int


def calibrate(logits: Tensor, labels: Tensor, steps: int = 50) -> tuple[float, Tensor]:
    """Bias-corrected temperature scaling: (T, b (C,)) minimising the cross-entropy of `logits / T + b`
    on labelled source-validation outputs (N, C), `labels` (N,) int64."""
    z = logits.detach().double()
    y = labels.long()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, bias], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp() + bias, y) + 1e-4 * bias.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or not torch.isfinite(bias).all():
        return 1.0, torch.zeros(z.shape[1], dtype=torch.float64)
    return t, bias.detach()


def em(proba: np.ndarray, prior: np.ndarray, counts: np.ndarray | None = None, iters: int = 200) -> np.ndarray:
    """Saerens' EM: the class mix q that makes the mean of the re-weighted posteriors `proba` (N, C)
    (the model's, trained under `prior` (C,)) equal to q. `counts` (B, N): B weighted copies of the
    rows (bootstrap resamples) solved at once; returns (C,) or (B, C)."""
    w = np.ones((1, len(proba))) if counts is None else np.asarray(counts, np.float64)
    p = np.clip(np.asarray(proba, np.float64), 1e-12, None)
    prior = np.clip(np.asarray(prior, np.float64), 1e-12, None)
    total = w.sum(1, keepdims=True)
    q = np.tile(prior, (len(w), 1))  # (B, C)
    for _ in range(iters):
        # the re-weighted posteriors post[b, n, c] = p[n, c] r[b, c] / (r_b . p_n), r = q / prior, summed over
        # the weighted rows without forming the (B, N, C) array: two matrix products per step
        r = q / prior
        new = r * ((w / (r @ p.T)) @ p) / total
        done = np.abs(new - q).max() < 1e-7
        q = new
        if done:
            break
    return q[0] if counts is None else q


def bbse(
    val_pred: np.ndarray, val_labels: np.ndarray, target_pred: np.ndarray, prior: np.ndarray, counts=None
) -> np.ndarray:
    """Black-box shift estimation from hard predictions: q = w * p with C w = mu, C the source-validation
    joint of (prediction, label), mu the target's prediction shares (B bootstrap copies when `counts`)."""
    c = len(prior)
    joint = np.zeros((c, c))
    np.add.at(joint, (val_pred, val_labels), 1.0)
    joint /= max(len(val_pred), 1)
    onehot = np.eye(c)[target_pred]  # (N, C)
    w = np.ones((1, len(target_pred))) if counts is None else np.asarray(counts, np.float64)
    mu = w @ onehot / w.sum(1, keepdims=True)  # (B, C)
    ratio = np.linalg.lstsq(joint, mu.T, rcond=None)[0].T  # (B, C)
    q = np.clip(ratio, 0.0, None) * prior
    q /= np.clip(q.sum(1, keepdims=True), 1e-12, None)
    return q[0] if counts is None else q


def _em_estimator(val_logits, val_labels, target_logits, prior, counts):
    t, b = calibrate(val_logits, val_labels)
    proba = (target_logits.double() / t + b).softmax(1).numpy()
    return em(proba, prior, counts)


def _bbse_estimator(val_logits, val_labels, target_logits, prior, counts):
    return bbse(val_logits.argmax(1).numpy(), val_labels.numpy(), target_logits.argmax(1).numpy(), prior, counts)


ESTIMATORS = {"em": _em_estimator, "bbse": _bbse_estimator}


def estimate(
    val_logits: Tensor,
    val_labels: Tensor,
    target_logits: Tensor,
    num_classes: int,
    source_prior: np.ndarray | None = None,
    method: str = "em",
    seed: int = 0,
) -> Estimate:
    """The target's class mix from one source model's outputs: `val_logits` (Ns, C) with `val_labels`
    (Ns,) on source validation, `target_logits` (Nt, C); `source_prior` (C,) the class shares the model
    trained on (default: the validation labels'). The interval: the LEVEL quantiles of BOOTSTRAPS
    resamples of the target images."""
    estimator = lookup(ESTIMATORS, "class-mix estimator", method)
    c = num_classes
    val_labels = val_labels.long()
    if source_prior is None:
        source_prior = np.bincount(val_labels.numpy(), minlength=c) / max(len(val_labels), 1)
    prior = np.asarray(source_prior, np.float64)
    point = estimator(val_logits, val_labels, target_logits, prior, None)
    n = len(target_logits)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=BOOTSTRAPS) if n else np.ones((1, 0))
    boot = estimator(val_logits, val_labels, target_logits, prior, counts) if n else np.tile(point, (1, 1))
    tail = (1 - LEVEL) / 2
    low, high = np.quantile(boot, [tail, 1 - tail], axis=0)
    return Estimate(
        source=[float(v) for v in prior],
        estimate=[float(v) for v in point],
        low=[float(min(v, e)) for v, e in zip(low, point, strict=True)],
        high=[float(max(v, e)) for v, e in zip(high, point, strict=True)],
        method=method,
        level=LEVEL,
        n_target=n,
    )


def shares(predictions: np.ndarray, num_classes: int) -> list[float]:
    """Each class's share of the predicted labels `predictions` (N,) int."""
    counts = np.bincount(np.asarray(predictions, np.int64), minlength=num_classes)[:num_classes]
    return [float(v) for v in counts / max(int(counts.sum()), 1)]


def total_variation(a, b) -> float:
    """Half the L1 distance between two class mixes: the share of images that would have to change class."""
    return 0.5 * float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).sum())


def label_shift(mix: Mix | None) -> bool:
    """Does the estimate say the target's class mix differs from the source's, significantly and by at least
    MIN_SHIFT?"""
    if mix is None:
        return False
    source, low, high = (np.asarray(v) for v in (mix.source, mix.low, mix.high))
    significant = bool(((source < low) | (source > high)).any())
    return significant and total_variation(mix.estimate, mix.source) >= MIN_SHIFT


def log_ratio(mix: Mix) -> np.ndarray:
    """(C,) log q(y) / p(y): added to a source model's logits, the prior-corrected prediction (`adjust`)."""
    q = np.clip(np.asarray(mix.estimate, np.float64), FLOOR, None)
    p = np.clip(np.asarray(mix.source, np.float64), FLOOR, None)
    return np.log(q / q.sum()) - np.log(p / p.sum())


def adjust(logits: Tensor, mix: Mix) -> Tensor:
    """Logits re-weighted to the estimated target mix (the argmax of p_s(y|x) q(y) / p(y))."""
    return logits + torch.as_tensor(log_ratio(mix), dtype=logits.dtype, device=logits.device)


def correct(model: torch.nn.Module, mix: Mix) -> torch.nn.Module:
    """`model` predicting under the estimated target mix: `log_ratio(mix)` added to the bias of its output
    layer (`model.classifier`, an nn.Linear), in place. Its logits become `adjust`'s, so every path that
    runs the model (prediction, scoring, ONNX export) predicts under the target's mix with no step of its
    own. Returns `model`."""
    bias = model.classifier.bias
    with torch.no_grad():
        bias += torch.as_tensor(log_ratio(mix), dtype=bias.dtype, device=bias.device)
    return model


def class_weights(mix: Mix, max_weight: float = 10.0) -> np.ndarray:
    """(C,) w(y) = q(y) / p(y), clipped at `max_weight`: the weight of a source image of class y in a
    class-weighted alignment loss (IWDAN, Tachet des Combes et al. 2020), so that the source the target is
    aligned with has the target's class mix; a class the target lacks weighs ~0 (PADA, Cao et al. 2018).
    The mean weight over the source's images is 1."""
    q, p = np.asarray(mix.estimate, np.float64), np.clip(np.asarray(mix.source, np.float64), 1e-12, None)
    w = np.clip(q / p, 0.0, max_weight)
    return w / max(float((w * p).sum()), 1e-12)
