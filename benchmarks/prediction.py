"""Benchmark: images-mode prediction against feature extraction, images/s over the same new images.

    .venv/bin/python benchmarks/prediction.py                                   # CPU, 1,000 images at 64 px
    python3 benchmarks/prediction.py --images 8192 --image-size 224 --device cuda  # GPU (gpu_check.sh)
    .venv/bin/python benchmarks/prediction.py --memory --images 20000 --image-size 48  # peak RSS, this size
    .venv/bin/python benchmarks/prediction.py --cli --images 20000 --image-size 48 --repeat 3  # `adaptflow predict`

In this process, without Prefect, each into a fresh store, from the first plan to the last commit:
extraction (`plan_extraction` + every `extract_shard`: decode, embed, commit) and prediction with an
end-to-end model (decode into the training-image cache, then `plan_prediction` + every `predict_shard` +
`merge_predictions`). With `--model` the model is a saved images-mode model; without, an untrained DANN
of the right shape is saved first (throughput does not depend on the weights). Prints both rates and
prediction / extraction (the scale issue's goal: >= 0.8). With `--memory`, prediction alone (decode into the
cache, then predict) and this process's peak RSS: run it at two sizes, each in its own process, to see
whether memory grows with the images (the goal: not with them). With `--cli`, `adaptflow predict` itself
(Prefect, its temporary API server and the decoding workers included) as a command of its own, `--repeat`
times, each into a fresh store: the peak RSS of the largest process of the command's tree (every process
polled every 50 ms, and the command's own peak as the kernel reports it on exit), and which process it was.
"""

from __future__ import annotations

import argparse
import os
import resource
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
sys.path.insert(0, str(ROOT / "tests"))  # the untrained model the tests predict with

from shifts import SHIFTS, make_shift  # noqa: E402
from synthetic import save_untrained_images_model  # noqa: E402

from adaptflow.config import validate_config  # noqa: E402
from adaptflow.data.ingest import ingest  # noqa: E402
from adaptflow.evaluate import predict  # noqa: E402
from adaptflow.extract import features  # noqa: E402
from adaptflow.extract.devices import resolve_device  # noqa: E402
from adaptflow.extract.image_cache import image_cache  # noqa: E402
from adaptflow.manifests import IngestManifest  # noqa: E402
from adaptflow.models.card import load_card  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=64, help="rendered images, backbone and model input size")
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="default: the offline weights; random; or a weights file")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--model", default=None, help="a saved images-mode model folder; default: an untrained DANN")
    p.add_argument("--work", default=None)
    p.add_argument(
        "--memory", action="store_true", help="images-mode prediction alone, reporting this process's peak RSS"
    )
    p.add_argument(
        "--cli", action="store_true", help="`adaptflow predict` as a command, reporting its largest process's peak RSS"
    )
    p.add_argument("--repeat", type=int, default=1, help="with --cli: commands to run, each into a fresh store")
    return p


def throughput(images_uri: str, work: Path, model_uri: str, device: str = "cpu") -> dict:
    """images/s of extraction and of images-mode prediction over the images under `images_uri`, each into a
    fresh store under `work`, with the model's own config (backbone, shard size, decoding workers)."""
    cfg = load_card(model_uri).config
    index = ingest(images_uri, "target", str(work / "tp-ingest"), cfg.ingest, cfg.seed)
    n = index.n_images
    t = time.perf_counter()
    plan = features.plan_extraction([index.index_uri], str(work / "tp-extract"), cfg.backbone, cfg.extract.shard_size)
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    extract_s = time.perf_counter() - t

    t = time.perf_counter()
    predict_images(index, str(work / "tp-predict"), model_uri, str(work / "tp-predictions.parquet"), device)
    predict_s = time.perf_counter() - t
    return {"images": n, "extract_per_s": n / extract_s, "predict_per_s": n / predict_s}


def predict_images(index: IngestManifest, store: str, model_uri: str, out_uri: str, device: str = "cpu") -> None:
    """Images-mode prediction of the images of `index` as `adaptflow predict` makes it, without Prefect:
    decode them into `store`'s training-image cache at the model's size, then plan, predict every shard in
    turn and merge."""
    card = load_card(model_uri)
    cfg = card.config
    cache = image_cache(store, cfg.backbone, card.image_size)
    plan = features.plan_extraction(
        [index.index_uri], store, cfg.backbone, cfg.extract.shard_size, cache=cache, features=False
    )
    for shard in plan.shards:
        features.extract_shard(shard, cfg.backbone, cfg.extract)
    to_do = predict.plan_prediction(model_uri, index, plan, out_uri, cfg.extract.shard_size)
    predict.merge_predictions(to_do, [predict.predict_shard(s, plan, device) for s in to_do.shards])


