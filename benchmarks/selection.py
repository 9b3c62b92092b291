"""Benchmark: label-free model selection (`--method auto`) on a suite of digit shifts.

    .venv/bin/python benchmarks/selection.py                       # every shift, the default candidates
    .venv/bin/python benchmarks/selection.py --shifts mnist-m clutter --work /tmp/sel   # keep and reuse

For each shift (benchmarks/shifts.py) it ingests, extracts and trains the candidates `auto` trains on a
CPU with the library's own functions, then asks each selection policy (POLICIES) for a pick with the
library's own `adapt.selection.select` (a policy is its validators, what its ties go to, and whether
source_val_acc counts a difference within the noise of the paired test as a tie). Target labels are read
only to score the picks. Per shift and policy it prints the selected candidate's target accuracy, the
oracle's (the best candidate's), the regret (oracle - selected), the source-only reference's accuracy
(the healthy `source_only` candidate with the best source-validation accuracy: what a run that trusts no
adaptation keeps; if every one collapsed, the best of them), whether the pick fell below it, and whether
selection was confident. "promoted" is what a first run on an empty store would make champion: a
low-confidence pick gives way to the source-only reference. Then, per policy, mean and worst regret over
the suite and the number of picks below source-only; and a leave-one-shift-out estimate: the policy with
the lowest mean regret on the other shifts, scored on the one left out, for each shift in turn.

Trained candidates are kept under --work (default: a temporary folder), so a second run with other
policies retrains nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from shifts import SHIFTS, make_shift  # noqa: E402

from adaptflow.adapt import candidates as adaptation  # noqa: E402
from adaptflow.adapt import halving, priors, selection  # noqa: E402
from adaptflow.adapt import plan as planning  # noqa: E402
from adaptflow.config import load_config  # noqa: E402
from adaptflow.data.ingest import ingest, read_index  # noqa: E402
from adaptflow.extract import features  # noqa: E402
from adaptflow.extract.image_cache import image_cache  # noqa: E402
from adaptflow.manifests import CandidateManifest, ClassMix, IngestManifest, RunData  # noqa: E402
from adaptflow.store import storage  # noqa: E402


class Policy(NamedTuple):
    validators: list[str]  # what the policy ranks by
    all_judge_all: bool = False  # True: a candidate may be judged by what it optimised (the rule before this benchmark)
    tie_break: str = selection.TIE_BREAK  # what ties of the mean rank go to first
    paired: bool = True  # False: source_val_acc ranked as it is, a one-image difference deciding (the rule before)
    # False: no rule 4 (the target's estimated class mix) and collapse judged without the estimate (the rule
    # of 2026-12-04)
    target_side: bool = True


POLICIES: dict[str, Policy] = {
    "before: src_val+im+bnm, all judge all": Policy(["source_val_acc", "im", "bnm"], True, "iwa", False, False),
    "source_val_acc": Policy(["source_val_acc"]),
    "before: source_val_acc, no target side": Policy(["source_val_acc"], target_side=False),
    "source_val_acc, ties to iwa": Policy(["source_val_acc"], tie_break="iwa"),
    "source_val_acc, ties to rv": Policy(["source_val_acc"], tie_break="rv"),
    "before: source_val_acc as it is, iwa": Policy(
        ["source_val_acc"], tie_break="iwa", paired=False, target_side=False
    ),
    "src_val+im+bnm": Policy(["source_val_acc", "im", "bnm"]),
    "src_val+im+bnm+rv": Policy(["source_val_acc", "im", "bnm", "rv"]),
    "src_val+im+bnm+iwa": Policy(["source_val_acc", "im", "bnm", "iwa"]),
    "src_val+rv+iwa": Policy(["source_val_acc", "rv", "iwa"]),
    "iwa": Policy(["iwa"]),
    "rv": Policy(["rv"]),
    "dev": Policy(["dev"]),
}
TOLERANCE = 0.01  # "below source-only" also counted with this slack: 6 of 600 target images

# The product's defaults on a CPU with a reduced step budget (a third of the defaults: 500 steps per
# features-mode candidate, 100 per end-to-end one, halving after 33) and a smaller backbone input, so the
# suite of eight shifts runs on 2 cores in well under an hour. `--set` restores any default.
SETTINGS = [
    "backbone.image_size=64",
    "extract.num_workers=0",
    "ingest.workers=2",
    "adapt.feature_steps=500",
    "adapt.image_steps=100",
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    p.add_argument("--work", default=None, help="folder for data, stores and candidates; reused when present")
    p.add_argument("--per-domain", type=int, default=600, help="images per domain")
    p.add_argument("--image-size", type=int, default=32, help="size the shift's images are rendered at")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every shift (e.g. adapt.image_steps=150 adapt.halving=0)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every candidate's scores and accuracy here")
    return p


def prepare_shift(name: str, root: Path, cfg, args) -> dict:
    """Data, ingest and features for one shift; returns the manifests train_candidate needs."""
    data = root / "data"
    if not (data / "target_labels.csv").exists():
        make_shift(SHIFTS[name], str(data), args.per_domain, args.image_size, args.seed)
    run = root / "run"
    store = str(root / "store")
    manifests = {}
    for domain, uri in (
        ("source", data / "source"),
        ("target", data / "target"),
        ("target_labels", data / "target_labels.csv"),
    ):
        out = run / "ingest" / domain
        if (out / "manifest.json").exists():
            manifests[domain] = adaptation.IngestManifest.load(str(out / "manifest.json"))
        else:
            classes = manifests["source"].classes if domain == "target_labels" else None
            manifests[domain] = ingest(str(uri), domain, str(out), cfg.ingest, cfg.seed, classes)
    specs = planning.plan_candidates(cfg, cuda=False)
    cache = image_cache(store, cfg.backbone, planning.training_image_size(specs))
    plan = features.plan_extraction(
        [manifests["source"].index_uri, manifests["target"].index_uri],
        store,
        cfg.backbone,
        cfg.extract.shard_size,
        cache=cache,
    )
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    return {**manifests, "plan": plan, "run": run}


def train_candidates(prepared: dict, cfg) -> list[CandidateManifest]:
    """The candidates `auto` trains, as the retrain flow trains them (successive halving included), one
    after the other; kept under the work folder, so a rerun trains none again."""

    def train(specs: list, untils: list) -> list[CandidateManifest]:
        out = []
        for spec, until in zip(specs, untils, strict=True):
            t = time.perf_counter()
            c = adaptation.train_candidate(
                spec,
                RunData(
                    source=prepared["source"],
                    target=prepared["target"],
                    target_labels=prepared["target_labels"],
                    features=prepared["plan"],
                ),
                cfg,
                str(prepared["run"] / "candidates" / spec.name),
                "cpu",
                until,
            )
            print(
                f"  {spec.name:<22} {c.steps:>5} steps  target {c.target_accuracy:.3f}  "
                f"{time.perf_counter() - t:6.1f} s",
                flush=True,
            )
            out.append(c)
        return out

    def stop(c: CandidateManifest, rung: int) -> CandidateManifest:
        return adaptation.stop_candidate(c, rung, str(prepared["run"] / "candidates" / c.spec.name))

    prior = adaptation.training_prior(prepared["source"])
    return halving.successive_halving(
        planning.plan_candidates(cfg, cuda=False),
        train,
        stop,
        cfg.adapt.policy,
        planning.budget(cfg).halving,
        lambda rung: adaptation.class_mix(rung, cfg.adapt.class_mix, cfg.seed, prior),
    )


def evaluate(
    candidates: list[CandidateManifest], policy: Policy, mix: ClassMix | None, labels: dict[str, str] | None = None
) -> dict:
    """One policy's pick on one shift, scored with the target labels the run never showed it. As in a run
    (`adaptation.select_model`), candidates successive halving stopped take no part in the pick; the
    oracle is the best of every candidate trained, stopped ones included. (Successive halving itself
    ranked with the library's rule: a policy here changes only the final pick.) With the target sample's
    `labels` (image_id -> class), "corrected" is the pick's accuracy as a run writes it where the estimated
    class mix is credible: predicting under that mix (`adapt.priors.correct`)."""
    finished = [c for c in candidates if c.stopped_at_rung is None]
    pool = adaptation.selection_candidates(finished)
    if policy.all_judge_all:
        pool = [replace(c, objectives=frozenset()) for c in pool]
    if not policy.paired:
        pool = [replace(c, val_correct=None) for c in pool]
    pick = selection.select(pool, policy.validators, policy.tie_break, mix if policy.target_side else None)
    acc = [c.target_accuracy for c in finished]
    oracle = max(c.target_accuracy for c in candidates)
    ref = pick.reference
    promoted = ref if not pick.confident and ref is not None else pick.index
    return {
        "pick": finished[pick.index].spec.name,
        "selected": acc[pick.index],
        "oracle": oracle,
        "regret": oracle - acc[pick.index],
        # what "doing nothing" scores: the reference, else (every source-only one collapsed) the best of them
        "reference": acc[ref]
        if ref is not None
        else max(c.target_accuracy for c in finished if c.spec.method == "source_only"),
        "confident": pick.confident,
        "promoted": acc[promoted],
        "promoted_regret": oracle - acc[promoted],
        "corrected": acc[pick.index]
        if pick.mix is None or labels is None
        else corrected_accuracy(finished[pick.index], pick.mix, labels),
    }


def corrected_accuracy(candidate: CandidateManifest, mix: ClassMix, labels: dict[str, str]) -> float:
    """`candidate`'s accuracy on the target sample predicting under `mix` (`adapt.priors.adjust` of its
    probabilities, which is what its corrected model's output layer gives)."""
    table = storage.read_table(candidate.predictions_uri, columns=["image_id", "probabilities"]).to_pandas()
    proba = np.stack(table.probabilities.to_numpy()).astype(np.float64)
    logits = torch.from_numpy(np.log(np.clip(proba, 1e-12, None)))
    predicted = [mix.classes[i] for i in priors.adjust(logits, mix).argmax(1).tolist()]
    truth = [labels.get(i) for i in table.image_id]
    scored = [(p, t) for p, t in zip(predicted, truth, strict=True) if t is not None]
    return sum(p == t for p, t in scored) / max(len(scored), 1)


def true_mix(labels: IngestManifest, classes: list[str]) -> list[float]:
    """The target's class shares, from the labels the run never showed selection."""
    counts = read_index(labels).label.value_counts()
    total = max(int(sum(counts.get(c, 0) for c in classes)), 1)
    return [float(counts.get(c, 0)) / total for c in classes]


def _top(shares: list[float], classes: list[str], k: int = 2) -> str:
    order = sorted(range(len(shares)), key=lambda i: -shares[i])[:k]
    return ", ".join(f"{classes[i]}: {shares[i]:.2f}" for i in order)


def report(results: dict[str, dict[str, dict]]) -> None:
    """results[shift][policy] = evaluate(...)."""
    shifts = list(results)
    for policy in POLICIES:
        print(f"\n-- policy: {policy}")
        print(
            f"{'shift':<18}{'pick':<22}{'selected':>9}{'oracle':>8}{'regret':>8}{'src-only':>9}{'below':>7}"
            f"{'confident':>10}{'promoted':>9}{'corrected':>10}"
        )
        for shift in shifts:
            r = results[shift][policy]
            ref = f"{r['reference']:.3f}"
            below = "yes" if r["selected"] < r["reference"] else "no"
            print(
                f"{shift:<18}{r['pick']:<22}{r['selected']:>9.3f}{r['oracle']:>8.3f}{r['regret']:>8.3f}{ref:>9}"
                f"{below:>7}{'yes' if r['confident'] else 'LOW':>10}{r['promoted']:>9.3f}"
                f"{r.get('corrected', r['selected']):>10.3f}"
            )
    print(
        f"\n{'policy':<40}{'mean regret':>12}{'worst':>7}{'below src-only':>15}{'below by >0.01':>15}"
        f"{'low conf.':>10}{'promoted mean/worst':>21}"
    )
    for policy in POLICIES:
        rs = [results[s][policy] for s in shifts]
        regret = [r["regret"] for r in rs]
        below = sum(r["selected"] < r["reference"] for r in rs)
        below_tol = sum(r["selected"] < r["reference"] - TOLERANCE for r in rs)
        promoted = [r["promoted_regret"] for r in rs]
        print(
            f"{policy:<40}{np.mean(regret):>12.3f}{max(regret):>7.3f}{below:>15}{below_tol:>15}"
            f"{sum(not r['confident'] for r in rs):>10}{np.mean(promoted):>12.3f} / {max(promoted):.3f}"
        )
    if len(shifts) > 2:  # choosing the policy on the suite is itself fitted: estimate it on held-out shifts
        held_out = []
        for shift in shifts:
            rest = [s for s in shifts if s != shift]
            best = min(POLICIES, key=lambda p: (np.mean([results[s][p]["regret"] for s in rest]), p))
            held_out.append((shift, best, results[shift][best]["regret"]))
        print("\nleave one shift out (policy with the lowest mean regret on the others -> regret on this one):")
        for shift, best, regret in held_out:
            print(f"  {shift:<18}{best:<40}{regret:.3f}")
        print(f"  mean {np.mean([r for *_, r in held_out]):.3f}, worst {max(r for *_, r in held_out):.3f}")


def main(args) -> None:
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print("$", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}")
    cfg = load_config(None, [*SETTINGS, f"seed={args.seed}", *args.set])
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="adaptflow-selection-"))
    results, dumped = {}, {}
    start = time.perf_counter()
    for name in args.shifts:
        t = time.perf_counter()
        print(f"\n== {name}: {SHIFTS[name].gap}", flush=True)
        prepared = prepare_shift(name, work / name, cfg, args)
        candidates = train_candidates(prepared, cfg)
        finished = [c for c in candidates if c.stopped_at_rung is None]
        mix = adaptation.class_mix(finished, source_prior=adaptation.training_prior(prepared["source"]))
        labels = read_index(prepared["target_labels"]).set_index("image_id").label.to_dict()
        results[name] = {p: evaluate(candidates, policy, mix, labels) for p, policy in POLICIES.items()}
        if mix is not None:
            truth = true_mix(prepared["target_labels"], mix.classes)
            pool = adaptation.selection_candidates(finished)
            print(
                f"  class mix: estimated {_top(mix.estimate, mix.classes)}, true {_top(truth, mix.classes)}; total "
                f"variation from the truth {priors.total_variation(mix.estimate, truth):.3f}, the truth's from the "
                f"source {priors.total_variation(truth, mix.source):.3f}; label shift estimated: "
                f"{'yes' if priors.label_shift(mix) else 'no'}, credible (rule 4 speaks): "
                f"{'yes' if selection.credible_in(pool, mix) else 'no'}",
                flush=True,
            )
        dumped[name] = [
            json.loads(
                c.model_dump_json(include={"spec", "scores", "collapsed", "target_accuracy", "steps", "seconds"})
            )
            for c in candidates
        ]
        print(f"  {name}: {len(candidates)} candidates in {time.perf_counter() - t:.0f} s", flush=True)
    report(results)
    print(f"\n{len(args.shifts)} shifts in {(time.perf_counter() - start) / 60:.1f} min; work folder: {work}")
    if args.json:
        Path(args.json).write_text(json.dumps({"candidates": dumped, "results": results}, indent=1))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
