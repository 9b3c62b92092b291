import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist

from adaptflow.errors import DatasetError
from adaptflow.manifests import ShiftTest
from adaptflow.monitor.shift import MIN_SAMPLES, domain_classifier_auc, mmd_permutation_test

DIM = 16


def _embeddings(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """L2-normalised rows, like backbone embeddings; `shift` moves the mean along the first axis."""
    x = np.random.default_rng(seed).normal(size=(n, DIM))
    x[:, 0] += shift
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _naive_mmd2(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook unbiased MMD² (Gretton et al. 2012, eq. 3), median heuristic on the pooled sample."""
    d = cdist(np.concatenate([a, b]), np.concatenate([a, b]), "sqeuclidean")
    k = np.exp(-d / (2 * np.median(d[~np.eye(len(d), dtype=bool)])))
    m, n = len(a), len(b)
    kxx, kyy, kxy = k[:m, :m], k[m:, m:], k[:m, m:]
    return (kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean()


def test_same_distribution_is_not_detected():
    result = mmd_permutation_test(_embeddings(150, 0), _embeddings(100, 1), seed=0)
    assert isinstance(result, ShiftTest)
    assert result.p_value > 0.05 and not result.detected
    assert (result.n_reference, result.n_batch, result.n_permutations, result.alpha) == (150, 100, 200, 0.05)


def test_false_positive_rate_is_near_alpha():
    # 20 fresh pairs from one distribution: about one in 20 may fall below 0.05, by design.
    p = [
        mmd_permutation_test(_embeddings(60, 2 * s), _embeddings(40, 2 * s + 1), n_permutations=100, seed=s).p_value
        for s in range(20)
    ]
    assert sum(x < 0.05 for x in p) <= 2, p


def test_modest_mean_shift_is_detected():
    # One standard deviation on one axis of 16, before normalising: every one of 20 seeds gives p < 0.01.
    ref, new = _embeddings(200, 0), _embeddings(100, 1, shift=1.0)
    result = mmd_permutation_test(ref, new, seed=0)
    assert result.detected and result.p_value < 0.01 and result.statistic > 0
    assert domain_classifier_auc(ref, new, seed=0) > 0.6


def test_statistic_is_the_unbiased_mmd2_and_p_value_is_bounded():
    a, b = _embeddings(40, 0), _embeddings(30, 1, shift=3.0)
    result = mmd_permutation_test(a, b, n_permutations=50)
    assert result.statistic == pytest.approx(_naive_mmd2(a, b), rel=1e-9)
    assert result.p_value == 1 / 51  # no permutation comes close to a shift this large: the smallest p-value
    same = mmd_permutation_test(a, a.copy(), n_permutations=50)
    assert 1 / 51 <= same.p_value <= 1.0 and same.statistic < 0.0  # unbiased: below zero for identical samples
    strict = mmd_permutation_test(a, b, alpha=0.01)
    assert strict.alpha == 0.01 and strict.p_value == 1 / 201 and strict.detected


def test_seed_determines_everything():
    a, b = _embeddings(300, 0), _embeddings(300, 1, shift=0.2)
    first = mmd_permutation_test(a, b, seed=7, max_samples=100, n_permutations=50)
    assert mmd_permutation_test(a, b, seed=7, max_samples=100, n_permutations=50) == first
    assert mmd_permutation_test(a, b, seed=8, max_samples=100, n_permutations=50).statistic != first.statistic
    assert domain_classifier_auc(a, b, seed=7, max_samples=100) == domain_classifier_auc(a, b, seed=7, max_samples=100)


def test_subsampling_caps_each_side():
    result = mmd_permutation_test(_embeddings(300, 0), _embeddings(80, 1), max_samples=100, n_permutations=20)
    assert (result.n_reference, result.n_batch) == (100, 80)
    tensors = mmd_permutation_test(torch.from_numpy(_embeddings(30, 0)).half(), _embeddings(30, 1), n_permutations=20)
    assert (tensors.n_reference, tensors.n_batch) == (30, 30)  # torch and float16 are read too


def test_result_is_a_json_ready_manifest():
    result = mmd_permutation_test(_embeddings(20, 0), _embeddings(20, 1), n_permutations=20)
    data = result.model_dump(mode="json")
    assert {"statistic", "p_value", "detected"} <= data.keys() and ShiftTest.model_validate(data) == result
    with pytest.raises(ValueError):
        result.detected = True  # frozen


def test_auc_is_near_chance_without_shift_and_high_with_it():
    ref = _embeddings(200, 0)
    assert 0.3 < domain_classifier_auc(ref, _embeddings(200, 1)) < 0.7
    assert domain_classifier_auc(ref, _embeddings(200, 1, shift=3.0)) > 0.95


@pytest.mark.parametrize("test", [mmd_permutation_test, domain_classifier_auc])
def test_bad_inputs_are_readable_errors(test):
    ok = _embeddings(20, 0)
    with pytest.raises(DatasetError, match=f"at least {MIN_SAMPLES} batch samples, got 3"):
        test(ok, ok[:3])
    with pytest.raises(DatasetError, match="at least 5 reference samples, got 0"):
        test(ok[:0], ok)
    with pytest.raises(DatasetError, match="differ in width: 16 vs 8"):
        test(ok, ok[:, :8])
    bad = ok.copy()
    bad[3, 2] = np.nan
    with pytest.raises(DatasetError, match="NaN or infinite"):
        test(ok, bad)
    with pytest.raises(DatasetError, match=r"2-d \(samples, features\) array, got shape \(16,\)"):
        test(ok, ok[0])


def test_bad_parameters_are_refused():
    ok = _embeddings(20, 0)
    for kwargs in ({"n_permutations": 0}, {"alpha": 1.0}, {"max_samples": 2}):
        with pytest.raises(ValueError):
            mmd_permutation_test(ok, ok, **kwargs)
    with pytest.raises(ValueError, match="alpha 0.01 needs more than 99 permutations, got 50"):
        mmd_permutation_test(ok, ok, n_permutations=50, alpha=0.01)
