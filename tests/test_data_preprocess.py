import io

import numpy as np
import pytest
import torch
from PIL import Image

from adaptflow.data.preprocess import (
    Both,
    ImageDataset,
    build_transform,
    decode_image,
    geometric_transform,
    make_loader,
)
from adaptflow.errors import DatasetError
from adaptflow.store import storage

COLOUR = (200, 100, 50)
H, W = 20, 30


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _rgb() -> Image.Image:
    return Image.new("RGB", (W, H), COLOUR)


def _grey16(value: int) -> Image.Image:
    return Image.fromarray(np.full((H, W), value, dtype=np.uint16))


# (image, format, expected pixel or None when the format is lossy or changes colours)
CASES = {
    "rgb png": (_rgb(), "PNG", COLOUR),
    "grey png": (_rgb().convert("L"), "PNG", (_rgb().convert("L").getpixel((0, 0)),) * 3),
    "palette png": (_rgb().convert("P"), "PNG", None),
    "rgba png": (_rgb().convert("RGBA"), "PNG", COLOUR),
    "grey+alpha png": (_rgb().convert("LA"), "PNG", None),
    "16-bit png": (_grey16(200 * 256 + 77), "PNG", (200, 200, 200)),  # keeps the high byte
    "16-bit tiff": (_grey16(200 * 256 + 77), "TIFF", (200, 200, 200)),  # the PIL path agrees
    "jpeg": (_rgb(), "JPEG", None),
    "grey jpeg": (_rgb().convert("L"), "JPEG", None),
    "cmyk jpeg": (_rgb().convert("CMYK"), "JPEG", None),
    "gif": (_rgb().convert("P"), "GIF", None),
    "webp": (_rgb(), "WEBP", None),
    "bmp": (_rgb(), "BMP", COLOUR),
    "tiff": (_rgb(), "TIFF", COLOUR),
}


@pytest.mark.parametrize("case", CASES)
def test_decode_any_image_to_rgb_uint8(case):
    img, fmt, pixel = CASES[case]
    out = decode_image(_encode(img, fmt))
    assert out.shape == (3, H, W) and out.dtype == torch.uint8
    if pixel is not None:
        assert out[:, 5, 5].tolist() == list(pixel)
    else:  # lossy: near the colour, or at least not blank
        assert out.float().mean() > 20


def test_decode_applies_exif_orientation():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = decode_image(_encode(_rgb(), "JPEG", exif=exif))
    assert out.shape == (3, W, H)


def test_decode_refuses_garbage():
    with pytest.raises(DatasetError, match="not a readable image"):
        decode_image(b"certainly not an image")
    with pytest.raises(DatasetError, match="not a readable image"):
        decode_image(_encode(_rgb(), "PNG")[:40])  # truncated: torchvision and PIL both fail


DATA_CONFIG = {
    "input_size": (3, 32, 32),
    "interpolation": "bicubic",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.5, 1.0),
    "crop_pct": 0.875,
    "crop_mode": "center",
}


def test_transform_resizes_crops_and_normalises():
    transform = build_transform(DATA_CONFIG)
    img = torch.full((3, 50, 80), 255, dtype=torch.uint8)
    out = transform(img)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # (1 - 0.5) / std per channel
    torch.testing.assert_close(out.mean(dim=(1, 2)), torch.tensor([2.0, 1.0, 0.5]))

    # short side to floor(32 / 0.875) = 36, then the centre 32 x 32: a centred square survives
    img = torch.zeros(3, 36, 54, dtype=torch.uint8)
    img[:, 2:34, 11:43] = 255
    out = build_transform({**DATA_CONFIG, "interpolation": "bilinear"})(img)
    assert out.shape == (3, 32, 32) and (out[0] == 2.0).all()


def test_transform_squash_and_unknown_crop_mode():
    out = build_transform({**DATA_CONFIG, "crop_mode": "squash"})(torch.zeros(3, 20, 90, dtype=torch.uint8))
    assert out.shape == (3, 32, 32)
    with pytest.raises(ValueError, match="crop_mode 'border'"):
        build_transform({**DATA_CONFIG, "crop_mode": "border"})


