"""Benchmark: the default `adaptflow run` on every shift of the suite, from one or more checkouts side by side.

    .venv/bin/python benchmarks/suite.py --work /tmp/suite                      # this checkout, every shift
    .venv/bin/python benchmarks/suite.py --work /tmp/suite --code release=/tmp/release-e291 --code today=.
    .venv/bin/python benchmarks/suite.py --work /tmp/suite --shifts dominant-class partial --set adapt.budget=quick

Where benchmarks/selection.py trains the candidates with the library's functions at a reduced budget and
asks many policies for a pick, this runs the product as a user would: `adaptflow run` with the default
config (and any `--set`), in its own process with its own temporary Prefect server and its own empty store,
on each shift of benchmarks/shifts.py (600 images per domain at 32 px). Target labels are passed only to
score. Per shift and checkout it prints the model the run selected and the one it promoted, their target
accuracy, the source-only models' (the features head every run trains, and the end-to-end `source_only`
candidate when there is one), the best candidate's (oracle), the regret, whether the selected model fell
below source-only, the estimated and true class mix (total variation between them, and from the source's),
and the wall seconds; then per checkout the mean and worst regret, the picks below source-only, and per shift
the difference between checkouts. Each finished run is appended to `--work`/results.jsonl and not run again,
so an interrupted benchmark resumes, and a later call with another `--code` adds a column.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from pathlib import Path
from statistics import mean

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import command, run_args  # noqa: E402  (benchmarks/scale.py)
from shifts import SHIFTS, make_shift  # noqa: E402

from adaptflow.store import storage  # noqa: E402

TOLERANCE = 0.01  # "below source-only" also counted with this slack: 6 of 600 target images


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shifts", nargs="+", default=list(SHIFTS), choices=list(SHIFTS))
    p.add_argument("--work", required=True, help="folder for data, stores and results.jsonl; reused when present")
    p.add_argument(
        "--code",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a checkout to run (repeatable; e.g. release=/tmp/release-e291); default: today=this checkout",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--per-domain", type=int, default=600, help="images per domain")
    p.add_argument("--image-size", type=int, default=32, help="size the shift's images are rendered at")
    p.add_argument("--seed", type=int, default=0, help="the config's seed and adapt.seeds")
    p.add_argument("--report-only", action="store_true", help="print the table of what results.jsonl holds")
    return p


def true_mix(labels_csv: str, classes: list[str]) -> list[float]:
    """The target's class shares over the source's classes (labels the source lacks left out)."""
    labels = pd.read_csv(labels_csv, dtype=str).label
    counts = labels[labels.isin(classes)].value_counts()
    total = max(int(counts.sum()), 1)
    return [float(counts.get(c, 0)) / total for c in classes]


def outcome(summary: dict, data: dict, wall: float) -> dict:
    """What one run kept and how well, from its summary (target labels used to score only)."""
    adaptation = summary["adaptation"]
    candidates = {c["name"]: c["target_accuracy"] for c in adaptation["candidates"]}
    head = summary["baseline"]["target"]["accuracy"]
    e2e = candidates.get("source_only-images")
    reference = adaptation.get("reference")
    # the source-only model a cautious run keeps: the reference candidate, else the end-to-end one, else the head
    source_only = candidates.get(reference) if reference else (e2e if e2e is not None else head)
    selected = summary["metrics"]["target"]["accuracy"]
    promotion = summary.get("promotion") or {}
    promoted = selected
    if promotion.get("stand_in_version") is not None and reference:
        promoted = candidates.get(reference, selected)  # the source-only reference became champion instead
    elif promotion and not promotion.get("promoted"):
        promoted = None  # nothing became champion: the store keeps none (a first run) or the one it had
    classes = summary["datasets"]["source"]["classes"]
    truth = true_mix(data["target_labels"], classes)
    mix = adaptation.get("class_mix")
    row = {
        "selected": adaptation.get("selected"),
        "accuracy": selected,
        "promoted": promoted,
        "confident": adaptation.get("confident"),
        "head": head,
        "source_only_images": e2e,
        "source_only": source_only,
        "oracle": max([a for a in candidates.values() if a is not None] + [selected]),
        "candidates": candidates,
        "wall": wall,
        "timings": summary["timings"],
        "true_mix": truth,
        "true_tv_from_source": 0.5 * float(np.abs(np.array(truth) - 1 / len(classes)).sum()),
    }
    if mix:
        row["estimated_mix"] = mix["estimate"]
        row["estimate_error_tv"] = 0.5 * float(np.abs(np.array(mix["estimate"]) - np.array(truth)).sum())
    return row


def run_one(name: str, code: Path, shift: str, data: dict, work: Path, args) -> dict:
    tag = f"{name}-{shift}-seed{args.seed}"
    (work / "prefect" / tag).mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        "DO_NOT_TRACK": "1",
        "PREFECT_HOME": str(work / "prefect" / tag),
        "PYTHONPATH": str(code),  # ahead of the installed package: this checkout's code
    }
    settings = [*args.set, f"seed={args.seed}", f"adapt.seeds=[{args.seed}]"]
    overrides = [x for s in settings for x in ("--set", s)]
    run_uri, wall, _ = command(run_args(data, str(work / "stores" / tag), *overrides), env, cwd=code)
    summary = storage.read_json(storage.join(run_uri, "summary.json"))
    return {"code": name, "shift": shift, "seed": args.seed, "set": args.set, **outcome(summary, data, wall)}


def _confidence(confident: bool | None) -> str:
    """yes / LOW, or - for a checkout whose summary does not say (before selection had a confidence)."""
    return "-" if confident is None else ("yes" if confident else "LOW")


def report(rows: list[dict], codes: list[str], shifts: list[str]) -> None:
    by = {(r["code"], r["shift"]): r for r in rows}
    for code in codes:
        print(f"\n-- {code}")
        print(
            f"{'shift':<17}{'selected':<22}{'acc':>6}{'promoted':>9}{'src-only':>9}{'head':>6}{'oracle':>7}"
            f"{'regret':>7}{'below':>6}{'conf':>5}{'mix err':>8}{'true TV':>8}{'wall s':>8}"
        )
        for shift in shifts:
            r = by.get((code, shift))
            if r is None:
                print(f"{shift:<17}(not run)")
                continue
            below = "yes" if r["accuracy"] < r["source_only"] - 1e-9 else "no"
            err = f"{r['estimate_error_tv']:.3f}" if "estimate_error_tv" in r else "-"
            print(
                f"{shift:<17}{str(r['selected']):<22}{r['accuracy']:>6.3f}{_score(r['promoted']):>9}"
                f"{r['source_only']:>9.3f}{r['head']:>6.3f}{r['oracle']:>7.3f}{r['oracle'] - r['accuracy']:>7.3f}"
                f"{below:>6}{_confidence(r['confident']):>5}{err:>8}{r['true_tv_from_source']:>8.3f}"
                f"{r['wall']:>8.0f}"
            )
        done = [by[(code, s)] for s in shifts if (code, s) in by]
        if done:
            regret = [r["oracle"] - r["accuracy"] for r in done]
            below = sum(r["accuracy"] < r["source_only"] - 1e-9 for r in done)
            below_tol = sum(r["accuracy"] < r["source_only"] - TOLERANCE for r in done)
            promoted = [r["promoted"] for r in done if r["promoted"] is not None]
            print(
                f"{code}: {len(done)} shifts, mean accuracy {mean(r['accuracy'] for r in done):.3f} (promoted on "
                f"{len(promoted)}: {_score(mean(promoted) if promoted else None)}), mean regret {mean(regret):.3f}, "
                f"worst {max(regret):.3f}, below source-only {below} (by more than {TOLERANCE}: {below_tol}), "
                f"wall {sum(r['wall'] for r in done):.0f} s"
            )
    if len(codes) > 1:
        print(f"\nselected target accuracy per shift ({' | '.join(codes)}), and each minus the first:")
        for shift in shifts:
            acc = [by[(c, shift)]["accuracy"] if (c, shift) in by else None for c in codes]
            cells = " | ".join("-" if a is None else f"{a:.3f}" for a in acc)
            diff = ", ".join("-" if a is None or acc[0] is None else f"{a - acc[0]:+.3f}" for a in acc[1:])
            print(f"  {shift:<17}{cells}   ({diff})")


def _score(value: float | None) -> str:
    return "none" if value is None else f"{value:.3f}"


def main(args) -> None:
    print("$", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    codes = dict(c.split("=", 1) for c in args.code) if args.code else {"today": str(ROOT)}
    results = work / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    rows = [r for r in rows if r["seed"] == args.seed and r["set"] == args.set]
    if not args.report_only:
        for shift in args.shifts:
            data_dir = work / "data" / shift
            if not (data_dir / "target_labels.csv").exists():
                make_shift(SHIFTS[shift], str(data_dir), args.per_domain, args.image_size, 0)
            data = {
                "source": str(data_dir / "source"),
                "target": str(data_dir / "target"),
                "target_labels": str(data_dir / "target_labels.csv"),
            }
            for name, code in codes.items():
                if any(r["code"] == name and r["shift"] == shift for r in rows):
                    continue
                row = run_one(name, Path(code).resolve(), shift, data, work, args)
                rows.append(row)
                with results.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{shift:<17} {name:<10} {row['selected']:<22} target {row['accuracy']:.3f} (source-only "
                    f"{row['source_only']:.3f}, oracle {row['oracle']:.3f}) {row['wall']:.0f} s",
                    flush=True,
                )
    report(rows, list(codes), args.shifts)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
