"""The data layer for semantic segmentation: list a dataset of images and their masks, refuse every bad
pair with a reason a user can act on, and load the good ones as tensors.

A mask is a single-channel 8-bit PNG the size of its image, each pixel a class index (line i of
`classes.txt` names class i) or `IGNORE`, 255, for a pixel with no label. Layouts:
- a folder `root/images/<stem>.<ext>`, `root/masks/<stem>.png`, `root/classes.txt`;
- a `.csv` or `.parquet` manifest with columns `uri` and `mask_uri` (absolute, or relative to the
  manifest's folder) and `classes.txt` beside it;
- for a target domain (`masks=False`): a flat folder of images, a folder with `images/`, or a manifest's
  `uri` column; no classes, no masks.
Images are checked as ingest checks them (`adaptflow.data.ingest.check_image`): read, hashed, fully
decoded. Pixels are taken as stored, EXIF orientation ignored: a mask is drawn on the stored pixels, and
its size is checked against them.
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from adaptflow.data.ingest import check_image, decode_reason
from adaptflow.data.layouts import Reject, manifest_uri, read_manifest
from adaptflow.errors import DatasetError, StoreError
from adaptflow.store import accounting, storage

IGNORE = 255  # mask pixel value meaning "no label"; so a dataset has at most 255 classes, 0..254
WORKERS = 8  # threads checking pairs: reads wait on the store, and PIL's decoders release the GIL
EXPECTED = "<root>/images/<stem>.<ext>, <root>/masks/<stem>.png, <root>/classes.txt"


class Pair(NamedTuple):
    """A valid image and its mask (None in a listing without masks). `width` x `height` is the image's
    stored size, which its mask shares."""

    image_uri: str
    mask_uri: str | None
    stem: str  # the image's file name without its extension: masks and predictions are named by it
    image_id: str  # sha256 hex of the image file's bytes
    width: int
    height: int


class SegmentationListing(NamedTuple):
    """A dataset's classes (line i = class index i; [] without masks), its valid pairs sorted by stem,
    and every refused file with its reason."""

    classes: list[str]
    pairs: list[Pair]
    rejects: list[Reject]


class _Candidate(NamedTuple):
    """A pair as a layout lists it, not yet read."""

    image_uri: str
    mask_uri: str | None
    stem: str


def list_segmentation(uri: str, masks: bool = True, max_pixels: int = 50_000_000) -> SegmentationListing:
    """Every valid (image, mask) pair of the dataset at `uri`, and a reject for each bad file; with
    `masks=False`, the images alone. Never raises for a bad file; a DatasetError for a dataset that is
    missing, laid out otherwise, or holds no valid pair."""
    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise DatasetError(f"dataset not found: {uri}")
    if storage.isfile(uri):
        classes, candidates, rejects = _list_manifest(uri, masks)
    else:
        classes, candidates, rejects = _list_folder(uri, masks)
    candidates, clashes = _one_per_stem(candidates)
    rejects += clashes
    if not candidates and not rejects:
        raise DatasetError(f"no images found under {uri}")
    with ThreadPoolExecutor(WORKERS) as pool:
        checked = list(pool.map(accounting.carry(lambda c: _check_pair(c, len(classes), max_pixels)), candidates))
    rejects += [reject for _, reject in checked if reject]
    pairs, duplicates = _deduplicate([pair for pair, _ in checked if pair])
    rejects += duplicates
    if not pairs:
        first = "; ".join(f"{posixpath.basename(u)}: {r}" for u, r, _ in sorted(rejects, key=_uri)[:3])
        what = "pairs" if masks else "images"
        raise DatasetError(f"no valid {what} under {uri}: {len(rejects)} files rejected (first reasons: {first})")
    return SegmentationListing(classes, pairs, sorted(rejects, key=_uri))


def _uri(reject: Reject) -> str:
    return reject[0]


# Layouts: what each lists, before a byte of an image is read.


def _list_folder(uri: str, masks: bool) -> tuple[list[str], list[_Candidate], list[Reject]]:
    top = {posixpath.basename(c["name"].rstrip("/")): c["type"] for c in storage.ls(uri)}
    if not masks:
        folder = storage.join(uri, "images") if top.get("images") == "directory" else uri
        files, rejects = _files(folder)
        return [], [_Candidate(u, None, _stem(u)) for u in files.values()], rejects
    missing = [
        name
        for name, kind in (("images/", "directory"), ("masks/", "directory"), ("classes.txt", "file"))
        if top.get(name.rstrip("/")) != kind
    ]
    if missing:
        raise DatasetError(f"{uri} is not a segmentation dataset: no {' and no '.join(missing)} (expected {EXPECTED})")
    classes = _read_classes(storage.join(uri, "classes.txt"))
    images, rejects = _files(storage.join(uri, "images"))
    mask_files, refused = _files(storage.join(uri, "masks"))
    rejects += refused
    by_stem = {}  # stem -> mask URI
    for name, mask_uri in mask_files.items():
        stem, ext = posixpath.splitext(name)
        if ext != ".png":
            rejects.append((mask_uri, "not a mask: masks are masks/<stem>.png, a PNG named after its image", None))
        else:
            by_stem[stem] = mask_uri
    candidates = []
    for image_uri in images.values():
        stem = _stem(image_uri)
        if stem in by_stem:
            candidates.append(_Candidate(image_uri, by_stem[stem], stem))
        else:
            rejects.append((image_uri, f"no mask masks/{stem}.png for this image", None))
    stems = {c.stem for c in candidates}
    rejects += [
        (mask_uri, f"mask without image (no images/{stem}.<ext> for it)", None)
        for stem, mask_uri in by_stem.items()
        if stem not in stems
    ]
    return classes, candidates, rejects


def _list_manifest(uri: str, masks: bool) -> tuple[list[str], list[_Candidate], list[Reject]]:
    columns = read_manifest(uri)
    needed = ["uri", "mask_uri"] if masks else ["uri"]
    if absent := [c for c in needed if c not in columns]:
        raise DatasetError(
            f"manifest {uri} has no {' or '.join(repr(c) for c in absent)} column "
            f"(columns: {', '.join(columns) or 'none'}; expected {', '.join(needed)})"
        )
    base = posixpath.dirname(uri)
    classes = _read_classes(storage.join(base, "classes.txt")) if masks else []
    candidates, rejects = [], []
    for row, raw in enumerate(columns["uri"], 2):  # row 1 is the header
        image_uri, reason = _resolve(base, raw)
        mask_raw = columns["mask_uri"][row - 2] if masks else None
        mask_uri, mask_reason = _resolve(base, mask_raw) if mask_raw else (None, None)
        if reason or mask_reason:
            where = image_uri if reason else mask_uri
            rejects.append((where or uri, f"row {row}: {reason or 'mask_uri ' + mask_reason}", None))
        elif masks and mask_uri is None:
            rejects.append((image_uri, f"row {row}: no mask_uri for this image", None))
        else:
            candidates.append(_Candidate(image_uri, mask_uri, _stem(image_uri)))
    return classes, candidates, rejects


def _resolve(base: str, raw: str | None) -> tuple[str | None, str | None]:
    """A manifest cell as a URI (`layouts.manifest_uri`), and why it is refused, if it is."""
    return manifest_uri(base, raw) if raw else (None, "empty uri")


def _read_classes(uri: str) -> list[str]:
    """`classes.txt`: line i names class index i; blank lines at the end are ignored."""
    if not storage.exists(uri):
        raise DatasetError(f"no classes.txt at {uri}: one class name per line, line i naming class index i")
    try:
        names = [line.strip() for line in storage.read_bytes(uri).decode("utf-8-sig").splitlines()]
    except UnicodeDecodeError:
        raise DatasetError(f"{uri} is not UTF-8 text: one class name per line") from None
    while names and not names[-1]:
        names.pop()
    if not names:
        raise DatasetError(f"{uri} is empty: write one class name per line, line i naming class index i")
    if "" in names:
        raise DatasetError(f"{uri}: line {names.index('') + 1} is blank; line i names class index i, so none may be")
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise DatasetError(f"{uri} names {', '.join(map(repr, dupes))} more than once; each class on one line only")
    if len(names) > IGNORE:
        raise DatasetError(f"{uri} names {len(names)} classes; at most {IGNORE} (mask value {IGNORE} means no label)")
    return names


def _files(folder: str) -> tuple[dict[str, str], list[Reject]]:
    """{name: URI} of the visible regular files directly in `folder`; sub-folders and special files are
    refused, never read (a named pipe blocks a reader forever)."""
    files, rejects = {}, []
    for child in storage.ls(folder):
        name = posixpath.basename(child["name"].rstrip("/"))
        if name.startswith("."):
            continue
        uri = storage.join(folder, name)
        if child["type"] == "directory":
            rejects.append((uri, "a folder where images are expected (files directly in it only)", None))
        elif child["type"] != "file":
            rejects.append((uri, "not a regular file (a named pipe, socket or device)", None))
        else:
            files[name] = uri
    return dict(sorted(files.items())), rejects


def _stem(uri: str) -> str:
    return posixpath.splitext(posixpath.basename(uri))[0]


def _one_per_stem(candidates: list[_Candidate]) -> tuple[list[_Candidate], list[Reject]]:
    """The first image of each stem by URI (`a.jpg` before `a.png`): its mask, and the masks predicted for
    it, are named by the stem alone."""
    kept: dict[str, _Candidate] = {}
    rejects = []
    for c in sorted(candidates, key=lambda c: c.image_uri):
        if c.stem in kept:
            rejects.append((c.image_uri, f"same stem as {kept[c.stem].image_uri} (masks are named by stem)", None))
        else:
            kept[c.stem] = c
    return list(kept.values()), rejects


# Checking: one pair at a time, on worker threads.


def _check_pair(c: _Candidate, num_classes: int, max_pixels: int) -> tuple[Pair | None, Reject | None]:
    """The pair, valid, or the reject that says why not: on the image's URI for a bad image, on the mask's
    for a bad mask (the file to fix), with the image's id either way."""
    image_id, reason, width, height, _ = check_image(c.image_uri, max_pixels)
    if reason:
        return None, (c.image_uri, reason, image_id)
    if c.mask_uri is not None and (reason := _mask_reason(c.mask_uri, width, height, num_classes, max_pixels)):
        return None, (c.mask_uri, reason, image_id)
    return Pair(c.image_uri, c.mask_uri, c.stem, image_id, width, height), None


