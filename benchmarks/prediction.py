"""Benchmark: images-mode prediction against feature extraction, images/s over the same new images.

    .venv/bin/python benchmarks/prediction.py                                   # CPU, 1,000 images at 64 px
    python3 benchmarks/prediction.py --images 8192 --image-size 224 --device cuda  # GPU (gpu_check.sh)
    .venv/bin/python benchmarks/prediction.py --memory --images 20000 --image-size 48  # peak RSS, this size

In this process, without Prefect, each into a fresh store, from the first plan to the last commit:
extraction (`plan_extraction` + every `extract_shard`: decode, embed, commit) and prediction with an
end-to-end model (decode into the training-image cache, then `plan_prediction` + every `predict_shard` +
`merge_predictions`). With `--model` the model is a saved images-mode model; without, an untrained DANN
of the right shape is saved first (throughput does not depend on the weights). Prints both rates and
prediction / extraction (the scale issue's goal: >= 0.8). With `--memory`, prediction alone (decode into the
cache, then predict) and this process's peak RSS: run it at two sizes, each in its own process, to see
whether memory grows with the images (the goal: not with them).
"""

from __future__ import annotations

import argparse
import resource
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a fresh clone without installing
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the untrained model the tests predict with

from shifts import SHIFTS, make_shift  # noqa: E402
from synthetic import save_untrained_images_model  # noqa: E402

from adaptflow.config import resolve_device, validate_config  # noqa: E402
from adaptflow.data.ingest import ingest  # noqa: E402
from adaptflow.evaluate import predict  # noqa: E402
from adaptflow.extract import features  # noqa: E402
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
