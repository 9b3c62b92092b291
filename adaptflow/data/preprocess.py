"""Images to model inputs, with the transform each backbone declares in its `data_config`.

Decoding uses torchvision's libjpeg-turbo/libpng path (~2.5x faster than PIL with the resize) and
falls back to PIL for everything else. Reading goes through fsspec, so the same dataset serves local
folders, `memory://` and object stores, also from DataLoader worker processes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset
from torchvision.io import ImageReadMode
from torchvision.io import decode_image as _tv_decode
from torchvision.transforms import InterpolationMode, v2

from adaptflow.errors import DatasetError
from adaptflow.store import storage

# what torchvision decodes natively: JPEG, PNG, GIF, and WebP (a RIFF file with "WEBP" at byte 8)
_TV_MAGIC = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a")


def decode_image(data: bytes) -> torch.Tensor:
    """Encoded image bytes -> (3, H, W) uint8 RGB, EXIF orientation applied. Raises DatasetError."""
    if data.startswith(_TV_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        try:
            img = _tv_decode(
                torch.frombuffer(bytearray(data), dtype=torch.uint8),
                mode=ImageReadMode.RGB,
                apply_exif_orientation=True,
            )
        except RuntimeError:
            pass  # e.g. an unusual JPEG variant libjpeg-turbo refuses: PIL may still read it
        else:
            if img.ndim == 4:  # (T, 3, H, W): an animated GIF; keep the first frame
                img = img[0]
            if img.dtype == torch.uint16:  # 16-bit PNG: keep the high byte
                img = (img.to(torch.int32) >> 8).to(torch.uint8)
            return img
    return _decode_pil(data)


def _decode_pil(data: bytes) -> torch.Tensor:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):
                # 16-bit grey: convert("RGB") would clip at 255, so scale to 8 bits by hand
                grey = (np.asarray(im).astype(np.int64).clip(0, 65535) >> 8).astype(np.uint8)
                return torch.from_numpy(grey).expand(3, *grey.shape).contiguous()
            rgb = np.asarray(im.convert("RGB"))  # palette, RGBA, LA, CMYK, BMP, TIFF, ...
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"not a readable image ({len(data)} bytes: {e})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()  # (H, W, 3) -> (3, H, W)


def geometric_transform(data_config: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """(3, H, W) uint8 -> (3, S, S) uint8: resize the short side to S / crop_pct, crop the centre S x S
    (timm's eval transform, without its float conversion). The training-image cache stores its output."""
    size = data_config["input_size"][-1]
    resize = math.floor(size / data_config["crop_pct"])
    mode = data_config.get("crop_mode", "center")
    if mode not in ("center", "squash"):
        raise ValueError(f"crop_mode {mode!r} is not supported; expected 'center' or 'squash'")
    return v2.Compose(
        [
            # "squash" resizes both sides to the same length, ignoring the aspect ratio
            v2.Resize(
                resize if mode == "center" else (resize, resize),
                interpolation=InterpolationMode(data_config["interpolation"]),
                antialias=True,
            ),
            v2.CenterCrop(size),
        ]
    )


def build_transform(data_config: dict) -> Callable[[torch.Tensor], torch.Tensor]:
    """(3, H, W) uint8 -> (3, S, S) float32, normalised: `geometric_transform`, then scale to [0, 1] and
    normalise with the backbone's mean and std."""
    return v2.Compose(
        [
            geometric_transform(data_config),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(data_config["mean"]), std=list(data_config["std"])),
        ]
    )


class Both:
    """Two transforms of one decoded image, as a tuple: extraction embeds one and caches the other."""

    def __init__(self, first: Callable[[torch.Tensor], torch.Tensor], second: Callable[[torch.Tensor], torch.Tensor]):
        self.first, self.second = first, second

    def __call__(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.first(img), self.second(img)


class ImageDataset(Dataset):
    """Item i: (transformed image (3, S, S) float32, i, bytes read), read from `uris[i]` through fsspec.

    With `transform=None` an item is the encoded file itself, (bytes (L,) uint8, i, L), for decoding
    on the GPU (`decode_on_device`)."""

    def __init__(self, uris: Sequence[str], transform: Callable[[torch.Tensor], torch.Tensor] | None):
        self.uris = list(uris)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.uris)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int]:
        uri = self.uris[i]
        try:
            data = storage.read_bytes(uri)
        except FileNotFoundError:
            raise DatasetError(f"image not found: {uri}") from None
        if self.transform is None:
            return torch.frombuffer(bytearray(data), dtype=torch.uint8), i, len(data)
        try:
            img = decode_image(data)
        except DatasetError as e:
            raise DatasetError(f"{uri}: {e}") from None
        return self.transform(img), i, len(data)


def _collate_encoded(
    items: list[tuple[torch.Tensor, int, int]],
) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    data, idx, nbytes = zip(*items, strict=True)
    return list(data), torch.tensor(idx), torch.tensor(nbytes)


def decode_on_device(
    encoded: list[torch.Tensor], transforms: Sequence[Callable[[torch.Tensor], torch.Tensor]], device: torch.device
) -> list[torch.Tensor]:
    """Encoded files -> one (B, 3, S, S) batch on `device` per transform: JPEGs decoded there in one
    batched `decode_jpeg` call (nvJPEG on CUDA), anything else decoded on the CPU; resized on the device."""
    from torchvision.io import decode_jpeg

    jpeg = [i for i, d in enumerate(encoded) if bytes(d[:3].tolist()) == _TV_MAGIC[0]]
    images: list[torch.Tensor | None] = [None] * len(encoded)
    if jpeg:
        try:
            decoded = decode_jpeg([encoded[i] for i in jpeg], mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            jpeg = []  # a JPEG variant the device decoder refuses: decode this batch on the CPU
        else:
            for i, img in zip(jpeg, decoded, strict=True):
                images[i] = img
    for i, img in enumerate(images):
        if img is None:
            images[i] = decode_image(encoded[i].numpy().tobytes()).to(device, non_blocking=True)
    return [torch.stack([t(img) for img in images]) for t in transforms]


def make_loader(
    uris: Sequence[str],
    transform: Callable[[torch.Tensor], object] | None,
    batch_size: int,
    num_workers: int,
    device: str | torch.device,
) -> DataLoader:
    """Batches (x, index (B,) int64, bytes read (B,) int64) in the order of `uris`: x is the batch of
    `transform`'s outputs (a tuple of batches for `Both`), or with `transform=None` a list of encoded
    files for `decode_on_device`."""
    workers = {}
    if num_workers > 0:
        # fork: workers inherit fsspec state (memory:// filesystems, open connections' settings);
        # each keeps 4 batches ready so the model never waits on a slow read
        workers = {"multiprocessing_context": "fork", "prefetch_factor": 4}
    return DataLoader(
        ImageDataset(uris, transform),
        batch_size=batch_size,
        collate_fn=_collate_encoded if transform is None else None,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=torch.device(device).type == "cuda",
        persistent_workers=False,
        # its own generator: iterating a loader draws a base seed, which would otherwise come from torch's
        # global generator while a candidate on another thread is seeded (adapt.seeding)
        generator=torch.Generator(),
        **workers,
    )
