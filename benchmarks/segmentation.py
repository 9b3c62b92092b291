"""Benchmark: semantic segmentation under a domain shift of our own making, every method, then selection.

    .venv/bin/python benchmarks/segmentation.py --work /tmp/seg
    .venv/bin/python benchmarks/segmentation.py --work /tmp/seg --methods source_only advent --steps 100

The shift is `adaptflow.data.shapes`: discs, squares and triangles in flat colours (source, with masks) and
the same shapes cut out of photos over photo backgrounds (target). Every method of
`adapt.segmentation.SEGMENTATION_METHODS` trains end to end from the same network for the same steps; the
table gives each one's source-test and target mIoU, pixel accuracy and per-class IoU on the target, the
label-free scores selection reads, and then the selected model, the source-only one and the best (oracle).
Target masks score only; nothing is chosen on them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import torch  # noqa: E402

from adaptflow.adapt import segmentation as seg  # noqa: E402
from adaptflow.adapt.selection import Selection  # noqa: E402
from adaptflow.config import BackboneConfig  # noqa: E402
from adaptflow.data.segmentation import Pair, list_segmentation, load_segmentation  # noqa: E402
from adaptflow.data.shapes import make_segmentation_shift  # noqa: E402
from adaptflow.store import storage  # noqa: E402

T = TypeVar("T")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for the generated shift and results.json")
    methods = list(seg.SEGMENTATION_METHODS)
    p.add_argument("--methods", nargs="+", default=methods, choices=methods)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--per-domain", type=int, default=300, help="images per domain")
    p.add_argument("--size", type=int, default=64, help="image size, generated and trained")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps per method")
    p.add_argument("--batch-size", type=int, default=16, help="per domain")
    p.add_argument("--seed", type=int, default=0)
    return p


def split_by_hash(items: list[T], key: Callable[[T], str]) -> dict[str, list[T]]:
    """train / val / test, 70 / 15 / 15 by the hash of each item's content id `key(item)` (as ingest splits:
    stable as a dataset grows or is reordered). benchmarks/video.py splits its clips with it too."""
    out: dict[str, list[T]] = {"train": [], "val": [], "test": []}
    for item in items:
        u = int(hashlib.sha256(key(item).encode()).hexdigest()[:8], 16) / 2**32
        out["train" if u < 0.7 else "val" if u < 0.85 else "test"].append(item)
    return out


def target_pairs(target_uri: str, masks_uri: str) -> list[Pair]:
    """The target's images, each with its scoring mask (same stem) from `masks_uri`."""
    listing = list_segmentation(target_uri, masks=False)
    return [p._replace(mask_uri=storage.join(masks_uri, f"{p.stem}.png")) for p in listing.pairs]


def scores(net: seg.SegmentationNet, x: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict:
    cm = seg.confusion(seg.predict_logits(net, x).argmax(1), y, len(classes))
    per_class = dict(zip(classes, (round(float(v), 3) for v in seg.iou(cm)), strict=True))
    return {"miou": seg.mean_iou(cm), "pixel_accuracy": seg.pixel_accuracy(cm), "iou": per_class}


def main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    threads, python = torch.get_num_threads(), platform.python_version()
    print(f"machine: {platform.node() or 'unknown'}, {threads} threads, Python {python}")
    print("$", shlex.join([sys.executable, *sys.argv]))
    shift = make_segmentation_shift(str(work / "data"), per_domain=args.per_domain, size=args.size, seed=args.seed)
    source = list_segmentation(shift.source_uri)
    classes, splits = source.classes, split_by_hash(source.pairs, lambda p: p.image_id)
    data = {k: load_segmentation(v, args.size) for k, v in splits.items()}
    xt, yt = load_segmentation(target_pairs(shift.target_uri, shift.target_masks_uri), args.size)
    print(f"source {len(source.pairs)} pairs ({', '.join(f'{k} {len(v)}' for k, v in splits.items())}), "
          f"target {len(xt)} images, classes {classes}, rejected {len(source.rejects)}")  # fmt: skip
    net, _ = seg.segmentation_net(BackboneConfig(name=args.backbone), len(classes))
    mix = seg.pixel_mix(data["train"][1], len(classes))
    rows, judged = [], []
    for method in args.methods:
        t0 = time.perf_counter()
        trained = seg.fit_segmentation(method, net, data["train"], xt, args.steps, args.batch_size, args.seed)
        seconds = time.perf_counter() - t0
        judged.append(seg.judge(trained, data["val"], xt, mix, args.seed))
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "source_test": scores(trained.net, *data["test"], classes),
                "target": scores(trained.net, xt, yt, classes),
                "scores": dict(judged[-1].scores),
                "collapsed": judged[-1].collapsed,
            }
        )
        r, flag = rows[-1], "COLLAPSED " if judged[-1].collapsed else ""
        print(f"{method:12s} source-test mIoU {r['source_test']['miou']:.3f}  target mIoU {r['target']['miou']:.3f}  "
              f"pixel acc {r['target']['pixel_accuracy']:.3f}  val acc {r['scores']['source_val_acc']:.3f}  "
              f"IM {r['scores']['im']:.3f}  {flag}{seconds:.0f} s  {r['target']['iou']}")  # fmt: skip
    pick = seg.select_segmentation(judged)
    report_pick(pick, {r["method"]: r["target"]["miou"] for r in rows}, "target mIoU", rows, args)


def report_pick(pick: Selection, target: dict[str, float], metric: str, rows: list[dict], args) -> None:
    """Print the selected candidate beside source-only and the oracle (by `target`, the scoring-only
    metric of each method), and keep every row in --work/results.json. benchmarks/video.py reports with it."""
    selected = rows[pick.index]["method"]
    oracle = max(target, key=target.get)
    print(f"\nselected {selected}: {metric} {target[selected]:.3f} "
          f"({'confident' if pick.confident else 'LOW confidence: ' + pick.confidence})")  # fmt: skip
    if "source_only" in target:
        print(f"source-only {target['source_only']:.3f}, oracle {oracle} {target[oracle]:.3f}, "
              f"regret {target[oracle] - target[selected]:.3f}, selected - source-only "
              f"{target[selected] - target['source_only']:+.3f}")  # fmt: skip
    print(f"why: {pick.reason}")
    summary = {"args": vars(args), "rows": rows, "selected": selected, "confident": pick.confident}
    (Path(args.work) / "results.json").write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
