"""Choosing a model without target labels, and saying how sure the choice is.

`select` ranks candidates by their label-free validator scores (`adapt.validators`) under four rules:

1. **No candidate judges itself.** A validator that a candidate's training loss optimises (its
   algorithm's `objectives`: `im` trains on IM, `mcc` on class confusion, which BNM rewards) is never
   used to score that candidate. Ranks are percentiles among the candidates each validator may judge,
   so every candidate's score is the mean over the validators that may judge it. Source-validation
   accuracy counts within its noise: a candidate not significantly less accurate than the most accurate
   one, on the same images, ranks with it (`ranked_values`); ties go to the higher `TIE_BREAK`.
2. **Never a collapsed model** (one class taking over the target predictions; `validators.is_collapsed`).
3. **Never clearly worse than doing nothing.** The *reference* is the healthy `source_only` candidate
   with the best source-validation accuracy: what a run that trusts no adaptation keeps. A candidate
   that lost more than `MAX_SOURCE_DROP` of the reference's source-validation accuracy, significantly
   so on the same images (an exact one-sided McNemar test), is skipped: it forgot what the source
   taught. Smaller drops are the usual price of adaptation (DANN trades a little source accuracy for
   target accuracy), so they only lower the confidence.
4. **Never against the target's class mix where it is known.** Source validation cannot see the
   target's class mix: when the target's differs from the source's (one class dominating, classes
   missing), alignment pulls the target onto the source's balance and maps the images of the common
   classes onto others, at source accuracy as high as ever. So when the reference's estimate of the
   target's mix (`adapt.priors`, passed as `mix`) shows a label shift, and the reference is as sure of
   the target's images as of the source's once the mix is accounted for (`credible`: a change of look
   would lower its confidence, and turn its mistakes into a class mix of their own), a candidate that
   predicts a class mix more than `MAX_MIX_PULL` further from the
   estimate (total variation) than the reference does is skipped. When the target also looks
   different, the rule stays silent rather than undo adaptation that works: a model fine-tuned end to end
   can be as sure of changed images as of the source's, so where the run has more than one source-only
   candidate, each is a witness, and the estimate is credible only if they agree on the target's images
   as often as on the source's (`witnesses_agree`).

The pick is **confident** when it is the reference itself, or when no evidence the run has says it is
worse than the reference: not significantly less accurate on source validation, at least as good on
every other validator of the policy that may judge it, and, where rule 4 speaks, not further from the
estimated class mix than the reference by more than `MIX_NOISE`. Otherwise the confidence names the
evidence against it, and the promotion gate treats the pick as a risk (`monitor.gate.register_and_gate`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import torch
from scipy.stats import binomtest

from adaptflow.adapt import priors
from adaptflow.adapt.losses import information_maximization
from adaptflow.adapt.validators import get_validator, is_collapsed

SIGNIFICANCE = 0.05  # one-sided level at which "less accurate on source validation than the reference" counts
MAX_SOURCE_DROP = 0.05  # source-validation accuracy a candidate may lose against the reference and be picked
# Source validation accuracy is a proportion on a few hundred images: ranked as it is, one image decides,
# and once every end-to-end model has learnt the source it keeps the model that did not adapt
# (benchmarks/cost.py's 5,000-image source at 500 steps: the source-only reference 1.0 and 0.554 target
# accuracy, cdan-images 0.998 and 0.796). So source_val_acc ranks within its noise: a candidate not
# significantly less accurate than the most accurate one on the same images (`less_accurate`) counts as
# accurate as it (`ranked_values`), and ties of the mean rank go to the higher TIE_BREAK, then the higher
# source_val_acc. TIE_BREAK is information maximisation on the target sample: confident, class-balanced
# predictions, never scoring a candidate that trained on it. benchmarks/selection.py, the default policy:
# mean regret 0.017 at 48 px, 0.016 at 64 px; with ties to iwa 0.023 and 0.048, to rv 0.037 and 0.030; the
# rule before (ranked as it is, ties to iwa) 0.018 and 0.048. At 64 px every one of these picks one model
# below source-only (blocky-to-photos, every candidate within 0.04 of chance).
TIE_BREAK = "im"
# Rule 4. Under a label shift alone, a model is as sure of the target's images of a class as of the source's
# (the same p(x | y)), so its mean confidence on the target equals its per-class mean confidence on source
# validation, weighed by the estimated mix; the estimate is taken as the target's only within CONFIDENCE_GAP
# of that. benchmarks/selection.py (docs/benchmarks.md): -0.003 and +0.025 on the suite's two shifts of the
# class mix alone, -0.11 to -0.39 on every shift whose look changed. MAX_MIX_PULL: how much further from the
# estimated mix (total variation of predicted class shares) than the reference a candidate may predict
# before it is skipped; MIX_NOISE: before the pick loses confidence.
CONFIDENCE_GAP = 0.05
# A label shift alone leaves each class's images as they were, so two source-only models agree on the
# target's images as often as on source validation's, class by class (weighed by the estimated mix); a
# change of look makes them err apart. On the stored suite runs (docs/benchmarks.md) the two source-only
# candidates' agreement on the target fell 0.04 and 0.08 short of that on the two shifts of the class mix
# alone, and 0.31 to 1.00 short on every shift whose look changed, including the long-tailed target where
# a source-only model fine-tuned end to end was as sure of the target as of the source (a gap of -0.045) and
# wrong on 85% of it.
AGREEMENT_GAP = 0.15
MAX_MIX_PULL = 0.15
MIX_NOISE = 0.05


@dataclass(frozen=True)
class Candidate:
    """What selection knows of one trained candidate."""

    name: str
    scores: Mapping[str, float]  # validator -> score, higher is better
    collapsed: bool
    objectives: frozenset[str] = frozenset()  # validators its own training optimised: never scored by them
    source_only: bool = False
    # (Ns,) bool: right or wrong on each source-validation image, the same images in the same order for
    # every candidate; None skips the source-validation test for this candidate.
    val_correct: np.ndarray | None = field(default=None, compare=False)
    # (Nt, C) its probabilities on the target sample, the same images in the same order for every candidate;
    # None: not kept (a candidate of an earlier release)
    target_proba: np.ndarray | None = field(default=None, compare=False)
    # (C,) its mean top probability on the source-validation images of each class; None: not kept
    source_confidence: np.ndarray | None = field(default=None, compare=False)
    # (Ns,) int: its predicted class and the true one on each source-validation image, in the order of
    # val_correct; None: not kept
    val_predictions: np.ndarray | None = field(default=None, compare=False)
    val_labels: np.ndarray | None = field(default=None, compare=False)


class Selection(NamedTuple):
    index: int
    reason: str
    confident: bool
    confidence: str  # why (not) confident, in words
    reference: int | None  # the source-only candidate a cautious run falls back to; None if there is none
    scores: list[float | None]  # each candidate's mean percentile rank, 1 = best; None: not ranked
    mix: priors.Mix | None = None  # the target's estimated class mix where it was credible (`credible`), else None


def select(
    candidates: Sequence[Candidate], policy: Sequence[str], tie_break: str = TIE_BREAK, mix: priors.Mix | None = None
) -> Selection:
    """Pick one of `candidates` by the mean percentile rank over the `policy` validators (see the module
    docstring for the rules); ties go to the higher `tie_break` score, then the higher source_val_acc, then
    to the earlier candidate (`preference`). `mix`: the target's class mix as estimated from the outputs of
    the source-only candidate with the best source_val_acc (`candidates.class_mix`). Where it is credible
    (`credible`) it speaks in rule 4, collapse is judged against it and IM's diversity term aims at it
    (`_judged_by_mix`); elsewhere it is not used."""
    if not candidates:
        raise ValueError("select needs at least one candidate")
    for name in policy:
        get_validator(name)  # an unknown name fails here, listing the valid ones
    candidates, mix = judged_by_mix(candidates, mix)
    acc = [finite_or_lowest(c.scores.get("source_val_acc", math.nan)) for c in candidates]
    alive = [i for i, c in enumerate(candidates) if not c.collapsed]
    if not alive:
        best = max(range(len(candidates)), key=lambda i: (acc[i], -i))
        return Selection(
            best,
            f"all {len(candidates)} candidates collapsed; fell back to the best source_val_acc",
            False,
            "every candidate collapsed",
            None,
            [None] * len(candidates),
            mix,
        )
    missing = [(candidates[i].name, n) for i in alive for n in policy if n not in candidates[i].scores]
    if missing:
        raise ValueError(f"candidates lack validator scores (name, validator): {missing}")

    rank = mean_ranks(candidates, alive, policy)
    reference = _reference(candidates, alive, acc, rank)
    order = sorted(
        (i for i in alive if rank[i] is not None), key=lambda i: preference(candidates[i], rank[i], i, tie_break)
    )
    if not order:
        raise ValueError(
            f"no validator of the policy {list(policy)} may judge any candidate: every one "
            "optimised them all; add source_val_acc to the policy"
        )
    skipped, target_skipped, pick = [], [], reference
    for i in order:
        drop = acc[reference] - acc[i] if reference is not None else 0.0
        worse, p = less_accurate(candidates[i], None if i == reference or reference is None else candidates[reference])
        if worse and drop > MAX_SOURCE_DROP:
            skipped.append(f"{candidates[i].name} ({drop:.3f} lower, p = {p:.3f})")
            continue
        pull = mix_pull(candidates[i], None if i == reference or reference is None else candidates[reference], mix)
        if pull is not None and pull > MAX_MIX_PULL:
            target_skipped.append(f"{candidates[i].name} ({pull:+.3f})")
            continue
        pick = i
        break

    n_collapsed = len(candidates) - len(alive)
    reason = (
        f"best mean rank {rank[pick]:.2f} over {', '.join(policy)} among {len(alive)} non-collapsed "
        f"candidates ({n_collapsed} collapsed skipped)"
    )
    gamed = sorted(
        f"{candidates[i].name}: {'/'.join(sorted(candidates[i].objectives & set(policy)))}"
        for i in alive
        if candidates[i].objectives & set(policy)
    )
    if gamed:
        reason += f"; not judged by what they optimised: {', '.join(gamed)}"
    if skipped:
        reason += (
            f"; skipped, more than {MAX_SOURCE_DROP} less accurate on source validation than source-only "
            f"{candidates[reference].name}: " + ", ".join(skipped)
        )
    if target_skipped:
        reason += (
            f"; skipped, predicting a class mix more than {MAX_MIX_PULL} further from the target's estimated "
            f"mix than source-only {candidates[reference].name} (alignment pulled the target onto the source's "
            "class balance): " + ", ".join(target_skipped)
        )
    confident, why = _confidence(candidates, pick, reference, policy, mix)
    return Selection(pick, reason, confident, why, reference, rank, mix)


def preference(c: Candidate, rank: float | None, index: int, tie_break: str = TIE_BREAK) -> tuple:
    """Sort key, best first: the higher mean rank, then `tie_break` (unless `c` optimised it), then
    source_val_acc, then the earlier."""
    tie = c.scores.get(tie_break, math.nan) if tie_break not in c.objectives else math.nan
    r = rank if rank is not None else -math.inf
    return (-r, -finite_or_lowest(tie), -finite_or_lowest(c.scores.get("source_val_acc", math.nan)), index)


def mean_ranks(candidates: Sequence[Candidate], alive: Sequence[int], policy: Sequence[str]) -> list[float | None]:
    """Each candidate's mean percentile rank (0 worst, 1 best) over the policy validators allowed to judge
    it, ranked among the alive candidates those validators may judge; None for the others."""
    ranks: dict[int, list[float]] = {i: [] for i in alive}
    for name in policy:
        judged = [i for i in alive if name not in candidates[i].objectives]
        for i, r in zip(judged, percentile_ranks(ranked_values(candidates, judged, name)), strict=True):
            ranks[i].append(r)
    return [float(np.mean(ranks[i])) if ranks.get(i) else None for i in range(len(candidates))]


def ranked_values(candidates: Sequence[Candidate], judged: Sequence[int], name: str) -> list[float]:
    """The values validator `name` ranks the `judged` candidates by: their scores, except that for
    source_val_acc a candidate not significantly less accurate than the most accurate one, on the same
    images (`less_accurate`), counts as accurate as it. Without both candidates' right-or-wrong per image
    there is no test, and the score stands."""
    values = [finite_or_lowest(candidates[i].scores[name]) for i in judged]
    if name != "source_val_acc" or not judged:
        return values
    lead = max(range(len(judged)), key=lambda k: (values[k], -k))
    best = candidates[judged[lead]]
    return [
        values[lead] if _paired(candidates[i], best) and not less_accurate(candidates[i], best)[0] else v
        for i, v in zip(judged, values, strict=True)
    ]


def percentile_ranks(values: Sequence[float]) -> list[float]:
    """1 for the highest, 0 for the lowest, ties sharing their mean; NaN counts as the lowest."""
    x = np.array([finite_or_lowest(v) for v in values])
    if len(x) == 1:
        return [1.0]
    below = (x[None, :] < x[:, None]).sum(1)  # how many each value beats
    ties = (x[None, :] == x[:, None]).sum(1) - 1
    return list((below + ties / 2) / (len(x) - 1))


def _reference(
    candidates: Sequence[Candidate], alive: Sequence[int], acc: list[float], rank: list[float | None]
) -> int | None:
    """The healthy source-only candidate with the best source_val_acc (then rank, then the earlier one)."""
    pool = [i for i in alive if candidates[i].source_only]
    return max(pool, key=lambda i: (acc[i], rank[i] if rank[i] is not None else -1.0, -i)) if pool else None


def _paired(a: Candidate, b: Candidate | None) -> bool:
    """Do `a` and `b` both say which of the same source-validation images they got right?"""
    if b is None or a.val_correct is None or b.val_correct is None:
        return False
    return len(a.val_correct) == len(b.val_correct)


def less_accurate(a: Candidate, b: Candidate | None) -> tuple[bool, float]:
    """Is `a` significantly less accurate than `b` on the same source-validation images? An exact
    one-sided McNemar test on the images exactly one of them gets right. No `b`: no test."""
    if not _paired(a, b):
        return False, 1.0
    a_only = int((a.val_correct & ~b.val_correct).sum())
    b_only = int((b.val_correct & ~a.val_correct).sum())
    if a_only + b_only == 0:
        return False, 1.0
    p = float(binomtest(b_only, a_only + b_only, 0.5, alternative="greater").pvalue)
    return p < SIGNIFICANCE, p


def _confidence(
    candidates: Sequence[Candidate], pick: int, reference: int | None, policy: Sequence[str], mix: priors.Mix | None
) -> tuple[bool, str]:
    if reference is None:
        return False, "no healthy source-only candidate to compare the pick with"
    ref = candidates[reference]
    if pick == reference:
        return True, f"the pick is the source-only reference {ref.name}: no adaptation was trusted"
    chosen = candidates[pick]
    judged = [n for n in policy if n not in chosen.objectives]
    against = []
    for n in judged:
        a, b = finite_or_lowest(chosen.scores[n]), finite_or_lowest(ref.scores[n])
        if n == "source_val_acc" and chosen.val_correct is not None and ref.val_correct is not None:
            worse, p = less_accurate(chosen, ref)  # paired: a difference of a few images is noise
            if worse:
                against.append(f"source_val_acc {a:.3f} < {b:.3f} (p = {p:.3f})")
        elif a < b:
            against.append(f"{n} {a:.3f} < {b:.3f}")
    pull = mix_pull(chosen, ref, mix)
    if pull is not None and pull > MIX_NOISE:
        against.append(f"the target's estimated class mix (the pick predicts one {pull:.3f} further from it)")
    if against:
        return False, f"source-only {ref.name} scores higher on " + ", ".join(against)
    return True, (f"no worse than source-only {ref.name} on any validator that may judge it ({', '.join(judged)})")


def judged_by_mix(candidates: Sequence[Candidate], mix: priors.Mix | None) -> tuple[list[Candidate], priors.Mix | None]:
    """`candidates` as selection judges them with the target's estimated class mix `mix`, and `mix` itself,
    where it is credible as estimated by its model (the source-only candidate with the best source_val_acc,
    collapsed or not: a true 70% skew looks collapsed to the rule that knows no estimate): each judged by
    `_judged_by_mix`. Where it is not, `candidates` unchanged and None."""
    if not credible_in(candidates, mix):
        return list(candidates), None
    return [_judged_by_mix(c, mix) for c in candidates], mix


def credible_in(candidates: Sequence[Candidate], mix: priors.Mix | None) -> bool:
    """Is `mix` credible among `candidates`: as estimated by the source-only candidate with the best
    source_val_acc (`credible`), and seen alike by every other source-only candidate (`witnesses_agree`)?"""
    pool = [i for i, c in enumerate(candidates) if c.source_only]
    if not pool:
        return False
    acc = [finite_or_lowest(candidates[i].scores.get("source_val_acc", math.nan)) for i in pool]
    estimator = pool[max(range(len(pool)), key=lambda k: (acc[k], -k))]
    witnesses = [candidates[i] for i in pool if i != estimator]
    return credible(candidates[estimator], mix) and all(
        witnesses_agree(candidates[estimator], w, mix) for w in witnesses
    )


def witnesses_agree(a: Candidate, b: Candidate, mix: priors.Mix) -> bool:
    """Do source-only candidates `a` and `b` agree on the target's images (the same predicted class) at
    least as often as on source validation's, class by class weighed by the estimated mix `mix`, less
    AGREEMENT_GAP? As they do under a label shift alone; without both models' outputs there is no test."""
    kept = (a.val_predictions, a.val_labels, b.val_predictions, a.target_proba, b.target_proba)
    if any(x is None for x in kept) or len(a.val_predictions) != len(b.val_predictions):
        return True
    same = a.val_predictions == b.val_predictions
    overall = float(same.mean()) if len(same) else 1.0
    by_class = [
        float(same[a.val_labels == k].mean()) if (a.val_labels == k).any() else overall
        for k in range(len(mix.estimate))
    ]
    expected = float(np.dot(np.asarray(mix.estimate), by_class))
    observed = float((a.target_proba.argmax(1) == b.target_proba.argmax(1)).mean())
    return observed >= expected - AGREEMENT_GAP


