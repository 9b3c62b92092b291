"""The target's class mix without target labels (`adapt.priors`), and what depends on it: class-weighted
losses, the collapse rule and the monitor's class-mix test."""

import numpy as np
import pytest
import torch

from adaptflow.adapt import losses, priors, validators
from adaptflow.adapt.algorithms import ALGORITHMS, default_hparams, get_algorithm
from adaptflow.errors import UnknownNameError
from adaptflow.monitor.shift import class_mix_test


def _domain(n: int, mix: list[float], seed: int, means: torch.Tensor, spread: float = 1.0):
    """Gaussian classes around `means` (C, D), `n` samples drawn with class shares `mix`."""
    g = torch.Generator().manual_seed(seed)
    y = torch.multinomial(torch.tensor(mix), n, replacement=True, generator=g)
    return means[y] + spread * torch.randn(n, means.shape[1], generator=g), y


def _model(means: torch.Tensor):
    """A nearest-mean classifier's logits: a source model trained on balanced classes."""
    return lambda x: -0.5 * torch.cdist(x, means).pow(2)


@pytest.fixture(scope="module")
def shifted():
    """Source validation with balanced classes; a target where class a is 70% and class d is absent."""
    means = 2.5 * torch.eye(4, 8)
    logits = _model(means)
    xv, yv = _domain(800, [0.25] * 4, 0, means)
    truth = [0.7, 0.15, 0.15, 0.0]
    xt, yt = _domain(2000, truth, 1, means)
    return logits(xv), yv, logits(xt), yt, truth


@pytest.mark.parametrize("method", ["em", "bbse"])
def test_a_known_class_mix_is_estimated_within_its_interval(shifted, method):
    val, yv, target, yt, _ = shifted
    mix = priors.estimate(val, yv, target, 4, method=method, seed=0)
    sample = np.bincount(yt.numpy(), minlength=4) / len(yt)  # the mix of the images the estimate saw
    assert all(lo - 0.01 <= s <= hi + 0.01 for lo, s, hi in zip(mix.low, sample, mix.high, strict=True))
    assert priors.total_variation(mix.estimate, sample) < 0.05
    assert mix.estimate[0] > 0.6 and mix.high[3] < 0.05  # the dominant class found, the absent one near 0
    assert priors.label_shift(mix) and mix.n_target == len(yt) and mix.source == pytest.approx([0.25] * 4, abs=0.05)


def test_a_balanced_target_is_no_label_shift():
    means = 2.5 * torch.eye(4, 8)
    logits = _model(means)
    xv, yv = _domain(800, [0.25] * 4, 0, means)
    xt, _ = _domain(1000, [0.25] * 4, 2, means)
    mix = priors.estimate(logits(xv), yv, logits(xt), 4, seed=0)
    assert not priors.label_shift(mix) and priors.total_variation(mix.estimate, mix.source) < 0.05


def test_an_unknown_estimator_lists_the_valid_ones(shifted):
    val, yv, target, _, _ = shifted
    with pytest.raises(UnknownNameError, match="valid class-mix estimators: bbse, em"):
        priors.estimate(val, yv, target, 4, method="magic")


def test_a_partial_targets_absent_classes_get_about_no_weight(shifted):
    val, yv, target, _, _ = shifted
    mix = priors.estimate(val, yv, target, 4, seed=0)
    w = priors.class_weights(mix)
    assert w[3] < 0.05 and w[0] > 2.5  # absent: ~0 (PADA); dominant: ~0.7 / 0.25
    assert float((w * np.array(mix.source)).sum()) == pytest.approx(1.0)  # mean 1 over the source's images


def test_prior_correction_moves_predictions_to_the_target_mix(shifted):
    val, yv, target, yt, _ = shifted
    mix = priors.estimate(val, yv, target, 4, seed=0)
    before = (target.argmax(1) == yt).float().mean()
    after = (priors.adjust(target, mix).argmax(1) == yt).float().mean()
    assert after > before  # Bayes' rule with the right prior is the better classifier


@pytest.mark.parametrize("method", ["head", "dann"])
def test_a_corrected_model_gives_the_prior_corrected_logits(shifted, method):
    """`priors.correct` moves the output layer's bias by log q/p: the model's logits become `adjust`'s."""
    from adaptflow.adapt.heads import Head

    val, yv, target, _, _ = shifted
    mix = priors.estimate(val, yv, target, 4, seed=0)
    torch.manual_seed(0)
    model = Head(8, 4) if method == "head" else get_algorithm(method)(torch.nn.Identity(), 8, 4, {}, max_steps=1)
    x = torch.randn(16, 8)
    with torch.no_grad():
        before = model.eval().predict(x)
        after = priors.correct(model, mix).predict(x)
    assert torch.allclose(after, priors.adjust(before, mix), atol=1e-6)


