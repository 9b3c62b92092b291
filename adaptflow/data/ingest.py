"""Ingest one dataset: list its files, read, hash and fully decode each one (or reuse an earlier ingest's
check of a file that has not changed since), and commit an index of the valid images beside a table of
refused files, each with a reason a user can act on.

The layouts it reads (a manifest, class folders, split folders, a flat folder) are `adaptflow.data.layouts`.
A bad file never stops the run; only a dataset with no valid image at all is an error. A reason never
quotes a file's content (the file may be anything: a password file given by mistake). Image URIs are
recorded absolute, so the index reads the same from any working directory.

Scheduled runs ingest a dataset that grew a little since the night before: with a listing cache in the
store (`cache_uri`; one per dataset, domain and check settings, `adaptflow.data.listing_cache`), a file
listed with the size and signature (S3's ETag, a local file's mtime) it had at an earlier ingest keeps
that ingest's check without being opened, a refused one its reason; new and changed files are read, and
deleted ones are no longer listed. Labels, splits, duplicates and unknown labels are decided afresh from
the checks every time (they are cheap), so the index is the one a full ingest writes. `rehash` reads every
file again, `full_check_days` a file whose check is that old; checks are flushed to the cache while an
ingest runs, so a killed one resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import posixpath
import re
import time
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import pandas as pd
import PIL
import pyarrow as pa
from PIL import Image, ImageFile, UnidentifiedImageError

from adaptflow import progress
from adaptflow.config import IngestConfig
from adaptflow.data import listing_cache
from adaptflow.data.layouts import Entry, Reject, list_dataset
from adaptflow.data.listing_cache import ListingCache
from adaptflow.errors import DatasetError, StoreUnavailableError
from adaptflow.manifests import IngestManifest
from adaptflow.store import accounting, storage

log = logging.getLogger(__name__)

# PIL's default, pinned: a truncated file must be refused here, not padded with grey and trained on.
ImageFile.LOAD_TRUNCATED_IMAGES = False

CHECK_VERSION = 1  # bump when `_check` judges a file differently: every listing cache is then set aside

INDEX_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),  # sha256 hex of the file's bytes
        ("uri", pa.string()),
        ("label", pa.string()),  # null when unlabeled
        ("domain", pa.string()),
        ("split", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),  # PIL's format name: PNG, JPEG, ...
    ]
)
REJECTS_SCHEMA = pa.schema(
    [("uri", pa.string()), ("reason", pa.string()), ("domain", pa.string()), ("image_id", pa.string())]
)


class _Checked(NamedTuple):
    entry: Entry
    image_id: str | None
    reason: str | None  # None for a valid image
    width: int = 0
    height: int = 0
    format: str = ""
    nbytes: int = 0  # bytes read: 0 for a file whose verdict was reused
    judged: bool = True  # False when the bytes could not be read: a verdict on the store, never remembered
    reused: bool = False  # the verdict of an earlier ingest, the file unopened


class _Rejected(Exception):
    """A file is refused; the message is the reason recorded for it."""


def ingest(
    dataset_uri: str,
    domain: str,
    out_uri: str,
    cfg: IngestConfig,
    seed: int = 0,
    classes: list[str] | None = None,
    labels_for: str | None = None,
    cache_uri: str | None = None,
) -> IngestManifest:
    """Validate every image under `dataset_uri` and commit `out_uri/{index,rejects}.parquet`, then
    `out_uri/manifest.json` last. Splits come from a manifest's `split` column, else from a seeded
    hash of each image's bytes, so an image keeps its split however the dataset grows. With `classes`
    (the source's, when ingesting target labels), any other label is refused as unknown; with
    `labels_for` (the target's index), labels that name none of its images are an error, not a run that
    scores nothing after training. With `cache_uri` (`layout.ingest_cache_uri`, keyed by `cache_key`), a
    file listed as it was at an earlier ingest keeps that ingest's check, unopened, and this ingest's
    checks are committed there after its manifest; None reads every file."""
    start = time.perf_counter()
    dataset_uri = storage.absolute(dataset_uri)
    entries, rejects = list_dataset(dataset_uri)
    if not entries and not rejects:
        raise DatasetError(f"no images found under {dataset_uri}")
    if classes is not None:
        known = set(classes)
        rejects += [
            (e.uri, f"unknown label {e.label!r} (known: {', '.join(sorted(known))})", None)
            for e in entries
            if e.label is not None and e.label not in known
        ]
        entries = [e for e in entries if e.label is None or e.label in known]
    cache = ListingCache(cache_uri, cache_settings(dataset_uri, domain, cfg), cfg) if cache_uri else None
    checked = _check_all(entries, domain, cfg, cache)
    rejects += [(c.entry.uri, c.reason, c.image_id) for c in checked if c.reason]
    kept, duplicates = _deduplicate([c for c in checked if not c.reason])
    rejects += duplicates
    if not kept:
        raise DatasetError(_all_rejected_message(dataset_uri, rejects))

    rows = [_index_row(c, domain, cfg, seed) for c in kept]
    if labels_for is not None:
        images = set(storage.read_table(labels_for, columns=["image_id"])["image_id"].to_pylist())
        if not any(r["image_id"] in images for r in rows):
            raise DatasetError(
                f"none of the {len(rows)} labelled images in {dataset_uri} is among the target's images "
                "(labels are matched to target images by content, not by name): are they labels of this target?"
            )
    index_uri, rejects_uri = storage.join(out_uri, "index.parquet"), storage.join(out_uri, "rejects.parquet")
    written = storage.write_table(index_uri, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
    reject_rows = [{"uri": u, "reason": r, "domain": domain, "image_id": i} for u, r, i in sorted(rejects, key=_first)]
    written += storage.write_table(rejects_uri, pa.Table.from_pylist(reject_rows, schema=REJECTS_SCHEMA))
    manifest = IngestManifest(
        domain=domain,
        dataset_uri=dataset_uri,
        index_uri=index_uri,
        rejects_uri=rejects_uri,
        n_images=len(rows),
        n_rejected=len(reject_rows),
        classes=sorted({r["label"] for r in rows if r["label"] is not None}),
        fingerprint=index_fingerprint(rows),
        seconds=time.perf_counter() - start,
        bytes_read=sum(c.nbytes for c in checked),
        bytes_written=written,
        n_read=sum(not c.reused for c in checked),
        n_reused=sum(c.reused for c in checked),
    )
    manifest.commit(storage.join(out_uri, "manifest.json"))
    if cache:
        cache.commit()
    if reject_rows:
        example = reject_rows[0]
        log.warning(
            "%s: %d of %d files rejected (e.g. %s: %s); every reason is in %s",
            dataset_uri,
            len(reject_rows),
            len(rows) + len(reject_rows),
            posixpath.basename(example["uri"]),
            example["reason"],
            rejects_uri,
        )
    return manifest


def _first(reject: Reject) -> str:
    return reject[0]


def cache_settings(dataset_uri: str, domain: str, cfg: IngestConfig) -> dict:
    """What a file's check depends on besides its bytes, and what its listing cache stands for: the same
    dataset ingested with other settings, or by another Pillow, has a cache of its own."""
    return {
        "dataset_uri": storage.absolute(dataset_uri),
        "domain": domain,
        "max_image_pixels": cfg.max_image_pixels,
        "check_extension": cfg.check_extension,
        "pillow": PIL.__version__,
        "check_version": CHECK_VERSION,
    }


def cache_key(dataset_uri: str, domain: str, cfg: IngestConfig) -> str:
    """16 hex characters naming `cache_settings`: the folder of the dataset's listing cache."""
    settings = json.dumps(cache_settings(dataset_uri, domain, cfg), sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:16]


# Checking: one file at a time, on worker threads.

_VERDICT = ("image_id", "reason", "width", "height", "format")  # what a listing cache keeps of a check


def _check_all(entries: list[Entry], domain: str, cfg: IngestConfig, cache: ListingCache | None) -> list[_Checked]:
    """Each entry's check, in order: reused from `cache` when its listing says the file is unchanged (a
    lookup, made here: 100,000 of them cost 3 s more as thread-pool tasks), else made on `cfg.workers`
    threads."""
    with ThreadPoolExecutor(cfg.workers) as pool, progress.task(f"ingest {domain}", len(entries), "files"):
        checked = [_reused(e, cache) if cache is not None and e.stat is not None else None for e in entries]
        progress.advance(sum(c is not None for c in checked))
        todo = [i for i, c in enumerate(checked) if c is None]
        for i, c in zip(
            todo, pool.map(accounting.carry(lambda i: _counted(entries[i], cfg, cache)), todo), strict=True
        ):
            checked[i] = c
        return checked


def _reused(entry: Entry, cache: ListingCache) -> _Checked | None:
    row = cache.reuse(entry.uri, entry.stat)
    return None if row is None else _Checked(entry, **{name: row[name] for name in _VERDICT}, reused=True)


def _counted(entry: Entry, cfg: IngestConfig, cache: ListingCache | None) -> _Checked:
    if cache is None:
        checked = _check(entry, cfg.max_image_pixels, cfg.check_extension)
    else:
        checked = _check_unless_cached(entry, cfg, cache)
    progress.advance()
    return checked


def _check_unless_cached(entry: Entry, cfg: IngestConfig, cache: ListingCache) -> _Checked:
    """The verdict `cache` holds on the file as it is listed now, the file unopened; else `_check`'s,
    remembered. A manifest's row is asked for its size and signature first (a stat, or an S3 HEAD): cheaper
    than reading the file, and taken before reading, so a file that changes meanwhile is read again next
    time."""
    stat = entry.stat or listing_cache.stat(entry.uri)
    if stat is not None and (reused := _reused(entry._replace(stat=stat), cache)):
        return reused
    checked = _check(entry, cfg.max_image_pixels, cfg.check_extension)
    if stat is not None and checked.judged:
        cache.record(entry.uri, stat, {name: getattr(checked, name) for name in _VERDICT})
    return checked


def _check(entry: Entry, max_pixels: int, check_extension: bool = True) -> _Checked:
    """Read, hash and fully decode one file. Never raises for a bad file: the reason says why."""
    try:
        data = storage.read_bytes(entry.uri)
    except FileNotFoundError:
        return _Checked(entry, None, "missing file", judged=False)
    except OSError as e:
        return _Checked(entry, None, f"unreadable file ({e})", judged=False)
    except StoreUnavailableError as e:  # one row of a manifest on a host that does not answer, say
        return _Checked(entry, None, f"unreachable ({e})", judged=False)
    if not data:
        return _Checked(entry, None, "empty file")
    image_id = hashlib.sha256(data).hexdigest()
    try:
        width, height, fmt = _decode(data, max_pixels)
    except _Rejected as e:
        return _Checked(entry, image_id, str(e), nbytes=len(data))
    ext = posixpath.splitext(entry.uri)[1].lower()
    if check_extension and _EXTENSIONS.get(ext, fmt) != fmt:
        return _Checked(entry, image_id, f"extension {ext} but the content is {fmt}", nbytes=len(data))
    return _Checked(entry, image_id, None, width, height, fmt, len(data))


class ImageCheck(NamedTuple):
    """One file judged as ingest judges a dataset's file, for layouts read elsewhere (segmentation's)."""

    image_id: str | None  # sha256 hex of the file's bytes; None when they could not be read
    reason: str | None  # None for a valid image
    width: int
    height: int
    nbytes: int  # bytes read


def check_image(uri: str, max_pixels: int) -> ImageCheck:
    """Read, hash and fully decode the file at `uri`, its extension matched to its content: ingest's own
    check. Never raises for a bad file: the reason says why."""
    c = _check(Entry(uri, None), max_pixels)
    return ImageCheck(c.image_id, c.reason, c.width, c.height, c.nbytes)


def decode_reason(data: bytes, max_pixels: int) -> str | None:
    """Why ingest refuses `data` as an image (empty, not an image, truncated or corrupt, a decompression
    bomb), or None when it decodes fully: for bytes a caller has read and will look into itself."""
    if not data:
        return "empty file"
    try:
        _decode(data, max_pixels)
    except _Rejected as e:
        return str(e)
    return None


# Extensions that name one format; a file with another (or none) is judged by its content alone.
_EXTENSIONS = {
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".png": "PNG",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".webp": "WEBP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}


def _decode(data: bytes, max_pixels: int) -> tuple[int, int, str]:
    """(width, height, format) of a fully decoded image, or _Rejected with the reason."""
    # PIL warns above its own MAX_IMAGE_PIXELS; such an image is refused too, so the limit is the lower one.
    limit = min(max_pixels, Image.MAX_IMAGE_PIXELS or max_pixels)
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise _Rejected(f"not an image (unrecognised content, {len(data)} bytes)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _Rejected(f"decompression bomb: {e}") from None
    except Exception as e:  # PIL's header parsers raise many types (SyntaxError, struct.error, ...)
        raise _Rejected(f"truncated or corrupt image ({_describe(e)})") from None
    with im:
        width, height = im.size  # declared in the header: checked before a byte of pixels is decoded
        if width * height > limit:
            raise _Rejected(f"decompression bomb: {width}x{height} pixels exceeds limit {limit}")
        try:
            im.load()
        except Exception as e:  # OSError for truncation, but decoders also raise ValueError, EOFError, ...
            raise _Rejected(f"truncated or corrupt image ({_describe(e)})") from None
        return width, height, im.format or ""


def _describe(e: Exception) -> str:
    """A decoder's message, without the bytes some quote from the file (PNG's "broken PNG file (chunk
    b'...')"), and short."""
    text = _QUOTED_BYTES.sub("b'…'", str(e)) or type(e).__name__
    return text if len(text) <= 160 else text[:159] + "…"


# b'...' or b"...", escapes included, not the b of a word ("the tab's 'x'")
_QUOTED_BYTES = re.compile(r"(?<!\w)(?:b'(?:[^'\\]|\\.)*'" + r'|b"(?:[^"\\]|\\.)*")')


def _deduplicate(valid: list[_Checked]) -> tuple[list[_Checked], list[Reject]]:
    """One row per distinct image, the first by uri. Identical bytes under different labels are all
    refused: no copy's label can be trusted, and keeping one would leak it across splits."""
    groups: dict[str, list[_Checked]] = {}
    for c in sorted(valid, key=lambda c: c.entry.uri):
        groups.setdefault(c.image_id, []).append(c)
    kept, rejects = [], []
    for copies in groups.values():
        labels = sorted({str(c.entry.label) for c in copies})
        if len(labels) > 1:
            reason = f"conflicting labels for identical images: {', '.join(labels)}"
            rejects += [(c.entry.uri, reason, c.image_id) for c in copies]
        else:
            kept.append(copies[0])
            rejects += [(c.entry.uri, f"duplicate of {copies[0].entry.uri}", c.image_id) for c in copies[1:]]
    return sorted(kept, key=lambda c: c.entry.uri), rejects


# Output rows.


def _index_row(c: _Checked, domain: str, cfg: IngestConfig, seed: int) -> dict:
    return {
        "image_id": c.image_id,
        "uri": c.entry.uri,
        "label": c.entry.label,
        "domain": domain,
        "split": _carved(c, cfg, seed) if c.entry.carve else c.entry.split or _split_of(c.image_id, cfg, seed),
        "width": c.width,
        "height": c.height,
        "format": c.format,
    }


def _split_of(image_id: str, cfg: IngestConfig, seed: int) -> str:
    """A split fixed by the image's bytes and the seed: stable as the dataset grows or is reordered."""
    h = hashlib.sha256(f"{seed}:{image_id}".encode()).hexdigest()
    u = int(h[:8], 16) / 16**8  # uniform in [0, 1)
    if u < cfg.test_fraction:
        return "test"
    return "val" if u < cfg.test_fraction + cfg.val_fraction else "train"


def _carved(c: _Checked, cfg: IngestConfig, seed: int) -> str:
    """A `train` folder's image: in the split its hash draws when that split has no folder of its own."""
    drawn = _split_of(c.image_id, cfg, seed)
    return drawn if drawn in c.entry.carve else "train"


def index_fingerprint(rows: list[dict]) -> str:
    """A dataset snapshot's hash: of its sorted (image_id, label, split) rows."""
    lines = sorted(f"{r['image_id']},{r['label'] or ''},{r['split']}" for r in rows)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _all_rejected_message(uri: str, rejects: list[Reject]) -> str:
    first = "; ".join(f"{posixpath.basename(u)}: {r}" for u, r, _ in sorted(rejects, key=_first)[:3])
    return f"no valid images under {uri}: {len(rejects)} files rejected (first reasons: {first})"


def read_index(manifest: IngestManifest) -> pd.DataFrame:
    """The valid images of an ingested dataset: image_id, uri, label, split, ..."""
    return storage.read_table(manifest.index_uri).to_pandas()
