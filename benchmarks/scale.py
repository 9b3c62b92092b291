"""Benchmark: the second half of the pipeline at scale, a small and a large target through `run --method auto`.

    .venv/bin/python benchmarks/scale.py                          # targets of 2,000 and 20,000 images
    .venv/bin/python benchmarks/scale.py --sizes 2000 20000 100000 --work /tmp/scale

Per target size N (a 2,000-image source, the mnist-m digit shift of benchmarks/shifts.py, rendered at 64 px):
1. `adaptflow run` with the default candidates and step budget, as a user runs it (its own process, its own
   temporary Prefect server): seconds per stage from the run's summary.json, and the peak memory of the
   whole process tree (the command, its Prefect server and every decoding worker, sampled every 0.5 s):
   the largest sum of PSS and the largest single process's RSS. PSS, not RSS, is what sums: decoding
   workers are forked, and each one's RSS counts again every page it still shares with its parent
   (measured: predicting 20,000 images, 5,070 MiB of RSS summed over 12 processes, 3,482 MiB of PSS);
2. `adaptflow predict` with the run's first end-to-end (images-mode) candidate over N new target images,
   with the same memory sampling.
Then, once, in this process and without Prefect: images/s of extraction (decode + embed + commit) and of
images-mode prediction (decode into the cache + forward + commit) over the same new images at the same size.

Prints the issue's ratios: train seconds at the largest N over the smallest (bounded by steps: <= 1.3),
peak memory likewise (<= 1.2, prediction included), and images-mode prediction over extraction images/s (>= 0.8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))

import psutil  # noqa: E402
from prediction import throughput  # noqa: E402  (benchmarks/prediction.py)
from shifts import SHIFTS, make_shift  # noqa: E402

from adaptflow.store import storage  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", type=int, default=[2000, 20000], help="target sizes, smallest first")
    p.add_argument("--source", type=int, default=2000, help="source images")
    p.add_argument("--shift", default="mnist-m", choices=list(SHIFTS))
    p.add_argument("--image-size", type=int, default=64, help="rendered images and the backbone's input size")
    p.add_argument("--throughput-images", type=int, default=2000, help="new images for the images/s comparison")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override for every run")
    p.add_argument("--work", default=None, help="folder for data and stores (default: a temporary one)")
    p.add_argument("--seed", type=int, default=0)
    return p


class TreeMemory:
    """Samples the memory of a process and all its descendants every `interval` seconds: the peak of their
    summed PSS (shared pages split among the processes sharing them) and the peak RSS of any one."""

    def __init__(self, pid: int, interval: float = 0.5):
        self.root, self.interval = psutil.Process(pid), interval
        self.peak_total = self.peak_single = 0
        self.processes: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            pss, rss = [], []
            for p in procs:
                try:
                    info = p.memory_full_info()  # Linux: reads /proc/PID/smaps_rollup
                    pss.append(info.pss)
                    rss.append(info.rss)
                    self.processes.add(p.pid)
                except psutil.Error:
                    pass
            self.peak_total = max(self.peak_total, sum(pss))
            self.peak_single = max([self.peak_single, *rss])
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_args(data: dict, store: str, *extra: str) -> list[str]:
    """`adaptflow run`'s arguments for a shift made by `shifts.make_shift`, into `store`."""
    return [
        "run",
        "--source",
        data["source"],
        "--target",
        data["target"],
        "--target-labels",
        data["target_labels"],
        "--store",
        store,
        *extra,
    ]


