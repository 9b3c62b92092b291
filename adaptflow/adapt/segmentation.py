"""Semantic segmentation, end to end: a backbone's multi-scale feature maps -> a light FPN decoder ->
per-pixel logits, the unsupervised domain adaptation methods built for it, and choosing among them without
target masks.

The network (`SegmentationNet`) reuses a registered timm backbone with its weights
(`extract.backbones.build_classifier`), cut after its last stage by timm's own
`prune_intermediate_layers`, and reads its four stages through `forward_intermediates` (strides 4 to 32).
The decoder is a feature pyramid (Lin et al. 2017, "Feature Pyramid Networks for Object Detection", as
the light semantic heads of Kirillov et al. 2019 use it): a 1x1 lateral per stage, a top-down sum, one
3x3 conv, a 1x1 classifier at stride 4, upsampled to the input.

Methods (`SEGMENTATION_METHODS`), one contract: `update(xs, ys, xt)` does one optimisation step on a
labelled source batch and an unlabelled target batch and returns its losses; `net` predicts.
- `source_only`: per-pixel cross-entropy on the source.
- `minent`: plus the target's mean per-pixel entropy (ADVENT's MinEnt, Vu et al. 2019).
- `advent`: a fully convolutional discriminator tells source from target *self-information maps*
  (-p log p per class and pixel), and the network learns to fool it on the target (ADVENT's AdvEnt).
- `adaptsegnet`: the same game on the softmax outputs themselves (output-space adversarial alignment,
  Tsai et al. 2018, "Learning to Adapt Structured Output Space for Semantic Segmentation").
- `cbst`: self-training after a source-only warm-up, on target pixels whose confidence is in the top
  `portion` of the pixels predicted as the same class in the batch: class-balanced thresholds, so that
  rare classes keep pseudo-labels (CBST, Zou et al. 2018); the portion grows from 0.2 to 0.5.
- `fda`: source images take the low-frequency amplitude of target images (Fourier Domain Adaptation,
  Yang & Soatto 2020, beta = `fda_beta`), plus the paper's small target entropy term.

Selection (`select_segmentation`) is `adapt.selection.select` itself, with pixels in the place of images:
source validation accuracy on a class-balanced sample of source-validation pixels, ranked within its noise
(a candidate not significantly less accurate than the best on the same pixels ties with it), ties to the
higher IM on a sample of target pixels with the source's pixel class mix as the prior, never judging a
candidate by the entropy it minimised; collapse is one class taking over the target's pixels beyond its
source share (`validators.is_collapsed` against the source's pixel mix); never clearly below the
source-only reference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.data import resolve_model_data_config
from torch import Tensor, nn

from adaptflow.adapt import priors
from adaptflow.adapt.images import normalising
from adaptflow.adapt.losses import entropy, information_maximization, warm_start_coeff
from adaptflow.adapt.selection import Candidate, Selection, select
from adaptflow.adapt.train import step_seed
from adaptflow.adapt.validators import is_collapsed
from adaptflow.config import BackboneConfig
from adaptflow.data.segmentation import IGNORE
from adaptflow.errors import ConfigError, lookup
from adaptflow.extract.backbones import build_classifier


class SegmentationNet(nn.Module):
    """uint8 (N, 3, S, S) -> (N, C, S, S) logits: normalise with the backbone's mean and std, take its four
    stages' feature maps, fuse them top-down (FPN), classify every pixel at stride 4 and upsample."""

    def __init__(self, encoder: nn.Module, data_config: dict, num_classes: int, width: int = 64):
        super().__init__()
        self.encoder = encoder.to(memory_format=torch.channels_last)  # ~2x faster training on CPU (adapt.images)
        scale, shift = normalising(data_config)  # the backbone's mean and std, as adapt.images applies them
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)
        with torch.no_grad():  # the stages' channels, read from one small forward pass
            channels = [f.shape[1] for f in self.stages(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))]
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in channels)
        self.fuse = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def stages(self, x: Tensor) -> list[Tensor]:
        if x.dtype != torch.uint8:
            raise TypeError(f"SegmentationNet takes uint8 images (N, 3, S, S), got {x.dtype}")
        x = torch.addcmul(self.shift, x.float(), self.scale).contiguous(memory_format=torch.channels_last)
        return self.encoder.forward_intermediates(x, indices=4, intermediates_only=True)

    def forward(self, x: Tensor) -> Tensor:
        feats = self.stages(x)
        y = self.lateral[-1](feats[-1])
        for lateral, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1]), strict=True):
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False) + lateral(f)
        logits = self.classifier(self.fuse(y))  # (N, C, S/4, S/4)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def segmentation_net(backbone: BackboneConfig, num_classes: int, width: int = 64) -> tuple[SegmentationNet, dict]:
    """A trainable `SegmentationNet` over `backbone` (its weights loaded, its head cut off), and the
    backbone's data_config. Needs a timm backbone with `forward_intermediates` (timm >= 1.0 models)."""
    model = build_classifier(backbone)
    if not hasattr(model, "forward_intermediates") or not hasattr(model, "prune_intermediate_layers"):
        raise ConfigError(
            f"segmentation needs a timm backbone that gives its stages' feature maps (forward_intermediates); "
            f"{backbone.name!r} does not"
        )
    model.prune_intermediate_layers(indices=4, prune_head=True, prune_norm=True)
    data_config = resolve_model_data_config(model)  # the backbone's own mean and std, as extraction's
    return SegmentationNet(model.train().requires_grad_(True), data_config, num_classes, width), data_config


