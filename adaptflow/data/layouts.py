"""The dataset layouts ingest reads, each listed into the files to check and the files it already refuses.

Three layouts are recognised from what a dataset URI names:
- a `.csv` or `.parquet` file: a manifest with a `uri` column (absolute, or relative to the
  manifest's folder) and optional `label` and `split` columns;
- a folder holding sub-folders with files in them: a class-folder tree `root/<class>/.../<image>`;
- a folder whose sub-folders are all split names (`train`, `test`, `val`, `valid`, `validation`, as
  Hugging Face's `imagefolder` and torchvision lay data sets out): `root/<split>/<class>/.../<image>`,
  each image in its folder's split; a split folder of loose images (no class folders) holds unlabeled
  images, and split names beside other folder names are an error that says so (never classes named
  `train` and `test`);
- any other folder: a flat folder of unlabeled images (an empty sub-folder, even one named like an
  image, `x.png/`, holds nothing to ingest and does not make the folder a class tree).
"""

from __future__ import annotations

import io
import posixpath
from collections.abc import Callable
from typing import NamedTuple

import pandas as pd
import pyarrow as pa

from adaptflow.data import listing_cache
from adaptflow.data.listing_cache import Stat
from adaptflow.errors import DatasetError
from adaptflow.store import storage

SPLITS = ("train", "val", "test")
# Folder names read as splits (imagefolder, torchvision), case-insensitively, and the split each one is
SPLIT_FOLDERS = {"train": "train", "test": "test", "val": "val", "valid": "val", "validation": "val"}

Reject = tuple[str, str, str | None]  # (uri, reason, image_id)


class Entry(NamedTuple):
    """One file a layout lists; `split` is None unless a manifest or a split folder fixes it. `carve`: the
    splits a layout lacks, drawn from this `train` image's hash as they would be without split folders."""

    uri: str
    label: str | None
    split: str | None = None
    carve: tuple[str, ...] = ()
    stat: Stat | None = None  # size and signature as the folder's listing gave them; None for a manifest's row


def list_dataset(uri: str, in_split: bool = False) -> tuple[list[Entry], list[Reject]]:
    if not storage.exists(uri):
        raise DatasetError(f"dataset not found: {uri}")
    if storage.isfile(uri):
        return _list_manifest(uri)
    children = [c for c in storage.ls(uri) if not _hidden(c["name"])]
    folders = {}  # class name -> the files under it; folders with no (visible) file in them count for nothing
    refused: list[Reject] = []  # what the class folders hold that cannot be read
    for child in children:
        name = posixpath.basename(child["name"].rstrip("/"))
        if child["type"] == "directory" and (files := _find(storage.join(uri, name), refused)):
            folders[name] = files
    if folders:
        splits = {name: SPLIT_FOLDERS[name.lower()] for name in folders if name.lower() in SPLIT_FOLDERS}
        if splits and len(splits) < len(folders):
            raise DatasetError(
                f"{uri} mixes split folders ({', '.join(sorted(splits))}) with other folders "
                f"({', '.join(sorted(set(folders) - set(splits)))}): lay it out as <split>/<class>/<image> or "
                "as <class>/<image>, not both (a folder named like a split is never taken for a class)"
            )
        if splits and in_split:
            raise DatasetError(f"{uri} holds split folders of its own: one level of <split>/ folders only")
        if splits:
            return _list_split_tree(uri, children, splits)  # each split folder is listed again on its own
        entries, rejects = _list_class_tree(uri, children, folders)
        return entries, rejects + refused
    refused = []
    return [Entry(u, None, stat=s) for u, s in _find(uri, refused).items()], refused


def _list_split_tree(uri: str, children: list[dict], splits: dict[str, str]) -> tuple[list[Entry], list[Reject]]:
    """`root/<split>/<class>/...`: each split folder read as a class tree (or, with loose images only, a
    flat folder of unlabeled ones), every image in its folder's split."""
    entries, rejects = [], []
    for name, split in sorted(splits.items()):
        folder = storage.join(uri, name)
        inner, refused = list_dataset(folder, in_split=True)
        entries += [e._replace(split=split) for e in inner]
        rejects += refused
    rejects += [
        (storage.join(uri, posixpath.basename(c["name"].rstrip("/"))), "file outside split folders", None)
        for c in children
        if c["type"] != "directory"
    ]
    labelled = {e.split for e in entries if e.label is not None}
    if labelled and len(labelled) < len({e.split for e in entries}):
        raise DatasetError(
            f"{uri}: some split folders hold class folders and others loose images; give every split its "
            "<class>/ folders (or none)"
        )
    missing = tuple(s for s in ("val", "test") if s not in splits.values())  # carved from train, by hash
    return [e._replace(carve=missing) if e.split == "train" else e for e in entries], rejects


