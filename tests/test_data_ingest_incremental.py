"""Incremental ingest: a listing cache in the store lets the next ingest of a dataset open only its new and
changed files, and a killed ingest resume, with the index a full ingest writes."""

from __future__ import annotations

import hashlib
import itertools
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest
from test_data_ingest import CFG, _image, _index, _reasons, _write

from adaptflow.config import IngestConfig
from adaptflow.data import listing_cache
from adaptflow.data.ingest import cache_key, ingest
from adaptflow.manifests import IngestListing, IngestManifest
from adaptflow.store import storage


@pytest.fixture
def reads(monkeypatch) -> Counter[str]:
    """How many times each file of a dataset was read whole through the store (not the manifest, nor the
    cache's own tables)."""
    counts: Counter[str] = Counter()
    real = storage.read_bytes

    def counting(uri: str) -> bytes:
        if not uri.endswith((".csv", ".json", ".parquet")):
            counts[uri] += 1
        return real(uri)

    monkeypatch.setattr(storage, "read_bytes", counting)
    return counts


def _tree(root: Path) -> None:
    """Class folders with four images, a duplicate, and three files refused for their bytes."""
    png = _image(1)
    _write(
        root,
        {
            "cat/a.png": png,
            "cat/b.png": _image(2),
            "cat/twin.png": png,
            "dog/c.png": _image(3),
            "dog/d.jpg": _image(4, fmt="JPEG"),
            "dog/notes.png": b"hello world",
            "dog/cut.png": _image(5)[:-30],
            "dog/empty.png": b"",
        },
    )


def _again(root: Path, tmp_path: Path, cfg: IngestConfig = CFG, domain: str = "source") -> IngestManifest:
    """An ingest of `root` into a fresh output folder, with the listing cache at tmp_path/cache."""
    out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
    return ingest(str(root), domain, str(out), cfg, cache_uri=str(tmp_path / "cache"))


def _assert_as_full(m: IngestManifest, root: Path, tmp_path: Path, domain: str = "source") -> None:
    """`m` wrote the index and rejects a full ingest (no cache) writes: same rows, splits, reasons."""
    full = ingest(str(root), domain, str(tmp_path / "full"), CFG)
    pd.testing.assert_frame_equal(_index(m), _index(full))
    assert _reasons(m) == _reasons(full) and m.fingerprint == full.fingerprint


def test_unchanged_files_are_not_read_again_and_new_ones_are(tmp_path, reads):
    root = tmp_path / "data"
    _tree(root)
    first = _again(root, tmp_path)
    files = {str(p) for p in root.rglob("*") if p.is_file()}
    assert dict(reads) == dict.fromkeys(files, 1)
    assert (first.n_read, first.n_reused) == (8, 0)
    reads.clear()
    second = _again(root, tmp_path)
    assert not reads and (second.n_read, second.n_reused, second.bytes_read) == (0, 8, 0)
    _assert_as_full(second, root, tmp_path)
    # the dataset grows: only the new files are read
    _write(root, {"cat/e.png": _image(6), "bird/f.png": _image(7)})
    reads.clear()
    third = _again(root, tmp_path)
    assert dict(reads) == {f"{root}/cat/e.png": 1, f"{root}/bird/f.png": 1}
    assert (third.n_read, third.n_reused) == (2, 8) and third.classes == ["bird", "cat", "dog"]
    assert third.bytes_read == len(_image(6)) + len(_image(7))
    _assert_as_full(third, root, tmp_path)


def test_a_file_changed_in_place_is_read_and_hashed_again(tmp_path, reads):
    root = tmp_path / "data"
    _write(root, {"a.png": _image(1), "b.png": _image(2)})
    _again(root, tmp_path, domain="target")
    new = _image(3)
    (root / "a.png").write_bytes(new)  # same name, new bytes
    stamp = (root / "b.png").stat().st_mtime + 10  # a new mtime, whatever the clock's resolution
    os.utime(root / "a.png", (stamp, stamp))
    reads.clear()
    m = _again(root, tmp_path, domain="target")
    assert dict(reads) == {f"{root}/a.png": 1} and (m.n_read, m.n_reused) == (1, 1)
    assert _index(m).set_index("uri").image_id[f"{root}/a.png"] == hashlib.sha256(new).hexdigest()
    _assert_as_full(m, root, tmp_path, "target")


def test_a_deleted_file_leaves_the_index_and_the_listing(tmp_path, reads):
    root = tmp_path / "data"
    _tree(root)
    _again(root, tmp_path)
    (root / "cat/b.png").unlink()
    (root / "dog/notes.png").unlink()
    reads.clear()
    m = _again(root, tmp_path)
    assert not reads and f"{root}/cat/b.png" not in set(_index(m).uri)
    assert f"{root}/dog/notes.png" not in _reasons(m)
    assert IngestListing.load(str(tmp_path / "cache/listing.json")).n_files == 6
    _assert_as_full(m, root, tmp_path)


