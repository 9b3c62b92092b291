"""The data layer for action recognition: list a dataset of video clips, refuse every bad clip with a reason
a user can act on, and load the good ones as tensors of frames.

A clip is either a folder of frames (`*.png`, `*.jpg`, `*.jpeg`, read in name order: number them with
zeros in front, `0007.png`, so that name order is time order) or an animated GIF file. Layouts:
- labelled (a source domain): class folders of clips, `root/<class>/<clip>`;
- unlabelled (a target domain): a flat folder of clips, `root/<clip>`.
Video files (`.mp4`, `.webm`, `.avi`, `.mov`, `.mkv`) are listed and refused with a reason: decoding them
needs PyAV, which is not among the project's dependencies yet (see `VIDEO_REASON`).

Every frame is checked as ingest checks an image (`adaptflow.data.ingest.decode_reason`: fully decoded,
decompression bombs refused), every frame of a GIF too. A clip's id is the sha256 of its bytes, so the
same clip copied under two names is kept once, and a clip keeps its split however the dataset grows.
"""

from __future__ import annotations

import hashlib
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

from adaptflow.data.ingest import decode_reason
from adaptflow.data.layouts import Reject
from adaptflow.data.segmentation import load_pair
from adaptflow.errors import DatasetError, StoreError
from adaptflow.store import accounting, storage

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg")
VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mov", ".mkv")
# PyAV is not a dependency of the project (tests/test_lock.py checks that every import is one), so video
# files are refused rather than decoded; `{ext}` is the file's extension.
VIDEO_REASON = (
    "video file: {ext} clips are not supported yet (decoding them needs PyAV, not a dependency of adaptflow); "
    "give the clip as a folder of frames or an animated GIF"
)
WORKERS = 8  # threads checking clips: reads wait on the store, and PIL's decoders release the GIL
EXPECTED = "<root>/<class>/<clip>, a clip being a folder of frames or an animated .gif"


class Clip(NamedTuple):
    """A valid clip: a folder of frames or a GIF file, its class (None without labels), its id and length."""

    uri: str
    label: str | None
    clip_id: str  # sha256 hex of a GIF's bytes, or of a frame folder's frames (length, bytes) in name order
    frames: int


class ClipListing(NamedTuple):
    """A dataset's classes (sorted; [] without labels), its valid clips sorted by URI, and every refused
    file or clip with its reason (`(uri, reason, clip_id or None)`)."""

    classes: list[str]
    clips: list[Clip]
    rejects: list[Reject]


class _Listed(NamedTuple):
    """A clip as the layout lists it, not yet read."""

    uri: str
    label: str | None
    is_gif: bool


def list_clips(uri: str, labelled: bool = True, min_frames: int = 4, max_pixels: int = 50_000_000) -> ClipListing:
    """Every valid clip of the dataset at `uri` (class folders when `labelled`, else a flat folder of
    clips), and a reject for each bad file or clip: a clip shorter than `min_frames`, a frame that does not
    decode, a file that is not a clip, a video file, a duplicate. Never raises for a bad clip; a
    DatasetError for a dataset that is missing or holds no valid clip."""
    if min_frames < 1:
        raise ValueError(f"min_frames must be at least 1, got {min_frames}")
    uri = storage.absolute(uri)
    if not storage.exists(uri):
        raise DatasetError(f"dataset not found: {uri}")
    if storage.isfile(uri):
        raise DatasetError(f"dataset {uri} is a file; clips are listed from a folder ({EXPECTED})")
    listed, rejects = _list_labelled(uri) if labelled else _list_flat(uri)
    if not listed and not rejects:
        raise DatasetError(f"no clips found under {uri} (expected {EXPECTED if labelled else '<root>/<clip>'})")
    with ThreadPoolExecutor(WORKERS) as pool:
        checked = list(pool.map(accounting.carry(lambda c: _check(c, min_frames, max_pixels)), listed))
    rejects += [reject for _, reject in checked if reject]
    clips, duplicates = _deduplicate([clip for clip, _ in checked if clip])
    rejects += duplicates
    rejects.sort(key=_first)
    if not clips:
        first = "; ".join(f"{_name(u)}: {r}" for u, r, _ in rejects[:3])
        raise DatasetError(f"no valid clips under {uri}: {len(rejects)} rejected (first reasons: {first})")
    classes = sorted({c.label for c in clips if c.label is not None})
    return ClipListing(classes, clips, rejects)


def _first(reject: Reject) -> str:
    return reject[0]


