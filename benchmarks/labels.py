"""Benchmark: what a few labelled target images do for model selection, replayed on the suite's candidates.

Reads the runs `benchmarks/suite.py --work DIR` left (one per shift, for one `--code` and `--seed`) and, for
each, chooses the model again as `adaptflow run --target-train-labels` would: the label-free pick
(`adapt.selection.select`, today's rules on the run's finished candidates), then revised by N labelled target
images (`adapt.labelled.by_labels`), for N in `--labels`, the images drawn at random (`--draws` times) or
chosen by `adaptflow label suggest` (BADGE over the label-free pick). The target images are split in two
halves once, by a seeded draw: labels come from one, and every pick of every row is scored on the other, so
no row is scored on easier images than another (active labelling takes the hard ones). A candidate's
outcome on the labelled images comes from its stored target predictions; for each run the benchmark also
runs the models themselves on one set of labelled images (`labelled_outcomes`, as the flow does) and fails
if the two differ. Training does not use the labels yet (issue 28, item 3): what this measures is selection.

    .venv/bin/python benchmarks/suite.py --work /tmp/suite             # the runs (about 5 minutes a shift)
    .venv/bin/python benchmarks/labels.py --work /tmp/suite --code today
"""

from __future__ import annotations

import argparse
import posixpath
import shlex
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adaptflow.adapt import candidates as adaptation  # noqa: E402
from adaptflow.adapt import selection  # noqa: E402
from adaptflow.adapt.labelled import by_labels, labelled_outcomes  # noqa: E402
from adaptflow.data.ingest import read_index  # noqa: E402
from adaptflow.label.suggest import suggest  # noqa: E402
from adaptflow.manifests import CandidateManifest, ExtractionPlan, ImageCache, IngestManifest  # noqa: E402
from adaptflow.report.records import RunSummary  # noqa: E402
from adaptflow.store import storage  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="a benchmarks/suite.py folder (its stores/)")
    p.add_argument("--code", default="today", help="whose runs: the suite's --code name")
    p.add_argument("--seed", type=int, default=0, help="the suite runs' seed")
    p.add_argument("--labels", type=int, nargs="+", default=[10, 50, 200], help="labelled images per run")
    p.add_argument("--draws", type=int, default=3, help="random draws per count (their mean is reported)")
    return p


