"""A synthetic domain shift for semantic segmentation, made offline: discs, squares and triangles, drawn
flat in the source domain and cut out of photos in the target, for the demo, the benchmark and tests.

- source: `source/images/<n>.png`, `source/masks/<n>.png` and `source/classes.txt` (`CLASSES`): each shape
  a flat random colour over a flat random background; colour never tells the class, so a model must
  learn shape;
- target: `target/images/<n>.png`, a folder without masks: the same kind of scenes, each shape filled
  with a crop of one scikit-image photo over a crop of another, plus mild Gaussian noise;
- target_masks: `target_masks/<n>.png`, the target's masks by stem, for scoring only.
Each image holds 1-3 shapes of random size (15-40 % of the side) and place, kept apart where a few
tries allow; a later shape covers an earlier one in the image and the mask alike. Deterministic for a seed.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image

from adaptflow.data.demo import encode_image, load_photos
from adaptflow.data.segmentation import mask_png
from adaptflow.store import storage

CLASSES = ["background", "disc", "square", "triangle"]  # mask value i is CLASSES[i]
NOISE = 8.0  # the target's Gaussian noise, standard deviation in 0-255 grey levels
LIFT = 90.0  # grey levels a photo fill is moved by when its mean colour is too close to what it covers


class SegmentationShift(NamedTuple):
    source_uri: str  # images/, masks/, classes.txt
    target_uri: str  # images/ only
    target_masks_uri: str  # <stem>.png per target image, for scoring
    classes: list[str]


def make_segmentation_shift(out_uri: str, per_domain: int = 200, size: int = 64, seed: int = 0) -> SegmentationShift:
    """Write `per_domain` source pairs and `per_domain` target images (their masks apart) of `size` x
    `size` pixels under `out_uri`, and return where each part is."""
    if per_domain < 1 or size < 16:
        raise ValueError(f"need per_domain >= 1 and size >= 16, got {per_domain} and {size}")
    grid = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5  # (2, size, size): pixel centres, y then x
    source_uri = storage.join(out_uri, "source")
    rng = np.random.default_rng([seed, 0])
    for n in range(per_domain):
        image, mask = _flat(_shapes(rng, grid), rng)
        storage.write_bytes(storage.join(source_uri, "images", f"{n:05d}.png"), encode_image(image, "PNG"))
        storage.write_bytes(storage.join(source_uri, "masks", f"{n:05d}.png"), mask_png(mask))
    storage.write_bytes(storage.join(source_uri, "classes.txt"), ("\n".join(CLASSES) + "\n").encode())

    target_uri, masks_uri = storage.join(out_uri, "target"), storage.join(out_uri, "target_masks")
    photos = [_at_least(p, size) for p in load_photos()]
    rng = np.random.default_rng([seed, 1])
    for n in range(per_domain):
        image, mask = _textured(_shapes(rng, grid), photos, rng)
        storage.write_bytes(storage.join(target_uri, "images", f"{n:05d}.png"), encode_image(image, "PNG"))
        storage.write_bytes(storage.join(masks_uri, f"{n:05d}.png"), mask_png(mask))
    return SegmentationShift(source_uri, target_uri, masks_uri, list(CLASSES))


def _shapes(rng: np.random.Generator, grid: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """1-3 (class index, (size, size) bool footprint), in drawing order. Each centre is drawn up to ten
    times to keep the shape clear of those before it; after that it may overlap."""
    size = grid.shape[1]
    placed: list[tuple[float, float, float]] = []  # (cy, cx, side)
    shapes = []
    for _ in range(rng.integers(1, 4)):
        cls = int(rng.integers(1, len(CLASSES)))
        side = rng.uniform(0.15, 0.40) * size
        for _ in range(10):
            cy, cx = rng.uniform(side / 2, size - side / 2, 2)
            if all(np.hypot(cy - py, cx - px) >= (side + ps) / 2 for py, px, ps in placed):
                break
        placed.append((cy, cx, side))
        shapes.append((cls, _footprint(CLASSES[cls], cy, cx, side, rng, grid)))
    return shapes


def _footprint(kind: str, cy: float, cx: float, side: float, rng: np.random.Generator, grid: np.ndarray) -> np.ndarray:
    """(size, size) bool: the pixels whose centres fall inside the shape."""
    dy, dx = grid[0] - cy, grid[1] - cx
    if kind == "disc":
        return dy**2 + dx**2 <= (side / 2) ** 2
    if kind == "square":  # axis-aligned
        return np.maximum(np.abs(dy), np.abs(dx)) <= side / 2
    # An equilateral triangle with sides of length `side`, at a random turn: its circumradius side / sqrt(3)
    # is a little over side / 2, so a corner may poke past the image's edge by up to 8 % of `side`.
    angles = rng.uniform(0, 2 * np.pi) + np.array([0, 2, 4]) * np.pi / 3  # vertices in turning order
    vy, vx = side / np.sqrt(3) * np.sin(angles), side / np.sqrt(3) * np.cos(angles)
    inside = np.ones_like(dy, dtype=bool)
    for k in range(3):  # on the inner side of every edge: the cross product (edge x point) is >= 0
        ey, ex = vy[(k + 1) % 3] - vy[k], vx[(k + 1) % 3] - vx[k]
        inside &= ex * (dy - vy[k]) - ey * (dx - vx[k]) >= 0
    return inside


def _flat(shapes: list[tuple[int, np.ndarray]], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The source look: (size, size, 3) uint8 image, flat colours; (size, size) uint8 mask."""
    size = shapes[0][1].shape[0]
    background = rng.integers(0, 256, 3)
    image = np.empty((size, size, 3), np.uint8)
    image[:] = background
    mask = np.zeros((size, size), np.uint8)
    for cls, inside in shapes:
        colour = rng.integers(0, 256, 3)
        while np.abs(colour - background).sum() < 120:  # a shape must stand out from the background
            colour = rng.integers(0, 256, 3)
        image[inside] = colour
        mask[inside] = cls
    return image, mask


