"""Has a batch of newly arrived target images moved away from the data the champion was trained on?

Two numbers on backbone embeddings (L2-normalised, e.g. 1280-d), both label-free:

- `mmd_permutation_test`: a two-sample test, unbiased MMD² under one Gaussian kernel, its p-value from
  label permutations (Gretton et al. 2012). It decides `detected`.
- `domain_classifier_auc`: how well a cross-validated logistic regression tells batch from reference,
  0.5 for indistinguishable and 1.0 for fully separable: the number to show a person.

A third asks about the classes rather than the pixels:

- `class_mix_test`: does the champion predict another class mix on the new batch than on its own target
  images (a chi-square test of homogeneity, and at least `monitor.min_mix_change` total variation)? A new
  site that sees mostly one class is a shift even when every image looks like the old ones.

`check_shift` applies them to the target's new images (those the champion's run did not see; at most
`monitor.max_samples`, chosen before any feature is read) against the champion's own target images, and
adds the champion's score falling `monitor.score_drop` below its registered one: any sends a run on to
retraining. A night with no new image tests nothing: the champion's scores decide alone.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.stats import chi2_contingency
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from adaptflow.adapt.domain_gap import as_numpy
from adaptflow.adapt.losses import sq_dists
from adaptflow.adapt.samples import sample_key
from adaptflow.config import MonitorConfig
from adaptflow.errors import DatasetError
from adaptflow.extract.features import load_features
from adaptflow.manifests import (
    Champion,
    ClassMixChange,
    ExtractionPlan,
    IngestManifest,
    ModelScores,
    ShiftManifest,
    ShiftTest,
)
from adaptflow.monitor import memo
from adaptflow.store import storage

MIN_SAMPLES = 5  # per side: below this a permutation test has too few distinct splits to mean anything


def _checked(x, name: str, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """`x` as a float64 (n, D) array of at most `max_samples` rows drawn without replacement."""
    if np.ndim(x) != 2:
        raise DatasetError(f"the {name} features must be a 2-d (samples, features) array, got shape {np.shape(x)}")
    if len(x) < MIN_SAMPLES:
        raise DatasetError(f"a shift test needs at least {MIN_SAMPLES} {name} samples, got {len(x)}")
    x = as_numpy(x)
    if not np.isfinite(x).all():
        raise DatasetError(f"the {name} features hold NaN or infinite values")
    if len(x) > max_samples:
        x = x[np.sort(rng.choice(len(x), max_samples, replace=False))]
    return x


def _pair(reference, batch, max_samples: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.random.Generator]:
    if max_samples < MIN_SAMPLES:
        raise ValueError(f"max_samples must be at least {MIN_SAMPLES}, got {max_samples}")
    rng = np.random.default_rng(seed)
    ref = _checked(reference, "reference", max_samples, rng)
    new = _checked(batch, "batch", max_samples, rng)
    if ref.shape[1] != new.shape[1]:
        raise DatasetError(
            f"reference and batch features differ in width: {ref.shape[1]} vs {new.shape[1]}; "
            "were they embedded by the same extractor?"
        )
    return ref, new, rng


def _gaussian_gram(x: np.ndarray) -> np.ndarray:
    """(n, n) k(x_i, x_j) = exp(-|x_i - x_j|² / (2 σ²)) with σ² the median off-diagonal squared distance
    (the median heuristic); a sample of mostly repeated rows falls back to the mean, then to 1."""
    t = torch.from_numpy(x)
    d = sq_dists(t, t).numpy()
    off = d[~np.eye(len(d), dtype=bool)]
    sigma2 = next((s for s in (np.median(off), off.mean()) if s > 0), 1.0)
    return np.exp(-d / (2.0 * sigma2))


def _mmd2_unbiased(k: np.ndarray, first: np.ndarray, m: int) -> np.ndarray:
    """Unbiased MMD² for each row of `first`, a (P, n) 0/1 matrix marking the m rows of one sample in the
    pooled Gram matrix `k` (the other n - m rows are the second sample). All P at once: with a = first,
    b = 1 - a and K0 = k without its diagonal, the within/between sums are a'K0a, b'K0b and a'K0b."""
    n = len(k)
    k0 = k.copy()
    np.fill_diagonal(k0, 0.0)
    ak = first @ k0  # (P, n)
    s_aa = (ak * first).sum(1)
    s_a1 = ak.sum(1)  # a'K0 1 = a'K0a + a'K0b
    s_ab = s_a1 - s_aa
    s_bb = k0.sum() - 2.0 * s_a1 + s_aa
    r = n - m
    return s_aa / (m * (m - 1)) + s_bb / (r * (r - 1)) - 2.0 * s_ab / (m * r)


