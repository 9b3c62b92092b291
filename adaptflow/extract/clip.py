"""CLIP image encoders as backbones, and CLIP's text encoder as a zero-shot classifier (needs
`adaptflow[clip]`, which installs open_clip).

`backbone.name: clip:ARCH/TAG` names an open_clip model and its published weights, e.g.
`clip:ViT-B-16/openai` or `clip:ViT-B-32/laion2b_s34b_b79k` (`open_clip.list_pretrained()` lists them);
`clip:ARCH` alone runs with `backbone.weights` (a file, or `random`). The features are the image
encoder's embeddings, in the space the text encoder maps prompts to, so that a `zero_shot` candidate
(`adapt.algorithms.ZeroShot`) classifies with no training: the cosine between an image's embedding and
each class's prompt embeddings (`class_embeddings`; Radford et al. 2021). Weights come from the
Hugging Face cache, as open_clip itself keeps them, or a download where `backbone.download` allows
(`extract.hub`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from adaptflow.errors import AdaptflowError, UnknownNameError
from adaptflow.extract import hub
from adaptflow.extract.spec import BackboneSpec

# The files an open_clip repository on the hub keeps its weights in (a timm repository's model.safetensors
# holds the same image tower under other names: not these)
CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# CLIP's prompt templates for a class name, averaged (a few of the 80 of Radford et al. 2021, Table 11)
TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "a blurry photo of a {}.", "a close-up photo of a {}.")


def _no_weights_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("No pretrained weights loaded")


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise AdaptflowError(
            "CLIP backbones need open_clip, which is not installed. To fix: pip install 'adaptflow[clip]'"
        ) from None
    return open_clip


@dataclass(frozen=True)
class ClipBackbone(BackboneSpec):
    """An open_clip model (`arch`), with the weights published under `tag` (None: the user names a file)."""

    tag: str | None = None

    def _pretrained(self) -> dict:
        return _open_clip().get_pretrained_cfg(self.arch, self.tag) if self.tag else {}

    def create(self) -> nn.Module:
        p = self._pretrained()  # how these weights were trained: activation, input transform
        transform = {k: p[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in p}
        root = logging.getLogger()
        root.addFilter(_no_weights_warning)  # adaptflow loads the weights itself, after this
        try:
            return _open_clip().create_model(
                self.arch,
                pretrained=None,
                force_quick_gelu=bool(p.get("quick_gelu", False)),
                force_preprocess_cfg=transform or None,
            )
        finally:
            root.removeFilter(_no_weights_warning)

    def data_config(self, model: nn.Module) -> dict:
        cfg = model.visual.preprocess_cfg
        size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
        squash = cfg.get("resize_mode") == "squash"
        return {
            "input_size": (3, size, size),
            "interpolation": cfg.get("interpolation", "bicubic"),
            "mean": cfg["mean"],
            "std": cfg["std"],
            "crop_pct": 1.0,  # open_clip resizes the shortest side to the input size, then crops its centre
            "crop_mode": "squash" if squash else "center",
        }

    def default_weights(self, name: str, download: bool = False) -> str:
        if not self.tag:
            tags = _open_clip().list_pretrained_tags_by_model(self.arch)
            raise AdaptflowError(
                f"backbone {name!r} names no weights: name them as clip:{self.arch}/TAG "
                f"(TAG one of: {', '.join(tags) or 'none published'}), or {hub.FIX}"
            )
        repo = self._pretrained().get("hf_hub", "").strip("/")
        if not repo:
            raise AdaptflowError(f"backbone {name!r}: open_clip publishes no hub copy of these weights; {hub.FIX}")
        return hub.hf_weights(repo, name, download, files=CLIP_FILES)

    def remap(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        return {k.removeprefix("module."): v for k, v in state_dict.items()}  # saved from DataParallel

    def head_of(self, model: nn.Module) -> str | None:
        return None  # no classifier: the text encoder is one (`class_embeddings`)

    def strip_head(self, model: nn.Module) -> nn.Module:
        return ImageEncoder(model)


class ImageEncoder(nn.Module):
    """CLIP's image tower and projection: (N, 3, S, S) -> (N, embed_dim), not normalised."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.visual = model.visual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)


def clip_spec(name: str) -> ClipBackbone:
    """`clip:ARCH` or `clip:ARCH/TAG`; an UnknownNameError lists what open_clip knows."""
    open_clip = _open_clip()
    arch, _, tag = name.removeprefix("clip:").partition("/")
    if arch not in open_clip.list_models():
        raise UnknownNameError("open_clip model", arch, open_clip.list_models())
    tags = open_clip.list_pretrained_tags_by_model(arch)
    if tag and tag not in tags:
        raise UnknownNameError(f"{arch} weights tag", tag, tags)
    return ClipBackbone(arch, tag or None)


@torch.inference_mode()
def class_embeddings(
    model: nn.Module, arch: str, classes: list[str], templates: tuple[str, ...] = TEMPLATES
) -> tuple[torch.Tensor, float]:
    """CLIP's zero-shot classifier for `classes` (folder names: `_` and `-` read as spaces): each class's
    prompts through the text encoder, L2-normalised and averaged, normalised again, (C, embed_dim); and
    the model's logit scale (100 for trained CLIP)."""
    tokenizer = _open_clip().get_tokenizer(arch)
    model.eval()
    rows = []
    for name in classes:
        words = name.replace("_", " ").replace("-", " ")
        text = F.normalize(model.encode_text(tokenizer([t.format(words) for t in templates])).float(), dim=1)
        rows.append(F.normalize(text.mean(0), dim=0))
    return torch.stack(rows), float(model.logit_scale.exp())