@pytest.mark.parametrize(
    "cfg", [IngestConfig(workers=2, rehash=True), IngestConfig(workers=2, full_check_days=1e-9)], ids=["rehash", "old"]
)
def test_rehash_and_checks_older_than_full_check_days_read_every_file(tmp_path, reads, cfg):
    root = tmp_path / "data"
    _tree(root)
    _again(root, tmp_path)
    reads.clear()
    m = _again(root, tmp_path, cfg)
    files = [str(p) for p in root.rglob("*") if p.is_file()]
    assert dict(reads) == dict.fromkeys(files, 1) and (m.n_read, m.n_reused) == (8, 0)
    assert not list((tmp_path / "cache").glob("listing-*.parquet"))[1:]  # the listing it replaced is gone
    _assert_as_full(m, root, tmp_path)


def test_a_refused_unchanged_file_keeps_its_reason_unread_and_a_missing_one_is_looked_for_again(tmp_path, reads):
    """A manifest's rows are not listed: each is asked for its size and mtime. A verdict on a file's bytes
    (not an image, truncated, empty) is kept; a file that could not be read at all is tried again."""
    _write(tmp_path / "data", {"a.png": _image(1), "notes.png": b"hello world", "cut.png": _image(2)[:-30]})
    (tmp_path / "data/m.csv").write_text("uri,label\na.png,x\nnotes.png,x\ncut.png,y\ngone.png,y\n")
    dataset = tmp_path / "data/m.csv"
    first = _again(dataset, tmp_path)
    reads.clear()
    m = _again(dataset, tmp_path)
    assert dict(reads) == {f"{tmp_path}/data/gone.png": 1} and (m.n_read, m.n_reused) == (1, 3)
    assert _reasons(m) == _reasons(first) and _reasons(m)[f"{tmp_path}/data/gone.png"] == "missing file"
    assert _reasons(m)[f"{tmp_path}/data/notes.png"] == "not an image (unrecognised content, 11 bytes)"
    _assert_as_full(m, dataset, tmp_path)


def test_a_killed_ingest_resumes_from_its_parts(tmp_path, reads, monkeypatch):
    """The reader dies after 12 files, with a part every 5 verdicts: the next ingest reads only the files no
    part holds, and writes the index a full ingest writes, one row per image."""
    root = tmp_path / "data"
    _write(root, {f"{i:02d}.png": _image(i) for i in range(30)})
    monkeypatch.setattr(listing_cache, "PART_ROWS", 5)
    counting, done = storage.read_bytes, itertools.count()

    def dying(uri: str) -> bytes:
        if next(done) >= 12:
            raise RuntimeError("killed")
        return counting(uri)

    with monkeypatch.context() as killing:
        killing.setattr(storage, "read_bytes", dying)
        with pytest.raises(RuntimeError, match="killed"):
            _again(root, tmp_path, IngestConfig(workers=1), domain="target")
    parts = sorted((tmp_path / "cache/parts").glob("*.parquet"))
    in_parts = {u for p in parts for u in storage.read_table(str(p))["uri"].to_pylist()}
    assert len(parts) == 2 and len(in_parts) == 10 and not (tmp_path / "cache/listing.json").exists()
    reads.clear()
    m = _again(root, tmp_path, domain="target")
    files = {str(p) for p in root.iterdir()}
    assert dict(reads) == dict.fromkeys(files - in_parts, 1) and (m.n_read, m.n_reused) == (20, 10)
    assert m.n_images == 30 and _index(m).uri.is_unique
    assert not list((tmp_path / "cache/parts").glob("*")) and IngestListing.load(str(tmp_path / "cache/listing.json"))
    _assert_as_full(m, root, tmp_path, "target")


def test_a_cache_made_with_other_check_settings_is_not_used(tmp_path, reads):
    """A task keys the cache by what the checks depend on; a commit made with other settings found in the
    folder anyway is passed over, never trusted."""
    root = tmp_path / "data"
    _write(root, {"a.png": _image(1), "b.png": _image(2, size=(20, 20))})
    _again(root, tmp_path)
    strict = IngestConfig(workers=2, max_image_pixels=100)
    assert cache_key(str(root), "source", strict) != cache_key(str(root), "source", CFG)
    assert cache_key(str(root), "target", CFG) != cache_key(str(root), "source", CFG)
    reads.clear()
    m = _again(root, tmp_path, strict)
    assert len(reads) == 2 and _reasons(m) == {f"{root}/b.png": "decompression bomb: 20x20 pixels exceeds limit 100"}


def test_the_ingest_task_keeps_its_cache_in_the_store(memory_uri, reads):
    from tasks.ingest import ingest_dataset

    for i in range(3):
        storage.write_bytes(f"{memory_uri}/data/{i}.png", _image(i))
    first = ingest_dataset.fn(f"{memory_uri}/data", "target", f"{memory_uri}/run1", CFG, 0, store=f"{memory_uri}/s")
    second = ingest_dataset.fn(f"{memory_uri}/data", "target", f"{memory_uri}/run2", CFG, 0, store=f"{memory_uri}/s")
    assert (first.n_read, second.n_read, second.n_reused) == (3, 0, 3)
    key = cache_key(f"{memory_uri}/data", "target", CFG)
    assert storage.exists(f"{memory_uri}/s/ingest-cache/{key}/listing.json")
    assert sum(reads.values()) == 3
