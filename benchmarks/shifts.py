"""A suite of source -> target digit shifts for the selection benchmark, made offline from data that ships
with installed packages: scikit-learn's 8x8 handwritten digits, the fonts bundled with matplotlib, and
scikit-image's photos.

Each shift writes `source/<digit>/<n>.png` (class folders), `target/<n>.{png,jpg}` (a flat folder) and
`target_labels.csv` (for scoring only), like `adaptflow.data.demo`. Handwritten source and target digits
never share an image (even / odd indices of `load_digits`); font digits are drawn afresh per domain.

    content  "hand": a handwritten digit upscaled and jittered; "blocky": the same at its native 8x8,
             nearest-neighbour upscaled (few pixels, no texture); "font": a digit typeset in one of
             20 fonts, sized, rotated and placed at random.
    style    how a stroke map in [0, 1] becomes pixels (plain, MNIST-M photo blend, a new camera, a
             degraded sensor, clutter, inverted polarity, class-coloured ink).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont
from sklearn.datasets import load_digits

from adaptflow.data.demo import balanced, encode_image, load_photos, mnist_m, new_camera, render_digit
from adaptflow.store import storage

CLASSES = [str(d) for d in range(10)]
# Ten visibly different inks; in `coloured` sources digit d is drawn in _INKS[d] most of the time.
_INKS = np.array(
    [
        [230, 25, 75],
        [60, 180, 75],
        [255, 225, 25],
        [0, 130, 200],
        [245, 130, 48],
        [145, 30, 180],
        [70, 240, 240],
        [240, 50, 230],
        [210, 245, 60],
        [250, 190, 190],
    ],
    np.float32,
)


@dataclass(frozen=True)
class Domain:
    content: str  # "hand" | "blocky" | "font"
    style: str  # a key of STYLES
    # The class mix: "uniform"; "skewed": shares falling geometrically from 0 to 9 (0.75**d); "dominant":
    # DOMINANT of the images are one class (DOMINANT_CLASS), the rest shared equally; "long-tailed": shares falling
    # geometrically from LONG_TAIL:1 (class 0) to 1 (class 9); "partial": only the classes PARTIAL, balanced
    prior: str = "uniform"
    classes: tuple[int, ...] = tuple(range(10))  # the digits this domain has (the source may lack some)


@dataclass(frozen=True)
class Shift:
    name: str
    gap: str  # what kind of gap, for the benchmark's table
    source: Domain
    target: Domain


SHIFTS: dict[str, Shift] = {
    s.name: s
    for s in [
        Shift("mnist-m", "colour and texture", Domain("hand", "plain"), Domain("hand", "mnist_m")),
        Shift("degraded", "blur, noise, resolution", Domain("hand", "plain"), Domain("hand", "degraded")),
        Shift("fonts-to-hand", "stroke style", Domain("font", "plain"), Domain("hand", "plain")),
        Shift("clutter", "background clutter", Domain("hand", "plain"), Domain("hand", "clutter")),
        Shift(
            "skewed-inverted",
            "class prior and polarity",
            Domain("hand", "plain"),
            Domain("hand", "inverted", prior="skewed"),
        ),
        Shift("blocky-to-photos", "low-information source", Domain("blocky", "plain"), Domain("font", "mnist_m")),
        Shift("spurious-colour", "class-conditional (ink colour)", Domain("hand", "coloured"), Domain("hand", "ink")),
        Shift("new-camera", "camera change", Domain("hand", "mnist_m"), Domain("hand", "new_camera")),
        # The target's class mix differs from the source's (label shift; partial and open-set adaptation): alone
        # (plain -> plain, new images: the source-only model reads the target well), or with a new look
        Shift(
            "dominant-class",
            "one class is 70% of the target",
            Domain("hand", "plain"),
            Domain("hand", "plain", prior="dominant"),
        ),
        Shift(
            "partial",
            "half the classes in the target",
            Domain("hand", "plain"),
            Domain("hand", "plain", prior="partial"),
        ),
        Shift(
            "dominant-photos",
            "70% one class, on photos",
            Domain("hand", "plain"),
            Domain("hand", "mnist_m", prior="dominant"),
        ),
        Shift(
            "long-tailed",
            "class shares 25:1, degraded",
            Domain("hand", "plain"),
            Domain("hand", "degraded", prior="long-tailed"),
        ),
        Shift(
            "open-set",
            "target classes the source lacks",
            Domain("hand", "plain", classes=tuple(range(7))),
            Domain("hand", "inverted"),
        ),
        # Resolution: a low-information source for a detailed target, and the reverse (like MNIST -> UCI digits)
        Shift("blocky-to-hand", "low-resolution source", Domain("blocky", "plain"), Domain("hand", "plain")),
        Shift("hand-to-blocky", "low-resolution target", Domain("hand", "plain"), Domain("blocky", "plain")),
    ]
}
DOMINANT, DOMINANT_CLASS = 0.7, 0
LONG_TAIL = 25.0
PARTIAL = (0, 1, 2, 3, 4)


def make_shift(
    shift: Shift,
    out_uri: str,
    per_domain: int = 600,
    image_size: int = 32,
    seed: int = 0,
    target_size: int | None = None,
) -> dict:
    """Write `shift` under `out_uri`, `per_domain` images per domain (`target_size` target images, if
    given); returns {"source", "target", "target_labels"} URIs. Deterministic."""
    digits = load_digits()
    images, labels = digits.images / 16.0, digits.target
    photos = load_photos()
    fonts = _fonts()
    uris = {}
    for k, (role, domain) in enumerate((("source", shift.source), ("target", shift.target))):
        rng = np.random.default_rng([seed, k])
        parity = np.arange(k, len(labels), 2)  # source: even indices, target: odd
        n_images = target_size if role == "target" and target_size else per_domain
        ys = _draw_labels(domain, labels[parity], parity, n_images, rng)
        rows = []
        for n, (index, y) in enumerate(ys):
            if domain.content == "font":
                stroke = _render_font_digit(y, image_size, fonts, rng)
            elif domain.content == "blocky":
                stroke = _blocky(images[index], image_size)
            else:
                stroke = render_digit(images[index], image_size, rng)
            pixels = STYLES[domain.style](stroke, y, photos, rng)
            fmt = "JPEG" if pixels.ndim == 3 and domain.style in _PHOTO_STYLES else "PNG"
            name = f"{n}.{'jpg' if fmt == 'JPEG' else 'png'}"
            path = storage.join(out_uri, role, str(y), name) if role == "source" else storage.join(out_uri, role, name)
            storage.write_bytes(path, encode_image(pixels, fmt))
            rows.append((f"{role}/{name}", y))
        uris[role] = storage.join(out_uri, role)
        if role == "target":
            uris["target_labels"] = storage.join(out_uri, "target_labels.csv")
            body = "uri,label\n" + "".join(f"{u},{y}\n" for u, y in rows)
            storage.write_bytes(uris["target_labels"], body.encode())
    return uris


def _draw_labels(
    domain: Domain, labels: np.ndarray, indices: np.ndarray, n: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """(index into load_digits, label) pairs: balanced over the classes, or with the domain's class mix
    (`Domain.prior`). Font digits only need labels; their index is unused."""
    keep = np.isin(labels, domain.classes)
    labels, indices = labels[keep], indices[keep]
    if domain.prior in _SHARES:
        return _draw_shares(domain, _SHARES[domain.prior](), labels, indices, n)
    if domain.prior == "skewed":
        share = 0.75 ** np.arange(10)
        counts = np.maximum(np.round(n * share / share.sum()).astype(int), 3)
        chosen = []
        for d, c in enumerate(counts):
            pool = indices[labels == d]
            chosen += [(int(i), d) for i in pool[: min(c, len(pool))]]
        return chosen
    if domain.content == "font":
        return [(-1, int(d)) for d in rng.permutation(np.arange(n) % 10)]
    picked: list[int] = []
    while len(picked) < n:  # more images than digits: each digit again, rendered anew (scale benchmark)
        picked += balanced(indices, _label_lookup(indices, labels), min(n - len(picked), len(indices)))
    lookup = dict(zip(indices.tolist(), labels.tolist(), strict=True))
    return [(i, int(lookup[i])) for i in picked]


_SHARES: dict[str, Callable[[], np.ndarray]] = {
    "dominant": lambda: np.where(np.arange(10) == DOMINANT_CLASS, DOMINANT, (1 - DOMINANT) / 9),
    "long-tailed": lambda: LONG_TAIL ** (-np.arange(10) / 9),
    "partial": lambda: np.isin(np.arange(10), PARTIAL).astype(float),
}


def _draw_shares(
    domain: Domain, share: np.ndarray, labels: np.ndarray, indices: np.ndarray, n: int
) -> list[tuple[int, int]]:
    """`n` (index, label) pairs with class d drawn round(n * share[d] / sum) times. Handwritten digits are
    rendered anew each time (so a class may hold more images than the dataset has of it); the blocky ones
    are the same pixels every time, so a class holds each of them at most once; font digits need no index."""
    share = share / share.sum()
    counts = np.round(n * share).astype(int)
    chosen = []
    for d, c in enumerate(counts):
        pool = indices[labels == d]
        if c == 0 or (len(pool) == 0 and domain.content != "font"):
            continue
        if domain.content == "font":
            chosen += [(-1, d)] * int(c)
        elif domain.content == "blocky":
            chosen += [(int(i), d) for i in pool[:c]]
        else:
            chosen += [(int(pool[k % len(pool)]), d) for k in range(c)]
    return chosen


def _label_lookup(indices: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """A full-length label array for `balanced`, which indexes labels by dataset index."""
    out = np.full(int(indices.max()) + 1, -1)
    out[indices] = labels
    return out


def _fonts() -> list[str]:
    """matplotlib's bundled text fonts whose digits are ordinary glyphs (no symbol or display fonts)."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "fonts" / "ttf"
    names = [
        p
        for p in sorted(folder.glob("*.ttf"))
        if (p.name.startswith(("DejaVuSans", "DejaVuSerif", "STIXGeneral")) and "Display" not in p.name)
        or p.stem in ("cmr10", "cmb10", "cmss10", "cmtt10", "cmti10")
    ]
    return [str(p) for p in names]