def output_discriminator(num_classes: int, width: int = 64) -> nn.Module:
    """AdaptSegNet's fully convolutional discriminator, narrowed for small images: 4x4 convs of stride 2 with
    leaky ReLUs, then one logit per location (1 = source)."""
    return nn.Sequential(
        nn.Conv2d(num_classes, width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(width, 2 * width, 4, 2, 1), nn.LeakyReLU(0.2),
        nn.Conv2d(2 * width, 1, 3, 1, 1),
    )  # fmt: skip


def pixel_entropy(logits: Tensor) -> Tensor:
    """(N, H, W) entropy of each pixel's softmax over the C classes of (N, C, H, W) logits, in [0, log C]."""
    return entropy(logits)


def fourier_style(xs: Tensor, xt: Tensor, beta: float) -> Tensor:
    """FDA: each source image with the low-frequency amplitude of a target image (the centre square of
    side 2 * floor(beta * min(H, W)) + 1 of the shifted spectrum), its phase kept. uint8 in and out."""
    src, tgt = torch.fft.fft2(xs.float()), torch.fft.fft2(xt.float())
    amp, phase = src.abs(), src.angle()
    h, w = xs.shape[-2:]
    b = max(int(math.floor(beta * min(h, w))), 1)
    amp, tgt_amp = torch.fft.fftshift(amp, dim=(-2, -1)), torch.fft.fftshift(tgt.abs(), dim=(-2, -1))
    ch, cw = h // 2, w // 2
    amp[..., ch - b : ch + b + 1, cw - b : cw + b + 1] = tgt_amp[..., ch - b : ch + b + 1, cw - b : cw + b + 1]
    amp = torch.fft.ifftshift(amp, dim=(-2, -1))
    out = torch.fft.ifft2(torch.polar(amp, phase)).real
    return out.round().clamp(0, 255).to(torch.uint8)


class Method:
    """One segmentation method: the network, its optimizer, and one step (`update`)."""

    key: ClassVar[str]
    objectives: ClassVar[frozenset[str]] = frozenset()  # validators its loss optimises (never judge it)
    defaults: ClassVar[dict[str, float]] = {}

    def __init__(self, net: SegmentationNet, num_classes: int, max_steps: int, hparams: dict[str, float]):
        self.net, self.num_classes, self.max_steps, self.step = net, num_classes, max_steps, 0
        self.hp = {"lr": 1e-3, "backbone_lr_mult": 0.1, "weight_decay": 1e-4, **self.defaults, **hparams}
        encoder = list(net.encoder.parameters())
        ids = {id(p) for p in encoder}
        head = [p for p in net.parameters() if id(p) not in ids]
        self.optimizer = torch.optim.AdamW(
            [{"params": encoder, "lr": self.hp["lr"] * self.hp["backbone_lr_mult"]}, {"params": head}],
            lr=self.hp["lr"],
            weight_decay=self.hp["weight_decay"],
        )

    def source_loss(self, xs: Tensor, ys: Tensor) -> tuple[Tensor, Tensor]:
        logits = self.net(xs)
        return F.cross_entropy(logits, ys, ignore_index=IGNORE), logits

    def update(self, xs: Tensor, ys: Tensor, xt: Tensor) -> dict[str, float]:
        self.net.train()
        loss, parts = self.loss(xs, ys, xt)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.after_step()
        self.step += 1
        return {"loss": float(loss.detach()), **parts}

    def loss(self, xs: Tensor, ys: Tensor, xt: Tensor) -> tuple[Tensor, dict[str, float]]:
        ce, _ = self.source_loss(xs, ys)
        return ce, {"cls_loss": float(ce.detach())}

    def after_step(self) -> None:
        """What a method does once the network has stepped (the adversarial ones train their discriminator)."""


class SourceOnly(Method):
    key = "source_only"


class MinEnt(Method):
    key = "minent"
    objectives = frozenset({"im"})
    defaults = {"ent_weight": 0.05}

    def loss(self, xs, ys, xt):
        ce, _ = self.source_loss(xs, ys)
        ent = pixel_entropy(self.net(xt)).mean() / math.log(self.num_classes)
        return ce + self.hp["ent_weight"] * ent, {"cls_loss": float(ce.detach()), "transfer_loss": float(ent.detach())}


class OutputAdversarial(Method):
    """The network fools a discriminator of its target outputs (`space`); the discriminator learns from
    both domains' outputs, detached, with its own Adam (AdaptSegNet's betas 0.9, 0.99)."""

    space: ClassVar[str]
    defaults = {"adv_weight": 0.01, "disc_lr": 1e-4}

    def __init__(self, net, num_classes, max_steps, hparams):
        super().__init__(net, num_classes, max_steps, hparams)
        self.disc = output_discriminator(num_classes)
        self.disc_optimizer = torch.optim.Adam(self.disc.parameters(), lr=self.hp["disc_lr"], betas=(0.9, 0.99))

    def view(self, logits: Tensor) -> Tensor:
        p = F.softmax(logits, dim=1)
        if self.space == "softmax":
            return p
        return -p * F.log_softmax(logits, dim=1) / math.log(self.num_classes)  # self-information, ADVENT's

    def loss(self, xs, ys, xt):
        ce, src_logits = self.source_loss(xs, ys)
        tgt_out = self.view(self.net(xt))
        self.disc.requires_grad_(False)  # the network's step: target outputs should read as source (1)
        fool = F.binary_cross_entropy_with_logits(d := self.disc(tgt_out), torch.ones_like(d))
        self.disc.requires_grad_(True)
        self.outputs = (self.view(src_logits).detach(), tgt_out.detach())  # for after_step
        coeff = warm_start_coeff(self.step, self.max_steps)
        parts = {"cls_loss": float(ce.detach()), "transfer_loss": float(fool.detach())}
        return ce + coeff * self.hp["adv_weight"] * fool, parts

    def after_step(self) -> None:
        src, tgt = self.outputs
        ds, dt = self.disc(src), self.disc(tgt)
        loss = F.binary_cross_entropy_with_logits(ds, torch.ones_like(ds))
        loss = loss + F.binary_cross_entropy_with_logits(dt, torch.zeros_like(dt))
        self.disc_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_optimizer.step()


class AdvEnt(OutputAdversarial):
    key = "advent"
    space = "self_information"


class AdaptSegNet(OutputAdversarial):
    key = "adaptsegnet"
    space = "softmax"


class CBST(Method):
    key = "cbst"
    objectives = frozenset({"im"})  # training on its own confident predictions rewards confidence
    defaults = {"st_weight": 1.0, "warmup": 0.3, "portion_start": 0.2, "portion_end": 0.5}

    def loss(self, xs, ys, xt):
        ce, _ = self.source_loss(xs, ys)
        progress = self.step / max(self.max_steps, 1)
        if progress < self.hp["warmup"]:
            return ce, {"cls_loss": float(ce.detach())}
        frac = (progress - self.hp["warmup"]) / max(1.0 - self.hp["warmup"], 1e-6)
        portion = self.hp["portion_start"] + frac * (self.hp["portion_end"] - self.hp["portion_start"])
        logits = self.net(xt)
        pseudo = class_balanced_pseudo_labels(logits.detach(), portion)
        st = F.cross_entropy(logits, pseudo, ignore_index=IGNORE) if (pseudo != IGNORE).any() else logits.sum() * 0
        return ce + self.hp["st_weight"] * st, {"cls_loss": float(ce.detach()), "transfer_loss": float(st.detach())}


def class_balanced_pseudo_labels(logits: Tensor, portion: float) -> Tensor:
    """(N, H, W) int64: each pixel's predicted class where its confidence is within the top `portion` of the
    pixels predicted as that class (a threshold per class, CBST's class balance), IGNORE elsewhere."""
    conf, pred = F.softmax(logits, dim=1).max(1)
    out = torch.full_like(pred, IGNORE)
    for c in pred.unique().tolist():
        sel = pred == c
        threshold = torch.quantile(conf[sel].float(), 1.0 - portion)
        out[sel & (conf >= threshold)] = c
    return out


class FDA(Method):
    key = "fda"
    objectives = frozenset({"im"})
    defaults = {"fda_beta": 0.04, "ent_weight": 0.005}

    def loss(self, xs, ys, xt):
        ce, _ = self.source_loss(fourier_style(xs, xt[torch.arange(len(xs)) % len(xt)], self.hp["fda_beta"]), ys)
        ent = pixel_entropy(self.net(xt)).mean() / math.log(self.num_classes)
        return ce + self.hp["ent_weight"] * ent, {"cls_loss": float(ce.detach()), "transfer_loss": float(ent.detach())}


SEGMENTATION_METHODS: dict[str, type[Method]] = {m.key: m for m in (SourceOnly, MinEnt, AdvEnt, AdaptSegNet, CBST, FDA)}


def get_segmentation_method(name: str) -> type[Method]:
    return lookup(SEGMENTATION_METHODS, "segmentation method", name)


class Trained(NamedTuple):
    name: str
    net: SegmentationNet
    curve: list[dict[str, float]]


def fit_segmentation(
    method: str,
    net: SegmentationNet,
    source: tuple[Tensor, Tensor],
    target: Tensor,
    steps: int,
    batch_size: int = 16,
    seed: int = 0,
    hparams: dict[str, float] | None = None,
) -> Trained:
    """Train a deep copy of `net` with `method` for `steps` steps on source (uint8 (N,3,S,S), int64 (N,S,S))
    and target (uint8 (M,3,S,S)) batches drawn with replacement, flipped left-right at random (image and
    mask together). Deterministic for a seed on one machine."""
    torch.manual_seed(seed)  # the decoder's and the discriminator's initialisation
    net = copy.deepcopy(net)
    algo = get_segmentation_method(method)(net, net.classifier.out_channels, steps, hparams or {})
    xs_all, ys_all = source
    curve = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step_seed(seed, step))
        i = torch.randint(len(xs_all), (batch_size,), generator=g)
        j = torch.randint(len(target), (batch_size,), generator=g)
        xs, ys, xt = xs_all[i], ys_all[i], target[j]
        flip = torch.rand(batch_size, generator=g) < 0.5
        xs, ys = torch.where(flip.view(-1, 1, 1, 1), xs.flip(-1), xs), torch.where(flip.view(-1, 1, 1), ys.flip(-1), ys)
        stats = algo.update(xs, ys, xt)
        if (step + 1) % max(steps // 10, 1) == 0 or step + 1 == steps:
            curve.append({"step": step + 1, **stats})
    return Trained(method, net.eval(), curve)


@torch.no_grad()
def predict_logits(net: SegmentationNet, x: Tensor, batch_size: int = 64) -> Tensor:
    """(N, C, S, S) float logits of uint8 (N, 3, S, S) images, in eval mode."""
    net.eval()
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]) if len(x) else x.new_zeros(0)


