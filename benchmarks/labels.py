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
if the two differ. A replay measures selection only: those candidates trained without the labels.

`--train SHIFT ...` measures the whole of `--target-train-labels`, training included: per shift, this
checkout's `adaptflow run` without labels, then with N of the pool half's images labelled, drawn at random
and chosen by `label suggest` on the first run, each run in its own store (about 5 minutes a run), every
selected model scored on the same scored half.

    .venv/bin/python benchmarks/suite.py --work /tmp/suite             # the runs (about 5 minutes a shift)
    .venv/bin/python benchmarks/labels.py --work /tmp/suite --code today
    .venv/bin/python benchmarks/labels.py --work /tmp/suite --train degraded mnist-m --labels 50
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

sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import command, run_args  # noqa: E402  (benchmarks/scale.py)

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
    p.add_argument(
        "--train", nargs="+", metavar="SHIFT", help="run end to end on these shifts, labels used in training"
    )
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


def train(args) -> None:
    """`--train`: this checkout end to end, without labels and with N random or active ones, per shift."""
    n = args.labels[0]
    ways = ["0", f"random {n}", f"active {n}"]
    print("| shift | " + " | ".join(ways) + " | wall (s) |")
    print("|---" * (len(ways) + 2) + "|")
    table = {w: [] for w in ways}
    for shift in args.train:
        first, wall = _run(args, shift, "0")
        base = Run(storage.join(first, "summary.json"))
        chosen = {
            f"random {n}": list(np.random.default_rng(0).choice(base.pool, n, replace=False)),
            f"active {n}": base.active(n),
        }
        cells, walls = [], [wall]
        for way in ways:
            uri = first
            if way != "0":
                ids = chosen[way]
                csv = Path(args.work, "labels", f"{shift}-seed{args.seed}-{way.replace(' ', '')}.csv")
                labels = {"uri": base.uris.loc[ids].to_numpy(), "label": base.truth.loc[ids].to_numpy()}
                pd.DataFrame(labels).to_csv(csv, index=False)
                uri, wall = _run(args, shift, way, "--target-train-labels", str(csv))
                walls.append(wall)
            predicted = storage.read_table(storage.join(uri, "predictions.parquet")).to_pandas().set_index("image_id")
            acc = float((predicted.prediction.loc[base.scored] == base.truth.loc[base.scored]).mean())
            table[way].append(acc)
            cells.append(f"{acc:.3f}")
        print(f"| {shift} | " + " | ".join(cells) + f" | {' / '.join(f'{w:.0f}' for w in walls)} |", flush=True)
    print("| mean | " + " | ".join(f"{np.mean(table[w]):.3f}" for w in ways) + " | |")


def _run(args, shift: str, way: str, *extra: str) -> tuple[str, float]:
    """This checkout's `adaptflow run` on `shift` of the suite's data, in a store and Prefect home of its
    own: (the run's URI, wall seconds)."""
    import os

    work, tag = Path(args.work), f"{shift}-seed{args.seed}-{way.replace(' ', '')}"
    folder = work / "data" / shift
    data = {k: str(folder / k) for k in ("source", "target")} | {"target_labels": str(folder / "target_labels.csv")}
    (work / "labels" / "prefect" / tag).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_HOME": str(work / "labels" / "prefect" / tag)}
    seeds = ["--set", f"seed={args.seed}", "--set", f"adapt.seeds=[{args.seed}]"]
    uri, wall, _ = command(run_args(data, str(work / "labels" / "stores" / tag), *seeds, *extra), env)
    return uri, wall


def main(args) -> None:
    print("$", shlex.join([sys.executable, *sys.argv]))
    if args.train:
        return train(args)
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
