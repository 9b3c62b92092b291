"""Histograms of oriented gradients: the classic hand-crafted baseline, as a backbone without weights."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adaptflow.extract.spec import BackboneSpec


@dataclass(frozen=True)
class HogBackbone(BackboneSpec):
    """Histograms of oriented gradients on the greyscale image: the classic hand-crafted baseline."""

    arch: str = "hog"
    image_size: int = 64
    orientations: int = 9
    pixels_per_cell: int = 8
    cells_per_block: int = 2

    has_weights = False

    def create(self) -> nn.Module:
        return _Hog(self.orientations, self.pixels_per_cell, self.cells_per_block)

    def data_config(self, model: nn.Module) -> dict:
        # mean 0, std 1: the module sees pixels in [0, 1] and needs no un-normalising
        s = self.image_size
        return {
            "input_size": (3, s, s),
            "interpolation": "bilinear",
            "mean": (0.0, 0.0, 0.0),
            "std": (1.0, 1.0, 1.0),
            "crop_pct": 1.0,
            "crop_mode": "center",
        }

    def head_of(self, model: nn.Module) -> str | None:
        return None

    def strip_head(self, model: nn.Module) -> nn.Module:
        return model


class _Hog(nn.Module):
    """(N, 3, S, S) pixels in [0, 1] -> (N, D) HOG descriptors of the greyscale image, float32."""

    _GREY = (0.2125, 0.7154, 0.0721)  # ITU-R 709 luma, as skimage.color.rgb2gray

    def __init__(self, orientations: int, pixels_per_cell: int, cells_per_block: int):
        super().__init__()
        self.orientations = orientations
        self.pixels_per_cell = pixels_per_cell
        self.cells_per_block = cells_per_block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from skimage.feature import hog

        grey = torch.einsum("nchw,c->nhw", x.detach().float().cpu(), torch.tensor(self._GREY)).numpy()
        ppc, cpb = (self.pixels_per_cell,) * 2, (self.cells_per_block,) * 2
        feats = [
            hog(
                g,
                orientations=self.orientations,
                pixels_per_cell=ppc,
                cells_per_block=cpb,
                block_norm="L2-Hys",
            )
            for g in grey
        ]
        return torch.from_numpy(np.stack(feats)).float().to(x.device)
