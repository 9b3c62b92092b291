"""Benchmark: what the default `--method auto` costs over `--method none` on the same data.

    .venv/bin/python benchmarks/cost.py                      # a 5,000-image source, 1,797 target images
    .venv/bin/python benchmarks/cost.py --code /tmp/release  # the same, also with another checkout's code
    .venv/bin/python benchmarks/cost.py --code /tmp/release --run-seeds 0 1 2  # each run three times

Makes one digit shift (benchmarks/shifts.py, mnist-m by default, rendered at 32 px), then runs `adaptflow
run` on it as a user would, each run in its own process with its own temporary Prefect server and its own
empty store, with the default config: `--method none` (ingest, extraction, the source-only head) and the
default `auto` (the same, plus every candidate and the selection). With `--code`, `auto` runs a second
time from that checkout (an earlier release), on the same data. Prints each run's wall seconds and
seconds per stage, the target accuracy of the model it keeps (target labels are used only to score), and
the ratio of auto's wall seconds to none's (the issue's goal: at most 3). One seed's target accuracy moves
by several points (the splits, each candidate's initialisation and batches): compare checkouts over several
`--run-seeds`, whose means it prints.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
from pathlib import Path
from statistics import mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

from scale import command, run_args  # noqa: E402  (benchmarks/scale.py)
from shifts import SHIFTS, make_shift  # noqa: E402

from adaptflow.store import storage  # noqa: E402

GOAL = 3.0  # auto may cost at most this many times a --method none run


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", type=int, default=5000, help="source images")
    p.add_argument("--target", type=int, default=1797, help="target images")
    p.add_argument("--shift", default="mnist-m", choices=list(SHIFTS))
    p.add_argument("--image-size", type=int, default=32, help="size the shift's images are rendered at")
    p.add_argument("--code", default=None, help="another checkout (e.g. the last release) to run auto with too")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--work", default=None, help="folder for data and stores (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0, help="the shift's seed (which images are drawn)")
    p.add_argument(
        "--run-seeds",
        type=int,
        nargs="+",
        default=[0],
        help="repeat every run with the config's seed and adapt.seeds set to each (the splits, the samples, "
        "each candidate's initialisation and batches); one seed's accuracy varies by a few points",
    )
    return p


def main(args) -> None:
    print("$", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="adaptflow-cost-") as tmp:
        work = Path(args.work or tmp)
        data = make_shift(
            SHIFTS[args.shift], str(work / "data"), args.source, args.image_size, args.seed, target_size=args.target
        )
        print(f"data: {args.shift}, {args.source:,} source and {args.target:,} target images at {args.image_size} px")
        runs = [("none", "--method none", ROOT), ("auto", "default", ROOT)]
        if args.code:
            runs.append(("auto, --code", f"default, from {args.code}", Path(args.code).resolve()))
        seconds: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        accuracy: dict[str, list[float]] = {name: [] for name, _, _ in runs}
        for seed in args.run_seeds:
            for i, (name, what, code) in enumerate(runs):
                tag = f"{i}-seed{seed}"
                env = {
                    **os.environ,
                    "DO_NOT_TRACK": "1",
                    "PREFECT_HOME": str(work / f"prefect-{tag}"),
                    "PYTHONPATH": str(code),  # ahead of the installed package: this checkout's code
                }
                flags = ["--method", "none"] if name == "none" else []
                settings = [*args.set, f"seed={seed}", f"adapt.seeds=[{seed}]"]
                overrides = [x for s in settings for x in ("--set", s)]
                store = str(work / f"store-{tag}")
                run_uri, wall, _ = command(run_args(data, store, *flags, *overrides), env, cwd=code)
                summary = storage.read_json(storage.join(run_uri, "summary.json"))
                seconds[name].append(wall)
                accuracy[name].append(summary["metrics"]["target"]["accuracy"])
                stages = ", ".join(f"{k} {v:.1f}" for k, v in summary["timings"].items())
                kept = summary["adaptation"].get("selected")
                kept = "the source-only head" if kept in (None, "head") else kept
                print(
                    f"seed {seed}: {name:<13} ({what}): {wall:7.1f} s ({stages}); keeps {kept}, "
                    f"target accuracy {accuracy[name][-1]:.3f}",
                    flush=True,
                )
            print(f"seed {seed}: auto / none wall seconds: {seconds['auto'][-1] / seconds['none'][-1]:.2f}", flush=True)
        ratio = sum(seconds["auto"]) / sum(seconds["none"])
        print(
            f"auto / none wall seconds over {len(args.run_seeds)} seed(s): {ratio:.2f} "
            f"(goal <= {GOAL}: {'met' if ratio <= GOAL else 'NOT met'})"
        )
        for name in accuracy:
            print(
                f"{name:<13} target accuracy: mean {mean(accuracy[name]):.3f} over seeds {args.run_seeds} "
                f"({', '.join(f'{a:.3f}' for a in accuracy[name])})"
            )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