def mmd_permutation_test(
    reference, batch, n_permutations: int = 200, seed: int = 0, max_samples: int = 500, alpha: float = 0.05
) -> ShiftTest:
    """Test whether `batch` (M, D) comes from the distribution of `reference` (N, D).

    Each side is subsampled without replacement to at most `max_samples` rows with `seed`; the Gram
    matrix of the pooled sample is computed once, with the median-heuristic bandwidth taken on the pooled
    sample, and every permutation only reassigns rows to sides, so the cost is one (n, n) kernel plus one
    (P, n) x (n, n) product. The p-value is (1 + #{permuted statistic >= observed}) / (1 + P), so it is
    never 0 and is exact in the sense of a Monte-Carlo test: under no shift, P(p <= alpha) <= alpha.
    The same inputs and seed give the same result. `alpha` must exceed 1 / (1 + P), the smallest
    p-value, or nothing could ever be detected (ValueError). Raises DatasetError for fewer than MIN_SAMPLES rows on
    a side, non-finite values or differing widths.
    """
    if n_permutations < 1:
        raise ValueError(f"n_permutations must be at least 1, got {n_permutations}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    if alpha * (1 + n_permutations) <= 1.0:  # the smallest p-value is 1 / (1 + P): nothing could be detected
        raise ValueError(f"alpha {alpha} needs more than {1 / alpha - 1:.0f} permutations, got {n_permutations}")
    ref, new, rng = _pair(reference, batch, max_samples, seed)
    n_ref, n = len(ref), len(ref) + len(new)
    k = _gaussian_gram(np.concatenate([ref, new]))  # (n, n), reference rows first
    # Row 0 is the observed split; each further row marks a random n_ref rows as the "reference" side.
    order = np.vstack([np.arange(n), rng.permuted(np.tile(np.arange(n), (n_permutations, 1)), axis=1)])
    first = np.zeros((n_permutations + 1, n))
    np.put_along_axis(first, order[:, :n_ref], 1.0, axis=1)
    stats = _mmd2_unbiased(k, first, n_ref)
    observed = float(stats[0])
    # A permutation that reproduces the observed split must count as >=, whatever the rounding.
    tol = 1e-12 * max(1.0, abs(observed))
    p_value = float((1 + np.count_nonzero(stats[1:] >= observed - tol)) / (1 + n_permutations))
    return ShiftTest(
        statistic=observed,
        p_value=p_value,
        n_reference=n_ref,
        n_batch=len(new),
        n_permutations=n_permutations,
        detected=p_value < alpha,
        alpha=alpha,
    )


def domain_classifier_auc(reference, batch, seed: int = 0, max_samples: int = 500, folds: int = 5) -> float:
    """Cross-validated ROC AUC of a logistic regression (on standardised features) that tells `batch`
    rows from `reference` rows, each side subsampled to `max_samples` with `seed`. Folds are stratified
    and shuffled with `seed`, and the AUC is averaged over them: about 0.5 (noise either way) when the
    batch looks like the reference, towards 1.0 the further it has moved. Raises DatasetError as
    `mmd_permutation_test` does."""
    ref, new, _ = _pair(reference, batch, max_samples, seed)
    x = np.concatenate([ref, new])
    y = np.r_[np.zeros(len(ref)), np.ones(len(new))]
    cv = StratifiedKFold(n_splits=max(2, min(folds, len(ref), len(new))), shuffle=True, random_state=seed)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    return float(np.mean(cross_val_score(clf, x, y, cv=cv, scoring="roc_auc")))


def class_mix_test(
    before: list[float], n_before: int, after: list[float], n_after: int, alpha: float, min_change: float
) -> ClassMixChange:
    """Do two samples' predicted class shares (`before` over `n_before` images, `after` over `n_after`)
    differ? Pearson's chi-square test of homogeneity on the counts (classes neither sample predicts left
    out); detected when p < `alpha` and the total variation between the shares is at least `min_change`,
    so that a large batch does not call a difference of a few images a shift."""
    counts = np.round(np.array([np.asarray(before) * n_before, np.asarray(after) * n_after]))
    counts = counts[:, counts.sum(0) > 0]
    tv = 0.5 * float(np.abs(np.asarray(before) - np.asarray(after)).sum())
    p = float(chi2_contingency(counts)[1]) if counts.shape[1] >= 2 and counts.sum(1).min() > 0 else 1.0
    return ClassMixChange(
        before=[float(v) for v in before],
        after=[float(v) for v in after],
        sizes=(n_before, n_after),
        total_variation=tv,
        p_value=p,
        detected=p < alpha and tv >= min_change,
    )


# Nine parameters: the test reads the target and its features, the champion with its scores and kept
# class mix, the monitor's settings and the run's seed; `store` and `labels` are optional evidence.
def check_shift(
    champion: Champion,
    target: IngestManifest,
    features: ExtractionPlan,
    scores: ModelScores | None,
    cfg: MonitorConfig,
    seed: int = 0,
    reference_mix: tuple[list[float], int] | None = None,
    store: str | None = None,
    labels: IngestManifest | None = None,
) -> ShiftManifest:
    """Test the target batch against the champion's reference images, and the champion's score drop;
    with `reference_mix` (the champion's predicted class shares on its reference images, and how many
    it predicted: `monitor.champion.reference_mix`), the class mix it predicts on the batch too. With
    `store`, the image test of a target already tested against the same reference is the one kept there
    (`monitor.memo`): same images, same features, same settings, same outcome. Target `labels` for
    training other than those the champion's run used are a reason to retrain of their own."""
    test, auc, n_new, untested = _image_test(champion, target, features, cfg, seed, store)
    drop = None
    if scores is not None and champion.selection_score is not None:
        drop = champion.selection_score - scores.selection_score
    mix = None
    if cfg.class_mix and reference_mix is not None and scores is not None and scores.predicted_mix:
        mix = class_mix_test(
            reference_mix[0], reference_mix[1], scores.predicted_mix, scores.n_scored, cfg.alpha, cfg.min_mix_change
        )
    shifted = (test is not None and test.detected) or (mix is not None and mix.detected)
    degraded = scores is None or (drop is not None and drop > cfg.score_drop) or scores.collapsed
    reasons = []
    if untested:
        reasons.append(untested)
    else:
        reasons.append(
            f"MMD² {test.statistic:.4f}, p = {test.p_value:.3f} "
            f"{'<' if test.detected else '>='} {cfg.alpha} (domain AUC {auc:.2f}; {test.n_batch} of {n_new} new images "
            f"against {test.n_reference} of the champion's)"
        )
    if mix is not None:
        reasons.append(
            f"predicted class mix moved by {mix.total_variation:.3f} (total variation), p = {mix.p_value:.3f} "
            f"{'<' if mix.p_value < cfg.alpha else '>='} {cfg.alpha}"
            + ("" if mix.detected or mix.p_value >= cfg.alpha else f", below {cfg.min_mix_change}")
        )
    if scores is None:
        reasons.append("the champion cannot score this data (its classes differ)")
    elif drop is not None:
        reasons.append(
            f"champion selection score {scores.selection_score:.3f} vs {champion.selection_score:.3f} at "
            f"registration (drop {drop:+.3f}, limit {cfg.score_drop}"
            + (f"; measured by an earlier run on {scores.reused:.0%} of this sample)" if scores.reused else ")")
        )
    if scores is not None and scores.collapsed:
        reasons.append("the champion's target predictions collapsed")
    new_labels = labels is not None and labels.fingerprint != champion.labels_fingerprint
    if new_labels:
        reasons.append(f"{labels.n_images} target labels for training the champion's run did not have")
    retrain = champion.reference_index_uri is None or shifted or degraded or new_labels
    verdict = "shift detected" if shifted else ("champion degraded" if degraded else "no shift")
    verdict += ", new labels" if new_labels else ""
    return ShiftManifest(
        champion_version=champion.version,
        test=test,
        domain_auc=auc,
        champion=scores,
        score_drop=drop,
        shift_detected=shifted,
        degraded=degraded,
        retrain=retrain,
        reason=f"{verdict}: " + "; ".join(reasons),
        class_mix=mix,
        n_new=n_new,
    )


def _image_test(
    champion: Champion, target: IngestManifest, features: ExtractionPlan, cfg: MonitorConfig, seed: int, store
) -> tuple[ShiftTest | None, float | None, int | None, str | None]:
    """The MMD test and domain AUC of the target's new images against the champion's reference images,
    how many images were new, and why there is no test when there is none."""
    if champion.reference_index_uri is None:
        return None, None, None, f"the champion's reference images (run {champion.run_id}) are gone: retraining"
    settings = (cfg.max_samples, cfg.permutations, cfg.alpha, seed)
    key = memo.key(champion.reference_index_uri, target.fingerprint, features.fingerprint, *settings)
    kept = memo.image_test(store, key) if store else None
    if kept is not None:
        return kept
    nothing_new = f"no new target images since the champion's run {champion.run_id}: nothing to test"
    if target.fingerprint == champion.reference_fingerprint:  # the very images the champion trained with
        return None, None, 0, nothing_new
    test = auc = None
    untested = None
    reference_ids = storage.read_table(champion.reference_index_uri, columns=["image_id"])["image_id"].to_pylist()
    target_ids = storage.read_table(target.index_uri, columns=["image_id"])["image_id"].to_pylist()
    batch_ids = new_images(target_ids, set(reference_ids))
    n_new = len(batch_ids)
    if n_new == 0:
        untested = nothing_new
    else:
        ref = _reference_sample(champion, features, reference_ids, cfg.max_samples, seed, store)
        new = _normalised(load_features(features.features_uri, batch_ids[: cfg.max_samples]))
        try:
            test = mmd_permutation_test(ref, new, cfg.permutations, seed, cfg.max_samples, cfg.alpha)
            auc = domain_classifier_auc(ref, new, seed, cfg.max_samples)
        except DatasetError as e:  # e.g. a batch of 3 images: too few to test; the champion's scores decide
            untested = f"no shift test ({e})"
    if store:
        memo.keep_image_test(store, key, (test, auc, n_new, untested))
    return test, auc, n_new, untested


def _reference_sample(
    champion: Champion, features: ExtractionPlan, reference_ids: list[str], max_samples: int, seed: int, store
) -> np.ndarray:
    """The normalised embeddings of the champion's reference sample (the first `max_samples` of its target
    images in the seeded order): the same every night until the champion changes, so read from the feature
    shards, which hold them among every other image's, once, and then from the monitor's memo."""
    key = memo.key(champion.reference_index_uri, features.features_uri, max_samples, seed)
    sample = memo.reference_features(store, key) if store else None
    if sample is None:
        sample = load_features(features.features_uri, _seeded_order(reference_ids, seed)[:max_samples])
        if store:
            memo.keep_reference_features(store, key, sample)
    return _normalised(sample)


def new_images(target_ids: list[str], reference: set[str]) -> list[str]:
    """The target's images the champion's run did not see (the nights' new ones), in a seeded order that
    keeps an image's place as more arrive: the shift test takes the first `monitor.max_samples`. Only new
    images are tested: the old ones are the champion's own reference, and a batch topped up with them
    would dilute a shift of the new ones into noise."""
    return _seeded_order([i for i in target_ids if i not in reference])


def _seeded_order(ids: list[str], seed: int = 0) -> list[str]:
    """`ids` in the order of a seeded hash of each (`adapt.samples.sample_key`): the first k are a sample
    that keeps its members as more ids arrive, so the same reference images are read every night."""
    return sorted(ids, key=lambda i: (sample_key(i, seed), i))


def _normalised(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length: the test compares directions of embeddings, not their norms."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
