"""Label-free model selection: validators score a trained model without target labels, HIGHER IS BETTER.

Every validator reads one `ValidationInputs`. Two of them, `entropy` and `snd`, reward confident or
tightly clustered target predictions and so rate a model that predicts one class everywhere highly
(skada's benchmark saw SND and DEV pick ~5%-accuracy models). Hence `is_collapsed`, and `select`
never promotes a collapsed candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from adaptflow.adapt.losses import entropy as _entropy
from adaptflow.adapt.losses import information_maximization
from adaptflow.errors import lookup


@dataclass(frozen=True)
class ValidationInputs:
    """What a validator may see: labelled source-validation outputs and unlabelled target outputs."""

    source_logits: Tensor  # (Ns, C) on the held-out source validation split
    source_labels: Tensor  # (Ns,) int64
    source_features: Tensor  # (Ns, d) bottleneck features
    target_logits: Tensor  # (Nt, C)
    target_features: Tensor  # (Nt, d)
    source_train_features: Tensor | None = None  # (Nr, d) for DEV's domain classifier; else source-val is used
    seed: int = 0  # for the subsampling in SND and DEV


def source_val_acc(v: ValidationInputs) -> float:
    """Accuracy on the source validation split: the baseline every other validator must beat."""
    return float((v.source_logits.argmax(1) == v.source_labels).float().mean())


def entropy(v: ValidationInputs) -> float:
    """Negative mean entropy of target predictions (confidence). Rewards collapse."""
    return -float(_entropy(v.target_logits.float()).mean())


def im(v: ValidationInputs) -> float:
    """Information maximisation: entropy of the mean target prediction minus mean entropy. A collapsed
    model loses the first term."""
    return -float(information_maximization(v.target_logits.float()))


def bnm(v: ValidationInputs) -> float:
    """Batch nuclear-norm: ||P||_* / Nt of the (Nt, C) target softmax. Rises with both confidence and
    prediction diversity; one class everywhere gives only sqrt(Nt) / Nt."""
    p = v.target_logits.float().softmax(1)
    return float(torch.linalg.matrix_norm(p, ord="nuc")) / len(p)


def _subsample(n: int, cap: int, seed: int) -> Tensor:
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap]


def snd(v: ValidationInputs, temperature: float = 0.05, max_points: int = 4096) -> float:
    """Soft neighbourhood density (Saito et al. 2021): mean entropy of each target sample's softmax
    over its cosine similarities (/ temperature) to the other targets' softmax outputs. High when
    predictions form dense neighbourhoods. Rewards collapse. O(N^2): subsampled to `max_points`."""
    p = v.target_logits.float().softmax(1)[_subsample(len(v.target_logits), max_points, v.seed)]
    n = len(p)
    if n < 2:
        return 0.0
    p = F.normalize(p, dim=1)
    sim = p @ p.T / temperature  # (N, N)
    sim = sim[~torch.eye(n, dtype=torch.bool, device=sim.device)].view(n, n - 1)  # a sample is not its own neighbour
    return float(_entropy(sim).mean())


def dev(v: ValidationInputs, max_points: int = 4000, max_weight: float = 100.0) -> float:
    """Negative Deep Embedded Validation risk (You et al. 2019).

    A logistic domain classifier on features gives density ratios w = p_t(x)/p_s(x) on source-val
    samples; the risk is the w-weighted source-val cross-entropy with the control variate
    eta = -Cov(wL, w)/Var(w) that cuts its variance: mean(wL) + eta * mean(w) - eta.
    """
    src = v.source_features if v.source_train_features is None else v.source_train_features
    i, j = _subsample(len(src), max_points // 2, v.seed), _subsample(len(v.target_features), max_points // 2, v.seed)
    xs, xt = src[i].double().cpu().numpy(), v.target_features[j].double().cpu().numpy()
    x = np.concatenate([xs, xt])
    domain = np.r_[np.zeros(len(xs)), np.ones(len(xt))]  # 1 = target
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x), domain)
    p_target = clf.predict_proba(scaler.transform(v.source_features.double().cpu().numpy()))[:, 1]
    # Bayes: p_t/p_s = (P(t|x)/P(s|x)) * (n_s/n_t), undoing the classifier's class prior.
    w = np.clip(p_target / np.clip(1 - p_target, 1e-12, None) * len(xs) / len(xt), 0.0, max_weight)
    loss = F.cross_entropy(v.source_logits.double(), v.source_labels, reduction="none").cpu().numpy()
    wl = w * loss
    var = w.var(ddof=1) if len(w) > 1 else 0.0
    eta = -np.cov(wl, w)[0, 1] / var if var > 1e-12 else 0.0
    return -float(wl.mean() + eta * w.mean() - eta)


VALIDATORS: dict[str, Callable[[ValidationInputs], float]] = {
    "source_val_acc": source_val_acc,
    "entropy": entropy,
    "im": im,
    "snd": snd,
    "dev": dev,
    "bnm": bnm,
}
# What `select` ranks by. Each of the three penalises collapse on its own, and source accuracy is the
# strong baseline of pytorch-adapt's benchmark. Entropy and SND reward collapse and DEV is high-variance:
# they are scored and reported beside these, not ranked.
DEFAULT_POLICY: tuple[str, ...] = ("source_val_acc", "im", "bnm")


def get_validator(name: str) -> Callable[[ValidationInputs], float]:
    return lookup(VALIDATORS, "validator", name)


def score(v: ValidationInputs, names: Sequence[str] | None = None) -> dict[str, float]:
    """Every named validator (default: all) on `v`."""
    return {name: get_validator(name)(v) for name in (names or VALIDATORS)}


def is_collapsed(target_logits: Tensor, num_classes: int, threshold: float = 0.6, min_entropy: float = 0.25) -> bool:
    """True when the target predictions have collapsed onto few classes.

    Let q be the share of target samples predicted as each class. Collapsed when the normalised
    entropy H(q)/log(C) < `min_entropy` (for C = 2: a 96/4 split or worse), or, with C >= 3, when one
    class takes more than `threshold` of the predictions. A target whose true labels are that
    imbalanced will be flagged too: raise the thresholds for it.
    """
    if num_classes < 2 or len(target_logits) == 0:
        return False
    q = torch.bincount(target_logits.argmax(1), minlength=num_classes).double() / len(target_logits)
    h = float(-(q[q > 0] * q[q > 0].log()).sum()) / math.log(num_classes)
    return h < min_entropy or (num_classes >= 3 and float(q.max()) > threshold)


class Selection(NamedTuple):
    index: int
    reason: str


def _ranks(values: list[float]) -> np.ndarray:
    """Rank 1 = highest; ties share their mean rank; NaN ranks last."""
    x = np.array([v if math.isfinite(v) else -np.inf for v in values])
    order = (-x).argsort(kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        ranks[x == value] = ranks[x == value].mean()
    return ranks


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


def select(candidates: list[dict], policy: Sequence[str] = DEFAULT_POLICY) -> Selection:
    """Pick a model from `candidates` = [{"name", "scores": {validator: float}, "collapsed": bool}].

    Among the non-collapsed candidates, the lowest mean of per-validator ranks over `policy` wins;
    ties go to the higher source_val_acc, then to the earlier candidate. A collapsed candidate is
    never picked unless all are, in which case the best source_val_acc is, and the reason says so.
    """
    if not candidates:
        raise ValueError("select needs at least one candidate")
    for name in policy:
        get_validator(name)
    acc = [float(c["scores"].get("source_val_acc", float("nan"))) for c in candidates]
    alive = [i for i, c in enumerate(candidates) if not c["collapsed"]]
    if not alive:
        best = max(range(len(candidates)), key=lambda i: (_finite(acc[i]), -i))
        return Selection(best, f"all {len(candidates)} candidates collapsed; fell back to the best source_val_acc")
    missing = [(candidates[i]["name"], n) for i in alive for n in policy if n not in candidates[i]["scores"]]
    if missing:
        raise ValueError(f"candidates lack validator scores (name, validator): {missing}")
    ranks = np.mean([_ranks([float(candidates[i]["scores"][n]) for i in alive]) for n in policy], axis=0)
    k = min(range(len(alive)), key=lambda k: (ranks[k], -_finite(acc[alive[k]]), k))
    skipped = len(candidates) - len(alive)
    return Selection(
        alive[k],
        f"best mean rank {ranks[k]:.2f} over {', '.join(policy)} among {len(alive)} non-collapsed "
        f"candidates ({skipped} collapsed skipped)",
    )