def _judged_by_mix(c: Candidate, mix: priors.Mix) -> Candidate:
    """`c` judged against the target's estimated class mix: collapsed only where the estimate does not
    expect its skew (`validators.is_collapsed`), and IM with the estimated prior in its diversity term."""
    if c.target_proba is None:
        return c
    logits = torch.from_numpy(np.log(np.clip(c.target_proba, 1e-12, None)))
    scores = dict(c.scores)
    if "im" in scores:
        prior = torch.tensor(mix.estimate, dtype=logits.dtype)
        scores["im"] = -float(information_maximization(logits, prior=prior))
    return replace(c, scores=scores, collapsed=is_collapsed(logits, logits.shape[1], mix))


def credible(reference: Candidate, mix: priors.Mix | None) -> bool:
    """Is `mix`, the reference's estimate, the target's class mix as far as the evidence goes: a label shift
    (`priors.label_shift`) seen by a reference whose mean confidence on the target is within
    `CONFIDENCE_GAP` of its per-class mean confidence on source validation weighed by `mix`, as it is
    when only the class mix changed?"""
    conf = reference.source_confidence
    if mix is None or reference.target_proba is None or conf is None or len(conf) != len(mix.estimate):
        return False
    expected = float(np.dot(np.asarray(mix.estimate), conf))
    return abs(float(reference.target_proba.max(1).mean()) - expected) <= CONFIDENCE_GAP and priors.label_shift(mix)


def mix_pull(a: Candidate, reference: Candidate | None, mix: priors.Mix | None) -> float | None:
    """How much further `a`'s predicted class mix on the target is from the estimated one than the
    reference's (total variation); None where rule 4 is silent (no credible estimate, no outputs)."""
    if reference is None or a.target_proba is None or not credible(reference, mix):
        return None
    c = len(mix.estimate)
    ours = priors.total_variation(priors.shares(a.target_proba.argmax(1), c), mix.estimate)
    theirs = priors.total_variation(priors.shares(reference.target_proba.argmax(1), c), mix.estimate)
    return ours - theirs


def finite_or_lowest(x: float | None) -> float:
    """`x`, or -inf for NaN, infinities and None: a missing score sorts last."""
    return x if x is not None and math.isfinite(x) else -math.inf
