"""adaptflow.data.ingest on tiny PIL-made images: every layout, every reject reason, every error message."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from PIL import Image

from adaptflow.config import IngestConfig
from adaptflow.data.ingest import INDEX_SCHEMA, REJECTS_SCHEMA, ingest
from adaptflow.errors import DatasetError
from adaptflow.manifests import IngestManifest
from adaptflow.store import storage

CFG = IngestConfig(workers=2)


def _image(seed: int, mode: str = "RGB", fmt: str = "PNG", size: tuple[int, int] = (6, 6)) -> bytes:
    """Bytes of a small random image; a different `seed` gives different bytes."""
    rng = np.random.default_rng(seed)
    im = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt)
    return buf.getvalue()


def _write(root: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)


def _index(m: IngestManifest) -> pd.DataFrame:
    return storage.read_table(m.index_uri).to_pandas()


def _reasons(m: IngestManifest) -> dict[str, str]:
    df = storage.read_table(m.rejects_uri).to_pandas()
    return dict(zip(df.uri, df.reason, strict=True))


def test_class_folder_tree(tmp_path):
    root = tmp_path / "data"
    _write(
        root,
        {
            "cat/a.png": _image(1),
            "cat/deeper/b.png": _image(2),
            "dog/c.jpg": _image(3, fmt="JPEG"),
            "dog/.DS_Store": b"junk",
            ".hidden/x.png": _image(4),
        },
    )
    m = ingest(str(root), "source", str(tmp_path / "out"), CFG)
    df = _index(m)
    assert storage.read_table(m.index_uri).schema.equals(INDEX_SCHEMA)
    assert list(df.uri) == [f"{root}/cat/a.png", f"{root}/cat/deeper/b.png", f"{root}/dog/c.jpg"]
    assert list(df.label) == ["cat", "cat", "dog"]
    assert list(df.format) == ["PNG", "PNG", "JPEG"]
    assert set(df.domain) == {"source"} and set(df.width) == {6}
    assert (m.n_images, m.n_rejected, m.classes) == (3, 0, ["cat", "dog"])
    assert storage.read_table(m.rejects_uri).schema.equals(REJECTS_SCHEMA)  # written even when empty


def test_flat_folder_in_memory(memory_uri):
    for i in range(3):
        storage.write_bytes(f"{memory_uri}/data/{i}.png", _image(i))
    m = ingest(f"{memory_uri}/data", "target", f"{memory_uri}/out", CFG)
    df = _index(m)
    assert list(df.uri) == [f"{memory_uri}/data/{i}.png" for i in range(3)]
    assert df.label.isna().all() and m.classes == []
    assert set(df.split) <= {"train", "val", "test"}


def test_csv_manifest_relative_and_absolute_uris(tmp_path):
    _write(tmp_path, {"data/imgs/a.png": _image(1), "elsewhere/b.png": _image(2), "elsewhere/c.png": _image(3)})
    absolute, as_uri = tmp_path / "elsewhere/b.png", f"file://{tmp_path}/elsewhere/c.png"
    (tmp_path / "data/labels.csv").write_text(f"uri,label\nimgs/a.png,07\n{absolute},NA\n{as_uri},x\n")
    m = ingest(str(tmp_path / "data/labels.csv"), "target_labels", str(tmp_path / "out"), CFG)
    df = _index(m).set_index("uri")
    assert df.label.to_dict() == {f"{tmp_path}/data/imgs/a.png": "07", str(absolute): "NA", as_uri: "x"}
    assert m.classes == ["07", "NA", "x"]


def test_parquet_manifest_honours_split_and_refuses_unknown_split(memory_uri):
    for i in range(4):
        storage.write_bytes(f"{memory_uri}/imgs/{i}.png", _image(i))
    table = pa.table(
        {
            "uri": [f"imgs/{i}.png" for i in range(4)],
            "label": [3, 3, 5, 5],  # integers become the strings "3", "5"
            "split": ["test", "test", "val", "holdout"],
        }
    )
    storage.write_table(f"{memory_uri}/m.parquet", table)
    m = ingest(f"{memory_uri}/m.parquet", "source", f"{memory_uri}/out", CFG)
    df = _index(m)
    assert list(df.split) == ["test", "test", "val"] and list(df.label) == ["3", "3", "5"]
    assert _reasons(m) == {f"{memory_uri}/imgs/3.png": "unknown split 'holdout' (expected train, val or test)"}


def test_splits_are_deterministic_seeded_and_roughly_proportional(memory_uri):
    for i in range(200):
        storage.write_bytes(f"{memory_uri}/data/{i:03d}.png", _image(i, size=(2, 2)))
    cfg = IngestConfig(workers=2, val_fraction=0.1, test_fraction=0.2)
    a = ingest(f"{memory_uri}/data", "source", f"{memory_uri}/a", cfg, seed=0)
    b = ingest(f"{memory_uri}/data", "source", f"{memory_uri}/b", cfg, seed=0)
    c = ingest(f"{memory_uri}/data", "source", f"{memory_uri}/c", cfg, seed=1)
    assert list(_index(a).split) == list(_index(b).split) and a.fingerprint == b.fingerprint
    assert list(_index(a).split) != list(_index(c).split) and a.fingerprint != c.fingerprint
    shares = _index(a).split.value_counts(normalize=True)
    assert abs(shares["test"] - 0.2) < 0.08 and abs(shares["val"] - 0.1) < 0.06


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("LA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG")],
)
def test_grey_palette_alpha_cmyk_and_16_bit_images_are_accepted(tmp_path, mode, fmt):
    _write(tmp_path / "data", {f"img.{fmt.lower()}": _image(0, mode=mode, fmt=fmt)})
    df = _index(ingest(str(tmp_path / "data"), "source", str(tmp_path / "out"), CFG))
    assert list(df.format) == [fmt]


def test_every_bad_file_in_a_class_tree_is_rejected_with_its_reason(tmp_path):
    root = tmp_path / "data"
    png, jpeg = _image(1), _image(2, fmt="JPEG")
    _write(
        root,
        {
            "cat/original.png": png,
            "cat/empty.png": b"",
            "cat/notes.png": b"hello world",
            "cat/cut.png": _image(3)[:-30],
            "cat/cut.jpg": jpeg[: len(jpeg) // 2],
            "cat/huge.png": _image(4, size=(20, 20)),
            "cat/twin.png": png,
            "cat/same.png": _image(5),
            "dog/same.png": _image(5),
            "stray.png": _image(6),
            "cat/renamed.jpg": _image(7),  # PNG bytes behind a .jpg name
            "cat/no_extension": _image(8),  # judged by its content alone: kept
        },
    )
    m = ingest(str(root), "source", str(tmp_path / "out"), IngestConfig(workers=2, max_image_pixels=100))
    reasons = _reasons(m)
    assert list(_index(m).uri) == [f"{root}/cat/no_extension", f"{root}/cat/original.png"]
    assert reasons.pop(f"{root}/cat/renamed.jpg") == "extension .jpg but the content is PNG"
    assert reasons.pop(f"{root}/cat/empty.png") == "empty file"
    assert reasons.pop(f"{root}/cat/notes.png") == "not an image (unrecognised content, 11 bytes)"
    assert reasons.pop(f"{root}/cat/cut.png").startswith("truncated or corrupt image (")
    assert reasons.pop(f"{root}/cat/cut.jpg").startswith("truncated or corrupt image (")
    assert reasons.pop(f"{root}/cat/huge.png") == "decompression bomb: 20x20 pixels exceeds limit 100"
    assert reasons.pop(f"{root}/cat/twin.png") == f"duplicate of {root}/cat/original.png"
    conflict = "conflicting labels for identical images: cat, dog"
    assert reasons.pop(f"{root}/cat/same.png") == reasons.pop(f"{root}/dog/same.png") == conflict
    assert reasons.pop(f"{root}/stray.png") == "file outside class folders"
    assert reasons == {}
    assert m.n_rejected == 10
    assert m.bytes_read == sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and p.name != "stray.png")
    assert m.bytes_written > 0


def test_labels_outside_the_known_classes_are_rejected_as_unknown(tmp_path):
    _write(tmp_path, {"data/a.png": _image(1), "data/b.png": _image(2)})
    (tmp_path / "data/m.csv").write_text("uri,label\na.png,cat\nb.png,zebra\n")
    m = ingest(str(tmp_path / "data/m.csv"), "target_labels", str(tmp_path / "out"), CFG, classes=["cat", "dog"])
    assert list(_index(m).label) == ["cat"]
    assert _reasons(m) == {f"{tmp_path}/data/b.png": "unknown label 'zebra' (known: cat, dog)"}


def test_every_bad_manifest_row_is_rejected_with_its_reason(tmp_path):
    _write(tmp_path, {"data/a.png": _image(1), "secret.png": _image(2), "data/c.png": _image(3)})
    (tmp_path / "data/m.csv").write_text("uri,label\na.png,x\ngone.png,x\n../secret.png,x\nc.png,\n")
    m = ingest(str(tmp_path / "data/m.csv"), "source", str(tmp_path / "out"), CFG)
    data = tmp_path / "data"
    assert _reasons(m) == {
        f"{data}/gone.png": "missing file",
        f"{data}/../secret.png": "outside dataset root",
        f"{data}/c.png": "empty label",
    }
    rejects = storage.read_table(m.rejects_uri).to_pandas()
    assert set(rejects.domain) == {"source"} and rejects.image_id.isna().all()


def test_manifest_is_written_last_and_names_existing_files(memory_uri, monkeypatch):
    storage.write_bytes(f"{memory_uri}/data/a.png", _image(1))
    storage.write_bytes(f"{memory_uri}/data/b.png", b"")
    written: list[str] = []
    real_write = storage.write_bytes

    def recording_write(uri: str, data: bytes) -> None:
        written.append(uri)
        real_write(uri, data)

    monkeypatch.setattr(storage, "write_bytes", recording_write)
    m = ingest(f"{memory_uri}/data", "target", f"{memory_uri}/out", CFG)
    assert written[-1] == f"{memory_uri}/out/manifest.json"
    assert set(written[:-1]) == {m.index_uri, m.rejects_uri}
    assert IngestManifest.load(f"{memory_uri}/out/manifest.json") == m
    assert (m.domain, m.dataset_uri, m.n_images, m.n_rejected) == ("target", f"{memory_uri}/data", 1, 1)
    assert storage.read_table(m.index_uri).num_rows == 1 and storage.read_table(m.rejects_uri).num_rows == 1


def test_missing_dataset_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match=f"^dataset not found: {re.escape(str(tmp_path))}/nope$"):
        ingest(str(tmp_path / "nope"), "source", str(tmp_path / "out"), CFG)


def test_folder_without_files_is_an_error(tmp_path):
    _write(tmp_path / "data", {".DS_Store": b"junk"})
    with pytest.raises(DatasetError, match=f"^no images found under {re.escape(str(tmp_path))}/data$"):
        ingest(str(tmp_path / "data"), "source", str(tmp_path / "out"), CFG)


def test_all_files_rejected_is_an_error_naming_the_reasons(tmp_path):
    _write(tmp_path / "data", {"a.png": b"", "b.png": b"hello world"})
    with pytest.raises(DatasetError) as e:
        ingest(str(tmp_path / "data"), "source", str(tmp_path / "out"), CFG)
    assert str(e.value) == (
        f"no valid images under {tmp_path}/data: 2 files rejected "
        "(first reasons: a.png: empty file; b.png: not an image (unrecognised content, 11 bytes))"
    )
    assert not (tmp_path / "out/manifest.json").exists()


def test_manifest_without_uri_column_is_an_error_naming_its_columns(tmp_path):
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(
        DatasetError, match=re.escape(f"manifest {tmp_path}/m.csv has no 'uri' column (columns: path, label)")
    ):
        ingest(str(tmp_path / "m.csv"), "source", str(tmp_path / "out"), CFG)


@pytest.mark.parametrize(("name", "data"), [("m.parquet", b"not parquet"), ("m.csv", b"")])
def test_unreadable_manifest_is_an_error(tmp_path, name, data):
    (tmp_path / name).write_bytes(data)
    with pytest.raises(DatasetError, match=f"^{re.escape(f'cannot read manifest {tmp_path}/{name}: ')}"):
        ingest(str(tmp_path / name), "source", str(tmp_path / "out"), CFG)


def test_empty_folders_named_like_images_do_not_make_a_flat_folder_a_class_tree(tmp_path):
    """`x.png/` (empty) or `y.jpg/` (only a hidden file) hold nothing to ingest: the folder stays flat, every
    image is indexed, unlabeled."""
    root = tmp_path / "target"
    _write(root, {"a.png": _image(1), "b.jpg": _image(2, fmt="JPEG"), "y.jpg/.DS_Store": b"junk"})
    (root / "x.png").mkdir()
    m = ingest(str(root), "target", str(tmp_path / "out"), CFG)
    index = _index(m)
    assert sorted(index.uri) == [f"{root}/a.png", f"{root}/b.jpg"] and index.label.isna().all()
    assert m.n_rejected == 0 and m.classes == []
    # a folder with files in it is a class folder, as before, and an empty one beside it changes nothing
    _write(root, {"cat/c.png": _image(3)})
    m = ingest(str(root), "target", str(tmp_path / "out2"), CFG)
    assert list(_index(m).uri) == [f"{root}/cat/c.png"] and m.classes == ["cat"]
    assert _reasons(m) == {f"{root}/a.png": "file outside class folders", f"{root}/b.jpg": "file outside class folders"}


def test_a_reason_never_quotes_the_file(tmp_path, caplog):
    """A password file given by absolute path, say: its reason says what it is not, not what it holds."""
    secret = b"root:x:0:0:root:/root:/bin/bash\nalice:$6$saltsalt$hash:1000:1000::/home/alice:/bin/sh\n"
    _write(tmp_path / "data", {"passwd": secret, "ok.png": _image(1)})
    (tmp_path / "list.csv").write_text(f"uri\n{tmp_path}/data/passwd\n{tmp_path}/data/ok.png\n")
    m = ingest(str(tmp_path / "list.csv"), "target", str(tmp_path / "out"), CFG)
    reason = _reasons(m)[f"{tmp_path}/data/passwd"]
    assert reason == f"not an image (unrecognised content, {len(secret)} bytes)"
    for piece in (b"root:x", b"x:0", b"alice", b"saltsalt", b"/bin/"):
        assert piece.decode() not in reason
        assert piece.decode() not in caplog.text  # the ingest warning names the file, never its content


def test_decoder_messages_lose_the_bytes_they_quote():
    from adaptflow.data.ingest import _describe

    assert _describe(SyntaxError("broken PNG file (chunk b'root')")) == "broken PNG file (chunk b'…')"
    assert _describe(ValueError('bad marker b"\\xff\\xd8" at 3')) == "bad marker b'…' at 3"
    assert _describe(ValueError("the tab's header 'x'")) == "the tab's header 'x'"  # a word's b stays
    assert _describe(ValueError("")) == "ValueError" and len(_describe(ValueError("x" * 500))) == 160


def test_rejections_are_logged_as_one_warning_naming_the_rejects_table(tmp_path, caplog):
    _write(tmp_path / "data", {"a.png": _image(1), "b.png": b"", "c.png": b"text"})
    m = ingest(str(tmp_path / "data"), "target", str(tmp_path / "out"), CFG)
    (warning,) = [r for r in caplog.records if r.name == "adaptflow.data.ingest"]
    assert warning.levelname == "WARNING"
    assert warning.getMessage() == (
        f"{tmp_path}/data: 2 of 3 files rejected (e.g. b.png: empty file); every reason is in {m.rejects_uri}"
    )


def test_relative_dataset_paths_are_recorded_absolute(tmp_path, monkeypatch):
    _write(tmp_path / "data", {"a.png": _image(1)})
    monkeypatch.chdir(tmp_path)
    m = ingest("data", "target", str(tmp_path / "out"), CFG)
    assert m.dataset_uri == str(tmp_path / "data") and list(_index(m).uri) == [str(tmp_path / "data" / "a.png")]


def test_an_imagefolder_source_trains_its_classes_in_its_splits(tmp_path):
    """Hugging Face's imagefolder and torchvision lay data sets out as <split>/<class>/<image>: the classes
    are the inner folders (never `train` and `test`), each image keeps its folder's split, and a split the
    layout lacks (here val) is drawn from train as it would be without split folders."""
    root = tmp_path / "hf"
    files = {f"train/{c}/{i}.png": _image(10 * k + i) for k, c in enumerate(["cat", "dog"]) for i in range(8)}
    files |= {f"test/{c}/{i}.png": _image(100 + 10 * k + i) for k, c in enumerate(["cat", "dog"]) for i in range(3)}
    files |= {"README.md": b"# a dataset card"}
    _write(root, files)
    m = ingest(str(root), "source", str(tmp_path / "out"), IngestConfig(workers=2, val_fraction=0.3, test_fraction=0.2))
    df = _index(m)
    assert m.classes == ["cat", "dog"] and len(df) == 22
    tested = df[df.uri.str.contains("/test/")]
    assert set(tested.split) == {"test"} and len(tested) == 6
    trained = df[df.uri.str.contains("/train/")]
    assert set(trained.split) <= {"train", "val"} and "val" in set(trained.split)  # no test carved: it has a folder
    assert _reasons(m) == {f"{root}/README.md": "file outside split folders"}
    capital = tmp_path / "caps"  # names are matched case-insensitively, "validation" is val
    _write(capital, {"Train/a/1.png": _image(1), "Train/b/2.png": _image(2), "Validation/a/3.png": _image(3)})
    df = _index(ingest(str(capital), "source", str(tmp_path / "out2"), CFG))
    assert dict(zip(df.uri.str.rsplit("/", n=1).str[-1], df.split, strict=True))["3.png"] == "val"
    assert set(df.label) == {"a", "b"}


def test_a_flat_target_in_split_folders_is_unlabeled_and_mixed_layouts_are_refused(tmp_path):
    flat = tmp_path / "flat"
    _write(flat, {"train/1.png": _image(1), "test/2.png": _image(2)})
    df = _index(ingest(str(flat), "target", str(tmp_path / "o1"), CFG))
    assert df.label.isna().all() and set(df.split) <= {"train", "val", "test"} and len(df) == 2
    mixed = tmp_path / "mixed"
    _write(mixed, {"train/cat/1.png": _image(1), "dogs/2.png": _image(2)})
    with pytest.raises(DatasetError, match=r"mixes split folders \(train\) with other folders \(dogs\)"):
        ingest(str(mixed), "source", str(tmp_path / "o2"), CFG)
    half = tmp_path / "half"
    _write(half, {"train/cat/1.png": _image(1), "test/2.png": _image(2)})
    with pytest.raises(DatasetError, match="some split folders hold class folders and others loose images"):
        ingest(str(half), "source", str(tmp_path / "o3"), CFG)
    nested = tmp_path / "nested"
    _write(nested, {"train/test/cat/1.png": _image(1)})
    with pytest.raises(DatasetError, match="holds split folders of its own"):
        ingest(str(nested), "source", str(tmp_path / "o4"), CFG)


def test_a_named_pipe_is_a_reject_not_a_hang(tmp_path):
    """Reading a FIFO blocks until a writer comes: ingest must never open one (issue 23: `pipe.png` hung it)."""
    import os

    root = tmp_path / "flat"
    _write(root, {"a.png": _image(1), "b.png": _image(2)})
    os.mkfifo(root / "pipe.png")
    m = ingest(str(root), "target", str(tmp_path / "out"), CFG)
    assert m.n_images == 2
    assert _reasons(m) == {f"{root}/pipe.png": "not a regular file (a named pipe, socket or device)"}
    tree = tmp_path / "tree"
    _write(tree, {"cat/a.png": _image(3), "dog/b.png": _image(4)})
    os.mkfifo(tree / "dog" / "pipe.png")
    assert _reasons(ingest(str(tree), "source", str(tmp_path / "out2"), CFG)) == {
        f"{tree}/dog/pipe.png": "not a regular file (a named pipe, socket or device)"
    }


def test_a_folder_that_cannot_be_read_is_a_reject_not_a_vanished_class(tmp_path, monkeypatch):
    """A class folder the process may not list used to disappear: the source lost a class, the report said
    "0 rejected" and the smaller model was promoted (issue 23). (Tests run as root, whom permissions do
    not stop: the listing is made to fail as it does for another user.)"""
    from fsspec.implementations.local import LocalFileSystem

    root = tmp_path / "data"
    _write(
        root, {"cat/a.png": _image(1), "dog/b.png": _image(2), "bird/c.png": _image(3), "bird/deep/d.png": _image(4)}
    )
    _write(tmp_path / "flat", {"x.png": _image(5), "locked/y.png": _image(6)})
    listing = LocalFileSystem.ls

    def ls(self, path, detail=False, **kwargs):
        if str(path).rstrip("/").endswith(("/bird", "/locked")):
            raise PermissionError(13, "Permission denied", str(path))
        return listing(self, path, detail=detail, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "ls", ls)
    m = ingest(str(root), "source", str(tmp_path / "out"), CFG)
    assert m.classes == ["cat", "dog"] and m.n_rejected == 1
    assert _reasons(m) == {f"{root}/bird": "folder cannot be read (PermissionError: Permission denied)"}
    flat = ingest(str(tmp_path / "flat"), "target", str(tmp_path / "out2"), CFG)
    assert flat.n_images == 1 and list(_reasons(flat)) == [f"{tmp_path}/flat/locked"]


def test_target_labels_that_name_no_target_image_are_an_error_before_training(tmp_path):
    target = tmp_path / "target"
    _write(target, {"a.png": _image(1), "b.png": _image(2)})
    t = ingest(str(target), "target", str(tmp_path / "t"), CFG)
    other = tmp_path / "labels"
    _write(other, {"cat/x.png": _image(3), "dog/y.png": _image(4)})
    with pytest.raises(DatasetError, match="none of the 2 labelled images .* is among the target's images"):
        ingest(str(other), "target_labels", str(tmp_path / "l"), CFG, classes=["cat", "dog"], labels_for=t.index_uri)
    _write(other, {"cat/a.png": _image(1)})  # one of them is a target image (by content): fine
    ok = ingest(str(other), "target_labels", str(tmp_path / "l2"), CFG, classes=["cat", "dog"], labels_for=t.index_uri)
    assert ok.n_images == 3


def test_a_manifest_row_on_a_host_that_does_not_answer_is_a_rejected_row(tmp_path, monkeypatch):
    from adaptflow.store.storage import PATIENCE_ENV

    monkeypatch.setenv(PATIENCE_ENV, "0.2")
    _write(tmp_path, {"a.png": _image(1)})
    (tmp_path / "labels.csv").write_text("uri,label\na.png,cat\nhttp://127.0.0.1:9/gone.png,dog\n")
    m = ingest(str(tmp_path / "labels.csv"), "source", str(tmp_path / "out"), CFG)
    assert m.n_images == 1 and m.n_rejected == 1
    reason = _reasons(m)["http://127.0.0.1:9/gone.png"]
    assert reason.startswith("unreachable (store unreachable: http://127.0.0.1:9/gone.png")
