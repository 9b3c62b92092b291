"""Label-free validators, the collapse guard, model selection, and domain-gap measures."""

import math

import numpy as np
import pytest
import torch
from synthetic import CLASSES, mlp, shifted_domains

from adaptflow.adapt.algorithms import get_algorithm
from adaptflow.adapt.domain_gap import mmd_distance, proxy_a_distance
from adaptflow.adapt.train import fit, infer
from adaptflow.adapt.validators import VALIDATORS, ValidationInputs, is_collapsed, score, select
from adaptflow.errors import UnknownNameError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

C, N = 4, 200


def _outputs(gen: torch.Generator, labels: torch.Tensor, accuracy: float, confidence: float, collapse: bool):
    """Logits and 8-D features of a model that is right on `accuracy` of `labels` (or predicts class 0
    everywhere when `collapse`), with `confidence` the logit margin; its features cluster by prediction."""
    pred = labels.clone()
    wrong = torch.rand(len(labels), generator=gen) > accuracy
    pred[wrong] = (labels[wrong] + 1) % C
    if collapse:
        pred = torch.zeros_like(labels)
    logits = torch.randn(len(labels), C, generator=gen) * 0.5
    logits[torch.arange(len(labels)), pred] += confidence
    feats = torch.eye(C).repeat(1, 2)[pred] * 3 + torch.randn(len(labels), 2 * C, generator=gen)
    return logits, feats


def _model(seed: int, src_acc: float, tgt_acc: float, confidence: float, collapse_source: bool, collapse_target: bool):
    gen = torch.Generator().manual_seed(seed)
    ys, yt = torch.arange(N) % C, torch.arange(N) % C
    sl, sf = _outputs(gen, ys, src_acc, confidence, collapse_source)
    tl, tf = _outputs(gen, yt, tgt_acc, confidence, collapse_target)
    return ValidationInputs(sl, ys, sf, tl, tf, source_train_features=sf + 0.1 * torch.randn(sf.shape, generator=gen))


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


def _candidates(grid_scores, names):
    return [
        {"name": n, "scores": grid_scores[n], "collapsed": is_collapsed(GRID[n].target_logits, C)} for n in names
    ]


def test_select_never_picks_a_collapsed_model(grid_scores):
    names = ["target_collapsed", "collapsed", "mediocre", "good"]
    choice = select(_candidates(grid_scores, names))
    assert names[choice.index] == "good"
    assert "2 collapsed skipped" in choice.reason
    # Even a policy of collapse-loving validators cannot pick a collapsed model.
    assert names[select(_candidates(grid_scores, names), policy=("entropy", "snd")).index] in {"good", "mediocre"}


def test_select_ties_and_fallback(grid_scores):
    cands = _candidates(grid_scores, ["collapsed", "target_collapsed"])
    choice = select(cands)
    assert choice.index == 1 and "all 2 candidates collapsed" in choice.reason  # best source accuracy
    tied = [{"name": n, "scores": {"source_val_acc": a, "im": 1.0, "bnm": 0.1}, "collapsed": False}
            for n, a in (("a", 0.8), ("b", 0.9), ("c", 0.9))]  # fmt: skip
    assert select(tied).index == 1  # mean ranks tie between b and c; b is first
    with pytest.raises(UnknownNameError, match="valid validators"):
        select(tied, policy=("oracle",))
    with pytest.raises(ValueError, match="lack validator scores"):
        select([{"name": "x", "scores": {"im": 1.0}, "collapsed": False}])


def test_selection_prefers_an_adapted_model_on_the_synthetic_shift():
    xs, ys, xt, yt = shifted_domains(seed=0, n=400)
    xv, yv, _, _ = shifted_domains(seed=50, n=200)  # a held-out source validation split
    candidates, target_acc = [], []
    for name, steps in (("source_only", 300), ("dann", 400)):
        torch.manual_seed(0)
        alg = get_algorithm(name)(mlp(), 32, CLASSES, {"bottleneck_dim": 16, "backbone_lr_mult": 1.0}, steps)
        fit(alg, xs, ys, xt, steps, batch_size=64, seed=0)
        (sl, sf), (tl, tf) = infer(alg, xv), infer(alg, xt)
        v = ValidationInputs(sl, yv, sf, tl, tf, source_train_features=infer(alg, xs)[1])
        candidates.append({"name": name, "scores": score(v), "collapsed": is_collapsed(tl, CLASSES)})
        target_acc.append(float((tl.argmax(1) == yt).float().mean()))
    assert target_acc[1] > target_acc[0] + 0.2, target_acc
    assert select(candidates).index == 1, candidates


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
