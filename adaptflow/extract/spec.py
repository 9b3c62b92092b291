"""What every backbone family provides (`BackboneSpec`), and what a built one is (`Extractor`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class Extractor:
    """A built backbone. `module` is in eval mode and shared by every caller in the process: treat it as
    read-only, and deep-copy it before training."""

    name: str
    module: nn.Module  # (N, 3, S, S) float32 normalised -> (N, dim) float32
    data_config: dict  # timm-style: input_size, interpolation, mean, std, crop_pct, crop_mode
    dim: int
    weights_sha256: str | None  # None: random init, or a backbone without weights
    fingerprint: str  # 16 hex chars naming these features: backbone, weights, transform, layer, version


@dataclass(frozen=True)
class BackboneSpec:
    """How to build one backbone offline. Subclasses are the families; the registry holds instances."""

    arch: str

    has_weights = True

    def create(self) -> nn.Module:
        """The full network with its 1000-class head, randomly initialised."""
        raise NotImplementedError

    def data_config(self, model: nn.Module) -> dict:
        """The input transform at the backbone's own size."""
        raise NotImplementedError

    def default_weights(self, name: str, download: bool = False) -> str:
        """The local path of the default weights (downloaded first where `download` allows and they are not
        found locally), or an AdaptflowError saying where it looked."""
        raise NotImplementedError

    def remap(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        """Rename a weights file's keys to the model's (most files already match); ValueError if impossible."""
        return state_dict

    def head_of(self, model: nn.Module) -> str | None:
        """The module name of the final classifier; None: there is none."""
        raise NotImplementedError

    def strip_head(self, model: nn.Module) -> nn.Module:
        """Remove the classifier in place; return the module computing pooled penultimate features."""
        raise NotImplementedError