def _render_font_digit(digit: int, size: int, fonts: list[str], rng: np.random.Generator) -> np.ndarray:
    """(size, size) float in [0, 1]: `digit` in a random font, 55-80 % of the canvas tall, rotated up to
    15 degrees, stroke widened by 0-1 px, and placed up to size/10 off centre."""
    font = ImageFont.truetype(fonts[rng.integers(len(fonts))], max(6, int(size * rng.uniform(0.55, 0.8))))
    big = Image.new("L", (2 * size, 2 * size), 0)
    draw = ImageDraw.Draw(big)
    stroke = int(rng.integers(0, 2))
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    draw.text(
        (size - (left + right) / 2, size - (top + bottom) / 2),
        str(digit),
        font=font,
        fill=255,
        stroke_width=stroke,
        stroke_fill=255,
    )
    big = big.rotate(float(rng.uniform(-15, 15)), resample=Image.Resampling.BILINEAR)
    dx, dy = rng.integers(-size // 10, size // 10 + 1, size=2)
    crop = big.crop((size // 2 + dx, size // 2 + dy, size // 2 + dx + size, size // 2 + dy + size))
    return np.asarray(crop, dtype=np.float32) / 255.0


def _blocky(image: np.ndarray, size: int) -> np.ndarray:
    """The 8x8 digit upscaled by nearest neighbour: 64 distinct pixels, hard edges, no texture at all."""
    return (
        np.asarray(
            Image.fromarray(np.uint8(image * 255)).resize((size, size), Image.Resampling.NEAREST), dtype=np.float32
        )
        / 255.0
    )


Style = Callable[[np.ndarray, int, list[np.ndarray], np.random.Generator], np.ndarray]


def _plain(stroke, label, photos, rng):
    return stroke


def _inverted(stroke, label, photos, rng):
    """Dark ink on a light, slightly uneven page."""
    page = rng.uniform(0.75, 1.0)
    return np.clip(page - stroke * rng.uniform(0.6, 0.9), 0, 1)


def _degraded(stroke, label, photos, rng):
    """A poor sensor: a third of the resolution, blur, low contrast, a grey cast and noise."""
    size = stroke.shape[0]
    img = Image.fromarray(np.uint8(stroke * 255))
    img = img.resize((max(size // 3, 2),) * 2, Image.Resampling.BILINEAR).resize(
        (size, size), Image.Resampling.BILINEAR
    )
    img = img.filter(ImageFilter.GaussianBlur(size / 40))
    x = np.asarray(img, np.float32) / 255.0
    x = 0.2 + rng.uniform(0.45, 0.75) * x + rng.normal(0, 0.08, x.shape)
    return np.clip(x, 0, 1)


def _clutter(stroke, label, photos, rng):
    """The digit in a random light colour over a dimmed photo, crossed by 4-8 random lines and a piece of
    another digit: background that competes with the stroke."""
    size = stroke.shape[0]
    photo = photos[rng.integers(len(photos))]
    top, left = rng.integers(0, photo.shape[0] - size + 1), rng.integers(0, photo.shape[1] - size + 1)
    canvas = Image.fromarray(np.uint8(photo[top : top + size, left : left + size] * rng.uniform(0.3, 0.6)))
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(4, 9))):
        xy = [tuple(int(v) for v in rng.integers(0, size, 2)) for _ in range(2)]
        draw.line(xy, fill=tuple(int(v) for v in rng.integers(60, 256, 3)), width=int(rng.integers(1, 3)))
    out = np.asarray(canvas, np.float32)
    ink = rng.uniform(170, 255, 3)
    return np.uint8(out * (1 - stroke[..., None]) + ink * stroke[..., None])


def _coloured(stroke, label, photos, rng):
    """Ink colour tied to the class 90 % of the time (a shortcut a source-only model can learn)."""
    ink = _INKS[label] if rng.random() < 0.9 else _INKS[rng.integers(10)]
    return np.uint8(stroke[..., None] * ink)


def _ink(stroke, label, photos, rng):
    """Ink colour drawn at random: the source's shortcut no longer holds."""
    return np.uint8(stroke[..., None] * _INKS[rng.integers(10)])


STYLES: dict[str, Style] = {
    "plain": _plain,
    "inverted": _inverted,
    "degraded": _degraded,
    "clutter": _clutter,
    "coloured": _coloured,
    "ink": _ink,
    "mnist_m": lambda stroke, label, photos, rng: mnist_m(stroke, photos, rng),
    "new_camera": lambda stroke, label, photos, rng: new_camera(stroke, photos, rng),
}
_PHOTO_STYLES = {"mnist_m", "new_camera", "clutter"}  # stored as JPEG, as a camera would