def _write_images(root: str, n: int) -> list[str]:
    uris = []
    for i in range(n):
        uri = storage.join(root, f"img{i}.{'png' if i % 2 else 'jpg'}")
        fmt = "PNG" if i % 2 else "JPEG"
        storage.write_bytes(uri, _encode(Image.new("RGB", (40 + i, 30), (10 * i, 0, 0)), fmt))
        uris.append(uri)
    return uris


def test_dataset_reads_through_fsspec(memory_uri):
    uris = _write_images(memory_uri, 3)
    ds = ImageDataset(uris + [storage.join(memory_uri, "missing.png")], build_transform(DATA_CONFIG))
    assert len(ds) == 4
    x, i, nbytes = ds[2]
    assert x.shape == (3, 32, 32) and i == 2 and nbytes == len(storage.read_bytes(uris[2]))
    with pytest.raises(DatasetError, match="image not found: memory://.*missing.png"):
        ds[3]
    storage.write_bytes(uris[0], b"garbage")
    with pytest.raises(DatasetError, match=r"img0\.jpg: not a readable image"):
        ds[0]


@pytest.mark.parametrize("where", ["local", "memory"])
@pytest.mark.parametrize("num_workers", [0, 1])
def test_loader_batches_in_order(where, num_workers, tmp_path, memory_uri):
    uris = _write_images(str(tmp_path) if where == "local" else memory_uri, 5)
    loader = make_loader(uris, build_transform(DATA_CONFIG), batch_size=2, num_workers=num_workers, device="cpu")
    assert not loader.pin_memory and not loader.persistent_workers
    batches = list(loader)
    assert [len(idx) for _, idx, _ in batches] == [2, 2, 1]
    assert torch.cat([idx for _, idx, _ in batches]).tolist() == [0, 1, 2, 3, 4]
    x = torch.cat([x for x, _, _ in batches])
    assert x.shape == (5, 3, 32, 32) and x.dtype == torch.float32
    # red rises with the index: (10 i / 255 - 0.5) / 0.25
    torch.testing.assert_close(x[:, 0].mean(dim=(1, 2)), (torch.arange(5) * 10 / 255 - 0.5) / 0.25, atol=0.05, rtol=0)


def test_decoding_on_the_device_matches_the_worker_path(memory_uri):
    """JPEGs go through batched `decode_jpeg` on the device, PNGs through the CPU decoder; the same
    transform follows, so both paths give the same tensors (JPEG decoders may differ by a level)."""
    from adaptflow.data.preprocess import decode_on_device

    uris = _write_images(memory_uri, 4)  # 2 JPEGs, 2 PNGs
    ((x, idx, nbytes),) = list(make_loader(uris, build_transform(DATA_CONFIG), 4, 0, "cpu"))
    ((enc, idx2, nbytes2),) = list(make_loader(uris, None, 4, 0, "cpu"))
    assert isinstance(enc, list) and enc[0].dtype == torch.uint8
    assert torch.equal(idx, idx2) and torch.equal(nbytes, nbytes2)
    y, pixels = decode_on_device(
        enc, [build_transform(DATA_CONFIG), geometric_transform(DATA_CONFIG)], torch.device("cpu")
    )
    torch.testing.assert_close(y, x, atol=0.05, rtol=0)
    assert pixels.dtype == torch.uint8 and pixels.shape == (4, 3, 32, 32)  # the cache's form of the same images


def test_both_gives_two_transforms_of_one_decode(memory_uri):
    uris = _write_images(memory_uri, 3)
    ((batch, idx, _),) = list(
        make_loader(uris, Both(build_transform(DATA_CONFIG), geometric_transform(DATA_CONFIG)), 3, 0, "cpu")
    )
    x, pixels = batch
    assert x.dtype == torch.float32 and pixels.dtype == torch.uint8 and x.shape == pixels.shape == (3, 3, 32, 32)
    # the normalised input is the cached pixels, scaled and normalised
    std = torch.tensor(DATA_CONFIG["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (pixels.float() / 255 - 0.5) / std, atol=1e-5, rtol=0)
