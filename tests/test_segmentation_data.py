"""adaptflow.data.segmentation and adaptflow.data.shapes on tiny PIL-made pairs: every layout, every reject
reason, the loaders' exactness, and the synthetic shift."""

from __future__ import annotations

import hashlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from adaptflow.data.segmentation import (
    IGNORE,
    Pair,
    list_segmentation,
    load_pair,
    load_segmentation,
    mask_png,
    resize_mask,
)
from adaptflow.data.shapes import CLASSES, make_segmentation_shift
from adaptflow.errors import DatasetError
from adaptflow.store import storage


def _png(pixels: np.ndarray, mode: str | None = None, fmt: str = "PNG") -> bytes:
    im = Image.fromarray(pixels)
    buf = io.BytesIO()
    (im.convert(mode) if mode else im).save(buf, fmt)
    return buf.getvalue()


def _image(seed: int, width: int = 8, height: int = 6) -> bytes:
    """A small random RGB PNG; another seed gives other bytes."""
    return _png(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(width: int = 8, height: int = 6, values: tuple[int, ...] = (0, 1, 2, IGNORE)) -> np.ndarray:
    """(height, width) uint8: `values` repeated over the pixels, row by row."""
    return np.resize(np.array(values, np.uint8), (height, width))


def _write(root: str, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        storage.write_bytes(storage.join(root, rel), data)


def _good(root: str) -> dict[str, bytes]:
    """Three valid pairs (one of another size) and classes.txt with a blank trailing line."""
    files = {
        "classes.txt": b"road\ncar\nsky\n\n",
        "images/b.png": _image(2),
        "masks/b.png": mask_png(_mask()),
        "images/a.png": _image(1),
        "masks/a.png": mask_png(_mask(values=(0,))),
        "images/c.png": _image(3, 5, 9),
        "masks/c.png": mask_png(_mask(5, 9, (2, 255))),
    }
    _write(root, files)
    return files


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_valid_folder_lists_every_pair(where, tmp_path, memory_uri):
    root = str(tmp_path / "data") if where == "local" else memory_uri
    files = _good(root)
    listing = list_segmentation(root)
    assert listing.classes == ["road", "car", "sky"]
    assert listing.rejects == []
    assert [p.stem for p in listing.pairs] == ["a", "b", "c"]
    c = listing.pairs[2]
    assert c == Pair(
        storage.join(root, "images/c.png"),
        storage.join(root, "masks/c.png"),
        "c",
        hashlib.sha256(files["images/c.png"]).hexdigest(),
        5,
        9,
    )


def test_every_bad_pair_is_refused_with_its_reason_and_the_good_ones_kept(tmp_path):
    root = tmp_path / "data"
    files = _good(str(root))
    rgb_mask = np.stack([_mask()] * 3, axis=-1)
    noisy = mask_png(np.random.default_rng(0).integers(0, 3, (32, 32), dtype=np.uint8))  # no run to compress
    _write(
        str(root),
        {
            "images/rgb.png": _image(10),
            "masks/rgb.png": _png(rgb_mask),
            "images/small.png": _image(11, 32, 32),
            "masks/small.png": mask_png(_mask(30, 20)),
            "images/values.png": _image(12),
            "masks/values.png": mask_png(_mask(values=(0, 7, 9, 255))),
            "images/alone.png": _image(13),
            "masks/orphan.png": mask_png(_mask()),
            "images/broken.png": _image(14, 32, 32)[:1000],  # cut inside the pixel data
            "masks/broken.png": mask_png(_mask(32, 32)),
            "images/text.png": b"not an image at all",
            "masks/text.png": mask_png(_mask()),
            "images/copy.png": files["images/a.png"],
            "masks/copy.png": mask_png(_mask()),
            "images/deep.png": _image(15),
            "masks/deep.png": _png(_mask().astype(np.uint16) * 1000, "I;16"),
            "images/cut.png": _image(16, 32, 32),
            "masks/cut.png": noisy[: len(noisy) // 2],
            "images/lossy.png": _image(17),
            "masks/lossy.png": _png(_mask(), fmt="JPEG"),
        },
    )
    listing = list_segmentation(str(root))
    assert [p.stem for p in listing.pairs] == ["a", "b", "c"]
    reasons = {u.removeprefix(str(root) + "/"): r for u, r, _ in listing.rejects}
    assert reasons.pop("masks/rgb.png").startswith("mask mode RGB: a mask must be single-channel 8-bit")
    assert reasons.pop("masks/small.png") == "mask 30x20 but image 32x32"
    assert reasons.pop("masks/values.png") == "mask values outside the 3 classes and 255: 7, 9"
    assert reasons.pop("images/alone.png") == "no mask masks/alone.png for this image"
    assert reasons.pop("masks/orphan.png") == "mask without image (no images/orphan.<ext> for it)"
    assert reasons.pop("images/broken.png").startswith("truncated or corrupt image")
    assert reasons.pop("images/text.png") == "not an image (unrecognised content, 19 bytes)"
    assert reasons.pop("images/copy.png") == f"duplicate of {root}/images/a.png"
    assert reasons.pop("masks/deep.png").startswith("mask mode I;16")
    assert reasons.pop("masks/cut.png").startswith("mask not decodable: truncated or corrupt image")
    assert reasons.pop("masks/lossy.png").startswith("mask is JPEG, not PNG")
    assert reasons == {}
    ids = {u.removeprefix(str(root) + "/"): i for u, _, i in listing.rejects}
    assert ids["images/copy.png"] == listing.pairs[0].image_id  # the duplicate carries the image's id
    assert ids["masks/values.png"] == hashlib.sha256((root / "images/values.png").read_bytes()).hexdigest()


def test_a_palette_mask_is_read_as_its_indices(tmp_path):
    root = tmp_path / "data"
    _good(str(root))
    palette = Image.fromarray(_mask(values=(0, 1, 2))).convert("P")  # indices 0, 1, 2 ...
    palette.putpalette([200, 0, 0, 0, 200, 0, 0, 0, 200] + [0] * (256 * 3 - 9))  # ... shown as colours
    buf = io.BytesIO()
    palette.save(buf, "PNG")
    _write(str(root), {"images/d.png": _image(4), "masks/d.png": buf.getvalue()})
    listing = list_segmentation(str(root))
    assert [p.stem for p in listing.pairs] == ["a", "b", "c", "d"] and listing.rejects == []
    _, y = load_pair(_image(4), buf.getvalue(), 6)
    assert set(y.unique().tolist()) == {0, 1, 2}


def test_a_csv_manifest_with_relative_paths(tmp_path):
    root = tmp_path / "data"
    _good(str(root / "files"))
    elsewhere = tmp_path / "elsewhere.png"
    elsewhere.write_bytes(_image(5))
    (tmp_path / "elsewhere_mask.png").write_bytes(mask_png(_mask()))
    (root / "classes.txt").write_text("road\ncar\nsky\n")
    (root / "list.csv").write_text(
        "uri,mask_uri\n"
        "files/images/a.png,files/masks/a.png\n"
        "./files/images/c.png,files/masks/c.png\n"
        f"{elsewhere},{tmp_path / 'elsewhere_mask.png'}\n"
        "../outside.png,files/masks/b.png\n"
        "files/images/b.png,\n"
    )
    listing = list_segmentation(str(root / "list.csv"))
    assert listing.classes == ["road", "car", "sky"]
    assert [(p.stem, p.image_uri, p.mask_uri) for p in listing.pairs] == [
        ("a", f"{root}/files/images/a.png", f"{root}/files/masks/a.png"),
        ("c", f"{root}/files/images/c.png", f"{root}/files/masks/c.png"),
        ("elsewhere", str(elsewhere), str(tmp_path / "elsewhere_mask.png")),
    ]
    assert sorted(r for _, r, _ in listing.rejects) == [
        "row 5: outside dataset root",
        "row 6: no mask_uri for this image",
    ]
    # Without masks, a manifest needs neither the mask column nor classes.txt.
    (root / "classes.txt").unlink()
    (root / "images.csv").write_text("uri\nfiles/images/a.png\nfiles/images/b.png\n")
    listing = list_segmentation(str(root / "images.csv"), masks=False)
    assert listing.classes == [] and [(p.stem, p.mask_uri) for p in listing.pairs] == [("a", None), ("b", None)]
    with pytest.raises(DatasetError, match=r"no 'mask_uri' column"):
        list_segmentation(str(root / "images.csv"))


def test_without_masks_a_flat_folder_or_images_alone(tmp_path):
    flat = tmp_path / "flat"
    _write(str(flat), {"x.png": _image(1), "y.jpg": _png(np.full((6, 8, 3), 90, np.uint8), fmt="JPEG")})
    listing = list_segmentation(str(flat), masks=False)
    assert listing.classes == [] and listing.rejects == []
    assert [(p.stem, p.mask_uri, p.width, p.height) for p in listing.pairs] == [("x", None, 8, 6), ("y", None, 8, 6)]

    nested = tmp_path / "nested"
    _write(str(nested), {"images/p.png": _image(2), "images/q.png": _image(3), "notes.txt": b"not an image"})
    listing = list_segmentation(str(nested), masks=False)
    assert [p.image_uri for p in listing.pairs] == [f"{nested}/images/p.png", f"{nested}/images/q.png"]
    assert listing.rejects == []  # notes.txt is beside images/, not in the dataset


def test_a_folder_without_the_layout_or_classes_is_an_error(tmp_path):
    with pytest.raises(DatasetError, match="dataset not found"):
        list_segmentation(str(tmp_path / "nowhere"))
    root = tmp_path / "data"
    _write(str(root), {"images/a.png": _image(1), "masks/a.png": mask_png(_mask())})
    with pytest.raises(DatasetError, match=r"no classes\.txt \(expected <root>/images/<stem>\.<ext>, <root>/masks/"):
        list_segmentation(str(root))
    _write(str(root), {"classes.txt": b"\n\n"})
    with pytest.raises(DatasetError, match="classes.txt is empty"):
        list_segmentation(str(root))
    _write(str(root), {"classes.txt": b"road\ncar\nroad\n"})
    with pytest.raises(DatasetError, match="names 'road' more than once"):
        list_segmentation(str(root))
    with pytest.raises(DatasetError, match=r"no masks/ and no classes\.txt"):
        list_segmentation(str(root / "images"))


def test_load_pair_keeps_mask_values_exact_under_resize():
    rng = np.random.default_rng(0)
    mask = rng.choice(np.array([0, 3, 5, IGNORE], np.uint8), (23, 37))
    image = _png(rng.integers(0, 256, (23, 37, 4), dtype=np.uint8))  # RGBA: converted to RGB
    for size in (8, 16, 64):
        x, y = load_pair(image, mask_png(mask), size)
        assert x.shape == (3, size, size) and x.dtype == torch.uint8
        assert y.shape == (size, size) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= {0, 3, 5, IGNORE}  # never a blend of two classes
    assert set(y.unique().tolist()) == {0, 3, 5, IGNORE}  # upscaled: every value kept, 255 too
    x, y = load_pair(_png(np.zeros((5, 5), np.uint8)), None, 4)  # a grey image, no mask
    assert x.shape == (3, 4, 4) and y is None


def test_mask_png_round_trip_and_resize_mask_is_nearest():
    mask = np.random.default_rng(1).integers(0, 256, (7, 11), dtype=np.uint8)
    with Image.open(io.BytesIO(mask_png(mask))) as im:
        assert im.format == "PNG" and im.mode == "L"
        np.testing.assert_array_equal(np.asarray(im), mask)
    with pytest.raises(ValueError, match="uint8"):
        mask_png(mask.astype(np.int64))

    small = np.array([[1, 2], [3, 255]], np.uint8)
    np.testing.assert_array_equal(resize_mask(small, 4, 2), [[1, 1, 2, 2], [3, 3, 255, 255]])  # width 4, height 2
    np.testing.assert_array_equal(resize_mask(resize_mask(small, 6, 6), 2, 2), small)
    big = np.arange(16, dtype=np.int64).reshape(4, 4)
    np.testing.assert_array_equal(resize_mask(big, 2, 2), [[5, 7], [13, 15]])  # pixel centres, dtype kept
    assert resize_mask(big, 2, 2).dtype == np.int64


def test_the_shapes_shift_lists_cleanly_and_loads(memory_uri):
    shift = make_segmentation_shift(memory_uri, per_domain=12, size=32, seed=3)
    source = list_segmentation(shift.source_uri)
    assert source.rejects == [] and len(source.pairs) == 12
    assert source.classes == CLASSES == shift.classes
    x, y = load_segmentation(source.pairs, 32)
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.uint8 and y.shape == (12, 32, 32)
    assert set(y.unique().tolist()) == {0, 1, 2, 3}  # every class appears in the source masks

    target = list_segmentation(shift.target_uri, masks=False)
    assert target.rejects == [] and target.classes == [] and len(target.pairs) == 12
    xt, yt = load_segmentation(target.pairs, 16)
    assert xt.shape == (12, 3, 16, 16) and yt is None
    masks = [storage.join(shift.target_masks_uri, f"{p.stem}.png") for p in target.pairs]
    assert all(storage.exists(m) for m in masks)

    again = make_segmentation_shift(memory_uri + "/again", per_domain=12, size=32, seed=3)
    first = list_segmentation(again.target_uri, masks=False)
    assert [p.image_id for p in first.pairs] == [p.image_id for p in target.pairs]  # deterministic for a seed
