"""A synthetic domain shift for action recognition, made offline: a small square moving left, right, up or
down across the frame, on flat colours in the source domain and over photos in the target, for the
benchmark and tests.

- source: `source/<class>/<n>/<k>.png`, class folders of clips, each clip a folder of frames (k = 000, 001,
  ...): a flat random colour square over a flat random background; colour never tells the class;
- target: `target/<n>.gif`, a flat folder of animated GIFs: the square filled with a crop of one
  scikit-image photo, over a still crop of another, plus mild Gaussian noise in every frame (and the GIF's
  256-colour palette);
- target_labels.csv: `uri,label` for the target's clips, relative to its folder, for scoring only.
The square crosses the frame from near one edge to near the other at constant speed, at a random place
across the motion. A left-moving clip played backwards is a right-moving one: only the order of the frames
tells the class, never one frame alone. Deterministic for a seed.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

from adaptflow.data.demo import encode_image, load_photos
from adaptflow.store import storage

CLASSES = ["left", "right", "up", "down"]  # the direction the square moves in
NOISE = 8.0  # the target's Gaussian noise, standard deviation in 0-255 grey levels
LIFT = 90.0  # grey levels a photo fill is moved by when its mean colour is too close to what it covers
# (axis moved along: 0 = rows, 1 = columns; +1 towards higher indices, -1 towards lower)
_MOTION = {"left": (1, -1), "right": (1, 1), "up": (0, -1), "down": (0, 1)}


class MotionShift(NamedTuple):
    source_uri: str  # <class>/<clip>/<frame>.png
    target_uri: str  # <clip>.gif
    target_labels_uri: str  # uri,label per target clip, for scoring
    classes: list[str]


def make_motion_shift(out_uri: str, per_class: int = 40, frames: int = 8, size: int = 32, seed: int = 0) -> MotionShift:
    """Write `per_class` source clips and `per_class` target clips of each class, `frames` frames of
    `size` x `size` pixels each, under `out_uri`, and return where each part is."""
    if per_class < 1 or frames < 2 or not 16 <= size <= 256:
        raise ValueError(f"need per_class >= 1, frames >= 2 and 16 <= size <= 256, got {per_class}, {frames}, {size}")
    source_uri = storage.join(out_uri, "source")
    rng = np.random.default_rng([seed, 0])
    for cls in CLASSES:
        for n in range(per_class):
            for k, frame in enumerate(_flat(_path(cls, frames, size, rng), size, rng)):
                storage.write_bytes(
                    storage.join(source_uri, cls, f"{n:05d}", f"{k:03d}.png"), encode_image(frame, "PNG")
                )

    target_uri = storage.join(out_uri, "target")
    photos = load_photos()
    rng = np.random.default_rng([seed, 1])
    labels = rng.permutation(np.repeat(np.arange(len(CLASSES)), per_class))  # names never tell the class
    rows = []
    for n, y in enumerate(labels):
        clip = _textured(_path(CLASSES[y], frames, size, rng), size, photos, rng)
        storage.write_bytes(storage.join(target_uri, f"{n:05d}.gif"), _gif(clip))
        rows.append(f"target/{n:05d}.gif,{CLASSES[y]}")
    labels_uri = storage.join(out_uri, "target_labels.csv")
    storage.write_bytes(labels_uri, ("uri,label\n" + "\n".join(rows) + "\n").encode())
    return MotionShift(source_uri, target_uri, labels_uri, list(CLASSES))


def _path(cls: str, frames: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """((frames, 2) int top-left corners, row then column, one per frame; the square's side). Along the
    motion the square goes from within 15 % of the side of one edge to within 15 % of the other."""
    side = max(3, round(0.2 * size))
    axis, sign = _MOTION[cls]
    far = size - side  # the largest top-left coordinate that keeps the square inside
    margin = 0.15 * size
    start, end = rng.uniform(0, margin), rng.uniform(far - margin, far)
    if sign < 0:
        start, end = far - start, far - end
    along = np.linspace(start, end, frames)
    across = np.full(frames, rng.uniform(0, far))
    corners = np.stack([along, across] if axis == 0 else [across, along], axis=1)
    return np.rint(corners).astype(np.int64), side


def _flat(path: tuple[np.ndarray, int], size: int, rng: np.random.Generator) -> np.ndarray:
    """The source look: (frames, size, size, 3) uint8, a flat square on a flat background."""
    corners, side = path
    background = rng.integers(0, 256, 3)
    colour = rng.integers(0, 256, 3)
    while np.abs(colour - background).sum() < 120:  # a square must stand out from the background
        colour = rng.integers(0, 256, 3)
    clip = np.empty((len(corners), size, size, 3), np.uint8)
    clip[:] = background
    for frame, (r, c) in zip(clip, corners, strict=True):
        frame[r : r + side, c : c + side] = colour
    return clip


def _textured(
    path: tuple[np.ndarray, int], size: int, photos: list[np.ndarray], rng: np.random.Generator
) -> np.ndarray:
    """The target look: (frames, size, size, 3) uint8, a still crop of one photo as background, the square
    a crop of another moving over it, fresh noise in every frame. A fill whose mean colour is within 60
    grey levels (summed over RGB) of the background's is moved `LIFT` away from it, so the square stays
    visible."""
    corners, side = path
    ground, texture = rng.choice(len(photos), 2, replace=False)
    background = _crop(photos[ground], size, rng)  # (size, size, 3) float32
    fill = _crop(photos[texture], side, rng)  # (side, side, 3)
    if np.abs(fill.mean((0, 1)) - background.mean((0, 1))).sum() < 60:
        fill += LIFT if background.mean() < 128 else -LIFT
    clip = np.repeat(background[None], len(corners), axis=0)  # (frames, size, size, 3)
    for frame, (r, c) in zip(clip, corners, strict=True):
        frame[r : r + side, c : c + side] = fill
    clip += rng.normal(0, NOISE, clip.shape).astype(np.float32)
    return np.uint8(clip.clip(0, 255).round())


def _crop(photo: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) float32: a random square of `photo` (every bundled photo is at least 300 pixels)."""
    top = rng.integers(0, photo.shape[0] - size + 1)
    left = rng.integers(0, photo.shape[1] - size + 1)
    return photo[top : top + size, left : left + size].astype(np.float32)


def _gif(clip: np.ndarray) -> bytes:
    """(frames, H, W, 3) uint8 as an animated GIF, 10 frames a second, each frame its own adaptive palette.
    Pillow merges a frame identical to the one before into it; the target's noise keeps every frame."""
    images = [Image.fromarray(frame) for frame in clip]
    buf = io.BytesIO()
    images[0].save(buf, "GIF", save_all=True, append_images=images[1:], duration=100, loop=0)
    return buf.getvalue()
