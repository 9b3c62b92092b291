"""Label-free validators, the collapse guard, and domain-gap measures (selection: test_adapt_selection.py)."""

import math

import numpy as np
import pytest
import torch
from synthetic import model_outputs

from adaptflow.adapt.domain_gap import mmd_distance, proxy_a_distance
from adaptflow.adapt.validators import VALIDATORS, is_collapsed, score

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C = 4


def _model(seed: int, src_acc: float, tgt_acc: float, confidence: float, collapse_source: bool, collapse_target: bool):
    return model_outputs(seed, src_acc, tgt_acc, confidence, collapse_source, collapse_target)


# A grid of four candidates; the good one is not the best on source accuracy.
GRID = {
    "good": _model(0, src_acc=0.9, tgt_acc=0.85, confidence=4.0, collapse_source=False, collapse_target=False),
    "mediocre": _model(1, src_acc=0.7, tgt_acc=0.55, confidence=1.0, collapse_source=False, collapse_target=False),
    "collapsed": _model(2, src_acc=0.0, tgt_acc=0.0, confidence=8.0, collapse_source=True, collapse_target=True),
    # Fine on source, one class on target: the model source accuracy alone would promote.
    "target_collapsed": _model(3, 0.97, 0.0, 8.0, collapse_source=False, collapse_target=True),
}


@pytest.fixture(scope="module")
def grid_scores() -> dict[str, dict[str, float]]:
    return {name: score(v) for name, v in GRID.items()}


def test_scores_are_finite_floats(grid_scores):
    for scores in grid_scores.values():
        assert set(scores) == set(VALIDATORS)
        assert all(isinstance(s, float) and math.isfinite(s) for s in scores.values())


def test_iwa_needs_the_shared_space():
    import dataclasses

    inputs = GRID["good"]
    assert math.isfinite(score(inputs)["iwa"])
    assert math.isnan(score(dataclasses.replace(inputs, shared_source=None))["iwa"])


def test_iwa_weights_are_fitted_once_per_shared_space_and_candidates_share_them(monkeypatch):
    """The weights come from the frozen space alone: a second candidate with the same shared features
    reuses them (the same score as fitting afresh), and other shared features get their own. The scorer
    owns them: another scorer fits its own."""
    import dataclasses

    from adaptflow.adapt import validators

    fits = []
    real = validators._fit_density_ratio
    monkeypatch.setattr(validators, "_fit_density_ratio", lambda *a: fits.append(1) or real(*a))
    iwa = validators.ImportanceWeightedAccuracy()
    good, mediocre = GRID["good"], dataclasses.replace(GRID["mediocre"], **_shared(GRID["good"]))
    first = iwa(good)
    assert iwa(mediocre) != first and len(fits) == 1  # another candidate, the same weights
    assert iwa(good) == first and len(fits) == 1
    other = dataclasses.replace(good, shared_target=good.shared_target + 1.0)
    iwa(other)
    assert len(fits) == 2 and len(iwa.ratios) == 2
    iwa.ratios.clear()
    assert iwa(good) == first and len(fits) == 3  # fitted afresh: the same value
    assert validators.score(good, ["iwa"]) == {"iwa": first}  # the registered scorer, with weights of its own


def _shared(v):
    return {k: getattr(v, k) for k in ("shared_source", "shared_target", "shared_source_train")}


def test_good_model_beats_collapsed_where_validators_claim_it(grid_scores):
    good, collapsed, half = grid_scores["good"], grid_scores["collapsed"], grid_scores["target_collapsed"]
    for name in ("source_val_acc", "im", "bnm", "dev"):
        assert good[name] > collapsed[name], name
    for name in ("im", "bnm"):  # these read the target and penalise a collapse there alone
        assert good[name] > half[name], name
    for name in ("source_val_acc", "im", "bnm"):  # and rank quality among healthy models
        assert good[name] > grid_scores["mediocre"][name], name
    # Documented failure: confidence-based validators prefer a confident collapse, hence the guard.
    for name in ("entropy", "snd"):
        assert collapsed[name] > good[name], name
    assert half["source_val_acc"] > good["source_val_acc"]


def test_is_collapsed_flags_one_class_predictions():
    flags = {name: is_collapsed(v.target_logits, C) for name, v in GRID.items()}
    assert flags == {"good": False, "mediocre": False, "collapsed": True, "target_collapsed": True}

    def two_classes(first: int):  # `first` of 100 predictions in class 0, the rest in class 1
        return torch.eye(2)[(torch.arange(100) >= first).long()]

    assert is_collapsed(two_classes(97), 2)  # 97/3: normalised entropy 0.19
    assert not is_collapsed(two_classes(70), 2)  # 70/30 is a plausible imbalance for two classes
    three = torch.eye(3)[torch.tensor([0] * 7 + [1, 2, 1])]  # 70% in one of three classes
    assert is_collapsed(three, 3) and not is_collapsed(three, 3, threshold=0.75)


def test_proxy_a_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1000, 8)), rng.normal(size=(1000, 8))
    assert proxy_a_distance(a, b, seed=0) < 0.2
    assert proxy_a_distance(a, b + 3.0, seed=0) > 1.9
    assert proxy_a_distance(a, b + 3.0, seed=0) == proxy_a_distance(a, b + 3.0, seed=0)
    assert proxy_a_distance(torch.from_numpy(a), torch.from_numpy(b + 3.0), seed=1) > 1.9
    with pytest.raises(ValueError, match="at least 4"):
        proxy_a_distance(a[:2], b[:2])


def test_mmd_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 8)), rng.normal(size=(300, 8))
    same, apart = mmd_distance(a, b), mmd_distance(a, b + 2.0)
    assert 0 <= same < 0.05 < apart
    assert mmd_distance(a, b + 1.0) < apart