def _mask_reason(uri: str, width: int, height: int, num_classes: int, max_pixels: int) -> str | None:
    """Why the mask at `uri` cannot label a `width` x `height` image of `num_classes` classes, or None."""
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        return "missing mask file"
    except (OSError, StoreError) as e:
        return f"mask unreadable ({e})"
    if reason := decode_reason(data, max_pixels):
        return f"mask not decodable: {reason}"
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "PNG":
            return f"mask is {im.format}, not PNG (a lossy format changes class indices along every edge)"
        if im.mode not in ("L", "P"):
            return f"mask mode {im.mode}: a mask must be single-channel 8-bit (mode L, or P read as its indices)"
        if im.size != (width, height):
            return f"mask {im.width}x{im.height} but image {width}x{height}"
        values = np.unique(np.asarray(im))  # P: the palette indices, not the colours they show
    bad = values[(values >= num_classes) & (values != IGNORE)].tolist()
    if bad:
        shown = ", ".join(map(str, bad[:10])) + (", …" if len(bad) > 10 else "")
        return f"mask values outside the {num_classes} classes and {IGNORE}: {shown}"
    return None


def _deduplicate(pairs: list[Pair]) -> tuple[list[Pair], list[Reject]]:
    """One pair per distinct image, the first by stem (then URI); the pairs sorted by stem."""
    kept: dict[str, Pair] = {}
    rejects = []
    for p in sorted(pairs, key=lambda p: (p.stem, p.image_uri)):
        if p.image_id in kept:
            rejects.append((p.image_uri, f"duplicate of {kept[p.image_id].image_uri}", p.image_id))
        else:
            kept[p.image_id] = p
    return list(kept.values()), rejects


