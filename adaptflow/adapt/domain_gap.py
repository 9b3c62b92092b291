"""How far apart two feature distributions are: proxy A-distance and multi-kernel MMD.

Both take (N, D) arrays (numpy or torch) and return a float; both subsample to bound their cost.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from adaptflow.adapt.losses import mmd


def as_numpy(x) -> np.ndarray:
    """`x` (numpy or torch, N rows) as a float64 (N, D) array, each row flattened."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(len(x), -1)


def proxy_a_distance(source_feats, target_feats, seed: int = 0, max_points: int = 4000) -> float:
    """2(1 - 2 err) of a linear domain classifier on held-out data (Ben-David et al. 2007), in [0, 2].

    An equal number from each domain (at most max_points / 2) is drawn; half of each trains a
    logistic regression and the other half measures its error. 0: indistinguishable; 2: perfectly
    separable. An error above 0.5 only means chance, so the result is clipped at 0.
    """
    rng = np.random.default_rng(seed)
    s, t = as_numpy(source_feats), as_numpy(target_feats)
    n = min(len(s), len(t), max_points // 2)
    if n < 4:
        raise ValueError(f"proxy_a_distance needs at least 4 samples per domain, got {min(len(s), len(t))}")
    s = s[rng.choice(len(s), n, replace=False)]
    t = t[rng.choice(len(t), n, replace=False)]
    h = n // 2  # the first half of each domain trains, the rest tests: both splits stay balanced
    x_train, x_test = np.concatenate([s[:h], t[:h]]), np.concatenate([s[h:], t[h:]])
    y_train, y_test = np.r_[np.zeros(h), np.ones(h)], np.r_[np.zeros(n - h), np.ones(n - h)]
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=1000).fit(scaler.transform(x_train), y_train)
    err = 1.0 - clf.score(scaler.transform(x_test), y_test)
    return float(np.clip(2.0 * (1.0 - 2.0 * err), 0.0, 2.0))


def mmd_distance(a, b, kernel_mul: float = 2.0, kernel_num: int = 5, max_points: int = 2000, seed: int = 0) -> float:
    """Squared multi-kernel MMD between samples `a` and `b` (DAN's estimator, `losses.mmd`), each
    subsampled to `max_points`: its cost is quadratic."""
    rng = np.random.default_rng(seed)
    a, b = as_numpy(a), as_numpy(b)
    a = a[rng.choice(len(a), min(len(a), max_points), replace=False)]
    b = b[rng.choice(len(b), min(len(b), max_points), replace=False)]
    with torch.no_grad():
        return float(mmd(torch.from_numpy(a), torch.from_numpy(b), kernel_mul, kernel_num))