def confusion(pred: Tensor, target: Tensor, num_classes: int) -> np.ndarray:
    """(C, C) int64 pixel counts, rows = true class, columns = predicted; pixels marked IGNORE left out."""
    keep = target != IGNORE
    idx = target[keep].long() * num_classes + pred[keep].long()
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes).numpy()


def iou(cm: np.ndarray) -> np.ndarray:
    """(C,) intersection over union per class from a confusion matrix; NaN for a class absent from both the
    truth and the predictions (left out of the mean, as in the Cityscapes and VOC scripts)."""
    tp = np.diag(cm).astype(float)
    union = cm.sum(0) + cm.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(cm: np.ndarray) -> float:
    values = iou(cm)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def pixel_accuracy(cm: np.ndarray) -> float:
    total = cm.sum()
    return float(np.trace(cm) / total) if total else float("nan")


def pixel_mix(masks: Tensor, num_classes: int) -> list[float]:
    """The share of each class among the labelled pixels of (N, H, W) masks."""
    counts = torch.bincount(masks[masks != IGNORE].long(), minlength=num_classes).double()
    return (counts / counts.sum().clamp_min(1)).tolist()


def balanced_pixels(masks: Tensor, per_class: int, seed: int = 0) -> Tensor:
    """(K,) flat indices into (N, H, W) masks: up to `per_class` labelled pixels of each class, drawn at
    random (a fixed sample, the same for every candidate)."""
    flat = masks.reshape(-1)
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in flat[flat != IGNORE].unique().tolist():
        where = (flat == c).nonzero().squeeze(1)
        picks.append(where[torch.randperm(len(where), generator=g)[:per_class]])
    return torch.cat(picks) if picks else torch.zeros(0, dtype=torch.long)