# Loading.


def load_pair(image: bytes, mask: bytes | None, size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An encoded image and mask as a training pair: (3, size, size) uint8 RGB, resized bilinearly with
    antialiasing, and (size, size) int64 class indices, resized by nearest neighbour (an interpolated
    index would be another class). A plain resize to size x size, no crop: the aspect ratio is not kept.
    Both are resized with pixel centres aligned, so image and mask stay on top of each other; pixels are
    taken as stored (EXIF orientation ignored), as the listing checked the mask's size against them."""
    with Image.open(io.BytesIO(image)) as im:
        if im.mode.startswith("I"):  # 16- or 32-bit grey: convert("RGB") would clip at 255; keep the high byte
            grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
            rgb = np.repeat(grey[..., None], 3, axis=2)
        else:
            rgb = np.asarray(im.convert("RGB"))  # palette, RGBA, CMYK, grey, ...: (H, W, 3)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W) uint8
    x = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True)
    if mask is None:
        return x, None
    with Image.open(io.BytesIO(mask)) as m:
        if m.mode not in ("L", "P"):
            raise DatasetError(f"mask mode {m.mode}: a mask must be single-channel 8-bit (mode L, or P)")
        indices = np.asarray(m)  # (H, W) uint8
    return x, torch.from_numpy(resize_mask(indices, size, size)).long()


