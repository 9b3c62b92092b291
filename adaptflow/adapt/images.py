"""End-to-end (image-mode) adaptation: the backbone trains inside the algorithm's featurizer.

Images are decoded, resized and cropped once into uint8 (N, 3, S, S) — by extraction, into the store's
training-image cache (`adaptflow.extract.image_cache`), read back in bounded memory through
`adaptflow.store.rows.ShardedRows` — so a training step costs no decoding at all. Normalisation, the random
translation used as augmentation and the backbone all run on the training device.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from adaptflow.adapt.contract import Algorithm, set_trainable
from adaptflow.adapt.train import Loop, Rows, as_rows, fit, infer, step_seed
from adaptflow.config import BackboneConfig
from adaptflow.data.preprocess import ImageDataset, geometric_transform
from adaptflow.errors import ConfigError, lookup
from adaptflow.extract.backbones import build_extractor
from adaptflow.store import accounting


def load_images(uris: Sequence[str], data_config: dict, num_workers: int = 2) -> Tensor:
    """(N, 3, S, S) uint8, row i from `uris[i]`: decoded, resized and centre-cropped by the backbone's own
    transform without its float conversion and normalisation (see ImageFeaturizer), as the training-image
    cache holds them. Decodes every file: for small sets (tests, benchmarks) and images not yet cached."""
    s = data_config["input_size"][-1]
    out = torch.empty((len(uris), 3, s, s), dtype=torch.uint8)
    if not uris:
        return out
    geometric = geometric_transform(data_config)
    workers = min(num_workers, max(len(uris) // 64, 1)) if num_workers > 0 else 0
    loader = DataLoader(
        ImageDataset(uris, geometric),
        batch_size=64,
        num_workers=workers,
        generator=torch.Generator(),  # not torch's global one (see data.preprocess.make_loader)
        **({"multiprocessing_context": "fork", "prefetch_factor": 4} if workers else {}),
    )
    for x, idx, nbytes in loader:
        out[idx] = x
        if workers:  # read in worker processes, out of sight of this thread's meters
            accounting.count(read=int(nbytes.sum()))
    return out


def normalising(data_config: dict) -> tuple[Tensor, Tensor]:
    """(scale, shift), each (1, 3, 1, 1): uint8 pixels x map to (x / 255 - mean) / std, the backbone's own
    normalisation, as one multiply-add: `torch.addcmul(shift, x.float(), scale)`."""
    mean = torch.tensor(data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(data_config["std"]).view(1, 3, 1, 1)
    return 1.0 / (255.0 * std), -mean / std


class ImageFeaturizer(nn.Module):
    """uint8 (N, 3, S, S) -> (N, D): scale to [0, 1], normalise with the backbone's mean and std, run the
    backbone. Channels-last throughout: measured ~2x faster for training on CPU, and what GPUs want."""

    def __init__(self, backbone: nn.Module, data_config: dict):
        super().__init__()
        self.backbone = backbone.to(memory_format=torch.channels_last)
        scale, shift = normalising(data_config)  # not persistent: data_config is the record
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8:
            raise TypeError(f"ImageFeaturizer takes uint8 images (N, 3, S, S), got {x.dtype}")
        x = torch.addcmul(self.shift, x.float(), self.scale)
        return self.backbone(x.contiguous(memory_format=torch.channels_last))


def image_featurizer(backbone: BackboneConfig) -> tuple[ImageFeaturizer, int, dict]:
    """(a trainable featurizer over a deep copy of the cached extractor module, its feature dim, its
    data_config). Training the copy leaves the shared extractor, and everyone's features, untouched."""
    extractor = build_extractor(backbone)
    module = copy.deepcopy(extractor.module)
    module.requires_grad_(True)
    return ImageFeaturizer(module, extractor.data_config), extractor.dim, dict(extractor.data_config)


def _blocks(module: nn.Module) -> list[nn.Module]:
    """The featurizer's blocks, first to last, for gradual unfreezing: descend through wrappers (a single
    child holding parameters), then split sequential containers into their members. EfficientNet-Lite0:
    stem conv, stem BN, 7 stages, head conv, head BN; a timm ResNet-18: conv1, bn1, 8 basic blocks."""
    has_params = [c for c in module.children() if next(c.parameters(), None) is not None]
    if len(has_params) == 1 and next(module.parameters(recurse=False), None) is None:
        return _blocks(has_params[0])
    blocks: list[nn.Module] = []
    for child in has_params:
        if isinstance(child, nn.Sequential | nn.ModuleList):
            blocks += [c for c in child.children() if next(c.parameters(), None) is not None]
        else:
            blocks.append(child)
    return blocks or [module]


class Knobs(NamedTuple):
    """What a strategy may read besides the step: see `fit_images`."""

    steps: int
    n_blocks: int
    lp_fraction: float
    unfreeze_every: int
    frozen_fraction: float


# A strategy maps (step, knobs) to what of the featurizer trains at that step: True (all), False (none: a
# linear probe of the heads), or k (the last k blocks).
Schedule = Callable[[int, Knobs], bool | int]


def _full(step: int, k: Knobs) -> bool | int:
    return True


def _partial(step: int, k: Knobs) -> bool | int:
    frozen = int(k.frozen_fraction * k.n_blocks)
    return True if frozen == 0 else k.n_blocks - frozen


def _lp_ft(step: int, k: Knobs) -> bool | int:
    return step >= int(k.lp_fraction * k.steps)


def _gradual(step: int, k: Knobs) -> bool | int:
    n = step // k.unfreeze_every
    return True if n >= k.n_blocks else n


