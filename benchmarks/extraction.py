"""Benchmark: feature extraction throughput, from JPEG files on disk to committed Parquet shards.

    .venv/bin/python benchmarks/extraction.py                                  # CPU-sized defaults
    .venv/bin/python benchmarks/extraction.py --backbone resnet50,efficientnet_lite0 --weights random \
        --images 20000 --batch-size 256 --num-workers 8                        # GPU

Per backbone, in one run: model-only images/s (pre-transformed tensors straight into the module),
pipeline images/s (`plan_extraction` + every `extract_shard`, plan start to last commit), and a
per-image loop (PIL + torchvision transforms, one forward per image). Then an incremental re-run after
adding 1% new images, and the peak RSS of the pipeline in fresh subprocesses for N and 10*N images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a fresh clone without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import transforms as T  # noqa: E402

from adaptflow.config import BackboneConfig, ExtractConfig, IngestConfig  # noqa: E402
from adaptflow.data.ingest import ingest  # noqa: E402
from adaptflow.data.preprocess import build_transform, decode_image  # noqa: E402
from adaptflow.errors import AdaptflowError  # noqa: E402
from adaptflow.extract import features  # noqa: E402
from adaptflow.extract.backbones import build_extractor  # noqa: E402
from adaptflow.extract.devices import resolve_device  # noqa: E402

_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")
_JPEG_SIZE = (500, 375)  # (W, H): a typical photo-dataset JPEG


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--backbone", action="append", default=None, help="repeatable, or a comma list; default efficientnet_lite0"
    )
    p.add_argument(
        "--weights",
        default="default",
        choices=["default", "random"],
        help="default: the offline default, falling back to random when no file is present",
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--images", type=int, default=512)
    p.add_argument(
        "--batch-size", type=int, default=None, help="default: extract.batch_size's (8 on a CPU, 256 on CUDA)"
    )
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument(
        "--decode-on",
        default="workers",
        choices=["workers", "device"],
        help="device: JPEGs decoded and resized on the extraction device (nvJPEG on CUDA)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (CUDA only)")
    p.add_argument("--per-image", type=int, default=96, help="images timed in the per-image loop")
    p.add_argument("--rss-images", type=int, default=100, help="RSS runs use N and 10*N images")
    p.add_argument("--rss-image-size", type=int, default=64)
    p.add_argument("--rss-child", nargs=3, metavar=("INDEX", "STORE", "BACKBONE_JSON"), help=argparse.SUPPRESS)
    return p


# Data: real JPEG files cropped from scikit-image's bundled photos, then ingested.


def write_jpegs(folder: Path, n: int, start: int = 0) -> None:
    """`n` distinct 500x375 JPEGs `img_{start..}.jpg`: a random 4:3 crop of a random photo, resized,
    maybe mirrored, at a random quality. Seeded by the file number, so a file is the same in every run."""
    import skimage.data  # heavy import, only needed here

    photos = [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in _PHOTOS]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        rng = np.random.default_rng(i)
        photo = photos[rng.integers(len(photos))]
        w_max = min(photo.width, photo.height * 4 // 3)
        w = int(w_max * rng.uniform(0.5, 1.0))
        h = w * 3 // 4
        left, top = rng.integers(0, photo.width - w + 1), rng.integers(0, photo.height - h + 1)
        im = photo.crop((left, top, left + w, top + h)).resize(_JPEG_SIZE, Image.Resampling.BILINEAR)
        if rng.random() < 0.5:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        im.save(folder / f"img_{i:06d}.jpg", "JPEG", quality=int(rng.integers(80, 96)))


def make_dataset(root: Path, n: int) -> tuple[Path, str]:
    """Write and ingest `n` JPEGs; return the image folder and the index URI."""
    images = root / "images"
    write_jpegs(images, n)
    return images, reingest(root, images)


def reingest(root: Path, images: Path) -> str:
    return ingest(str(images), "bench", str(root / "ingest"), IngestConfig(workers=2)).index_uri


# The three ways to embed images.


def backbone_config(name: str, weights: str, image_size: int | None) -> tuple[BackboneConfig, str]:
    """The config for `name`, and which weights it got: 'random' when the default has no file here."""
    if weights == "random":
        return BackboneConfig(name=name, weights="random", image_size=image_size), "random"
    cfg = BackboneConfig(name=name, image_size=image_size)
    try:
        build_extractor(cfg)
    except AdaptflowError:
        return BackboneConfig(name=name, weights="random", image_size=image_size), "random (no default file)"
    return cfg, "default"


def run_pipeline(index_uri: str, store: str, cfg: BackboneConfig, extract: ExtractConfig) -> dict:
    """Plan and extract every missing shard; wall time from plan start to the last commit."""
    start = time.perf_counter()
    plan = features.plan_extraction([index_uri], store, cfg, extract.shard_size)
    shards = [features.extract_shard(s, cfg, extract) for s in plan.shards]
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "plan_s": plan.seconds,
        "n": sum(s.n_rows for s in shards),
        "cached": plan.n_cached,
        "shards": len(shards),
    }


def model_only(cfg: BackboneConfig, uris: list[str], n: int, batch_size: int, device: torch.device) -> float:
    """images/s of the module alone on pre-decoded, pre-transformed tensors (up to 512 distinct, cycled)."""
    extractor = build_extractor(cfg)
    transform = build_transform(extractor.data_config)
    x = torch.stack([transform(decode_image(Path(u).read_bytes())) for u in uris[:512]]).to(device)
    module, on_cuda = features._prepare(extractor.module, device, compile=False), device.type == "cuda"
    x = x.contiguous(memory_format=torch.channels_last)  # as the pipeline runs it
    batches = [x[(i % len(x)) : (i % len(x)) + batch_size] for i in range(0, n, batch_size)]

    def forward(batch: torch.Tensor) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_cuda):
            module(batch)

    with torch.inference_mode():
        forward(batches[0])  # warm-up: allocator, cuDNN / oneDNN algorithm choice
        _sync(device)
        start = time.perf_counter()
        for batch in batches:
            forward(batch)
        _sync(device)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def per_image_loop(cfg: BackboneConfig, uris: list[str], device: torch.device) -> float:
    """images/s of the classic loop: PIL open, torchvision transform, one forward per image."""
    extractor = build_extractor(cfg)
    dc = extractor.data_config
    transform = T.Compose(
        [
            T.Resize(math.floor(dc["input_size"][-1] / dc["crop_pct"]), T.InterpolationMode(dc["interpolation"])),
            T.CenterCrop(dc["input_size"][-1]),
            T.ToTensor(),
            T.Normalize(dc["mean"], dc["std"]),
        ]
    )
    module = extractor.module.to(device)
    with torch.inference_mode():
        module(transform(Image.open(uris[0]).convert("RGB"))[None].to(device))  # warm-up
        _sync(device)
        start = time.perf_counter()
        for uri in uris:
            module(transform(Image.open(uri).convert("RGB"))[None].to(device)).cpu()
        _sync(device)
    return len(uris) / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# Peak memory: the pipeline alone, in a fresh process.


def rss_child(index_uri: str, store: str, cfg_json: str, extract: ExtractConfig) -> None:
    """Run the pipeline and print the peak RSS (MiB) of this process and of its largest worker.
    This process's peak is VmHWM: ru_maxrss would carry the parent's peak over fork + exec."""
    result = run_pipeline(index_uri, store, BackboneConfig.model_validate_json(cfg_json), extract)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    self_mb = int(hwm.group(1)) / 1024
    # workers are forked from this process: their peak counts the pages they share with it
    child_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"self_mb": self_mb, "worker_mb": child_mb, "n": result["n"]}))


def peak_rss(root: Path, n: int, cfg: BackboneConfig, args: argparse.Namespace) -> dict:
    _, index_uri = make_dataset(root, n)
    cmd = [
        sys.executable,
        __file__,
        "--rss-child",
        index_uri,
        str(root / "store"),
        cfg.model_dump_json(),
        "--batch-size",
        str(args.batch_size),
        "--num-workers",
        str(args.num_workers),
        "--device",
        args.device,
        "--decode-on",
        args.decode_on,
    ] + (["--compile"] if args.compile else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# Report.


def print_header(argv: list[str], device: torch.device) -> None:
    gpu = f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""
    print(f"$ {shlex.join([Path(sys.executable).name, *argv])}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), "
        f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, device {device}{gpu}"
    )


def bench_backbone(name: str, args: argparse.Namespace, extract: ExtractConfig, device: torch.device) -> None:
    cfg, weights = backbone_config(name, args.weights, args.image_size)
    print(
        f"\n== {name} (weights: {weights}), {args.image_size} px, {args.images} JPEGs "
        f"{_JPEG_SIZE[0]}x{_JPEG_SIZE[1]}, batch {args.batch_size}, {args.num_workers} workers"
    )
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        images, index_uri = make_dataset(root, args.images)
        uris = sorted(str(p) for p in images.glob("*.jpg"))
        store = str(root / "store")

        # pipeline first, cold: its time includes the planning step's model build
        first = run_pipeline(index_uri, store, cfg, extract)
        pipe = first["n"] / first["seconds"]
        model = model_only(cfg, uris, args.images, args.batch_size, device)
        loop = per_image_loop(cfg, uris[: args.per_image], device)
        print(f"model-only      {model:9.1f} img/s")
        print(
            f"pipeline        {pipe:9.1f} img/s  ({first['n']} images, {first['shards']} shard(s), "
            f"{first['seconds']:.2f} s, of which plan {first['plan_s']:.2f} s)"
        )
        print(f"per-image loop  {loop:9.1f} img/s  ({len(uris[: args.per_image])} images)")
        print(f"pipeline / model-only = {pipe / model:.2f}  (goal >= 0.9)")
        print(f"pipeline / per-image  = {pipe / loop:.1f}  (goal >= 10)")

        added = max(1, args.images // 100)
        write_jpegs(images, added, start=args.images)
        t = time.perf_counter()
        index_uri = reingest(root, images)
        ingest_s = time.perf_counter() - t
        rerun = run_pipeline(index_uri, store, cfg, extract)
        print(
            f"incremental: +{added} images, re-ingest {ingest_s:.2f} s; re-plan+extract {rerun['n']} new, "
            f"{rerun['cached']} cached, {rerun['seconds']:.2f} s = {rerun['seconds'] / first['seconds']:.1%} "
            f"of the first run (goal: a few %)"
        )


def bench_rss(name: str, args: argparse.Namespace) -> None:
    size = None if name.startswith("clip:") else args.rss_image_size  # a CLIP encoder takes its own size only
    cfg, weights = backbone_config(name, args.weights, size)
    print(f"\n== peak RSS, {name} (weights: {weights}), {size or 'its own'} px, fresh process per size")
    for n in (args.rss_images, 10 * args.rss_images):
        with tempfile.TemporaryDirectory() as tmp:
            r = peak_rss(Path(tmp), n, cfg, args)
        print(
            f"{r['n']:6d} images: main process {r['self_mb']:7.1f} MiB, largest DataLoader worker "
            f"{r['worker_mb']:7.1f} MiB"
        )


def main(args: argparse.Namespace) -> None:
    extract = ExtractConfig(
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        decode_on=args.decode_on,
        compile=args.compile,
    )
    if args.rss_child:
        rss_child(*args.rss_child, extract)
        return
    device = resolve_device(args.device)
    args.batch_size = features.batch_size_for(extract, device)
    names = [n for item in args.backbone or ["efficientnet_lite0"] for n in item.split(",") if n]
    print_header(sys.argv, device)
    for name in names:
        bench_backbone(name, args, extract, device)
    for name in names:
        bench_rss(name, args)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
