"""Label-free model selection: validators score a trained model without target labels, HIGHER IS BETTER.

Every validator reads one `ValidationInputs`. Two of them, `entropy` and `snd`, reward confident or
tightly clustered target predictions and so rate a model that predicts one class everywhere highly
(skada's benchmark saw SND and DEV pick ~5%-accuracy models). Hence `is_collapsed`, and
`adapt.selection.select` never promotes a collapsed candidate.

Each docstring gives the formula, the paper, what it reads and an example (tests/test_docs_examples.py
runs them): `source_val_acc` (the source-risk baseline), `entropy` (Morerio et al. 2018), `im`
(information maximisation: Shi & Sha 2012, SHOT), `bnm` (Cui et al. 2020), `snd` (Saito et al. 2021),
`dev` (You et al. 2019), `rv` (reverse validation, Zhong et al. 2010) and `iwa` (importance weighting,
Sugiyama et al. 2007). `score` runs them by name; `is_collapsed` is this project's guard.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.preprocessing import StandardScaler
from torch import Tensor

from adaptflow.adapt import priors
from adaptflow.adapt.losses import entropy as _entropy
from adaptflow.adapt.losses import information_maximization
from adaptflow.errors import lookup
from adaptflow.state import LRUCache


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
    # The frozen backbone's features of the same images, identical for every candidate of a run: a space no
    # candidate shaped, where importance weights mean the same for all (`iwa`). None: iwa is NaN.
    shared_source_train: Tensor | None = None  # (Nr', D) source training images (a sample will do)
    shared_source: Tensor | None = None  # (Ns, D) the source-validation images, in source_logits' order
    shared_target: Tensor | None = None  # (Nt', D) target images (a sample will do)


def source_val_acc(v: ValidationInputs) -> float:
    """Accuracy on the source validation split: the baseline every other validator must beat.

    acc = mean_i [argmax_c source_logits_ic = source_labels_i]: the "source risk" criterion that You et al.
    2019 and Saito et al. 2021 compare with. Labelled, but on the wrong domain: it need not follow target
    accuracy.

    Reads source_logits (Ns, C) and source_labels (Ns,); returns a float in [0, 1].

    >>> v = ValidationInputs(torch.eye(3), torch.tensor([0, 1, 1]), torch.eye(3), torch.eye(3), torch.eye(3))
    >>> round(source_val_acc(v), 4)
    0.6667
    """
    return float((v.source_logits.argmax(1) == v.source_labels).float().mean())


def entropy(v: ValidationInputs) -> float:
    """Negative mean entropy of target predictions (confidence). Rewards collapse.

    score = -mean_i H(softmax(target_logits_i)), in [-log C, 0]. Proposed for label-free validation by
    Morerio, Cavazza & Murino 2018, "Minimal-Entropy Correlation Alignment for Unsupervised Deep Domain
    Adaptation" (ICLR); pytorch-adapt's EntropyValidator.

    Reads target_logits (Nt, C); returns a float.

    >>> from dataclasses import replace
    >>> t = 100.0 * torch.eye(3)  # confident, one per class
    >>> v = ValidationInputs(t, torch.arange(3), torch.eye(3), torch.zeros(3, 3), torch.eye(3))
    >>> round(entropy(v), 4)  # uniform target predictions: -log 3
    -1.0986
    >>> entropy(replace(v, target_logits=t[[0, 0, 0]])) > -1e-6  # one class, confidently: the maximum, 0
    True
    """
    return -float(_entropy(v.target_logits.float()).mean())


def im(v: ValidationInputs) -> float:
    """Information maximisation: entropy of the mean target prediction minus mean entropy. A collapsed
    model loses the first term.

    score = H(mean_i p_i) - mean_i H(p_i) = -information_maximization(target_logits), p_i the target
    softmax: the mutual information between target inputs and predicted labels, in [0, log C], that
    Krause et al. 2010 and Shi & Sha 2012 maximise and SHOT (Liang et al. 2020) trains with (see
    `losses.information_maximization`); pytorch-adapt's IMValidator.

    Reads target_logits (Nt, C); returns a float.

    >>> from dataclasses import replace
    >>> t = 100.0 * torch.eye(3)  # confident, one per class
    >>> v = ValidationInputs(t, torch.arange(3), torch.eye(3), t, torch.eye(3))
    >>> round(im(v), 4)  # log 3, the maximum
    1.0986
    >>> abs(im(replace(v, target_logits=t[[0, 0, 0]]))) < 1e-6  # one class: nothing
    True
    """
    return -float(information_maximization(v.target_logits.float()))


def bnm(v: ValidationInputs) -> float:
    """Batch nuclear-norm: ||P||_* / Nt of the (Nt, C) target softmax. Rises with both confidence and
    prediction diversity; one class everywhere gives only sqrt(Nt) / Nt.

    ||P||_* is the sum of the singular values of P = softmax(target_logits). Cui, Wang, Zhuo, Li, Huang &
    Tian 2020, "Towards Discriminability and Diversity: Batch Nuclear-norm Maximization under Label
    Insufficient Situations" (CVPR), maximise it as a loss; pytorch-adapt's BNMValidator scores with it.
    Its maximum, sqrt(min(Nt, C) Nt) / Nt, is reached by one-hot predictions spread evenly over the classes.

    Reads target_logits (Nt, C); returns a float.

    >>> from dataclasses import replace
    >>> t = 100.0 * torch.eye(2)[[0, 1, 0, 1]]  # confident, two per class
    >>> v = ValidationInputs(t, torch.tensor([0, 1, 0, 1]), torch.eye(4), t, torch.eye(4))
    >>> round(bnm(v), 4)  # sqrt(2 * 4) / 4
    0.7071
    >>> round(bnm(replace(v, target_logits=t[[0, 0, 0, 0]])), 4)  # one class: sqrt(4) / 4
    0.5
    """
    p = v.target_logits.float().softmax(1)
    return float(torch.linalg.matrix_norm(p, ord="nuc")) / len(p)


def _subsample(n: int, cap: int, seed: int) -> Tensor:
    if n <= cap:
        return torch.arange(n)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:cap]


def snd(v: ValidationInputs, temperature: float = 0.05, max_points: int = 4096) -> float:
    """Soft neighbourhood density (Saito et al. 2021): mean entropy of each target sample's softmax
    over its cosine similarities (/ temperature) to the other targets' softmax outputs. High when
    predictions form dense neighbourhoods. Rewards collapse. O(N^2): subsampled to `max_points`.

    With q_i = p_i / ||p_i|| the L2-normalised target softmax: s_ij = <q_i, q_j> / temperature for j != i
    (a sample is left out of its own neighbourhood, as pytorch-adapt's SNDValidator masks it),
    score = mean_i H(softmax_j s_ij), in [0, log(N - 1)]. Saito, Kim, Teterwak, Sclaroff, Darrell & Saenko
    2021, "Tune it the Right Way: Unsupervised Validation of Domain Adaptation via Soft Neighborhood
    Density" (ICCV); 0.05 is pytorch-adapt's temperature too.

    Reads target_logits (Nt, C) and seed; returns a float.

    >>> from dataclasses import replace
    >>> t = 100.0 * torch.eye(2)[[0, 0, 1, 1, 1]]  # two clusters, of 2 and 3
    >>> v = ValidationInputs(t, torch.zeros(5, dtype=torch.long), torch.eye(5), t, torch.eye(5))
    >>> round(snd(v), 4)  # 3/5 log 2: each of the 3 has two close neighbours, each of the 2 one
    0.4159
    >>> round(snd(replace(v, target_logits=t[[0, 0, 0, 0, 0]])), 4)  # one class: log 4, the maximum
    1.3863
    """
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

    You, Wang, Long & Jordan 2019, "Towards Accurate Model Selection in Deep Unsupervised Domain
    Adaptation" (ICML). Here w = P(t|x) / P(s|x) * n_s / n_t from a logistic regression on the standardised
    features (source_train_features, else source_features, against target_features; up to max_points / 2
    of each), clipped to [0, max_weight], and L the per-sample cross-entropy on the source-validation split.

    Reads source_logits (Ns, C), source_labels (Ns,), source_features (Ns, d), target_features (Nt, d),
    source_train_features (Nr, d) if given, and seed; returns a float, minus the estimated target risk.

    When the classifier cannot tell the domains apart, w = 1, eta = 0 and DEV is minus the source-validation
    cross-entropy:

    >>> _ = torch.manual_seed(0)
    >>> x, y, logits = torch.randn(40, 3), torch.randint(0, 3, (40,)), torch.randn(40, 3)
    >>> v = ValidationInputs(logits, y, x, logits, x)  # the target's features are the source's
    >>> abs(dev(v) + float(F.cross_entropy(logits, y))) < 1e-4
    True
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


def rv(v: ValidationInputs, max_points: int = 4000, alpha: float = 1.0) -> float:
    """Reverse validation (Zhong et al. 2010, as a validator in pytorch-adapt): fit a linear classifier on
    the model's own target features with its own target predictions as labels, then measure it on the
    labelled source-validation features. Pseudo-labels that follow the structure the model gave the
    target, and carry it back to the source, score high; a labelling the features do not support does
    not. One class predicted everywhere scores at most that class's source share. The reverse classifier
    is a ridge classifier (closed form, one solve): a logistic regression fitted by L-BFGS made this
    validator 2.2 s of a features-mode candidate's 5.2 s (benchmarks/selection.py, mnist-m).

    h = RidgeClassifier fitted on (target_features, argmax target_logits), both standardised by the
    target's scaler, up to max_points targets; score = mean_i [h(source_features_i) = source_labels_i].
    Zhong, Fan, Yang, Verscheure & Ren 2010, "Cross Validation Framework to Choose amongst Models and
    Datasets for Transfer Learning" (ECML PKDD), as Ganin et al. 2016 used it to select DANN's settings.

    Reads target_logits (Nt, C), target_features (Nt, d), source_features (Ns, d), source_labels (Ns,)
    and seed; returns a float in [0, 1].

    >>> from dataclasses import replace
    >>> x, y = torch.tensor([[-2.0], [-1.0], [1.0], [2.0]]), torch.tensor([0, 0, 1, 1])
    >>> t = F.one_hot(y, 3).float()  # pseudo-labels that follow the features
    >>> v = ValidationInputs(t, y, x, t, x)
    >>> rv(v)
    1.0
    >>> rv(replace(v, target_logits=t[[0, 0, 0, 0]]))  # one class: class 0's share of the source
    0.5
    """
    idx = _subsample(len(v.target_features), max_points, v.seed)
    pseudo = v.target_logits.argmax(1)[idx].cpu().numpy()
    if len(np.unique(pseudo)) < 2:
        return float((v.source_labels.cpu().numpy() == pseudo[0]).mean()) if len(pseudo) else 0.0
    xt = v.target_features[idx].double().cpu().numpy()
    scaler = StandardScaler().fit(xt)
    clf = RidgeClassifier(alpha=alpha).fit(scaler.transform(xt), pseudo)
    predicted = clf.predict(scaler.transform(v.source_features.double().cpu().numpy()))
    return float((predicted == v.source_labels.cpu().numpy()).mean())


class ImportanceWeightedAccuracy:
    """`iwa`: importance-weighted source-validation accuracy, weights from the shared frozen space: a
    logistic domain classifier on the frozen backbone's features (source training vs target) gives each
    source-validation image w = p_t(x)/p_s(x), so source images that look like the target count more.
    Unlike DEV, the weights come from a space no candidate shaped, so they are the same for every
    candidate of a run and an aligned featurizer cannot flatten them. Clipped at `max_weight`, then
    normalised to mean 1. NaN without shared features.

    score = mean_i w_i [argmax_c source_logits_ic = source_labels_i], an estimate of target accuracy:
    importance-weighted validation under covariate shift (Sugiyama, Krauledat & Mueller 2007, "Covariate
    Shift Adaptation by Importance Weighted Cross Validation", JMLR), with the density ratio from a
    probabilistic domain classifier (as in Bickel, Brueckner & Scheffer 2009, "Discriminative Learning
    under Covariate Shift", JMLR); `density_ratio` fits it.

    Reads source_logits (Ns, C), source_labels (Ns,), shared_source_train (Nr', D), shared_source (Ns, D)
    and shared_target (Nt', D); returns a float (the weights average 1: all correct gives 1.0), or NaN.

    The scorer owns what it fits, as skada's scorers own their fitted weight estimators: `ratios` keeps
    the weights of the `kept` inputs used last (an `LRUCache`; `iwa`, the registered one, lives as long as
    the process). Keyed by a digest of the shared features and the settings, so weights never go stale:
    other features are another key.

    >>> from dataclasses import replace
    >>> v = ValidationInputs(torch.eye(3), torch.arange(3), torch.eye(3), torch.eye(3), torch.eye(3))
    >>> iwa(v)  # no shared features
    nan
    >>> _ = torch.manual_seed(0)
    >>> frozen = torch.randn(6, 8)  # the frozen backbone's features
    >>> round(iwa(replace(v, shared_source_train=frozen, shared_source=frozen[:3], shared_target=frozen)), 6)
    1.0
    """

    def __init__(self, max_points: int = 4000, max_weight: float = 20.0, kept: int = 4) -> None:
        self.max_points, self.max_weight = max_points, max_weight
        self.ratios: LRUCache[np.ndarray] = LRUCache(max_items=kept)

    def __call__(self, v: ValidationInputs) -> float:
        if v.shared_source is None or v.shared_target is None or v.shared_source_train is None:
            return math.nan
        correct = (v.source_logits.argmax(1) == v.source_labels).double().cpu().numpy()
        w = self.density_ratio(v.shared_source_train, v.shared_target, v.shared_source)
        return float((w * correct).mean())

    def density_ratio(self, source: Tensor, target: Tensor, at: Tensor) -> np.ndarray:
        """w = p_target(x) / p_source(x) at the rows of `at`, from a logistic domain classifier on 64
        principal components (standardised), clipped and normalised to mean 1 (read-only). Seeded by
        nothing a candidate owns: the same inputs give every candidate the same weights, so they are fitted
        once per scorer and inputs (2.4 s of a features-mode candidate's 9 s on the demo)."""
        digest = hashlib.sha256()
        for t in (source, target, at):
            digest.update(str(tuple(t.shape)).encode())
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        key = f"{digest.hexdigest()}-{self.max_points}-{self.max_weight}"
        if (w := self.ratios.get(key)) is None:
            w = _fit_density_ratio(source, target, at, self.max_points, self.max_weight)
            w.setflags(write=False)
            self.ratios.put(key, w)
        return w


iwa = ImportanceWeightedAccuracy()


def _fit_density_ratio(source: Tensor, target: Tensor, at: Tensor, max_points: int, max_weight: float) -> np.ndarray:
    from sklearn.decomposition import PCA

    seed = 0
    i, j = _subsample(len(source), max_points // 2, seed), _subsample(len(target), max_points // 2, seed)
    xs, xt = source[i].double().cpu().numpy(), target[j].double().cpu().numpy()
    x = np.concatenate([xs, xt])
    pca = PCA(min(64, *x.shape), random_state=seed).fit(x)
    scaler = StandardScaler().fit(pca.transform(x))
    clf = LogisticRegression(C=0.1, max_iter=2000).fit(
        scaler.transform(pca.transform(x)), np.r_[np.zeros(len(xs)), np.ones(len(xt))]
    )
    p = clf.predict_proba(scaler.transform(pca.transform(at.double().cpu().numpy())))[:, 1]
    w = np.clip(p / np.clip(1 - p, 1e-12, None) * len(xs) / len(xt), 0.0, max_weight)
    return w / w.mean() if w.mean() > 0 else np.ones_like(w)


VALIDATORS: dict[str, Callable[[ValidationInputs], float]] = {
    "source_val_acc": source_val_acc,
    "entropy": entropy,
    "im": im,
    "snd": snd,
    "dev": dev,
    "bnm": bnm,
    "rv": rv,
    "iwa": iwa,
}


def get_validator(name: str) -> Callable[[ValidationInputs], float]:
    """The validator registered under `name` in VALIDATORS; an unknown name raises UnknownNameError.

    >>> get_validator("bnm") is bnm
    True
    """
    return lookup(VALIDATORS, "validator", name)


def score(v: ValidationInputs, names: Sequence[str] | None = None) -> dict[str, float]:
    """Every named validator (default: all) on `v`.

    >>> t = 100.0 * torch.eye(3)
    >>> v = ValidationInputs(t, torch.arange(3), torch.eye(3), t, torch.eye(3))
    >>> {name: round(s, 4) for name, s in score(v, ["source_val_acc", "im"]).items()}
    {'source_val_acc': 1.0, 'im': 1.0986}
    """
    return {name: get_validator(name)(v) for name in (names or VALIDATORS)}


def is_collapsed(
    target_logits: Tensor,
    num_classes: int,
    mix: priors.Mix | None = None,
    threshold: float = 0.6,
    min_entropy: float = 0.25,
    margin: float = 0.15,
) -> bool:
    """True when the target predictions have collapsed onto few classes where the target's class mix
    does not put them.

    Let q be the share of target samples predicted as each class. Without an estimate of the target's
    class mix (`mix`, `adapt.priors`), collapsed when the normalised entropy H(q)/log(C) < `min_entropy`
    (for C = 2: a 96/4 split or worse), or, with C >= 3, when one class takes more than `threshold` of the
    predictions. With one, skew the estimate expects is not collapse: a class may take up to `margin` more
    than the upper end of its interval (and never less than `threshold`), and the entropy may fall to half
    the estimate's own. An interval wider than `MAX_INTERVAL` cannot excuse anything: an estimate too
    uncertain to say falls back to the rule without one.

    A rule of this project's, no paper's. Reads target_logits (N, C); returns a bool.

    >>> one_hot = 100.0 * torch.eye(3)
    >>> is_collapsed(one_hot[[0, 0, 0, 1]], num_classes=3)  # 3/4 on class 0, over `threshold`
    True
    >>> is_collapsed(one_hot[[0, 1, 2, 0]], num_classes=3)
    False
    """
    if num_classes < 2 or len(target_logits) == 0:
        return False
    q = torch.bincount(target_logits.argmax(1), minlength=num_classes).double() / len(target_logits)
    h = _normalised_entropy(q, num_classes)
    allowed = torch.full((num_classes,), threshold if num_classes >= 3 else 1.0, dtype=torch.float64)
    floor = min_entropy
    if mix is not None and len(mix.estimate) == num_classes:
        low, high = torch.tensor(mix.low, dtype=torch.float64), torch.tensor(mix.high, dtype=torch.float64)
        precise = (high - low) <= MAX_INTERVAL
        allowed = torch.where(precise, torch.maximum(allowed, high + margin), allowed)
        if bool(precise.all()):
            floor = min(
                min_entropy, 0.5 * _normalised_entropy(torch.tensor(mix.estimate, dtype=torch.float64), num_classes)
            )
    return h < floor or bool((q > allowed).any())


MAX_INTERVAL = 0.3  # an estimated class share known no better than this cannot excuse a skewed prediction


def _normalised_entropy(q: Tensor, num_classes: int) -> float:
    """H(q) / log(C) of a class-share vector."""
    nz = q[q > 0]
    return float(-(nz * nz.log()).sum()) / math.log(num_classes)
