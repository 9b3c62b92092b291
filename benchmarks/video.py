"""Benchmark: action recognition under a domain shift of our own making, every method, then selection.

    .venv/bin/python benchmarks/video.py --work /tmp/video
    .venv/bin/python benchmarks/video.py --work /tmp/video --methods source_only dann --steps 100

The shift is `adaptflow.data.motion`: a square moving left, right, up or down on flat colours (source,
class folders of frame folders) and over photos with noise (target, animated GIFs). Frames are embedded
once by the frozen backbone (`adapt.video.frame_features`); every method of `--methods` (any of
`adapt.algorithms.ALGORITHMS`) then trains the same `TemporalEncoder` over them for the same steps. The
table gives each one's source-test and target accuracy and the label-free scores selection reads, then the
selected model, the source-only one and the best (oracle). Target labels score only; nothing is chosen on
them.

Frames are made and embedded at 64 px by default: at 32 px EfficientNet-Lite0's last feature map is 1x1,
and its pooled embedding barely says where the square is (a logistic regression on the last frame's
embedding minus the first's told the four directions apart at chance, 0.20, on 40 held-out clips; at 64 px,
0.95), so no temporal model can read the motion from it.
"""

from __future__ import annotations

import argparse
import io
import platform
import posixpath
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/segmentation.py

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from segmentation import report_pick, split_by_hash  # noqa: E402  (benchmarks/segmentation.py)

from adaptflow.adapt import video  # noqa: E402
from adaptflow.adapt.algorithms import ALGORITHMS  # noqa: E402
from adaptflow.adapt.losses import information_maximization  # noqa: E402
from adaptflow.adapt.selection import Candidate, select  # noqa: E402
from adaptflow.adapt.train import infer  # noqa: E402
from adaptflow.adapt.validators import is_collapsed  # noqa: E402
from adaptflow.config import BackboneConfig  # noqa: E402
from adaptflow.data.clips import Clip, list_clips, load_clips  # noqa: E402
from adaptflow.data.motion import make_motion_shift  # noqa: E402
from adaptflow.store import storage  # noqa: E402

DEFAULT_METHODS = ["source_only", "dann", "cdan", "mmd", "coral", "mcc", "im"]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", required=True, help="folder for the generated shift and results.json")
    methods = [m for m in ALGORITHMS if m != "zero_shot"]  # zero_shot needs a CLIP backbone's text tower
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=methods)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--per-class", type=int, default=40, help="clips per class and domain")
    p.add_argument("--frames", type=int, default=8, help="frames per generated clip, and frames sampled (T)")
    p.add_argument("--size", type=int, default=64, help="frame size, generated and embedded")
    p.add_argument("--steps", type=int, default=300, help="optimisation steps per method")
    p.add_argument("--seed", type=int, default=0)
    return p


def target_labels(labels_uri: str, clips: list[Clip], classes: list[str]) -> torch.Tensor:
    """(M,) int64 class of each target clip, from `uri,label` rows relative to the file's folder."""
    table = pd.read_csv(io.BytesIO(storage.read_bytes(labels_uri)), dtype=str)
    base = posixpath.dirname(labels_uri)
    by_uri = {storage.join(base, u): classes.index(y) for u, y in zip(table.uri, table.label, strict=True)}
    return torch.tensor([by_uri[c.uri] for c in clips])


def accuracy(algorithm, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return float((video.predict_video(algorithm, feats).argmax(1) == labels).float().mean())


def main(args: argparse.Namespace) -> None:
    work = Path(args.work)
    threads, python = torch.get_num_threads(), platform.python_version()
    print(f"machine: {platform.node() or 'unknown'}, {threads} threads, Python {python}")
    print("$", shlex.join([sys.executable, *sys.argv]))
    t0 = time.perf_counter()
    shift = make_motion_shift(str(work / "data"), args.per_class, args.frames, args.size, args.seed)
    source, target = list_clips(shift.source_uri), list_clips(shift.target_uri, labelled=False)
    classes, splits = source.classes, split_by_hash(source.clips, lambda c: c.clip_id)
    backbone = BackboneConfig(name=args.backbone)
    feats = {k: video.frame_features(load_clips(v, args.frames, args.size), backbone) for k, v in splits.items()}
    labels = {k: torch.tensor([classes.index(c.label) for c in v]) for k, v in splits.items()}
    ft = video.frame_features(load_clips(target.clips, args.frames, args.size), backbone)
    yt = target_labels(shift.target_labels_uri, target.clips, classes)
    print(f"source {len(source.clips)} clips ({', '.join(f'{k} {len(v)}' for k, v in splits.items())}), "
          f"target {len(target.clips)} clips, classes {classes}, rejected {len(source.rejects) + len(target.rejects)}, "
          f"features {tuple(ft.shape[1:])} in {time.perf_counter() - t0:.0f} s")  # fmt: skip
    rows, judged = [], []
    for method in args.methods:
        t0 = time.perf_counter()
        algorithm = video.fit_video(
            method, feats["train"], labels["train"], ft, args.steps, args.seed, num_classes=len(classes)
        )
        seconds = time.perf_counter() - t0
        val_correct = (video.predict_video(algorithm, feats["val"]).argmax(1) == labels["val"]).numpy()
        target_logits = infer(algorithm, ft)[0]  # (M, C)
        im = -float(information_maximization(target_logits))  # higher is better, as selection reads scores
        judged.append(
            Candidate(
                name=method,
                scores={"source_val_acc": float(val_correct.mean()), "im": im},
                collapsed=is_collapsed(target_logits, len(classes)),
                objectives=ALGORITHMS[method].objectives,
                source_only=method == "source_only",
                val_correct=val_correct,
            )
        )
        rows.append(
            {
                "method": method,
                "seconds": seconds,
                "source_test_acc": accuracy(algorithm, feats["test"], labels["test"]),
                "target_acc": float((target_logits.argmax(1) == yt).float().mean()),
                "scores": dict(judged[-1].scores),
                "collapsed": judged[-1].collapsed,
            }
        )
        r, flag = rows[-1], "COLLAPSED " if judged[-1].collapsed else ""
        print(f"{method:12s} source-test acc {r['source_test_acc']:.3f}  target acc {r['target_acc']:.3f}  "
              f"val acc {r['scores']['source_val_acc']:.3f}  IM {r['scores']['im']:.3f}  "
              f"{flag}{seconds:.0f} s")  # fmt: skip
    pick = select(judged, ["source_val_acc"], tie_break="im")
    report_pick(pick, {r["method"]: r["target_acc"] for r in rows}, "target acc", rows, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