def _name(uri: str) -> str:
    """The last two parts of a URI (`left/00003`): enough to find a clip in a message."""
    parent, name = posixpath.split(uri.rstrip("/"))
    return f"{posixpath.basename(parent)}/{name}"


# Layouts: what each lists, before a byte of a frame is read.


def _children(folder: str) -> list[tuple[str, str, str]]:
    """(name, URI, fsspec type) of the visible entries directly in `folder`, sorted by name."""
    out = []
    for child in storage.ls(folder):
        name = posixpath.basename(child["name"].rstrip("/"))
        if not name.startswith("."):
            out.append((name, storage.join(folder, name), child["type"]))
    return sorted(out)


def _list_labelled(uri: str) -> tuple[list[_Listed], list[Reject]]:
    listed, rejects = [], []
    for name, child, kind in _children(uri):
        if kind != "directory":
            rejects.append((child, f"a file outside the class folders (expected {EXPECTED})", None))
            continue
        found, refused = _list_flat(child, label=name)
        listed += found
        rejects += refused
    return listed, rejects


def _list_flat(folder: str, label: str | None = None) -> tuple[list[_Listed], list[Reject]]:
    """The clips directly in `folder` (a class folder, or an unlabelled domain's root)."""
    listed, rejects = [], []
    for name, uri, kind in _children(folder):
        ext = posixpath.splitext(name)[1].lower()
        if kind == "directory":
            listed.append(_Listed(uri, label, is_gif=False))
        elif kind != "file":
            rejects.append((uri, "not a regular file (a named pipe, socket or device)", None))
        elif ext == ".gif":
            listed.append(_Listed(uri, label, is_gif=True))
        elif ext in VIDEO_EXTENSIONS:
            rejects.append((uri, VIDEO_REASON.format(ext=ext), None))
        elif ext in FRAME_EXTENSIONS:
            rejects.append((uri, "a lone frame: a clip's frames go in a folder of their own, <clip>/<frame>", None))
        else:
            rejects.append((uri, "not a clip: a clip is a folder of frames (*.png, *.jpg, *.jpeg) or a .gif", None))
    return listed, rejects


def frame_names(clip_uri: str) -> tuple[list[str], str | None]:
    """The frame files of a frame-folder clip in name order (= time order), and why the folder is not a
    clip (a sub-folder or a file that is not a frame in it, or no frame at all), or None."""
    frames = []
    for name, _, kind in _children(clip_uri):
        if kind == "directory":
            return [], f"holds a folder {name!r}: a clip's frames are files directly in its folder"
        if posixpath.splitext(name)[1].lower() not in FRAME_EXTENSIONS:
            return [], f"holds {name!r}, not a frame (frames are *.png, *.jpg, *.jpeg)"
        frames.append(name)
    return frames, None if frames else "an empty clip folder: no *.png, *.jpg or *.jpeg frames"


# Checking: one clip at a time, on worker threads.


def _check(c: _Listed, min_frames: int, max_pixels: int) -> tuple[Clip | None, Reject | None]:
    """The clip, valid, or the reject that says why not, with the clip's id when all its bytes were read."""
    check = _check_gif if c.is_gif else _check_frames
    try:
        clip_id, frames, reason = check(c.uri, max_pixels)
    except FileNotFoundError:
        return None, (c.uri, "missing file (deleted while listed?)", None)
    except (OSError, StoreError) as e:
        return None, (c.uri, f"unreadable ({type(e).__name__})", None)
    if reason is None and frames < min_frames:
        reason = f"{frames} frame{'s' * (frames != 1)}, need at least {min_frames}"
    if reason is not None:
        return None, (c.uri, reason, clip_id)
    return Clip(c.uri, c.label, clip_id, frames), None


def _check_frames(uri: str, max_pixels: int) -> tuple[str | None, int, str | None]:
    """(clip id, frames, reason) of a frame folder: every frame read, hashed and fully decoded."""
    names, reason = frame_names(uri)
    if reason:
        return None, 0, reason
    h = hashlib.sha256()
    for name in names:
        data = storage.read_bytes(storage.join(uri, name))
        if reason := decode_reason(data, max_pixels):
            return None, len(names), f"frame {name}: {reason}"
        h.update(len(data).to_bytes(8, "little"))  # lengths too: frames [ab, c] and [a, bc] differ
        h.update(data)
    return h.hexdigest(), len(names), None