def test_the_collapse_rule_reads_skew_against_the_estimate(shifted):
    val, yv, target, yt, truth = shifted
    mix = priors.estimate(val, yv, target, 4, seed=0)
    right = torch.nn.functional.one_hot(yt, 4).float() * 10  # predicts the truth: 70% one class
    assert validators.is_collapsed(right, 4)  # without the estimate: one class above 60%
    assert not validators.is_collapsed(right, 4, mix)  # the estimate expects it
    wrong = torch.zeros(len(yt), 4)
    wrong[:, 1] = 10  # everything "b", which the estimate puts at ~15%
    assert validators.is_collapsed(wrong, 4, mix)
    vague = mix._replace(low=[0.0] * 4, high=[1.0] * 4)
    assert validators.is_collapsed(right, 4, vague)  # an estimate too uncertain to say excuses nothing


def test_class_weighted_losses_are_the_unweighted_ones_under_equal_weights():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(12, 5, generator=g), torch.randn(9, 5, generator=g) + 1
    ones = torch.ones(12)
    assert torch.allclose(losses.mmd(a, b, weights=ones), losses.mmd(a, b), atol=1e-6)
    assert torch.allclose(losses.coral(a, b, weights=ones), losses.coral(a, b), atol=1e-6)
    # weighing the source rows like the target's pulls the distance down
    w = torch.where(a[:, 0] > 0, 4.0, 0.25)
    assert losses.mmd(a, a[a[:, 0] > 0], weights=w) < losses.mmd(a, a[a[:, 0] > 0])
    logits = torch.randn(7, 3, generator=g)
    uniform = torch.full((3,), 1 / 3)
    diff = losses.information_maximization(logits, prior=uniform) - losses.information_maximization(logits)
    assert float(diff) == pytest.approx(np.log(3), abs=1e-5)  # -KL to uniform = entropy - log C


@pytest.mark.parametrize("method", [m for m in ALGORITHMS if m != "source_only"])
def test_every_algorithm_trains_with_the_estimated_class_mix(method):
    torch.manual_seed(0)
    algo = get_algorithm(method)(torch.nn.Identity(), 6, 3, {"bottleneck_dim": 8, "batch_size": 8}, max_steps=4)
    algo.use_class_mix([2.0, 1.0, 0.0], [0.6, 0.4, 0.0])
    for _ in range(3):
        out = algo.update((torch.randn(8, 6), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])), torch.randn(8, 6))
        assert all(np.isfinite(v) for v in out.values())


def test_online_class_weights_follow_the_targets_mix():
    """IWDAN's weights, re-estimated from the model's own outputs: a target of mostly class 0 raises w(0)."""
    torch.manual_seed(0)
    means = 3 * torch.eye(3, 6)
    hp = {**default_hparams("dann"), "class_weighting": "online", "iw_warmup": 0.0, "bottleneck_dim": 0}
    algo = get_algorithm("dann")(torch.nn.Identity(), 6, 3, hp, max_steps=60)
    for step in range(60):
        xs, ys = _domain(32, [1 / 3] * 3, step, means)
        xt, _ = _domain(32, [0.8, 0.1, 0.1], 1000 + step, means)
        algo.update((xs, ys), xt)
    w = algo.class_weights
    assert w is not None and w[0] > 1.5 and w[1] < 0.8 and w[2] < 0.8
    state = algo.state_dict()
    assert "iw_joint" in state and "iw_target" in state  # resumed from a checkpoint, it goes on where it was


def test_the_monitor_calls_a_class_mix_change_a_shift_only_when_it_is_large_and_significant():
    before = [0.25] * 4
    assert class_mix_test(before, 500, [0.7, 0.1, 0.1, 0.1], 500, 0.01, 0.1).detected
    assert not class_mix_test(before, 500, [0.27, 0.25, 0.24, 0.24], 500, 0.01, 0.1).detected  # noise
    small = class_mix_test(before, 200000, [0.3, 0.25, 0.2, 0.25], 200000, 0.01, 0.1)
    assert small.p_value < 0.01 and not small.detected  # significant at this size, but a change of 0.05
    assert class_mix_test(before, 500, before, 0, 0.01, 0.1).p_value == 1.0  # nothing to compare
