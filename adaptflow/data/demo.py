"""A small demo dataset with a real domain shift, made offline from data that ships with installed
packages: scikit-learn's 8x8 digits, and scikit-image's bundled photos as MNIST-M-style backgrounds.

- source: `source/<digit>/<n>.png`, a class-folder tree of white-on-black greyscale digits;
- target: `target/<n>.jpg`, a flat unlabeled folder of the other half of the digits blended into
  colour photo patches, plus two broken files that ingest must refuse;
- target_labels.csv: `uri,label` for the valid target images, relative to its folder; for scoring only.
`<n>` is the sample's index in `load_digits()`: even indices are source, odd are target, so the two
domains never share an image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from adaptflow.store import storage

# Colour photos bundled inside scikit-image's wheel (no download); MNIST-M crops BSDS500 the same way.
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry")


@dataclass(frozen=True)
class DemoData:
    source_uri: str
    target_uri: str
    target_labels_uri: str
    classes: list[str]


def make_demo_data(out_uri: str, image_size: int = 32, seed: int = 0, max_per_domain: int | None = None) -> DemoData:
    """Write the demo dataset under `out_uri` and return where each part is. Deterministic for a
    given `seed`; `max_per_domain` caps the images per domain, balanced across the ten digits."""
    if max_per_domain is not None and max_per_domain < 1:
        raise ValueError(f"max_per_domain must be at least 1, got {max_per_domain}")
    digits = load_digits()
    images = digits.images / 16.0  # (1797, 8, 8) float in [0, 1], stroke = 1
    labels = digits.target
    source_idx = balanced(np.arange(0, len(labels), 2), labels, max_per_domain)
    target_idx = balanced(np.arange(1, len(labels), 2), labels, max_per_domain)

    source_uri = storage.join(out_uri, "source")
    rng = np.random.default_rng([seed, 0])
    for n in source_idx:
        digit = render_digit(images[n], image_size, rng)
        storage.write_bytes(storage.join(source_uri, str(labels[n]), f"{n}.png"), encode_image(digit, "PNG"))

    target_uri = storage.join(out_uri, "target")
    rng = np.random.default_rng([seed, 1])
    photos = load_photos()
    rows = []
    for n in target_idx:
        jpeg = encode_image(mnist_m(render_digit(images[n], image_size, rng), photos, rng), "JPEG")
        storage.write_bytes(storage.join(target_uri, f"{n}.jpg"), jpeg)
        rows.append(f"target/{n}.jpg,{labels[n]}")
    storage.write_bytes(storage.join(target_uri, "broken_empty.jpg"), b"")
    storage.write_bytes(storage.join(target_uri, "broken_truncated.jpg"), jpeg[: len(jpeg) // 2])

    target_labels_uri = storage.join(out_uri, "target_labels.csv")
    storage.write_bytes(target_labels_uri, ("uri,label\n" + "\n".join(rows) + "\n").encode())
    classes = sorted({str(labels[n]) for n in source_idx})
    return DemoData(source_uri, target_uri, target_labels_uri, classes)


@dataclass(frozen=True)
class NightlyDemo:
    """A source and three nightly target batches: the first two from one camera, the third from a new one."""

    source_uri: str
    batches: list[tuple[str, str, str]]  # (name, images URI, labels URI) per night
    classes: list[str]


def make_nightly_batches(out_uri: str, image_size: int = 32, seed: int = 0, per_batch: int = 300) -> NightlyDemo:
    """The demo's source, then the target digits cut into three batches of `per_batch`: night 1 and
    night 2 in the MNIST-M style (new images, same camera), night 3 from a "new camera" (coloured strokes
    on darkened, tinted, blurred photos): a shift the monitor should catch."""
    demo = make_demo_data(out_uri, image_size, seed, max_per_domain=None)
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    target_idx = balanced(np.arange(1, len(labels), 2), labels, 3 * per_batch)
    photos = load_photos()
    batches = []
    for night, (style, chunk) in enumerate(
        zip((mnist_m, mnist_m, new_camera), np.array_split(np.array(target_idx), 3), strict=True), 1
    ):
        name = f"night{night}"
        rng = np.random.default_rng([seed, 10 + night])
        folder = storage.join(out_uri, name)
        rows = []
        for n in chunk:
            storage.write_bytes(
                storage.join(folder, f"{n}.jpg"),
                encode_image(style(render_digit(images[n], image_size, rng), photos, rng), "JPEG"),
            )
            rows.append(f"{n}.jpg,{labels[n]}")
        labels_uri = storage.join(out_uri, f"{name}_labels.csv")
        storage.write_bytes(labels_uri, ("uri,label\n" + "\n".join(f"{name}/{r}" for r in rows) + "\n").encode())
        batches.append((name, folder, labels_uri))
    return NightlyDemo(demo.source_uri, batches, demo.classes)


def new_camera(digit: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a photo patch darkened to 30% and tinted, the digit drawn over it in a
    bright random colour, then blurred: other colours, contrast and sharpness than `mnist_m`."""
    from PIL import ImageFilter

    size = digit.shape[0]
    photo = photos[rng.integers(len(photos))]
    top = rng.integers(0, photo.shape[0] - size + 1)
    left = rng.integers(0, photo.shape[1] - size + 1)
    patch = photo[top : top + size, left : left + size].astype(np.float32) * 0.3 * rng.uniform(0.5, 1.0, 3)
    ink = rng.uniform(150, 255, 3)
    out = patch * (1 - digit[..., None]) + ink * digit[..., None]
    blurred = Image.fromarray(np.uint8(out.clip(0, 255))).filter(ImageFilter.GaussianBlur(size / 48))
    return np.asarray(blurred)