def _list_class_tree(
    uri: str, children: list[dict], folders: dict[str, dict[str, Stat]]
) -> tuple[list[Entry], list[Reject]]:
    entries = [Entry(u, name, stat=s) for name, files in folders.items() for u, s in files.items()]
    rejects = [
        (storage.join(uri, posixpath.basename(c["name"].rstrip("/"))), "file outside class folders", None)
        for c in children
        if c["type"] != "directory"
    ]
    return entries, rejects


def _find(folder_uri: str, rejects: list[Reject] | None = None) -> dict[str, Stat]:
    """The regular files anywhere under `folder_uri` as listed ({uri: size and signature}), their URIs
    written like it, hidden ones left out. What must not or cannot be read is appended to `rejects` with
    its reason: a named pipe, socket or device (reading one blocks or never ends), and a folder that
    cannot be listed (its files would vanish without a word)."""
    fs, folder = storage.filesystem(folder_uri)
    prefix = folder.rstrip("/") + "/"
    found, unreadable = storage.walk_files(folder_uri)
    files = {}
    for path, detail in found.items():
        rel = path[len(prefix) :] if path.startswith(prefix) else None
        if rel is not None and any(part.startswith(".") for part in rel.split("/")):
            continue
        uri = storage.join(folder_uri, rel) if rel is not None else storage.to_uri(fs, path, folder_uri)
        if detail.get("type", "file") == "file":
            files[uri] = listing_cache.stat_of(detail)
        elif rejects is not None:
            rejects.append((uri, "not a regular file (a named pipe, socket or device)", None))
    if rejects is not None:
        rejects += [
            (storage.to_uri(fs, p, folder_uri), f"folder cannot be read ({why})", None) for p, why in unreadable.items()
        ]
    return files


def _hidden(path: str) -> bool:
    return posixpath.basename(path.rstrip("/")).startswith(".")


def _read_csv(uri: str) -> dict[str, list[str | None]]:
    # All strings, no NA guessing: a label "07" or "NA" is kept as written.
    df = pd.read_csv(io.BytesIO(storage.read_bytes(uri)), dtype=str, keep_default_na=False)
    return {str(name).strip(): df[name].str.strip().tolist() for name in df.columns}


def _read_parquet(uri: str) -> dict[str, list[str | None]]:
    table = storage.read_table(uri)
    return {name: table.column(name).cast(pa.string()).to_pylist() for name in table.column_names}


_MANIFEST_READERS: dict[str, Callable[[str], dict[str, list[str | None]]]] = {
    ".csv": _read_csv,
    ".parquet": _read_parquet,
}


def read_manifest(uri: str) -> dict[str, list[str | None]]:
    """A `.csv` or `.parquet` manifest's columns, every cell a string (or None); a DatasetError for any
    other file or one that cannot be read."""
    suffix = posixpath.splitext(uri)[1].lower()
    if suffix not in _MANIFEST_READERS:
        raise DatasetError(f"dataset {uri} is a file but not a .csv or .parquet manifest")
    try:
        return _MANIFEST_READERS[suffix](uri)
    except (OSError, ValueError, pa.ArrowException) as e:
        raise DatasetError(f"cannot read manifest {uri}: {e}") from None


def manifest_uri(base: str, raw: str) -> tuple[str, str | None]:
    """A manifest cell as a URI (absolute as written, else under the manifest's folder `base`), and
    "outside dataset root" where a relative one climbs out of it."""
    if "://" in raw or raw.startswith("/"):
        return raw, None
    rel = posixpath.normpath(raw)
    if rel == ".." or rel.startswith("../"):
        return storage.join(base, raw), "outside dataset root"
    return storage.join(base, rel), None


def _list_manifest(uri: str) -> tuple[list[Entry], list[Reject]]:
    columns = read_manifest(uri)
    if "uri" not in columns:
        raise DatasetError(f"manifest {uri} has no 'uri' column (columns: {', '.join(columns) or 'none'})")
    base = posixpath.dirname(uri)
    labels, splits = columns.get("label"), columns.get("split")
    entries, rejects = [], []
    for i, raw in enumerate(columns["uri"]):
        label = None if labels is None else labels[i] or ""
        split = None if splits is None else splits[i] or ""
        row_uri, reason = manifest_uri(base, raw or "")
        entry = Entry(row_uri, label, split)
        reason = reason or _row_reason(label, split)
        if reason:
            rejects.append((entry.uri, reason, None))
        else:
            entries.append(entry)
    return entries, rejects


def _row_reason(label: str | None, split: str | None) -> str | None:
    if label == "":
        return "empty label"
    if split is not None and split not in SPLITS:
        return f"unknown split {split!r} (expected train, val or test)"
    return None