def _textured(
    shapes: list[tuple[int, np.ndarray]], photos: list[np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """The target look: a crop of one photo as background, each shape a crop of another, then noise.
    A fill whose mean colour is within 60 grey levels (summed over RGB) of what it covers is moved `LIFT`
    away from it (brighter over a dark ground, darker over a light one), so the task stays solvable."""
    size = shapes[0][1].shape[0]
    ground, texture = rng.choice(len(photos), 2, replace=False)
    image = _crop(photos[ground], size, rng)  # (size, size, 3) float32
    mask = np.zeros((size, size), np.uint8)
    for cls, inside in shapes:
        fill = _crop(photos[texture], size, rng)
        under, over = image[inside].mean(0), fill[inside].mean(0)  # (3,) mean colours
        if np.abs(over - under).sum() < 60:
            fill += LIFT if under.mean() < 128 else -LIFT
        image[inside] = fill[inside]
        mask[inside] = cls
    image += rng.normal(0, NOISE, image.shape).astype(np.float32)
    return np.uint8(image.clip(0, 255).round()), mask


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32: a random square of `photo`."""
    top = rng.integers(0, photo.shape[0] - size + 1)
    left = rng.integers(0, photo.shape[1] - size + 1)
    return photo[top : top + size, left : left + size].astype(np.float32)


def _at_least(photo: np.ndarray, size: int) -> np.ndarray:
    """`photo` scaled up, if need be, so that a `size` x `size` crop fits in it."""
    short = min(photo.shape[:2])
    if short >= size:
        return photo
    scale = size / short
    w, h = round(photo.shape[1] * scale + 0.5), round(photo.shape[0] * scale + 0.5)
    return np.asarray(Image.fromarray(photo).resize((w, h), Image.Resampling.BILINEAR))