def balanced(indices: np.ndarray, labels: np.ndarray, cap: int | None) -> list[int]:
    """The first `cap` of `indices` taken round-robin over the classes, so each class gets an equal
    share as far as the data allows; all of them when `cap` is None."""
    if cap is None or cap >= len(indices):
        return [int(i) for i in indices]
    per_class = [list(indices[labels[indices] == c]) for c in np.unique(labels[indices])]
    chosen: list[int] = []
    for rank in range(max(len(p) for p in per_class)):
        chosen += [int(p[rank]) for p in per_class if rank < len(p)]
    return sorted(chosen[:cap])


def render_digit(image: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """(size, size) float in [0, 1]: the 8x8 digit upscaled bilinearly to 80-95% of the canvas and
    placed near the centre, up to size/16 off, so no two renders line up pixel for pixel."""
    side = int(round(size * rng.uniform(0.8, 0.95)))
    small = Image.fromarray(np.uint8(image * 255)).resize((side, side), Image.Resampling.BILINEAR)
    shift = max(1, size // 16)
    x, y = np.clip((size - side) // 2 + rng.integers(-shift, shift + 1, size=2), 0, size - side)
    canvas = Image.new("L", (size, size), 0)
    canvas.paste(small, (int(x), int(y)))
    return np.asarray(canvas, dtype=np.float32) / 255.0


def load_photos() -> list[np.ndarray]:
    import skimage.data  # heavy import, only needed here

    return [getattr(skimage.data, name)() for name in _PHOTOS]  # each (H, W, 3) uint8


def mnist_m(digit: np.ndarray, photos: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """(size, size, 3) uint8: a random crop of a random photo with the digit blended in as
    |patch - digit|, the MNIST-M rule (Ganin & Lempitsky, 2015): strokes invert the background."""
    size = digit.shape[0]
    photo = photos[rng.integers(len(photos))]
    top = rng.integers(0, photo.shape[0] - size + 1)
    left = rng.integers(0, photo.shape[1] - size + 1)
    patch = photo[top : top + size, left : left + size].astype(np.float32)
    return np.uint8(np.abs(patch - digit[..., None] * 255.0))


def encode_image(pixels: np.ndarray, fmt: str) -> bytes:
    """`pixels` encoded as `fmt`; a float image in [0, 1] is scaled to 0-255 first. (H, W) -> mode L."""
    if pixels.dtype != np.uint8:
        pixels = np.uint8(np.round(pixels * 255))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()