STRATEGIES: dict[str, Schedule] = {"full": _full, "partial": _partial, "lp_ft": _lp_ft, "gradual": _gradual}


def _set_trainable(featurizer: nn.Module, blocks: nn.Module, spec: bool | int) -> None:
    if isinstance(spec, bool):
        set_trainable(featurizer, spec)
    else:
        featurizer.requires_grad_(False)  # parameters outside every block stay frozen until the end
        set_trainable(blocks, spec)


def _translate(x: Tensor, max_shift: int, generator: torch.Generator) -> Tensor:
    """Each image of (N, C, H, W) shifted by its own random (dy, dx) in [-max_shift, max_shift], edges
    replicated: one gather with clamped indices, no padding copy, any dtype. No flips: digits and text
    are not mirror-symmetric."""
    n, c, h, w = x.shape
    dy, dx = torch.randint(-max_shift, max_shift + 1, (2, n, 1), device=x.device, generator=generator)
    rows = (torch.arange(h, device=x.device) + dy).clamp_(0, h - 1)  # (N, H)
    cols = (torch.arange(w, device=x.device) + dx).clamp_(0, w - 1)  # (N, W)
    idx = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
    return x.flatten(2).gather(2, idx).view(n, c, h, w)


@dataclass(frozen=True)
class Tuning:
    """Which part of the backbone trains when, end to end, and how its batches are augmented. `strategy`
    (a key of STRATEGIES): "full", "partial" (its first `frozen_fraction` of blocks never train: no
    gradient flows through the high-resolution layers, the costliest part of a step), "lp_ft" (frozen for
    the first `lp_fraction` of the steps, then all) or "gradual" (one more block every `unfreeze_every`
    steps, by default all unfrozen halfway). With `augment`, each batch is shifted by a random translation
    drawn from (seed, step)."""

    strategy: str = "full"
    lp_fraction: float = 0.25
    unfreeze_every: int | None = None
    frozen_fraction: float = 0.5
    augment: bool = True


def fit_images(
    algorithm: Algorithm,
    source_x: Tensor | Rows,
    source_y: Tensor,
    target_x: Tensor | Rows,
    loop: Loop,
    tuning: Tuning = Tuning(),
    device: str | torch.device = "cpu",
) -> list[dict[str, float]]:
    """Run `loop`'s part of its schedule end to end on uint8 images (source_x, source_y) and unlabelled
    target_x, moving `algorithm` to `device` (see `adapt.train.fit`, whose curve it returns), the
    featurizer trained as `tuning` says. Frozen blocks keep their BatchNorm statistics."""
    strategy, lp_fraction, frozen_fraction = tuning.strategy, tuning.lp_fraction, tuning.frozen_fraction
    unfreeze_every, steps, seed = tuning.unfreeze_every, loop.steps, loop.seed
    schedule = lookup(STRATEGIES, "strategy name", strategy)
    if not 0.0 <= lp_fraction <= 1.0:
        raise ConfigError(f"lp_fraction must be in [0, 1], got {lp_fraction}")
    if not 0.0 <= frozen_fraction < 1.0:
        raise ConfigError(f"frozen_fraction must be in [0, 1), got {frozen_fraction}")
    device = torch.device(device)
    blocks = nn.Sequential(*_blocks(algorithm.featurizer))  # a view: the same modules, not copies
    n_blocks = len(blocks)
    if unfreeze_every is None:
        unfreeze_every = max(steps // (2 * n_blocks), 1)
    elif unfreeze_every < 1:
        raise ConfigError(f"unfreeze_every must be at least 1, got {unfreeze_every}")
    knobs = Knobs(steps, n_blocks, lp_fraction, unfreeze_every, frozen_fraction)
    algorithm.to(device)
    source_x, target_x = as_rows(source_x), as_rows(target_x)
    size = source_x.gather(np.zeros(1, np.int64)).shape[-1]
    shift = max(1, round(size / 16))  # 4 px at 64 px, as the demo's own jitter
    trainable: list[bool | int | None] = [None]

    def before_step(step: int) -> None:
        wanted = schedule(step, knobs)
        if wanted != trainable[0]:
            trainable[0] = wanted
            _set_trainable(algorithm.featurizer, blocks, wanted)
            algorithm.train()  # re-run after every change: frozen BatchNorm layers go to eval mode

    def prepare(x: Tensor, draw: int) -> Tensor:
        x = x.to(device, non_blocking=True)
        if tuning.augment:
            x = _translate(x, shift, torch.Generator(device=device).manual_seed(step_seed(seed, draw, 4)))
        return x

    return fit(algorithm, source_x, source_y, target_x, loop, prepare=prepare, before_step=before_step, autocast=True)


INFER_BATCH = {"cuda": 256, "cpu": 64}  # images per forward pass when inferring, by device type


def infer_images(
    algorithm: Algorithm, x_uint8: Tensor | Rows, batch_size: int | None = None, device: str | torch.device = "cpu"
) -> tuple[Tensor, Tensor]:
    """(logits (N, C), bottleneck features (N, d)) float32 on the CPU, computed in eval mode on `device`
    (where `algorithm` is moved), `batch_size` images at a time (default: `INFER_BATCH` for the device:
    on a CPU, 64 images at 48 px predicted 16% faster than 256, and a batch's activations, the peak of a
    prediction process, took 200 MB less); the training mode is restored."""
    device = torch.device(device)
    algorithm.to(device)
    batch_size = batch_size or INFER_BATCH.get(device.type, INFER_BATCH["cpu"])
    return infer(algorithm, x_uint8, batch_size, prepare=lambda x, draw: x.to(device, non_blocking=True), autocast=True)