def judge(
    trained: Trained, val: tuple[Tensor, Tensor], target: Tensor, source_mix: Sequence[float], seed: int = 0
) -> Candidate:
    """What selection knows of one trained candidate (see the module docstring)."""
    xv, yv = val
    c = trained.net.classifier.out_channels
    val_logits, tgt_logits = predict_logits(trained.net, xv), predict_logits(trained.net, target)
    picked = balanced_pixels(yv, per_class=2000, seed=seed)
    val_correct = (val_logits.argmax(1).reshape(-1)[picked] == yv.reshape(-1)[picked]).numpy()
    flat = tgt_logits.permute(0, 2, 3, 1).reshape(-1, c)  # (M*S*S, C)
    sample = flat[torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed))[:20000]]
    prior = torch.tensor(source_mix, dtype=sample.dtype)
    shares = list(source_mix)  # collapse is judged against the source's pixel mix, known exactly
    mix = priors.Estimate(shares, shares, shares, shares, "source pixels", 1.0, len(sample))
    algo = get_segmentation_method(trained.name)
    im = -float(information_maximization(sample, prior=prior))
    return Candidate(
        name=trained.name,
        scores={"source_val_acc": float(val_correct.mean()), "im": im},
        collapsed=is_collapsed(sample, c, mix),
        objectives=algo.objectives,
        source_only=algo is SourceOnly,
        val_correct=val_correct,
    )


def select_segmentation(candidates: Sequence[Candidate]) -> Selection:
    """`adapt.selection.select` over segmentation candidates (`judge`): source-validation pixel accuracy
    within its noise, ties to IM on the target's pixels."""
    return select(candidates, ["source_val_acc"], tie_break="im")