class Run:
    """One suite run's finished candidates, their target predictions and the target's true labels."""

    def __init__(self, summary_uri: str):
        self.summary = RunSummary.load(summary_uri)
        a = self.summary.adaptation
        cms = [CandidateManifest.load(posixpath.dirname(c.model_uri) + "/candidate.json") for c in a.candidates]
        self.done = [c for c in cms if c.stopped_at_rung is None]
        truth = read_index(IngestManifest.load(_ingest(self.summary, "target_labels")))
        self.truth = truth.drop_duplicates("image_id").set_index("image_id").label
        tables = {
            c.spec.name: storage.read_table(c.predictions_uri, columns=["uri", "image_id", "prediction"])
            .to_pandas()
            .set_index("image_id")
            for c in self.done
        }
        ids = sorted(set.intersection(*(set(p.index) for p in tables.values())) & set(self.truth.index))
        truth_ids = self.truth.loc[ids].to_numpy()
        self.right = pd.DataFrame({n: p.prediction.loc[ids].to_numpy() == truth_ids for n, p in tables.items()}, ids)
        halves = np.random.default_rng(1234).permutation(ids)
        self.pool, self.scored = sorted(halves[: len(ids) // 2]), sorted(halves[len(ids) // 2 :])
        self.uris = next(iter(tables.values())).uri
        source = IngestManifest.load(_ingest(self.summary, "source"))
        mix = adaptation.class_mix(
            self.done, self.summary.config.adapt.class_mix, self.summary.config.seed, adaptation.training_prior(source)
        )
        self.judged = adaptation.selection_candidates(self.done)
        self.label_free = selection.select(self.judged, a.policy, mix=mix)

    def pick(self, labelled: list[str]) -> int:
        if not labelled:
            return self.label_free.index
        outcomes = [self.right.loc[labelled, c.spec.name].to_numpy() for c in self.done]
        return by_labels(self.label_free, self.judged, outcomes).index

    def accuracy(self, index: int) -> tuple[float, float]:
        """(the candidate's accuracy, the best candidate's) on the scored half of the target."""
        held = self.right.loc[self.scored]
        return float(held[self.done[index].spec.name].mean()), float(held.mean().max())

    def active(self, n: int) -> list[str]:
        """`label suggest`'s n images of the pool half (BADGE over the label-free pick)."""
        name = self.done[self.label_free.index].spec.name
        summary = self.summary.model_copy(
            update={"adaptation": self.summary.adaptation.model_copy(update={"selected": name})}
        )
        chosen = suggest(summary, n, seed=0, labelled=set(self.uris.loc[self.scored]))
        return [i for i in chosen.image_id if i in set(self.pool)]

    def check(self, labelled: list[str]) -> None:
        """The stored predictions' outcomes equal the models' own on `labelled` (as the flow computes them)."""
        ext = self.summary.extraction
        cache = None
        if ext.image_cache_uri:
            size = next((c.spec.image_size for c in self.done if c.spec.image_size), 0)
            cache = ImageCache(uri=ext.image_cache_uri, fingerprint="", size=size, geometry={})
        plan = ExtractionPlan(
            features_uri=ext.features_uri,
            fingerprint=ext.fingerprint,
            dim=0,
            n_requested=0,
            n_cached=0,
            shards=[],
            seconds=0.0,
            cache=cache,
        )
        rows = pd.DataFrame({"image_id": labelled, "label": self.truth.loc[labelled].to_numpy()})
        rows["uri"] = ""
        for c, real in zip(self.done, labelled_outcomes(self.done, rows, plan), strict=True):
            stored = self.right.loc[labelled, c.spec.name].to_numpy()
            if not np.array_equal(real, stored):
                raise SystemExit(f"{c.spec.name}: its model and its stored predictions disagree on labelled images")


def _ingest(summary: RunSummary, domain: str) -> str:
    index_uri = summary.datasets[domain].index_uri
    return posixpath.dirname(index_uri) + "/manifest.json"


def main(args) -> None:
    print("$", shlex.join([sys.executable, *sys.argv]))
    stores = sorted(Path(args.work, "stores").glob(f"{args.code}-*-seed{args.seed}"))
    ways = ["0"] + [f"{w} {n}" for n in args.labels for w in ("random", "active")]
    table = {w: [] for w in ways}
    regret = {w: [] for w in ways}
    print("| shift | " + " | ".join(ways) + " | oracle |")
    print("|---" * (len(ways) + 2) + "|")
    for store in stores:
        summaries = sorted(store.glob("runs/*/summary.json"))
        if not summaries:
            continue
        run = Run(str(summaries[0]))
        if len(run.done) < 2:
            continue
        cells, oracle = [], None
        for way in ways:
            n = 0 if way == "0" else int(way.split()[1])
            draws = (
                [[]]
                if n == 0
                else (
                    [run.active(n)]
                    if way.startswith("active")
                    else [
                        list(np.random.default_rng(d).choice(run.pool, min(n, len(run.pool)), replace=False))
                        for d in range(args.draws)
                    ]
                )
            )
            if way == f"active {args.labels[0]}":
                run.check(draws[0])
            scores = [run.accuracy(run.pick(ids)) for ids in draws]
            acc = float(np.mean([s[0] for s in scores]))
            best = float(np.mean([s[1] for s in scores]))
            table[way].append(acc)
            regret[way].append(best - acc)
            oracle = best if way == "0" else oracle
            cells.append(f"{acc:.3f}")
        shift = store.name[len(args.code) + 1 : -len(f"-seed{args.seed}")]
        print(f"| {shift} | " + " | ".join(cells) + f" | {oracle:.3f} |", flush=True)
    print("| mean | " + " | ".join(f"{np.mean(table[w]):.3f}" for w in ways) + " | |")
    print("| mean regret | " + " | ".join(f"{np.mean(regret[w]):.3f}" for w in ways) + " | |")
    print("| worst regret | " + " | ".join(f"{np.max(regret[w]):.3f}" for w in ways) + " | |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
