"""Benchmark: every adaptation method on the demo digit shift, on frozen features and end to end.

    .venv/bin/python benchmarks/adaptation.py                         # everything, 64 px
    .venv/bin/python benchmarks/adaptation.py --methods source_only dann --modes images --epochs 4

features: frozen EfficientNet-Lite0 features (extracted once) + `adapt.train.fit`.
images:   `adapt.images.fit_images`, the backbone trained end to end.
Target accuracy is measured against target_labels.csv for reporting only; nothing is selected on it.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402
import yaml  # noqa: E402
from torch import nn  # noqa: E402

from adaptflow.adapt.algorithms import ALGORITHMS, candidate_hparams, get_algorithm  # noqa: E402
from adaptflow.adapt.images import STRATEGIES, Tuning, fit_images, image_featurizer, infer_images, load_images  # noqa: E402
from adaptflow.adapt.train import Loop, fit, infer  # noqa: E402
from adaptflow.config import BackboneConfig  # noqa: E402
from adaptflow.data.demo import make_demo_data  # noqa: E402
from adaptflow.extract.devices import resolve_device  # noqa: E402

MODES = ("features", "images")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--weights", default=None, help="backbone weights; default: the offline default")
    p.add_argument("--image-size", type=int, default=64, help="backbone input size")
    p.add_argument("--demo-size", type=int, default=None, help="size the demo is rendered at; default image size")
    p.add_argument("--max-per-domain", type=int, default=None, help="cap images per domain, for quick runs")
    p.add_argument("--epochs", type=int, default=4, help="images mode: passes over the source training set")
    p.add_argument("--steps", type=int, default=None, help="images mode: a fixed number of steps (overrides --epochs)")
    p.add_argument("--feature-epochs", type=int, default=30, help="features mode: passes over the source")
    p.add_argument("--batch-size", type=int, default=None, help="per domain; default: the hparam")
    p.add_argument("--strategy", default="full", choices=list(STRATEGIES))
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--hp", action="append", default=[], metavar="KEY=VALUE", help="hparam override, both modes")
    p.add_argument("--image-hp", action="append", default=[], metavar="KEY=VALUE", help="images mode only")
    p.add_argument("--val-fraction", type=float, default=0.2, help="source images held out for source-val")
    p.add_argument("--threads", type=int, default=None, help="torch threads; default: torch's choice")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--workers", type=int, default=2, help="decoding processes")
    p.add_argument("--seed", type=int, default=0)
    return p


def load_data(root: str, args) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor, list[str]]:
    """Demo shift under `root`: (source uris, labels, target uris, labels, classes). Source classes are
    their folder names; target labels come from target_labels.csv (broken files are not listed there)."""
    demo = make_demo_data(
        root, image_size=args.demo_size or args.image_size, seed=args.seed, max_per_domain=args.max_per_domain
    )
    classes = demo.classes
    src = sorted(Path(demo.source_uri).glob("*/*.png"))
    ys = torch.tensor([classes.index(p.parent.name) for p in src])
    with open(demo.target_labels_uri) as f:
        rows = list(csv.DictReader(f))
    base = Path(demo.target_labels_uri).parent
    tgt = [str(base / r["uri"]) for r in rows]
    yt = torch.tensor([classes.index(r["label"]) for r in rows])
    return [str(p) for p in src], ys, tgt, yt, classes


def split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train index, val index), stratified: each class gives `fraction` of its images to val."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in y.unique():
        idx = (y == c).nonzero().squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = round(fraction * len(idx))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


def _parse_hparams(items: list[str]) -> dict:
    return {k: yaml.safe_load(v) for k, v in (item.split("=", 1) for item in items)}


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print("$", shlex.join([sys.executable, *sys.argv]))
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(
        f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} threads, device {device}{gpu}"
    )

    hp_overrides = _parse_hparams(args.hp)
    image_overrides = {**hp_overrides, **_parse_hparams(args.image_hp)}
    backbone = BackboneConfig(name=args.backbone, weights=args.weights, image_size=args.image_size)
    with tempfile.TemporaryDirectory(prefix="adaptflow-bench-") as root:
        t = time.perf_counter()
        src_uris, ys, tgt_uris, yt, classes = load_data(root, args)
        _, _, data_config = image_featurizer(backbone)
        xs_all = load_images(src_uris, data_config, args.workers)
        xt = load_images(tgt_uris, data_config, args.workers)
    train, val = split(ys, args.val_fraction, args.seed)
    xs, ys_train, xv, yv = xs_all[train], ys[train], xs_all[val], ys[val]
    mb = (xs_all.numel() + xt.numel()) / 2**20
    print(
        f"data: {len(xs)} source train, {len(xv)} source val, {len(xt)} target, {len(classes)} classes, "
        f"{tuple(xs.shape[1:])} uint8 ({mb:.0f} MB), made and decoded in {time.perf_counter() - t:.1f} s"
    )

    feats = None
    if "features" in args.modes:
        t = time.perf_counter()
        frozen, dim, _ = image_featurizer(backbone)
        frozen.eval()
        with torch.no_grad():
            feats = [torch.cat([frozen(c) for c in x.split(256)]) for x in (xs, xv, xt)]
        print(f"features: frozen {args.backbone}, dim {dim}, extracted in {time.perf_counter() - t:.1f} s")

    print(
        f"{'method':<12} {'mode':<9} {'target_acc':>10} {'src_val_acc':>11} {'s/epoch':>8} {'total_s':>8} "
        f"{'steps/s':>8}  last losses"
    )
    for method in args.methods:
        hparams = {**candidate_hparams(method, "features", 0), **hp_overrides}
        bs = args.batch_size or hparams["batch_size"]
        steps_per_epoch = max(len(xs) // bs, 1)
        for mode in args.modes:
            torch.manual_seed(args.seed)
            t = time.perf_counter()
            if mode == "features":
                steps = args.feature_epochs * steps_per_epoch
                alg = get_algorithm(method)(nn.Identity(), feats[0].shape[1], len(classes), hparams, steps)
                curve = fit(alg, feats[0], ys_train, feats[2], Loop(steps, bs, args.seed, log_every=steps))
                fit_s = time.perf_counter() - t
                acc_v, acc_t = (accuracy(infer(alg, f)[0], y) for f, y in ((feats[1], yv), (feats[2], yt)))
                epochs = args.feature_epochs
            else:
                steps = args.steps or args.epochs * steps_per_epoch
                featurizer, dim, _ = image_featurizer(backbone)
                # the pipeline's end-to-end defaults (adapt.hparams.IMAGE_MODE_DEFAULTS), then the flags
                image_hparams = {**candidate_hparams(method, "images", 0), **image_overrides}
                alg = get_algorithm(method)(featurizer, dim, len(classes), image_hparams, steps)
                curve = fit_images(
                    alg,
                    xs,
                    ys_train,
                    xt,
                    Loop(steps, bs, args.seed, log_every=steps),
                    Tuning(args.strategy, augment=not args.no_augment),
                    device=device,
                )
                fit_s = time.perf_counter() - t
                acc_v, acc_t = (accuracy(infer_images(alg, x, device=device)[0], y) for x, y in ((xv, yv), (xt, yt)))
                epochs = curve[-1]["step"] / steps_per_epoch
            total = time.perf_counter() - t
            last = {k: round(v, 3) for k, v in curve[-1].items() if k not in ("step", "elapsed_s")}
            print(
                f"{method:<12} {mode:<9} {acc_t:>10.3f} {acc_v:>11.3f} {fit_s / epochs:>8.2f} {total:>8.1f} "
                f"{curve[-1]['step'] / fit_s:>8.2f}  {last}",
                flush=True,
            )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