def command(args: list[str], env: dict, cwd: Path = ROOT) -> tuple[str, float, TreeMemory]:
    """Run the adaptflow command line of the checkout at `cwd`; returns (its last stdout line, wall
    seconds, memory)."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", *args],
        cwd=cwd,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    memory = TreeMemory(proc.pid)
    out, err = proc.communicate()
    memory.stop()
    if proc.returncode:
        sys.exit(f"adaptflow {args[0]} failed ({proc.returncode}):\n{err[-3000:]}")
    return out.strip().splitlines()[-1], time.perf_counter() - t, memory


def main(args) -> None:
    print("$", shlex.join([sys.executable, *sys.argv]))
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    settings = [f"backbone.image_size={args.image_size}", *args.set]
    with tempfile.TemporaryDirectory(prefix="adaptflow-scale-") as tmp:
        work = Path(args.work or tmp)
        env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_HOME": str(work / "prefect"), "PYTHONUNBUFFERED": "1"}
        overrides = [x for s in settings for x in ("--set", s)]
        rows, images_model = [], None
        for n in args.sizes:
            data = make_shift(
                SHIFTS[args.shift], str(work / f"data-{n}"), args.source, args.image_size, args.seed, target_size=n
            )
            fresh = make_shift(
                SHIFTS[args.shift], str(work / f"new-{n}"), 10, args.image_size, args.seed + 1, target_size=n
            )
            store = str(work / f"store-{n}")
            run_uri, run_s, run_mem = command(run_args(data, store, *overrides), env)
            summary = storage.read_json(storage.join(run_uri, "summary.json"))
            a = summary["adaptation"]
            images = [c for c in a["candidates"] if c["mode"] == "images"]
            if not images:
                sys.exit("no images-mode candidate was trained: see adapt.image_methods")
            images_model = images[0]["model_uri"]
            _, predict_s, predict_mem = command(
                [
                    "predict",
                    images_model,
                    fresh["target"],
                    "--store",
                    store,
                    "--out",
                    str(work / f"predict-{n}.parquet"),
                    *overrides,
                ],
                env,
            )
            stopped = [c["name"] for c in a["candidates"] if c.get("stopped_at_rung") is not None]
            rows.append(
                {
                    "n": n,
                    "run_s": run_s,
                    "timings": summary["timings"],
                    "run_pss": run_mem.peak_total,
                    "run_rss_single": run_mem.peak_single,
                    "processes": len(run_mem.processes),
                    "predict_s": predict_s,
                    "predict_pss": predict_mem.peak_total,
                    "selected": a["selected"],
                    "accuracy": a.get("selected_target_accuracy"),
                    "stopped": stopped,
                }
            )
            r = rows[-1]
            print(
                f"target {n:>7,}: run {run_s:7.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in r['timings'].items())}); "
                f"peak PSS {r['run_pss'] / 2**20:,.0f} MiB over {r['processes']} processes "
                f"(largest RSS {r['run_rss_single'] / 2**20:,.0f}); selected {r['selected']} "
                f"(target {r['accuracy']:.3f}); halving stopped {', '.join(stopped) or 'none'}",
                flush=True,
            )
            print(
                f"{'':>15} predict {n:,} new images with {images[0]['name']}: {predict_s:.1f} s, "
                f"peak PSS {r['predict_pss'] / 2**20:,.0f} MiB",
                flush=True,
            )

        fresh = make_shift(
            SHIFTS[args.shift],
            str(work / "throughput"),
            10,
            args.image_size,
            args.seed + 2,
            target_size=args.throughput_images,
        )
        tp = throughput(fresh["target"], work, images_model)
        print(
            f"throughput over {tp['images']:,} new images: extraction {tp['extract_per_s']:.1f} images/s, "
            f"images-mode prediction {tp['predict_per_s']:.1f} images/s"
        )

        small, large = rows[0], rows[-1]
        ratios = {
            "train s": (large["timings"]["train"] / small["timings"]["train"], 1.3, "<="),
            "peak PSS (run and predict)": (
                max(large["run_pss"], large["predict_pss"]) / max(small["run_pss"], small["predict_pss"]),
                1.2,
                "<=",
            ),
            "prediction / extraction images/s": (tp["predict_per_s"] / tp["extract_per_s"], 0.8, ">="),
        }
        print(f"ratios, target {large['n']:,} over {small['n']:,}:")
        for name, (value, goal, op) in ratios.items():
            met = value <= goal if op == "<=" else value >= goal
            print(f"  {name:<34} {value:6.2f}  (goal {op} {goal}: {'met' if met else 'NOT met'})")
        if args.work:
            Path(args.work, "scale.json").write_text(json.dumps({"rows": rows, "throughput": tp}, indent=1))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