def peak_memory(images_uri: str, work: Path, model_uri: str, device: str = "cpu") -> dict:
    """This process's peak RSS (MiB) once the images under `images_uri` are ingested and predicted
    (`predict_images`) into a fresh store under `work`: run each size in a process of its own."""
    cfg = load_card(model_uri).config
    index = ingest(images_uri, "target", str(work / "mem-ingest"), cfg.ingest, cfg.seed)
    predict_images(index, str(work / "mem-predict"), model_uri, str(work / "mem-predictions.parquet"), device)
    return {"images": index.n_images, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def cli_peak_memory(images_uri: str, work: Path, model_uri: str, name: str) -> dict:
    """`adaptflow predict` of the images under `images_uri` with `model_uri` into a fresh store `work/name`,
    as a command of its own (a fresh PREFECT_HOME unless one is set): the largest peak RSS (MiB) among its
    processes, which one it was, and the command's seconds."""
    store, home = work / name, work / f"{name}-prefect"
    env = {
        **os.environ,
        "DO_NOT_TRACK": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    env.setdefault("PREFECT_HOME", str(home))
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "predict",
        model_uri,
        images_uri,
        "--out",
        str(work / f"{name}.parquet"),
    ]
    start = time.perf_counter()
    proc = subprocess.Popen([*command, "--store", str(store), "--quiet"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    peaks: dict[int, tuple[int, str]] = {}
    stop = threading.Event()
    poller = threading.Thread(target=_poll_tree, args=(proc.pid, peaks, stop), daemon=True)
    poller.start()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - start
    stop.set()
    poller.join()
    if status != 0:
        raise SystemExit(f"{shlex.join(command)} failed ({status})")
    own = usage.ru_maxrss  # KiB: the command's peak, and its reaped children's
    pid, (kib, what) = max(peaks.items(), key=lambda kv: kv[1][0], default=(proc.pid, (0, "")))
    if own >= kib:
        kib, what = own, "the command (or a child it reaped)"
    return {"peak_rss_mib": kib / 1024, "process": what, "seconds": seconds}


def _poll_tree(root: int, peaks: dict[int, tuple[int, str]], stop: threading.Event, every_s: float = 0.05) -> None:
    """Every `every_s`, each process under `root` (itself included): its VmHWM (KiB) and command line."""
    while not stop.is_set():
        parents = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                    parents[int(entry)] = int(stat[stat.rindex(")") + 2 :].split()[1])
                except (OSError, ValueError):
                    continue
        tree, grew = {root}, True
        while grew:
            found = {pid for pid, ppid in parents.items() if ppid in tree} - tree
            tree |= found
            grew = bool(found)
        for pid in tree:
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])
                what = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:80].strip()
            except (OSError, StopIteration, ValueError):
                continue
            if kib > peaks.get(pid, (0, ""))[0]:
                peaks[pid] = (kib, what)
        stop.wait(every_s)


def main(args) -> None:
    print("$", shlex.join([sys.executable, *sys.argv]))
    device = str(resolve_device(args.device))
    with tempfile.TemporaryDirectory(prefix="adaptflow-predict-") as tmp:
        work = Path(args.work or tmp)
        data = make_shift(SHIFTS["mnist-m"], str(work / "data"), 10, args.image_size, seed=3, target_size=args.images)
        cfg = validate_config(
            {
                "backbone": {"name": args.backbone, "weights": args.weights, "image_size": args.image_size},
                "extract": {"device": device},
            }
        )
        digits = [str(d) for d in range(10)]
        model = args.model or save_untrained_images_model(str(work / "model"), cfg, digits, args.image_size)
        if args.cli:
            for i in range(args.repeat):
                mem = cli_peak_memory(data["target"], work, model, f"cli-{i}")
                print(
                    f"{args.images:,} images at {args.image_size} px, `adaptflow predict` {i + 1}/{args.repeat}: "
                    f"peak RSS {mem['peak_rss_mib']:,.0f} MiB ({mem['process']}), {mem['seconds']:.1f} s",
                    flush=True,
                )
            return
        if args.memory:
            mem = peak_memory(data["target"], work, model, device)
        else:
            tp = throughput(data["target"], work, model, device)
    if args.memory:
        print(f"{mem['images']:,} images at {args.image_size} px on {device}: peak RSS {mem['peak_rss_mib']:,.0f} MiB")
        return
    print(
        f"{tp['images']:,} images at {args.image_size} px on {device}: extraction {tp['extract_per_s']:.1f} "
        f"images/s, images-mode prediction {tp['predict_per_s']:.1f} images/s, ratio "
        f"{tp['predict_per_s'] / tp['extract_per_s']:.2f} (goal >= 0.8)"
    )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