def load_segmentation(pairs: Sequence[Pair], size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every pair loaded (`load_pair`) and stacked: X (N, 3, size, size) uint8 and Y (N, size, size) int64,
    or None when the pairs have no masks (a target domain)."""
    with_masks = sum(p.mask_uri is not None for p in pairs)
    if with_masks not in (0, len(pairs)):
        raise ValueError(f"{with_masks} of {len(pairs)} pairs have masks: load all with masks, or none")

    def load(p: Pair) -> tuple[torch.Tensor, torch.Tensor | None]:
        try:
            mask = storage.read_bytes(p.mask_uri) if p.mask_uri is not None else None
            return load_pair(storage.read_bytes(p.image_uri), mask, size)
        except (DatasetError, OSError, ValueError) as e:  # changed since it was listed: PIL's errors, too
            raise DatasetError(f"cannot load {p.image_uri} (mask {p.mask_uri}): {e}") from None

    x = torch.empty((len(pairs), 3, size, size), dtype=torch.uint8)
    y = torch.empty((len(pairs), size, size), dtype=torch.int64) if with_masks else None
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, (xi, yi) in enumerate(pool.map(accounting.carry(load), pairs)):
            x[i] = xi
            if y is not None:
                y[i] = yi
    return x, y


def mask_png(mask: np.ndarray) -> bytes:
    """A (H, W) uint8 array of class indices as a single-channel (mode L) PNG: lossless, as masks must be."""
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"a mask is a (H, W) uint8 array, got {mask.dtype} of shape {mask.shape}")
    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, "PNG")  # (H, W) uint8 -> mode L
    return buf.getvalue()


def resize_mask(mask: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, ...) -> (height, width, ...), same dtype, by nearest neighbour with pixel centres aligned (as
    PIL's NEAREST): output pixel i takes input pixel floor((i + 0.5) * H / height). Values are copied, never
    blended, so a class index stays a class index."""
    h, w = mask.shape[:2]
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return mask[rows[:, None], cols[None, :]]
