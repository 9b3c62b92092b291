"""Segmentation models scored and put to work: mIoU and per-class IoU from a confusion matrix, masks
predicted at each input's own size, and overlays for people to look at.

    {out}/masks/{stem}.png     one predicted mask per image, the image's size, pixel = class index
    {out}/predictions.parquet  uri, image_id, mask_uri: one row per image, written last (the commit)

A rerun into the same folder with the same model keeps the masks already written (each was written whole,
`storage.write_bytes`) and predicts the rest.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F

from adaptflow.adapt.segmentation import SegmentationNet, iou, mean_iou, pixel_accuracy, predict_logits
from adaptflow.data.segmentation import Pair, load_segmentation, mask_png
from adaptflow.store import storage

# Distinct colours for masks in pictures (class i -> PALETTE[i % len]); unlabelled pixels are not painted.
PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [170, 110, 40]],
    dtype=np.uint8,
)  # fmt: skip


def segmentation_metrics(cm: np.ndarray, classes: Sequence[str]) -> dict:
    """mIoU, pixel accuracy, per-class IoU (None for a class neither true nor predicted) and the confusion
    matrix (rows true, columns predicted) of one scored set."""
    per_class = [None if np.isnan(v) else float(v) for v in iou(cm)]
    return {
        "miou": mean_iou(cm),
        "pixel_accuracy": pixel_accuracy(cm),
        "iou": dict(zip(classes, per_class, strict=True)),
        "confusion": cm.tolist(),
    }


def predict_masks(net: SegmentationNet, pairs: Sequence[Pair], size: int, out_uri: str, batch_size: int = 32) -> str:
    """Predict a mask for each image of `pairs` and write it at the image's own size (the logits upsampled
    bilinearly from `size` x `size`, then the most likely class per pixel), then the predictions table.
    Returns the table's URI."""
    rows = []
    for start in range(0, len(pairs), batch_size):
        batch = list(pairs[start : start + batch_size])
        uris = [storage.join(out_uri, "masks", f"{p.stem}.png") for p in batch]
        todo = [i for i, u in enumerate(uris) if not storage.exists(u)]
        if todo:
            x, _ = load_segmentation([batch[i]._replace(mask_uri=None) for i in todo], size)
            logits = predict_logits(net, x)
            for k, i in enumerate(todo):
                p = batch[i]
                full = F.interpolate(logits[k : k + 1], size=(p.height, p.width), mode="bilinear", align_corners=False)
                storage.write_bytes(uris[i], mask_png(full[0].argmax(0).to(torch.uint8).numpy()))
        rows += [{"uri": p.image_uri, "image_id": p.image_id, "mask_uri": u} for p, u in zip(batch, uris, strict=True)]
    table = pa.Table.from_pylist(
        rows, schema=pa.schema([("uri", pa.string()), ("image_id", pa.string()), ("mask_uri", pa.string())])
    )
    out = storage.join(out_uri, "predictions.parquet")
    storage.write_table(out, table)
    return out


def overlay(image: np.ndarray, mask: np.ndarray, alpha: float = 0.5, ignore: int = 255) -> np.ndarray:
    """(H, W, 3) uint8: `image` (H, W, 3) uint8 with each pixel of `mask` (H, W) painted in its class's
    colour at `alpha`; pixels marked `ignore` left as they are."""
    colours = PALETTE[mask.astype(np.int64) % len(PALETTE)].astype(np.float32)
    painted = (1 - alpha) * image.astype(np.float32) + alpha * colours
    keep = (mask == ignore)[..., None]
    return np.where(keep, image, painted.round()).astype(np.uint8)
