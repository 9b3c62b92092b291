"""Successive halving of the end-to-end candidates: all train to a rung's steps, the selection policy ranks
them, and only the best 1/eta go on, from their checkpoints (`candidates.train_candidate` resumes them)."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from adaptflow.adapt import selection
from adaptflow.adapt.candidates import selection_candidates
from adaptflow.adapt.labelled import MIN_LABELS, within_noise
from adaptflow.manifests import CandidateManifest, CandidateSpec, ClassMix


def halving_rungs(steps: int, candidates: int, eta: int) -> list[int]:
    """The step counts at which successive halving ranks `candidates` and keeps the best 1/eta: e.g.
    300 steps, 3 candidates, eta 3 -> [100, 300]. No halving (one rung) for eta < 2 or one candidate."""
    if eta < 2 or candidates < 2:
        return [steps]
    levels = math.ceil(math.log(candidates, eta))
    return [max(1, steps // eta**k) for k in range(levels, 0, -1)] + [steps]


def successive_halving(
    specs: list[CandidateSpec],
    train: Callable[[list[CandidateSpec], list[int | None]], list[CandidateManifest]],
    stop: Callable[[CandidateManifest, int], CandidateManifest],
    policy: list[str],
    eta: int,
    estimate: Callable[[list[CandidateManifest]], ClassMix | None] | None = None,
    judge: Callable[[list[CandidateManifest]], list[np.ndarray]] | None = None,
) -> list[CandidateManifest]:
    """Train every candidate: features-mode ones to the end at once, images-mode ones in rungs
    (`halving_rungs`): all to the first rung's steps, then the best 1/eta of them by the selection policy
    (`survivors`) on to the next, resuming from their checkpoints. The source-only images candidate does
    not race: it is the reference selection's safety net compares the pick with and falls back to
    (`adapt.selection`), so it is never left behind — a reference stopped after a third of its steps
    would make every adapted pick look safe, or leave no healthy reference at all — but it trains in the
    rungs beside the racers, so that every rung has work for more than one worker (trained alone to the
    end in the first rung, it left the last rung's survivor alone on the machine).
    `train(specs, untils)` trains each spec up to its step (None: the end) — a loop here, a map over
    Prefect tasks in a flow; `stop` records a candidate left behind; `estimate` gives the target's class
    mix from a rung's candidates (`candidates.class_mix`), which the ranking reads as selection does;
    `judge` their right-or-wrong on labelled target images (`labelled.labelled_outcomes`), which go first as
    they do in selection (`survivors`). Returns the candidates in `specs` order."""
    images = [s for s in specs if s.mode == "images" and s.method != "source_only"]
    reference = [s for s in specs if s.mode == "images" and s.method == "source_only"]
    rungs = halving_rungs(max((s.steps for s in images), default=0), len(images), eta)
    done: dict[str, CandidateManifest] = {}
    # the long end-to-end tasks first, the short features-mode ones after, filling the workers' gaps
    batch = reference + images + [s for s in specs if s not in images and s not in reference]
    for rung in range(len(rungs)):
        last = rung == len(rungs) - 1
        untils = [rungs[rung] if s in images or (s in reference and not last) else None for s in batch]
        results = train(batch, untils) if batch else []
        done.update({c.spec.name: c for c in results})
        racing = [c for c in results if c.spec in images]
        if last:
            break
        mix = estimate(results) if estimate is not None else None
        ref = next((c for c in results if c.spec in reference), None)
        outcomes = judge(racing) if judge is not None else None
        keep = survivors(racing, policy, math.ceil(len(racing) / eta), mix, ref, outcomes)
        for i, c in enumerate(racing):
            if i not in keep:
                done[c.spec.name] = stop(c, rung)
        batch = reference + [racing[i].spec for i in keep]
    return [done[s.name] for s in specs]


def survivors(
    candidates: list[CandidateManifest],
    policy: list[str],
    keep: int,
    mix: ClassMix | None = None,
    reference: CandidateManifest | None = None,
    outcomes: list[np.ndarray] | None = None,
) -> list[int]:
    """Indices of the `keep` best candidates by the selection policy's ranks (`adapt.selection`): healthy
    ones first, a collapsed one only if nothing else is left; with the target's class mix `mix` where it is
    credible (`selection.judged_by_mix`, judged against the source-only `reference`), judged against it as
    selection judges them, those rule 4 would skip after the rest. With their `outcomes` on labelled target
    images (at least `labelled.MIN_LABELS`), those not significantly less accurate there than the best come
    before all others, as in `labelled.by_labels`."""
    pool = selection_candidates(candidates + ([reference] if reference is not None else []))
    pool, mix = selection.judged_by_mix(pool, mix)
    ref = pool[-1] if reference is not None else None
    pool = pool[: len(candidates)]
    pulled = {i for i, c in enumerate(pool) if (selection.mix_pull(c, ref, mix) or 0.0) > selection.MAX_MIX_PULL}
    alive = [i for i, c in enumerate(pool) if not c.collapsed] or list(range(len(pool)))
    ranks = selection.mean_ranks(pool, alive, policy)
    near = set(range(len(candidates)))
    if outcomes is not None and len(outcomes[0]) >= MIN_LABELS:
        near = within_noise(outcomes)
    order = sorted(
        range(len(candidates)),
        key=lambda i: (i not in near, i not in alive, i in pulled, selection.preference(pool[i], ranks[i], i)),
    )
    return sorted(order[:keep])