def _check_gif(uri: str, max_pixels: int) -> tuple[str | None, int, str | None]:
    """(clip id, frames, reason) of a GIF file: every frame decoded, not only the first as PIL's `load`."""
    data = storage.read_bytes(uri)
    clip_id = hashlib.sha256(data).hexdigest()
    if reason := decode_reason(data, max_pixels):  # the header, the size limit and the first frame
        return clip_id, 0, reason
    with Image.open(io.BytesIO(data)) as im:
        if im.format != "GIF":
            return clip_id, 0, f"extension .gif but the content is {im.format}"
        i = 0
        try:
            n = int(getattr(im, "n_frames", 1))
            for i in range(n):
                im.seek(i)
                im.load()
        except Exception as e:  # PIL's GIF decoder raises OSError, EOFError, ValueError, ...
            return clip_id, 0, f"truncated or corrupt GIF ({type(e).__name__} after {i} frames)"
    return clip_id, n, None


def _deduplicate(clips: list[Clip]) -> tuple[list[Clip], list[Reject]]:
    """One clip per distinct content, the first by URI. Identical clips under different labels are all
    refused, as ingest refuses identical images: no copy's label can be trusted."""
    groups: dict[str, list[Clip]] = {}
    for c in sorted(clips, key=lambda c: c.uri):
        groups.setdefault(c.clip_id, []).append(c)
    kept, rejects = [], []
    for copies in groups.values():
        labels = sorted({str(c.label) for c in copies})
        if len(labels) > 1:
            reason = f"conflicting labels for identical clips: {', '.join(labels)}"
            rejects += [(c.uri, reason, c.clip_id) for c in copies]
        else:
            kept.append(copies[0])
            rejects += [(c.uri, f"duplicate of {copies[0].uri}", c.clip_id) for c in copies[1:]]
    return sorted(kept, key=lambda c: c.uri), rejects


# Loading.


def sample_frames(n_frames: int, t: int) -> list[int]:
    """The `t` frames a clip of `n_frames` is read at, TSN-style (Wang et al. 2016, "Temporal Segment
    Networks"): the clip cut into `t` equal segments, the middle frame of each, frame
    floor((k + 0.5) * n_frames / t) for segment k. Deterministic (no random offset), non-decreasing, and
    a clip shorter than `t` repeats frames: 3 frames at t = 6 give [0, 0, 1, 1, 2, 2]."""
    if n_frames < 1 or t < 1:
        raise ValueError(f"need n_frames >= 1 and t >= 1, got {n_frames} and {t}")
    return [min(int((k + 0.5) * n_frames / t), n_frames - 1) for k in range(t)]


def load_clip(clip: Clip, t: int, size: int) -> torch.Tensor:
    """uint8 (t, 3, size, size) RGB: the clip's `sample_frames`, each resized to size x size (bilinear,
    antialiased; no crop, the aspect ratio is not kept). A DatasetError if the clip changed since it was
    listed (another number of frames, or a frame that no longer decodes)."""
    index = sample_frames(clip.frames, t)
    try:
        if posixpath.splitext(clip.uri)[1].lower() == ".gif" and storage.isfile(clip.uri):
            return _load_gif(storage.read_bytes(clip.uri), index, size)
        names, reason = frame_names(clip.uri)
        if reason or len(names) != clip.frames:
            raise DatasetError(reason or f"{len(names)} frames, listed with {clip.frames}")
        return torch.stack(
            [load_pair(storage.read_bytes(storage.join(clip.uri, names[i])), None, size)[0] for i in index]
        )
    except (DatasetError, OSError, ValueError, EOFError) as e:  # changed since it was listed: PIL's errors, too
        raise DatasetError(f"cannot load clip {clip.uri}: {e}") from None


def _load_gif(data: bytes, index: Sequence[int], size: int) -> torch.Tensor:
    out = []
    with Image.open(io.BytesIO(data)) as im:
        for i in index:  # non-decreasing: PIL's GIF reader seeks forward without starting over
            im.seek(i)
            rgb = np.asarray(im.convert("RGB"))  # (H, W, 3), the frame composited as a viewer shows it
            x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)  # (3, H, W) uint8
            out.append(TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True))
    return torch.stack(out)


def load_clips(clips: Sequence[Clip], t: int, size: int) -> torch.Tensor:
    """Every clip loaded (`load_clip`) and stacked: uint8 (N, t, 3, size, size)."""
    out = torch.empty((len(clips), t, 3, size, size), dtype=torch.uint8)
    with ThreadPoolExecutor(WORKERS) as pool:
        for i, x in enumerate(pool.map(accounting.carry(lambda c: load_clip(c, t, size)), clips)):
            out[i] = x
    return out
